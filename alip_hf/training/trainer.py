"""One training run as the list of its steps: accelerator -> lock the output directory -> check the eval data
-> model + processor -> data -> optimizer + schedule -> `accelerator.prepare` -> resume (identity checked) ->
loop -> save -> final evaluation -> model card."""

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
from alip_hf.training.checkpoints import (
    _checkpoints,
    _run_id,
    checkpoint_dir,
    load_checkpoint,
    load_data_state,
    read_state,
    resolve_checkpoint,
)
from alip_hf.training.data import build_train_data, check_text_context
from alip_hf.training.loop import train_loop
from alip_hf.training.optim import build_optimizer, warmup_steps_for
from alip_hf.training.outputs import (
    ARGS_FILE,
    check_eval_data,
    evaluate,
    final_model,
    push_to_hub,
    save_outputs,
    write_model_card,
)
from alip_hf.training.run import (
    OutputDirLock,
    apply_optimizer_changes,
    check_resume,
    new_run_record,
    run_identity,
)
from alip_hf.training.sample_weights import SampleWeightLog, clear_sample_weights
from alip_hf.training.tracking import METRICS_FILE, JSONLinesTracker, tracker_config

logger = logging.getLogger("train")


def run_training(model_args: ModelArguments, data_args: DataArguments, train_args: TrainArguments,
                 recipe_args: recipes.RecipeArguments) -> dict[str, float]:
    """Trains, saves, evaluates; returns the metrics of the last step (with the evaluation results)."""
    # main() may run several times in one interpreter (notebooks, tests); the precision of an earlier run must
    # not stick. The process group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        mixed_precision=train_args.mixed_precision, project_dir=train_args.output_dir,
        log_with=[*train_args.report_to, JSONLinesTracker(Path(train_args.output_dir) / METRICS_FILE)])
    lock = OutputDirLock(train_args.output_dir)
    _on_main(accelerator, lambda: lock.acquire() and None)  # before anything is written to output_dir
    try:
        return _train(accelerator, model_args, data_args, train_args, recipe_args)
    finally:
        lock.release()


def _on_main(accelerator: Accelerator, fn):
    """Runs `fn` on the main process and returns its result on every process; an error there is raised on
    every process (the others would otherwise wait for it at the next barrier)."""
    if accelerator.num_processes == 1:
        return fn()
    from accelerate.utils import broadcast_object_list

    payload = [None, None]
    if accelerator.is_main_process:
        try:
            payload[0] = fn()
        except Exception as error:
            payload[1] = error
    broadcast_object_list(payload)
    if payload[1] is not None:
        raise payload[1]
    return payload[0]


def _train(accelerator: Accelerator, model_args: ModelArguments, data_args: DataArguments,
           train_args: TrainArguments, recipe_args: recipes.RecipeArguments) -> dict[str, float]:
    groups = (model_args, data_args, train_args, recipe_args)
    output_dir = Path(train_args.output_dir)
    set_seed(train_args.seed)
    recipe = recipes.get_recipe(recipe_args)
    if train_args.push_to_hub:  # a missing token fails now, not after the training
        resolve_token(train_args.hub_token)
    _on_main(accelerator, lambda: check_eval_data(data_args))  # a mistyped path fails now, not after training

    model = build_model(model_args, seed=train_args.seed, loss_config=recipe.model_config())
    processor = build_processor(model_args, core_model(model, accelerator))
    check_text_context(data_args, core_model(model, accelerator))

    resume_path = resolve_checkpoint(train_args.resume_from_checkpoint, train_args.output_dir)
    resumed = read_state(resume_path) if resume_path else None
    _on_main(accelerator, lambda: _claim_output_dir(train_args, resumed))
    start_step = resumed["global_step"] if resumed else 0
    if start_step == 0 and accelerator.is_main_process:  # a fresh run does not append to an old run's log
        (output_dir / METRICS_FILE).unlink(missing_ok=True)
    data_state = load_data_state(resume_path, accelerator.process_index, accelerator.num_processes)
    train_data = build_train_data(data_args, train_args, recipe, processor, accelerator, start_step,
                                  cache_dir=model_args.cache_dir, data_state=data_state)
    max_steps = train_data.max_steps

    optimizer, scheduler = build_optimizer(model, train_args, max_steps)
    # The scheduler is not prepared: Accelerate would step it once per process, changing the schedule with
    # the number of processes. Checkpoints hold it as JSON (not `register_for_checkpointing`, which pickles).
    model, optimizer = accelerator.prepare(model, optimizer)
    identity = run_identity(model_args, data_args, train_args, recipe_args,
                            model_config=core_model(model, accelerator).config,
                            num_processes=accelerator.num_processes, train_rows=train_data.num_rows,
                            max_steps=max_steps, warmup_steps=warmup_steps_for(train_args, max_steps))
    counters = {"skipped_images": train_data.skipped["skipped_images"],
                "skipped_texts": train_data.skipped["skipped_texts"], "truncated_texts": 0, "nonfinite_steps": 0}
    if resume_path is not None:
        run = _resume(accelerator, resume_path, resumed, identity, train_args, optimizer, scheduler, start_step)
        counters.update({k: v for k, v in resumed.items() if k in counters})
    else:
        run = _on_main(accelerator, lambda: new_run_record(identity))  # one run id for every process
    if accelerator.is_main_process:
        save_args(groups, output_dir / ARGS_FILE, model_config=core_model(model, accelerator).config.to_diff_dict(),
                  extra={"run_id": run["run_id"], "resume_changes": run["changes"]})
    global_batch = identity["global_batch_size"]
    logger.info("%s with %d process(es), global batch %d, %d steps", accelerator.distributed_type,
                accelerator.num_processes, global_batch, max_steps)
    accelerator.init_trackers("train", config=tracker_config(groups))

    sample_log = build_sample_log(recipe, train_data, train_args, accelerator, start_step)
    metrics, finished = train_loop(
        model, optimizer, scheduler, recipe, train_data, accelerator, train_args, start_step, counters,
        run_eval=lambda: evaluate(core_model(model, accelerator), processor, data_args, accelerator),
        checkpoint_state=lambda: {**counters, "run": run}, sample_log=sample_log)
    if sample_log is not None:
        sample_log.save()
    if counters["nonfinite_steps"]:
        logger.warning("%d of %d steps were skipped for a non-finite loss or gradient",
                       counters["nonfinite_steps"], max_steps)
    if not finished:  # --stop_after_steps: leave the run as a kill would, resumable from its checkpoints
        accelerator.end_training()
        return metrics

    # The model is saved before the final evaluation: an evaluation that fails loses no training.
    trained = final_model(accelerator, model)
    if accelerator.is_main_process:
        save_outputs(trained, processor, train_args.output_dir, {})
    accelerator.wait_for_everyone()
    results = evaluate(trained, processor, data_args, accelerator)
    if results:
        accelerator.log(results, step=max_steps)
        metrics.update(results)
    if accelerator.is_main_process:
        if results:
            print(json.dumps(results, indent=1))
            write_model_card(train_args.output_dir, results)
        if train_args.push_to_hub:
            push_to_hub(train_args.output_dir, train_args.hub_model_id, train_args.hub_options())
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


def build_sample_log(recipe, train_data, train_args: TrainArguments, accelerator: Accelerator,
                     start_step: int) -> SampleWeightLog | None:
    """The `--log_sample_weights` recorder, or None when the flag is off."""
    if not train_args.log_sample_weights:
        return None
    if type(recipe).sample_values is recipes.Recipe.sample_values:
        raise ValueError(f"--log_sample_weights: --recipe {recipe.name} has no per-sample gate values to log")
    if start_step == 0 and accelerator.is_main_process:
        clear_sample_weights(train_args.output_dir)
    batches_per_epoch = None
    if train_data.num_rows is not None:
        batches_per_epoch = train_data.num_rows // (train_args.per_device_train_batch_size * accelerator.num_processes)
    return SampleWeightLog(recipe, train_args.output_dir, train_data.max_steps, train_args.gradient_accumulation_steps,
                           batches_per_epoch, train_args.log_sample_weights_steps, accelerator.process_index,
                           accelerator.num_processes)


def _claim_output_dir(train_args: TrainArguments, resumed: dict | None):
    """Refuses to mix two runs' checkpoints in one output_dir: a fresh run (or a resume of another run) in a
    directory holding checkpoints of a run it does not continue, unless `--overwrite_output_dir` (which
    deletes them)."""
    run_id = (resumed or {}).get("run", {}).get("run_id")
    others = [p for p in _checkpoints(train_args.output_dir) if resumed is None or _run_id(p) != run_id]
    if not others:
        return
    if not train_args.overwrite_output_dir:
        if resumed is None and train_args.resume_from_checkpoint == "latest":
            raise FileExistsError(
                f"--resume_from_checkpoint latest: none of the checkpoints in {checkpoint_dir(train_args.output_dir)} "
                f"({', '.join(p.name for p in others)}) is complete (see the warnings); name one with "
                "--resume_from_checkpoint, or pass --overwrite_output_dir to start afresh")
        what = "a fresh run" if resumed is None else f"resuming run {run_id}"
        raise FileExistsError(
            f"{checkpoint_dir(train_args.output_dir)} holds checkpoints of another run "
            f"({', '.join(p.name for p in others)}) and this is {what}: pass --resume_from_checkpoint latest to "
            "continue that run, another --output_dir, or --overwrite_output_dir to delete them")
    for path in others:
        logger.warning("--overwrite_output_dir: deleting %s of another run", path)
        shutil.rmtree(path)


def _resume(accelerator, path: Path, resumed: dict, identity: dict, train_args: TrainArguments, optimizer,
            scheduler, start_step: int) -> dict:
    """Checks the checkpoint's identity against this run's, restores it, applies the allowed changes; returns
    the run record to continue."""
    unknown = sorted(set(train_args.resume_allow_changes) - set(identity))
    if unknown:
        raise ValueError(f"--resume_allow_changes {','.join(unknown)}: not run settings; they are "
                         f"{', '.join(sorted(identity))}")
    run = check_resume(resumed.get("run"), identity, train_args.resume_allow_changes, path, start_step)
    load_checkpoint(accelerator, path, scheduler)
    changed = {change["field"] for change in run["changes"][len(resumed["run"].get("changes", [])):]}
    apply_optimizer_changes(optimizer, scheduler, train_args, changed)
    logger.info("resumed run %s from %s at step %d", run["run_id"], path, start_step)
    return run
