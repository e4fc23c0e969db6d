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
    directory, which `latest` never picks. Afterwards, the oldest checkpoints of the same run
    (`state["run"]["run_id"]`) beyond `keep` are removed; other runs' checkpoints are never touched.
    """
    root = checkpoint_dir(output_dir)
    final = root / f"{CHECKPOINT_PREFIX}{step:06d}"
    tmp = root / f".tmp-{CHECKPOINT_PREFIX}{step:06d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if data_state is not None:
        write_text_atomic(tmp / data_state_file(accelerator.process_index), json.dumps(data_state))
        accelerator.wait_for_everyone()  # every process's position is in the directory before the manifest
    if accelerator.is_main_process:
        if scheduler is not None:
            write_json_atomic(tmp / SCHEDULER_FILE, scheduler.state_dict())
        manifest = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        write_text_atomic(tmp / STATE_FILE, json.dumps({**state, "global_step": step, "files": manifest}, indent=1))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        apply_default_permissions(tmp)  # every process has written; safetensors makes private files
        replace_directory(tmp, final)  # a re-saved step: the old one stays whole until the new one is in place
        run_id = state.get("run", {}).get("run_id")
        own = [p for p in _checkpoints(output_dir) if _run_id(p) == run_id]
        for old in own[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


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
    about each newer one that is incomplete; a path -> that checkpoint, which must be complete.

    Raises:
        CheckpointError: the named checkpoint is incomplete (the message names each missing or bad file).
    """
    if value is None:
        return None
    if value == "latest":
        for path in reversed(_checkpoints(output_dir)):
            problems = checkpoint_problems(path)
            if not problems:
                return path
            logger.warning("checkpoint %s is not usable (%s); falling back to the previous one",
                           path, "; ".join(problems))
        return None
    path = Path(value)
    problems = checkpoint_problems(path)
    if problems:
        raise CheckpointError(f"--resume_from_checkpoint {value}: not a complete checkpoint: {'; '.join(problems)}")
    return path


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
