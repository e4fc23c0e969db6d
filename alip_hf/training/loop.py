"""The training loop: one optimizer step (forward, backward, exact accumulation, update) repeated."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from alip_hf import recipes
from alip_hf.models import core_model
from alip_hf.training.checkpoints import save_checkpoint
from modeling_alip import ALIPModel

if TYPE_CHECKING:
    from alip_hf.training.arguments import TrainArguments
    from alip_hf.training.data import TrainData
    from alip_hf.training.preemption import StopSignal

logger = logging.getLogger(__name__)

LOGIT_SCALE_MAX = math.log(100)  # CLIP's clamp of the learnable temperature, kept by the official ALIP code


# ----------------------------------------------------------------------------------------------------------------
# One optimizer step
# ----------------------------------------------------------------------------------------------------------------

_NOT_MODEL_INPUTS = ("stats", "ids")


def _model_inputs(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if k not in _NOT_MODEL_INPUTS}


def forward_backward(model, core: ALIPModel, recipe: recipes.Recipe, micro_batches: list[dict],
                     accelerator: Accelerator, local_loss: bool) -> recipes.StepLoss:
    """Loss of the whole (accumulated) batch and its gradient; the recipe embeds, and forms the loss.

    With `k > 1` micro-batches this is open_clip's exact accumulation for contrastive losses: embed all `k`
    micro-batches without gradient (`recipe.embed`), compute what the recipe needs once per step on the cached
    batch (`recipe.step_state`: ALIP's gates), then re-embed each micro-batch with gradient, splice it into
    the cached batch, and back-propagate the loss of the whole batch (`recipe.loss`). The `k` backward passes
    sum to the gradient of one k-times larger batch. Deviation: the official ALIP code accumulates
    per-micro-batch losses (fewer negatives).
    """
    device = accelerator.device
    if len(micro_batches) == 1:
        with accelerator.autocast():
            embeds = recipe.embed(model, _model_inputs(micro_batches[0], device))
        result = recipe.loss(core, embeds, local_loss)
        accelerator.backward(result.loss)
        return result
    with torch.no_grad(), accelerator.autocast():
        cached = [recipe.embed(model, _model_inputs(mb, device)) for mb in micro_batches]
    with torch.no_grad():
        state = recipe.step_state(core, {name: torch.cat([c[name] for c in cached]) for name in cached[0]})
    for j, micro_batch in enumerate(micro_batches):
        sync = contextlib.nullcontext() if j == len(micro_batches) - 1 else accelerator.no_sync(model)
        with sync:
            with accelerator.autocast():
                fresh = recipe.embed(model, _model_inputs(micro_batch, device))
            spliced = {name: torch.cat([(fresh if i == j else c)[name] for i, c in enumerate(cached)])
                       for name in fresh}
            result = recipe.loss(core, spliced, local_loss, state)
            accelerator.backward(result.loss)
    # logit_scale enters every recomputed loss directly (not through the spliced rows), so each of the k
    # backward passes added the full d(loss)/d(logit_scale): keep one.
    if core.logit_scale.grad is not None:
        core.logit_scale.grad.div_(len(micro_batches))
    return result


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------

FINISHED, STOPPED, PREEMPTED = "finished", "stopped", "preempted"


@dataclass
class LoopResult:
    """How the loop ended: `FINISHED` (reached max_steps), `STOPPED` (`--stop_after_steps`) or `PREEMPTED` (a stop
    signal; `checkpoint` is the one saved for it); `metrics` are those of the last logged step."""

    metrics: dict
    end: str
    step: int
    checkpoint: Path | None = None


@dataclass
class _Clock:
    """Throughput and the fraction of time spent waiting for data, since the loop started."""

    start_step: int
    samples_per_step: int
    started: float = field(default_factory=time.perf_counter)
    data_wait: float = 0.0

    def wait_for(self, fetch):
        waited = time.perf_counter()
        value = fetch()
        self.data_wait += time.perf_counter() - waited
        return value

    def rates(self, step: int) -> tuple[float, float]:
        """(samples per second, data-wait fraction) over the steps run so far."""
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        return (step - self.start_step) * self.samples_per_step / elapsed, self.data_wait / elapsed


def train_loop(model, optimizer, scheduler, recipe, train_data: TrainData, accelerator: Accelerator,
               args: TrainArguments, start_step: int, counters: dict, run_eval, checkpoint_state,
               sample_log=None, stop_signal: StopSignal | None = None) -> LoopResult:
    """Optimizer steps `start_step + 1 .. max_steps`, each: fetch -> forward/backward -> update (or skip) -> log
    -> checkpoint -> stop?

    `run_eval()` gives the `eval/...` metrics (every `--eval_steps`, not at the last step); `checkpoint_state()`
    the JSON state saved with each checkpoint (counters and run identity). `sample_log` (a `SampleWeightLog`)
    records per-sample gate values of the steps it wants. `stop_signal` (a `StopSignal`) is asked after each
    step: once any process has received SIGTERM or SIGUSR1, the step's checkpoint is saved and the loop ends."""
    max_steps = train_data.max_steps
    core = core_model(model, accelerator)
    k = args.gradient_accumulation_steps
    # A stream starts where its loader's restored state says (see build_train_data); nothing is replayed.
    batches = iter(train_data.loader)
    clock = _Clock(start_step, args.per_device_train_batch_size * accelerator.num_processes * k)
    progress = tqdm(total=max_steps, initial=start_step, unit="step", disable=not accelerator.is_main_process)
    model.train()
    metrics, skipped_in_a_row = {}, []
    try:
        for step in range(start_step + 1, max_steps + 1):
            micro_batches = clock.wait_for(lambda: [next(batches) for _ in range(k)])
            output, stats = train_step(model, core, optimizer, recipe, micro_batches, accelerator, args, step,
                                       counters, skipped_in_a_row, sample_log)
            scheduler.step()
            for key in ("skipped_images", "skipped_texts", "truncated_texts"):
                counters[key] += stats.get(key, 0)
            metrics = _log_step(accelerator, recipe, output, stats, scheduler, core, counters, args, step, max_steps,
                                clock, progress, run_eval) or metrics
            saved = None
            if args.save_steps and step % args.save_steps == 0:
                saved = _save(accelerator, args, step, train_data, scheduler, checkpoint_state)
            if step == args.stop_after_steps:
                return LoopResult(metrics, STOPPED, step, saved)
            if step < max_steps and stop_signal is not None and stop_signal.requested(accelerator):
                saved = saved or _save(accelerator, args, step, train_data, scheduler, checkpoint_state)
                return LoopResult(metrics, PREEMPTED, step, saved)
    finally:
        progress.close()
    return LoopResult(metrics, FINISHED, max_steps)


def train_step(model, core: ALIPModel, optimizer, recipe: recipes.Recipe, micro_batches: list[dict],
               accelerator: Accelerator, args: TrainArguments, step: int, counters: dict,
               skipped_in_a_row: list[int], sample_log=None) -> tuple[recipes.StepLoss, dict[str, int]]:
    """One optimizer step on `micro_batches`: forward/backward, then the update, or under `--nonfinite skip` a
    skipped step (counted in `counters`, its step appended to `skipped_in_a_row`). Returns the step's loss and
    its data counts summed over processes.

    Raises:
        FloatingPointError: a non-finite loss or gradient under `--nonfinite stop`, or
            `--max_consecutive_nonfinite` skipped steps in a row.
    """
    # The gates update their running means inside the forward pass, before the loss is known to be finite.
    buffers = _snapshot_buffers(core) if args.nonfinite == "skip" else None
    output = forward_backward(model, core, recipe, micro_batches, accelerator, args.local_loss)
    if sample_log is not None:
        sample_log.record(step, output, micro_batches)
    stats = _sum_stats(accelerator, micro_batches)
    if _all_finite(accelerator, output.loss) and apply_update(model, core, optimizer, accelerator, args.max_grad_norm):
        skipped_in_a_row.clear()
        return output, stats
    if args.nonfinite == "stop":
        raise FloatingPointError(f"non-finite loss or gradient (loss {output.loss.item()}) at step {step}; "
                                 "lower the learning rate or pass --nonfinite skip")
    _skip_step(core, optimizer, buffers)
    counters["nonfinite_steps"] += 1
    skipped_in_a_row.append(step)
    logger.warning("step %d: non-finite loss or gradient (loss %s); step skipped", step, output.loss.item())
    if len(skipped_in_a_row) >= args.max_consecutive_nonfinite:
        raise FloatingPointError(
            f"{len(skipped_in_a_row)} steps in a row had a non-finite loss or gradient (steps {skipped_in_a_row}; "
            f"--max_consecutive_nonfinite {args.max_consecutive_nonfinite}); the run diverged: lower the learning "
            "rate")
    return output, stats


def _log_step(accelerator, recipe, output, stats, scheduler, core, counters, args: TrainArguments, step: int,
              max_steps: int, clock: _Clock, progress, run_eval) -> dict | None:
    """Updates the progress bar; every `--logging_steps`, at `--eval_steps` and at the last step, logs the step's
    metrics (with the evaluation's at `--eval_steps`) and returns them; else None."""
    rate, data_wait = clock.rates(step)
    progress.update(1)
    progress.set_postfix(loss=f"{output.loss.item():.4f}", samples_per_s=f"{rate:.1f}")
    # The final evaluation runs after the final model is saved (trainer.py): a failing evaluation loses nothing.
    evaluate_now = args.eval_steps > 0 and step % args.eval_steps == 0 and step < max_steps
    if not (evaluate_now or step == max_steps or step % args.logging_steps == 0):
        return None
    metrics = _step_metrics(accelerator, recipe, output, stats, clock.samples_per_step, scheduler, core, counters)
    metrics["train/samples_per_second"] = rate
    metrics["train/data_wait_fraction"] = data_wait
    if evaluate_now:
        metrics.update(run_eval())
    accelerator.log(metrics, step=step)
    return metrics


def _save(accelerator, args: TrainArguments, step: int, train_data: TrainData, scheduler, checkpoint_state) -> Path:
    data_state = train_data.loader.state_dict() if train_data.stateful else None
    return save_checkpoint(accelerator, args.output_dir, step, checkpoint_state(), args.save_total_limit, scheduler,
                           data_state)


def apply_update(model, core: ALIPModel, optimizer, accelerator: Accelerator, max_grad_norm: float) -> bool:
    """Clip, AdamW step, zero the gradients, clamp the temperature. Returns False, without stepping, when the
    gradient norm is not finite (a finite loss can still have an overflowing gradient)."""
    if max_grad_norm > 0:
        norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
        # The norm of all processes' gradients, so every process decides the same. Under fp16 the grad scaler
        # owns overflowing gradients (it skips the step and lowers its scale), as it must early in a run.
        if norm is not None and accelerator.scaler is None and not torch.isfinite(torch.as_tensor(norm)):
            return False
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():  # CLIP and the official ALIP code: logit_scale in [0, ln 100]
        core.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
    return True


def _snapshot_buffers(core: ALIPModel) -> dict[str, torch.Tensor]:
    """Copies of every buffer (the gates' running means, a few scalars) to restore if the step is skipped."""
    return {name: buffer.detach().clone() for name, buffer in core.named_buffers()}


def _skip_step(core: ALIPModel, optimizer, buffers: dict[str, torch.Tensor]):
    """Undoes what the skipped step's forward pass changed: the gradients and the buffers. The weights and the
    optimizer state were not touched (no optimizer step)."""
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        for name, buffer in core.named_buffers():
            buffer.copy_(buffers[name])


def _sum_stats(accelerator: Accelerator, micro_batches: list[dict]) -> dict[str, int]:
    """Per-batch counts summed over micro-batches and processes."""
    keys = sorted({key for mb in micro_batches for key in mb["stats"]})
    local = torch.tensor([sum(mb["stats"].get(key, 0) for mb in micro_batches) for key in keys],
                         dtype=torch.float64, device=accelerator.device)
    total = accelerator.reduce(local, reduction="sum") if accelerator.num_processes > 1 else local
    return {key: int(value) for key, value in zip(keys, total.tolist())}


def _all_finite(accelerator: Accelerator, loss: torch.Tensor) -> bool:
    # Every process must take the same decision; with --local_loss their losses differ.
    finite = torch.isfinite(loss.detach().float()).float().reshape(1)
    if accelerator.num_processes > 1:
        finite = accelerator.reduce(finite, reduction="sum") / accelerator.num_processes
    return bool(finite.item() == 1.0)


def _step_metrics(accelerator, recipe, output, stats, samples_per_step, scheduler, core, counters) -> dict:
    metrics = recipe.metrics(output, stats, samples_per_step)
    if accelerator.num_processes > 1:  # with --local_loss each process holds a part of the loss
        keys = sorted(metrics)
        values = accelerator.reduce(torch.tensor([metrics[k] for k in keys], device=accelerator.device), "mean")
        metrics = dict(zip(keys, values.tolist()))
    metrics.update({
        "train/lr": scheduler.get_last_lr()[0],
        "train/logit_scale": core.logit_scale.detach().exp().item(),
        "data/skipped_images": counters["skipped_images"],
        "data/skipped_texts": counters["skipped_texts"],
        "data/truncated_texts": counters["truncated_texts"],
        "train/nonfinite_steps": counters["nonfinite_steps"],
    })
    return metrics


