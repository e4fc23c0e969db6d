"""Resumable checkpoints: written atomically into `output_dir/checkpoints/step_XXXXXX`, checked, found and
restored without ever unpickling code.

A checkpoint is `accelerator.save_state`'s files (model weights as safetensors; the optimizer, RNG and scaler
states, which `torch.save` writes and `accelerate` reads back with `weights_only=True`), the scheduler as
`scheduler.json`, and `trainer_state.json`: the step, the counters, the run's identity (`run.py`) and a
manifest of every file with its size. A checkpoint is complete when every file of its manifest is there with
its size; `latest` takes the newest complete one and names what is wrong with any newer one.

Accelerate's own way to save extra objects (`register_for_checkpointing`) pickles them to
`custom_checkpoint_<i>.pkl` and loads them with `weights_only=False`, which runs whatever code the file names;
it is not used here, and a checkpoint holding such a file is never loaded.
"""

from __future__ import annotations

import errno
import json
import logging
import re
import shutil
from pathlib import Path

from accelerate import Accelerator

from alip_hf.io import (
    apply_default_permissions,
    replace_directory,
    write_json_atomic,
    write_text_atomic,
)

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step_"
STATE_FILE = "trainer_state.json"
SCHEDULER_FILE = "scheduler.json"
RNG_FILE = "random_states_{}.pkl"  # accelerate's name; read with weights_only=True
# Files that would be unpickled with weights_only=False by `Accelerator.load_state` (registered objects).
UNSAFE_PICKLE = re.compile(r"^custom_checkpoint_\d+\.pkl$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the file."""


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------


def data_state_file(rank: int) -> str:
    return f"data_state_{rank}.json"


def load_data_state(path: Path | None, rank: int, world_size: int) -> dict | None:
    """This process's saved stream position, None for a fresh run or a map-style checkpoint (which has none).

    Raises:
        ValueError: the checkpoint was written by another number of processes (each stream is split by process).
    """
    if path is None:
        return None
    saved = sorted(path.glob("data_state_*.json"))
    if not saved:
        return None
    if len(saved) != world_size:
        raise ValueError(f"{path} holds the stream positions of {len(saved)} process(es); resume a streaming run with "
                         f"the same number of processes (this run has {world_size})")
    return json.loads((path / data_state_file(rank)).read_text())


def checkpoint_dir(output_dir: str) -> Path:
    return Path(output_dir) / "checkpoints"


def save_checkpoint(accelerator: Accelerator, output_dir: str, step: int, state: dict, keep: int,
                    scheduler=None, data_state: dict | None = None) -> Path:
    """`accelerator.save_state` into a temporary directory renamed to `step_XXXXXX` once complete.

    `state` (JSON) goes to `trainer_state.json` with the step and the manifest; `scheduler` to `scheduler.json`;
    `data_state`, this process's stream position (`StatefulDataLoader.state_dict()`), to
    `data_state_<rank>.json`, written by each process. A run killed while saving leaves only a `.tmp-*`
    directory, which `latest` never picks; a save that fails (a full disk) removes it. Afterwards, the oldest
    checkpoints of the same run (`state["run"]["run_id"]`) beyond `keep` are removed; other runs' checkpoints
    are never touched.

    Raises:
        CheckpointSaveError: a process could not write its files (every process raises); "no space left" when
            the disk is full. The earlier checkpoints are untouched.
    """
    root = checkpoint_dir(output_dir)
    final = root / f"{CHECKPOINT_PREFIX}{step:06d}"
    tmp = root / f".tmp-{CHECKPOINT_PREFIX}{step:06d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    # Two phases, each ended by an agreement on every process (it is also the barrier between them): every
    # process's files, then the scheduler and the manifest.
    _agree_written(accelerator, tmp, final, lambda: _write_process_files(accelerator, tmp, data_state))
    _agree_written(accelerator, tmp, final, lambda: accelerator.is_main_process and _write_manifest(
        tmp, step, state, scheduler))
    if accelerator.is_main_process:
        replace_directory(tmp, final)  # a re-saved step: the old one stays whole until the new one is in place
        run_id = state.get("run", {}).get("run_id")
        own = [p for p in _checkpoints(output_dir) if _run_id(p) == run_id]
        for old in own[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _write_process_files(accelerator: Accelerator, tmp: Path, data_state: dict | None):
    """`accelerator.save_state`'s files (weights, optimizer, RNG of each process) and this process's stream
    position."""
    accelerator.save_state(str(tmp))
    if data_state is not None:
        write_text_atomic(tmp / data_state_file(accelerator.process_index), json.dumps(data_state))


def _write_manifest(tmp: Path, step: int, state: dict, scheduler):
    """`scheduler.json`, then `trainer_state.json` with the manifest of every file, written last (main process)."""
    if scheduler is not None:
        write_json_atomic(tmp / SCHEDULER_FILE, scheduler.state_dict())
    manifest = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
    write_text_atomic(tmp / STATE_FILE, json.dumps({**state, "global_step": step, "files": manifest}, indent=1))
    apply_default_permissions(tmp)  # every process has written; safetensors makes private files


class CheckpointSaveError(OSError):
    """A checkpoint that could not be written; the message names the directory and the cause."""


# How a full disk shows: errno ENOSPC (or EDQUOT, a quota) from Python; safetensors' Rust error text; torch's zip
# writer only reports "unexpected pos", without the errno (then the free space is looked at).
_NO_SPACE_TEXT = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")
_LOW_SPACE = 64 * 2**20


def _no_space(error: BaseException, directory: Path) -> bool:
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(seen) for text in _NO_SPACE_TEXT):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return "unexpected pos" in str(error) and shutil.disk_usage(directory).free < _LOW_SPACE
    except OSError:
        return False


def _agree_written(accelerator: Accelerator, tmp: Path, final: Path, write):
    """Runs `write()` on every process; if it fails on any, the partial checkpoint is removed and every process
    raises (one that waited at a barrier for the failed one would hang)."""
    error = None
    try:
        write()
    except Exception as caught:  # OSError, torch's RuntimeError, safetensors' error: all mean "not written"
        error = caught
    failed = error is not None
    if accelerator.num_processes > 1:
        import torch

        flag = torch.tensor([float(failed)], device=accelerator.device)
        failed = bool(accelerator.reduce(flag, reduction="sum").item() > 0)
    if not failed:
        return
    no_space = error is not None and _no_space(error, tmp.parent)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written is left to be taken for a checkpoint
    accelerator.wait_for_everyone()
    if error is None:
        raise CheckpointSaveError(f"saving checkpoint {final.name} in {tmp.parent} failed on another process; the "
                                  "partial checkpoint was removed")
    cause = ("no space left on device" + (f" ({shutil.disk_usage(tmp.parent).free // 2**20} MiB free now that the "
                                          "partial checkpoint is removed)" if tmp.parent.exists() else "")
             if no_space else f"{type(error).__name__}: {error}")
    raise CheckpointSaveError(f"saving checkpoint {final.name} in {tmp.parent} failed: {cause}. The partial "
                              "checkpoint was removed; earlier checkpoints are intact. Free space (or choose another "
                              "--output_dir), then resume with --resume_from_checkpoint latest") from error


# ----------------------------------------------------------------------------------------------------------------
# Finding and checking
# ----------------------------------------------------------------------------------------------------------------


def _checkpoints(output_dir: str) -> list[Path]:
    """Every renamed (not `.tmp-*`) checkpoint directory with a state file, oldest first."""
    root = checkpoint_dir(output_dir)
    found = [p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if (p / STATE_FILE).exists()] if root.exists() else []
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def read_state(path: Path) -> dict:
    """`trainer_state.json` of a checkpoint."""
    return json.loads((Path(path) / STATE_FILE).read_text())


def _run_id(path: Path) -> str | None:
    try:
        return read_state(path).get("run", {}).get("run_id")
    except (OSError, ValueError):
        return None


def checkpoint_problems(path: Path) -> list[str]:
    """What makes `path` unusable (`[]` when it is complete): a missing or unreadable state file or manifest, a
    missing file, a file whose size differs from the manifest (truncated), or a pickle only unsafe loading
    reads."""
    path = Path(path)
    try:
        state = read_state(path)
    except FileNotFoundError:
        return [f"{STATE_FILE} is missing"]
    except (OSError, ValueError) as error:
        return [f"{STATE_FILE} is unreadable ({error})"]
    manifest = state.get("files")
    if not isinstance(manifest, dict) or not manifest:
        return [f"{STATE_FILE} has no file manifest (a checkpoint of an older version)"]
    problems = []
    for name, size in manifest.items():
        file = path / name
        if not file.is_file():
            problems.append(f"{name} is missing")
        elif file.stat().st_size != size:
            problems.append(f"{name} is {file.stat().st_size} bytes, {size} when saved (truncated or replaced)")
    problems += [f"{p.name} is a pickle that would be loaded with weights_only=False; it is never loaded"
                 for p in sorted(path.iterdir()) if UNSAFE_PICKLE.match(p.name)]
    return problems


def resolve_checkpoint(value: str | None, output_dir: str) -> Path | None:
    """`latest` -> the newest complete checkpoint in `output_dir/checkpoints` (None if there is none), warning
    about each newer one that is incomplete; a path -> that checkpoint, which must exist and be complete. Either
    must be consistent (`check_state`).

    Raises:
        CheckpointError: the named checkpoint does not exist, is incomplete (the message names each missing or bad
            file), or its `trainer_state.json` contradicts its own files (the message names the field).
    """
    if value is None:
        return None
    if value == "latest":
        for path in reversed(_checkpoints(output_dir)):
            problems = checkpoint_problems(path)
            if not problems:
                check_state(path, read_state(path))
                return path
            logger.warning("checkpoint %s is not usable (%s); falling back to the previous one",
                           path, "; ".join(problems))
        return None
    path = Path(value)
    if not path.is_dir():
        raise CheckpointError(f"--resume_from_checkpoint {value}: no such directory"
                              + (" (it is a file; name the checkpoint directory)" if path.exists() else ""))
    problems = checkpoint_problems(path)
    if problems:
        raise CheckpointError(f"--resume_from_checkpoint {value}: not a complete checkpoint: {'; '.join(problems)}")
    check_state(path, read_state(path))
    return path


def nothing_to_resume(output_dir: str) -> Exception:
    """The error for `--resume_from_checkpoint latest` when `resolve_checkpoint` found no checkpoint: HF Trainer's
    "no valid checkpoint found in output directory" (a mistyped --output_dir must not start a new run), or, when
    there are checkpoints but none is complete, one that names them."""
    incomplete = _checkpoints(output_dir)
    if incomplete:
        return FileExistsError(
            f"--resume_from_checkpoint latest: none of the checkpoints in {checkpoint_dir(output_dir)} "
            f"({', '.join(p.name for p in incomplete)}) is complete (see the warnings); name one with "
            "--resume_from_checkpoint, or pass --overwrite_output_dir to start afresh")
    return CheckpointError(
        f"--resume_from_checkpoint latest: no valid checkpoint found in output directory ({output_dir}; "
        f"{checkpoint_dir(output_dir)} holds none). Check --output_dir, or leave out --resume_from_checkpoint to "
        "start a new run")


def _step_of(path: Path) -> int | None:
    match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", Path(path).name)
    return int(match.group(1)) if match else None


def check_state(path: Path, state: dict):
    """Checks `trainer_state.json` against what the checkpoint's other files record: `global_step` against the
    directory's step and the scheduler's (`scheduler.json`, `last_epoch`), the run's `max_steps`, and the
    learning rate of the run identity against the scheduler's base rates. The optimizer's own step count is
    checked once it is loaded (`check_optimizer_steps`).

    Raises:
        CheckpointError: naming the field, its value and the record it contradicts.
    """
    path = Path(path)
    step = state.get("global_step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise _inconsistent(path, f"global_step is {step!r}, not a step number")
    if _step_of(path) is not None and _step_of(path) != step:
        raise _inconsistent(path, f"global_step is {step}, but the checkpoint is {path.name}")
    identity = (state.get("run") or {}).get("identity") or {}
    if isinstance(identity.get("max_steps"), int) and step > identity["max_steps"]:
        raise _inconsistent(path, f"global_step is {step}, beyond the run's max_steps {identity['max_steps']}")
    for counter in ("nonfinite_steps",):
        if not 0 <= state.get(counter, 0) <= step:
            raise _inconsistent(path, f"{counter} is {state.get(counter)!r}, not in [0, global_step {step}]")
    if not (path / SCHEDULER_FILE).exists():
        return
    scheduler = json.loads((path / SCHEDULER_FILE).read_text())
    if scheduler.get("last_epoch") != step:
        raise _inconsistent(path, f"global_step is {step}, but {SCHEDULER_FILE} is at step "
                                  f"{scheduler.get('last_epoch')} (last_epoch)")
    rate = identity.get("learning_rate")
    if rate is not None and any(base != rate for base in scheduler.get("base_lrs", [])):
        raise _inconsistent(path, f"learning_rate is {rate} in the run identity, but {SCHEDULER_FILE}'s base rates "
                                  f"are {scheduler['base_lrs']}")


def check_optimizer_steps(path: Path, state: dict, optimizer, exact: bool):
    """Checks the restored optimizer's update count (AdamW's per-parameter `step`, the largest) against
    `global_step`: one update per step, less the steps skipped for a non-finite loss (`nonfinite_steps`). Under
    fp16 the grad scaler also skips updates without counting them (`exact=False`): only more updates than steps
    is then an error.

    Raises:
        CheckpointError: naming `global_step` and the optimizer's count.
    """
    counts = [int(s["step"]) for s in optimizer.state_dict()["state"].values() if "step" in s]
    updates = max(counts, default=0)
    expected = state["global_step"] - state.get("nonfinite_steps", 0)
    if updates > state["global_step"] or (exact and updates != expected):
        raise _inconsistent(Path(path), f"global_step is {state['global_step']} ({state.get('nonfinite_steps', 0)} "
                                        f"skipped), but the optimizer state (optimizer.bin) has taken {updates} "
                                        "update(s)")


def _inconsistent(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: {STATE_FILE} does not match the checkpoint's own record: {what}. The file was "
                           "edited or mixed with another checkpoint's; resume from another checkpoint")


# ----------------------------------------------------------------------------------------------------------------
# Restoring
# ----------------------------------------------------------------------------------------------------------------


def _check_rng_state(path: Path, process_index: int):
    """`accelerator.load_state` swallows any error reading the RNG state ("Could not load random states") and
    goes on with other random numbers; a resumed run would then silently differ. Read it first, as accelerate
    does (`weights_only=True`), and fail naming the file."""
    from accelerate.utils import load

    file = path / RNG_FILE.format(process_index)
    try:
        load(file)
    except Exception as error:  # what torch's restricted unpickler raises varies (UnpicklingError, ...)
        raise CheckpointError(f"{file}: unreadable RNG state ({type(error).__name__}: {error})") from error


def _unreadable_file(path: Path) -> str | None:
    """After a failed restore: the first torch file of the checkpoint that safe loading cannot read, to name it."""
    from accelerate.utils import load

    for name in read_state(path)["files"]:
        if name.endswith((".bin", ".pkl", ".pt")):
            try:
                load(path / name)
            except Exception:
                return f"{name} cannot be read with weights_only=True "
    return None


def load_checkpoint(accelerator: Accelerator, path: Path, scheduler=None) -> dict:
    """Restores model (gate running means included), optimizer, scaler, RNG and the scheduler; returns
    `trainer_state.json`. Nothing is unpickled with `weights_only=False`."""
    path = Path(path)
    problems = checkpoint_problems(path)
    if problems:  # also checked when resolved; a file may have gone since
        raise CheckpointError(f"{path}: not a complete checkpoint: {'; '.join(problems)}")
    _check_rng_state(path, accelerator.process_index)
    try:
        accelerator.load_state(str(path))
    except Exception as error:
        raise CheckpointError(f"{path}: cannot be restored: {_unreadable_file(path) or ''}"
                              f"({type(error).__name__}: {error})") from error
    if scheduler is not None:
        scheduler.load_state_dict(json.loads((path / SCHEDULER_FILE).read_text()))
    return read_state(path)
