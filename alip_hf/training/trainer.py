"""One training run as the list of its steps: accelerator -> model + processor -> data -> optimizer + schedule
-> `accelerator.prepare` -> resume -> loop -> save."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed

from alip_hf import recipes
from alip_hf.hub import resolve_token
from alip_hf.models import build_model, build_processor, core_model
from alip_hf.training.arguments import (
    DataArguments,
    ModelArguments,
    TrainArguments,
    save_args,
)
from alip_hf.training.checkpoints import STATE_FILE, checkpoint_dir, load_checkpoint, resolve_checkpoint
from alip_hf.training.data import build_train_data, check_text_context
from alip_hf.training.loop import train_loop
from alip_hf.training.optim import build_optimizer
from alip_hf.training.outputs import (
    ARGS_FILE,
    evaluate,
    final_model,
    push_to_hub,
    save_outputs,
)
from alip_hf.training.tracking import METRICS_FILE, JSONLinesTracker, tracker_config

logger = logging.getLogger("train")


def run_training(model_args: ModelArguments, data_args: DataArguments, train_args: TrainArguments,
                 recipe_args: recipes.RecipeArguments) -> dict[str, float]:
    """Trains, evaluates and saves; returns the metrics of the last step (with the evaluation results)."""
    groups = (model_args, data_args, train_args, recipe_args)
    # main() may run several times in one interpreter (notebooks, tests); the precision of an earlier run must
    # not stick. The process group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        mixed_precision=train_args.mixed_precision, project_dir=train_args.output_dir,
        log_with=[*train_args.report_to, JSONLinesTracker(Path(train_args.output_dir) / METRICS_FILE)])
    set_seed(train_args.seed)
    recipe = recipes.get_recipe(recipe_args)
    check_output_dir(train_args, accelerator)
    if train_args.push_to_hub:  # a missing token fails now, not after the training
        resolve_token(train_args.hub_token)
    if accelerator.is_main_process:
        save_args(groups, Path(train_args.output_dir) / ARGS_FILE)

    model = build_model(model_args)
    processor = build_processor(model_args, core_model(model, accelerator))
    check_text_context(data_args, core_model(model, accelerator))

    resume_path = resolve_checkpoint(train_args.resume_from_checkpoint, train_args.output_dir)
    start_step = json.loads((resume_path / STATE_FILE).read_text())["global_step"] if resume_path else 0
    if start_step == 0 and accelerator.is_main_process:  # a fresh run does not append to an old run's log
        (Path(train_args.output_dir) / METRICS_FILE).unlink(missing_ok=True)
    train_data = build_train_data(data_args, train_args, recipe, processor, accelerator, start_step,
                                  cache_dir=model_args.cache_dir)
    max_steps = train_data.max_steps

    optimizer, scheduler = build_optimizer(model, train_args, max_steps)
    # The scheduler is not prepared: Accelerate would step it once per process, changing the schedule with
    # the number of processes. It is registered so that checkpoints hold it.
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    counters = {"skipped_images": train_data.skipped["skipped_images"],
                "skipped_texts": train_data.skipped["skipped_texts"], "truncated_texts": 0, "nonfinite_steps": 0}
    if resume_path is not None:
        counters.update({k: v for k, v in load_checkpoint(accelerator, resume_path).items() if k in counters})
        logger.info("resumed from %s at step %d", resume_path, start_step)
    global_batch = (train_args.per_device_train_batch_size * accelerator.num_processes
                    * train_args.gradient_accumulation_steps)
    logger.info("%s with %d process(es), global batch %d, %d steps", accelerator.distributed_type,
                accelerator.num_processes, global_batch, max_steps)
    accelerator.init_trackers("train", config=tracker_config(groups))

    metrics, finished = train_loop(
        model, optimizer, scheduler, recipe, train_data, accelerator, train_args, start_step, counters,
        run_eval=lambda: evaluate(core_model(model, accelerator), processor, data_args, accelerator))
    if not finished:  # --stop_after_steps: leave the run as a kill would, resumable from its checkpoints
        accelerator.end_training()
        return metrics

    model = final_model(accelerator, model)
    results = {k: v for k, v in metrics.items() if k.startswith("eval/")}
    if results and accelerator.is_main_process:
        print(json.dumps(results, indent=1))
    if accelerator.is_main_process:
        save_outputs(model, processor, train_args.output_dir, results)
        if train_args.push_to_hub:
            push_to_hub(train_args.output_dir, train_args.hub_model_id, train_args.hub_options())
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


# What a run that trained leaves in its output directory (outputs.save_outputs, checkpoints, the metrics log).
# train_args.yaml alone is not one: a run that failed before its first step (bad data, say) may be rerun.
RUN_MARKERS = (METRICS_FILE, "model.safetensors", "checkpoints")


def check_output_dir(train_args: TrainArguments, accelerator: Accelerator):
    """Refuses a fresh run in an `--output_dir` that holds an earlier run, whose checkpoints a later `latest`
    resume would pick and whose files would mix with this run's; `--overwrite_output_dir` clears them first.

    Resuming (`--resume_from_checkpoint`) continues the run that is there and is always allowed.
    """
    out = Path(train_args.output_dir)
    earlier = [name for name in RUN_MARKERS if (out / name).exists()]
    if not earlier or train_args.resume_from_checkpoint is not None:
        return
    if not train_args.overwrite_output_dir:
        raise FileExistsError(
            f"--output_dir {out} holds an earlier run ({', '.join(earlier)}); pass --overwrite_output_dir to "
            "start a new run there, --resume_from_checkpoint latest to continue it, or another --output_dir")
    if accelerator.is_main_process:
        shutil.rmtree(checkpoint_dir(str(out)), ignore_errors=True)
        (out / METRICS_FILE).unlink(missing_ok=True)
    accelerator.wait_for_everyone()
