"""A run's identity and its output directory: what a checkpoint must match to be resumed, and one writer per
`--output_dir`.

The identity is every setting that changes what a step computes (recipe, model, data, batch, accumulation,
seed, the optimizer and its schedule), flat and JSON-serialisable, plus a `run_id` drawn when the run starts.
Resuming compares it with the checkpoint's and refuses any difference that `--resume_allow_changes` does not
name; allowed changes are applied (not only recorded) and kept in the identity's `changes` history.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from alip_hf.identity import identity_differences, sha256_json

if TYPE_CHECKING:
    from alip_hf.recipes import RecipeArguments
    from alip_hf.training.arguments import DataArguments, ModelArguments, TrainArguments

logger = logging.getLogger(__name__)

LOCK_FILE = ".train.lock"

# Arguments that do not change what a step computes (logging, saving, evaluation, where outputs go, ...).
_NOT_IDENTITY = {
    "output_dir", "logging_steps", "save_steps", "save_total_limit", "resume_from_checkpoint", "stop_after_steps",
    "eval_steps", "eval_data", "eval_split", "report_to", "nonfinite", "max_consecutive_nonfinite", "push_to_hub",
    "hub_model_id", "dataloader_num_workers", "preprocessing_num_proc", "gradient_checkpointing",
    "resume_allow_changes", "overwrite_output_dir",
    # where and how the result is pushed and cached, not what is trained (the token is never recorded)
    "hub_private_repo", "hub_revision", "hub_commit_message", "hub_create_pr", "hub_token", "license", "cache_dir",
    # resolved into max_steps / warmup_steps below
    "num_train_epochs", "warmup_ratio",
}


# ----------------------------------------------------------------------------------------------------------------
# Identity
# ----------------------------------------------------------------------------------------------------------------


def config_digest(config) -> str:
    """A short digest of a model config's values (architecture and gate hyper-parameters), without the fields
    that name where or by which version it was saved."""
    values = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k != "transformers_version"}
    for sub in ("text_config", "vision_config"):
        if isinstance(values.get(sub), dict):
            values[sub] = {k: v for k, v in values[sub].items()
                           if not k.startswith("_") and k != "transformers_version"}
    return sha256_json(values)[:16]


def run_identity(model_args: ModelArguments, data_args: DataArguments, train_args: TrainArguments,
                 recipe_args: RecipeArguments, *, model_config, num_processes: int, train_rows: int | None,
                 max_steps: int, warmup_steps: int) -> dict:
    """The identity fields of a run (flag name -> value), resolved where the flags leave a choice."""
    identity = {}
    for group in (recipe_args, model_args, data_args, train_args):
        for key, value in dataclasses.asdict(group).items():
            if key not in _NOT_IDENTITY:
                identity[key] = value
    identity.update({
        "model_config_digest": config_digest(model_config),
        "train_data": _source(data_args.train_data),
        "train_rows": train_rows,  # usable rows after validation (map-style); None for a stream
        "num_processes": num_processes,
        "global_batch_size": train_args.per_device_train_batch_size * num_processes
        * train_args.gradient_accumulation_steps,
        "max_steps": max_steps,
        "warmup_steps": warmup_steps,
    })
    return json.loads(json.dumps(identity))  # lists, not tuples: compares equal to what was read back


def _source(source: str) -> str:
    # A local path is compared as an absolute path (a resume from another working directory is the same data).
    return str(Path(source).resolve()) if os.path.exists(source) else source


def new_run_record(identity: dict) -> dict:
    return {"run_id": uuid.uuid4().hex[:12], "identity": identity, "changes": []}


def check_resume(saved_run: dict | None, identity: dict, allowed: list[str], checkpoint: Path, step: int) -> dict:
    """The run record to continue: the checkpoint's `run_id`, the current identity, and the allowed changes
    appended to its history.

    Raises:
        ValueError: the checkpoint has no identity, or fields differ that `allowed` does not name (the message
            lists each field with the checkpoint's value and the current one).
    """
    if not saved_run or "identity" not in saved_run:
        raise ValueError(f"{checkpoint}: the checkpoint records no run identity; it cannot be checked against "
                         "this run")
    differences = identity_differences(saved_run["identity"], identity)
    refused = {k: v for k, v in differences.items() if k not in allowed}
    if refused:
        listed = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in refused.items())
        raise ValueError(
            f"--resume_from_checkpoint {checkpoint} belongs to a run with other settings: {listed}. Resume with the "
            f"checkpoint's settings, or pass --resume_allow_changes {','.join(refused)} to apply the change")
    changes = [{"step": step, "checkpoint": str(checkpoint), "field": k, "checkpoint_value": a, "value": b}
               for k, (a, b) in differences.items()]
    for change in changes:
        logger.warning("resuming with %s changed from %r to %r (--resume_allow_changes)", change["field"],
                       change["checkpoint_value"], change["value"])
    return {"run_id": saved_run["run_id"], "identity": identity,
            "changes": [*saved_run.get("changes", []), *changes]}


def apply_optimizer_changes(optimizer, scheduler, train_args: TrainArguments, changed: set[str]):
    """Loading a checkpoint restores the optimizer's hyper-parameters and the scheduler's base rates as they
    were saved; re-apply the current flags for the allowed changes so that they take effect. The first group
    has weight decay, the second none (see `optim.build_optimizer`)."""
    if "learning_rate" in changed:
        scheduler.base_lrs = [train_args.learning_rate for _ in optimizer.param_groups]
        for group, lr_lambda in zip(optimizer.param_groups, scheduler.lr_lambdas):
            group["initial_lr"] = train_args.learning_rate
            group["lr"] = train_args.learning_rate * lr_lambda(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    if {"max_steps", "warmup_steps"} & changed:  # the schedule's shape is the new one: recompute this step's rate
        for group, base, lr_lambda in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * lr_lambda(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    if "weight_decay" in changed:
        optimizer.param_groups[0]["weight_decay"] = train_args.weight_decay
    if {"adam_beta1", "adam_beta2"} & changed:
        for group in optimizer.param_groups:
            group["betas"] = (train_args.adam_beta1, train_args.adam_beta2)
    if "adam_epsilon" in changed:
        for group in optimizer.param_groups:
            group["eps"] = train_args.adam_epsilon


# ----------------------------------------------------------------------------------------------------------------
# One writer per output directory
# ----------------------------------------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class OutputDirLock:
    """`output_dir/.train.lock`, created exclusively, naming the holder's pid and host.

    A lock whose holder is a dead process on this host is stale (a killed run): it is taken over with a warning.
    A live holder, or one on another host (whose pid cannot be checked from here), is an error naming it.
    """

    def __init__(self, output_dir: str | os.PathLike):
        self.path = Path(output_dir) / LOCK_FILE
        self.held = False

    def acquire(self) -> OutputDirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        for _ in range(3):  # a stale lock removed by someone else between our tries: try again
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._handle_existing()
                continue
            with os.fdopen(fd, "w") as file:
                json.dump(holder, file)
            self.held = True
            return self
        raise RuntimeError(f"{self.path}: could not take the lock")

    def _handle_existing(self):
        try:
            holder = json.loads(self.path.read_text() or "{}")
        except FileNotFoundError:
            return
        except ValueError:
            holder = {}
        pid, host = holder.get("pid"), holder.get("host")
        if host == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
            logger.warning("%s: taking over the stale lock of process %d on %s, which no longer runs",
                           self.path, pid, host)
            self.path.unlink(missing_ok=True)
            return
        raise RuntimeError(
            f"{self.path.parent} is in use by another train.py (pid {pid} on host {host}, since "
            f"{holder.get('started')}); two runs in one output_dir would mix their checkpoints and metrics. Wait "
            f"for it, use another --output_dir, or delete {self.path} if that process is gone")

    def release(self):
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
