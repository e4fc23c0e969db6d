"""Resumable checkpoints: written atomically into `output_dir/checkpoints/step_XXXXXX`, found and restored."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from accelerate import Accelerator

from alip_hf.io import apply_default_permissions, write_text_atomic

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step_"
STATE_FILE = "trainer_state.json"


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------


def checkpoint_dir(output_dir: str) -> Path:
    return Path(output_dir) / "checkpoints"


def save_checkpoint(accelerator: Accelerator, output_dir: str, step: int, state: dict, keep: int) -> Path:
    """`accelerator.save_state` into a temporary directory renamed to `step_XXXXXX` once complete.

    A run killed while saving leaves only a `.tmp-*` directory, which `latest` never picks.
    """
    root = checkpoint_dir(output_dir)
    final = root / f"{CHECKPOINT_PREFIX}{step:06d}"
    tmp = root / f".tmp-{CHECKPOINT_PREFIX}{step:06d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        write_text_atomic(tmp / STATE_FILE, json.dumps({**state, "global_step": step}, indent=1))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        apply_default_permissions(tmp)  # every process has written; safetensors makes private files
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in _checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _checkpoints(output_dir: str) -> list[Path]:
    root = checkpoint_dir(output_dir)
    found = [p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if (p / STATE_FILE).exists()] if root.exists() else []
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def resolve_checkpoint(value: str | None, output_dir: str) -> Path | None:
    """`latest` -> newest complete checkpoint in `output_dir/checkpoints` (None if there is none); a path as is."""
    if value is None:
        return None
    if value == "latest":
        found = _checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(value)
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(f"--resume_from_checkpoint {value}: not a complete checkpoint (no {STATE_FILE})")
    return path


def load_checkpoint(accelerator: Accelerator, path: Path) -> dict:
    """Restores model (gate running means included), optimizer, scheduler, scaler and RNG; returns the counters."""
    accelerator.load_state(str(path))
    return json.loads((path / STATE_FILE).read_text())


