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
    check_optimizer_steps,
    checkpoint_dir,
    load_checkpoint,
    load_data_state,
    nothing_to_resume,
    read_state,
    resolve_checkpoint,
)
from alip_hf.training.data import build_train_data, check_text_context
from alip_hf.training.loop import PREEMPTED, STOPPED, train_loop
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
from alip_hf.training.preemption import PREEMPTED_EXIT_CODE, StopSignal, TrainingPreempted
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
    """Trains, saves, evaluates; returns the metrics of the last step (with the evaluation results).

    Raises:
        TrainingPreempted: SIGTERM or SIGUSR1 arrived; the checkpoint of the step it ended is saved. A
            `SystemExit` with status `preemption.PREEMPTED_EXIT_CODE` (75).
    """
    # main() may run several times in one interpreter (notebooks, tests); the precision of an earlier run must
    # not stick. The process group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        mixed_precision=train_args.mixed_precision, project_dir=train_args.output_dir,
        log_with=[*train_args.report_to, JSONLinesTracker(Path(train_args.output_dir) / METRICS_FILE)])
    lock = OutputDirLock(train_args.output_dir)
    # From here on a stop signal is recorded, not fatal: the loop ends after the current step with a checkpoint.
    with StopSignal() as stop_signal:
        _on_main(accelerator, lambda: lock.acquire() and None)  # before anything is written to output_dir
        try:
            return _train(accelerator, model_args, data_args, train_args, recipe_args, stop_signal)
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
           train_args: TrainArguments, recipe_args: recipes.RecipeArguments,
           stop_signal: StopSignal) -> dict[str, float]:
    groups = (model_args, data_args, train_args, recipe_args)
    recipe = _check_before_work(accelerator, data_args, train_args, recipe_args)
    model = build_model(model_args, seed=train_args.seed)
    processor = build_processor(model_args, core_model(model, accelerator))
    check_text_context(data_args, core_model(model, accelerator))
    resume_path, resumed = _resume_point(accelerator, train_args)
    start_step = resumed["global_step"] if resumed else 0
    train_data = _build_data(accelerator, model_args, data_args, train_args, recipe, processor, resume_path,
                             start_step)
    optimizer, scheduler = build_optimizer(model, train_args, train_data.max_steps)
    # The scheduler is not prepared: Accelerate would step it once per process, changing the schedule with
    # the number of processes. Checkpoints hold it as JSON (not `register_for_checkpointing`, which pickles).
    model, optimizer = accelerator.prepare(model, optimizer)
    identity = run_identity(model_args, data_args, train_args, recipe_args,
                            model_config=core_model(model, accelerator).config,
                            num_processes=accelerator.num_processes, train_rows=train_data.num_rows,
                            max_steps=train_data.max_steps,
                            warmup_steps=warmup_steps_for(train_args, train_data.max_steps))
    run, counters = _start_or_resume(accelerator, resume_path, resumed, identity, train_args, train_data,
                                     optimizer, scheduler, start_step)
    _record_run(accelerator, groups, model, run, identity)

    sample_log = build_sample_log(recipe, train_data, train_args, accelerator, start_step)
    result = train_loop(
        model, optimizer, scheduler, recipe, train_data, accelerator, train_args, start_step, counters,
        run_eval=lambda: evaluate(core_model(model, accelerator), processor, data_args, accelerator),
        checkpoint_state=lambda: {**counters, "run": run}, sample_log=sample_log, stop_signal=stop_signal)
    if sample_log is not None:
        sample_log.save()
    if counters["nonfinite_steps"]:
        logger.warning("%d of %d steps were skipped for a non-finite loss or gradient",
                       counters["nonfinite_steps"], train_data.max_steps)
    if result.end == PREEMPTED:
        accelerator.end_training()
        raise _preempted(accelerator, stop_signal, result, train_data.max_steps)
    if result.end == STOPPED:  # --stop_after_steps: leave the run as a kill would, resumable from its checkpoints
        accelerator.end_training()
        return result.metrics
    if stop_signal.received:  # during the last step or after it: the final save is what is left to do
        logger.warning("received %s after the last step: saving the final model", stop_signal.received)
    return _finish(accelerator, model, processor, data_args, train_args, result.metrics, train_data.max_steps)


def _check_before_work(accelerator: Accelerator, data_args: DataArguments, train_args: TrainArguments,
                       recipe_args: recipes.RecipeArguments) -> recipes.Recipe:
    """Seeds, looks the recipe up, and checks what would otherwise fail only after training: the Hub token and
    the evaluation data."""
    set_seed(train_args.seed)
    recipe = recipes.get_recipe(recipe_args)
    if train_args.push_to_hub:
        resolve_token(train_args.hub_token)
    _on_main(accelerator, lambda: check_eval_data(data_args))  # a mistyped path fails now, not after training
    return recipe


def _resume_point(accelerator: Accelerator, train_args: TrainArguments) -> tuple[Path | None, dict | None]:
    """The checkpoint to resume (checked) and its state, or `(None, None)` for a new run; claims the output
    directory for this run (`_claim_output_dir`)."""
    resume_path = resolve_checkpoint(train_args.resume_from_checkpoint, train_args.output_dir)
    if resume_path is None and train_args.resume_from_checkpoint == "latest":
        raise nothing_to_resume(train_args.output_dir)
    resumed = read_state(resume_path) if resume_path else None
    _on_main(accelerator, lambda: _claim_output_dir(train_args, resumed))
    if resumed is None and accelerator.is_main_process:  # a new run does not append to an old run's log
        (Path(train_args.output_dir) / METRICS_FILE).unlink(missing_ok=True)
    return resume_path, resumed


def _build_data(accelerator: Accelerator, model_args: ModelArguments, data_args: DataArguments,
                train_args: TrainArguments, recipe, processor, resume_path: Path | None, start_step: int):
    """The training data, positioned at `start_step` (a stream restores its saved position)."""
    data_state = load_data_state(resume_path, accelerator.process_index, accelerator.num_processes)
    return build_train_data(data_args, train_args, recipe, processor, accelerator, start_step,
                            cache_dir=model_args.cache_dir, data_state=data_state)


def _start_or_resume(accelerator: Accelerator, resume_path: Path | None, resumed: dict | None, identity: dict,
                     train_args: TrainArguments, train_data, optimizer, scheduler,
                     start_step: int) -> tuple[dict, dict]:
    """The run record (a new one, or the checkpoint's, checked and restored) and the counters to continue."""
    counters = {"skipped_images": train_data.skipped["skipped_images"],
                "skipped_texts": train_data.skipped["skipped_texts"], "truncated_texts": 0, "nonfinite_steps": 0}
    if resume_path is None:
        return _on_main(accelerator, lambda: new_run_record(identity)), counters  # one run id for every process
    run = _resume(accelerator, resume_path, resumed, identity, train_args, optimizer, scheduler, start_step)
    counters.update({k: v for k, v in resumed.items() if k in counters})
    return run, counters


def _record_run(accelerator: Accelerator, groups, model, run: dict, identity: dict):
    """`train_args.yaml` (the used arguments, the model configuration, the run id and resume changes), the
    trackers' configuration and a log line of the setup."""
    config = core_model(model, accelerator).config
    if accelerator.is_main_process:
        save_args(groups, Path(groups[2].output_dir) / ARGS_FILE, model_config=config.to_diff_dict(),
                  extra={"run_id": run["run_id"], "resume_changes": run["changes"]})
    logger.info("%s with %d process(es), global batch %d, %d steps", accelerator.distributed_type,
                accelerator.num_processes, identity["global_batch_size"], identity["max_steps"])
    accelerator.init_trackers("train", config=tracker_config(groups))


def _preempted(accelerator: Accelerator, stop_signal: StopSignal, result, max_steps: int) -> TrainingPreempted:
    """The exit of a run stopped by a signal, its message logged on every process."""
    received = stop_signal.received or "a stop signal on another process"
    message = (f"received {received}: stopped after step {result.step} of {max_steps} with checkpoint "
               f"{result.checkpoint}; run the same command with --resume_from_checkpoint latest to continue "
               f"(exit status {PREEMPTED_EXIT_CODE})")
    logger.warning("process %d: %s", accelerator.process_index, message)
    return TrainingPreempted(message, result.checkpoint)


def _finish(accelerator: Accelerator, model, processor, data_args: DataArguments, train_args: TrainArguments,
            metrics: dict, max_steps: int) -> dict[str, float]:
    """Saves the final model, then evaluates it, writes the model card and pushes to the Hub. The model is saved
    before the final evaluation: an evaluation that fails loses no training."""
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


# What a run leaves in output_dir besides checkpoints: the final model, its log, its arguments.
_FINISHED_MODEL = ("model.safetensors", "config.json")
_RUN_RECORDS = (METRICS_FILE, ARGS_FILE)


def _claim_output_dir(train_args: TrainArguments, resumed: dict | None):
    """Refuses to train over another run in output_dir, unless `--overwrite_output_dir`: a fresh run (or a resume
    of another run) in a directory holding checkpoints of a run it does not continue (deleted with the flag), and
    a fresh run in a directory holding a trained model or the log of an earlier run (replaced with the flag), as
    transformers' `run_clip.py` refuses a non-empty output directory."""
    run_id = (resumed or {}).get("run", {}).get("run_id")
    others = [p for p in _checkpoints(train_args.output_dir) if resumed is None or _run_id(p) != run_id]
    if others and not train_args.overwrite_output_dir:
        what = "a fresh run" if resumed is None else f"resuming run {run_id}"
        raise FileExistsError(
            f"{checkpoint_dir(train_args.output_dir)} holds checkpoints of another run "
            f"({', '.join(p.name for p in others)}) and this is {what}: pass --resume_from_checkpoint latest to "
            "continue that run, another --output_dir, or --overwrite_output_dir to delete them")
    for path in others:
        logger.warning("--overwrite_output_dir: deleting %s of another run", path)
        shutil.rmtree(path)
    if resumed is None:
        _refuse_earlier_outputs(train_args)


def _refuse_earlier_outputs(train_args: TrainArguments):
    """A fresh run in a directory holding a finished run's model, or the log of an earlier run, stops naming
    `--overwrite_output_dir` and `--resume_from_checkpoint`, unless `--overwrite_output_dir` is given."""
    output_dir = Path(train_args.output_dir)
    model = [name for name in _FINISHED_MODEL if (output_dir / name).exists()]
    records = [name for name in _RUN_RECORDS if (output_dir / name).exists()]
    if not (model or records):
        return
    if train_args.overwrite_output_dir:
        logger.warning("--overwrite_output_dir: training from scratch into %s, replacing %s", output_dir,
                       ", ".join(model + records))
        return
    if model:
        held = f"already holds a trained model ({', '.join(model)})"
        resume = ("--resume_from_checkpoint latest to continue its run from its last checkpoint (a finished run "
                  "resumes at its last step and only saves and evaluates again)")
    else:
        held = f"holds the outputs of an earlier run ({', '.join(records)})"
        resume = "--resume_from_checkpoint with a checkpoint of that run to continue it"
    raise FileExistsError(
        f"Output directory ({output_dir}) {held}; training again would replace it. Pass --overwrite_output_dir "
        f"to train from scratch into it, {resume}, or choose another --output_dir")


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
    # Under fp16 the grad scaler skips updates it does not count: the optimizer's count is then only a bound.
    check_optimizer_steps(path, resumed, optimizer, exact=accelerator.scaler is None)
    changed = {change["field"] for change in run["changes"][len(resumed["run"].get("changes", [])):]}
    apply_optimizer_changes(optimizer, scheduler, train_args, changed)
    logger.info("resumed run %s from %s at step %d", run["run_id"], path, start_step)
    return run
