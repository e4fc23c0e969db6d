"""The training loop: one optimizer step (forward, backward, exact accumulation, update) repeated."""

from __future__ import annotations

import contextlib
import logging
import math
import time
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
    # The temperature (and the sigmoid loss's bias) enter every recomputed loss directly (not through the
    # spliced rows), so each of the k backward passes added the full d(loss)/d(parameter): keep one.
    for parameter in core.loss_parameters():
        if parameter.grad is not None:
            parameter.grad.div_(len(micro_batches))
    return result


def train_loop(model, optimizer, scheduler, recipe, train_data: TrainData, accelerator: Accelerator,
               args: TrainArguments, start_step: int, counters: dict, run_eval, checkpoint_state,
               sample_log=None) -> tuple[dict, bool]:
    """Optimizer steps `start_step + 1 .. max_steps`; returns the metrics of the last logged step and whether
    the run reached `max_steps` (False when stopped by `--stop_after_steps`).

    `run_eval()` gives the `eval/...` metrics (every `--eval_steps`, not at the last step); `checkpoint_state()`
    the JSON state saved with each checkpoint (counters and run identity). `sample_log` (a `SampleWeightLog`)
    records per-sample gate values of the steps it wants."""
    max_steps = train_data.max_steps
    core = core_model(model, accelerator)
    k = args.gradient_accumulation_steps
    # A stream starts where its loader's restored state says (see build_train_data); nothing is replayed.
    batches = iter(train_data.loader)
    samples_per_step = args.per_device_train_batch_size * accelerator.num_processes * k
    progress = tqdm(total=max_steps, initial=start_step, unit="step", disable=not accelerator.is_main_process)
    model.train()
    metrics, started = {}, time.perf_counter()
    data_wait = 0.0
    skipped_in_a_row: list[int] = []
    for step in range(start_step + 1, max_steps + 1):
        waited = time.perf_counter()
        micro_batches = [next(batches) for _ in range(k)]
        data_wait += time.perf_counter() - waited
        # The gates update their running means inside the forward pass, before the loss is known to be finite.
        buffers = _snapshot_buffers(core) if args.nonfinite == "skip" else None
        output = forward_backward(model, core, recipe, micro_batches, accelerator, args.local_loss)
        if sample_log is not None:
            sample_log.record(step, output, micro_batches)
        stats = _sum_stats(accelerator, micro_batches)
        updated = _all_finite(accelerator, output.loss) and apply_update(
            model, core, optimizer, accelerator, args.max_grad_norm)
        if updated:
            skipped_in_a_row = []
        elif args.nonfinite == "stop":
            raise FloatingPointError(f"non-finite loss or gradient (loss {output.loss.item()}) at step {step}; "
                                     "lower the learning rate or pass --nonfinite skip")
        else:
            _skip_step(core, optimizer, buffers)
            counters["nonfinite_steps"] += 1
            skipped_in_a_row.append(step)
            logger.warning("step %d: non-finite loss or gradient (loss %s); step skipped", step, output.loss.item())
            if len(skipped_in_a_row) >= args.max_consecutive_nonfinite:
                raise FloatingPointError(
                    f"{len(skipped_in_a_row)} steps in a row had a non-finite loss or gradient (steps "
                    f"{skipped_in_a_row}; --max_consecutive_nonfinite {args.max_consecutive_nonfinite}); the run "
                    "diverged: lower the learning rate")
        scheduler.step()
        for key in ("skipped_images", "skipped_texts", "truncated_texts"):
            counters[key] += stats.get(key, 0)
        progress.update(1)
        elapsed = time.perf_counter() - started
        rate = (step - start_step) * samples_per_step / max(elapsed, 1e-9)
        progress.set_postfix(loss=f"{output.loss.item():.4f}", samples_per_s=f"{rate:.1f}")
        # The final evaluation runs after the final model is saved (trainer.py): a failing evaluation loses nothing.
        evaluate_now = args.eval_steps > 0 and step % args.eval_steps == 0 and step < max_steps
        if evaluate_now or step == max_steps or step % args.logging_steps == 0:
            metrics = _step_metrics(accelerator, recipe, output, stats, samples_per_step, scheduler, core, counters)
            metrics["train/samples_per_second"] = rate
            metrics["train/data_wait_fraction"] = data_wait / max(elapsed, 1e-9)
            if evaluate_now:
                metrics.update(run_eval())
            accelerator.log(metrics, step=step)
        if args.save_steps and step % args.save_steps == 0:
            data_state = train_data.loader.state_dict() if train_data.stateful else None
            save_checkpoint(accelerator, args.output_dir, step, checkpoint_state(), args.save_total_limit, scheduler,
                            data_state)
        if step == args.stop_after_steps:
            progress.close()
            return metrics, False
    progress.close()
    return metrics, True


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
        **({"train/logit_bias": core.logit_bias.detach().item()} if core.config.loss == "siglip" else {}),
        "data/skipped_images": counters["skipped_images"],
        "data/skipped_texts": counters["skipped_texts"],
        "data/truncated_texts": counters["truncated_texts"],
        "train/nonfinite_steps": counters["nonfinite_steps"],
    })
    return metrics


