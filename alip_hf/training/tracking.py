"""Metric logging: the JSON-lines tracker behind `metrics.jsonl`, and the trackers' run configuration."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from accelerate.tracking import GeneralTracker

from alip_hf.hub import SECRET_ARGUMENTS


METRICS_FILE = "metrics.jsonl"


# ----------------------------------------------------------------------------------------------------------------
# Logging and evaluation
# ----------------------------------------------------------------------------------------------------------------


class JSONLinesTracker(GeneralTracker):
    """Appends each `accelerator.log` call as one JSON line to `metrics.jsonl` (main process)."""

    name = "jsonl"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, path: Path):
        super().__init__()
        self.path = Path(path)

    @property
    def tracker(self):
        return self.path

    def store_init_configuration(self, values: dict):
        pass

    def log(self, values: dict, step: int | None = None, **kwargs):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(json.dumps({"step": step, **{k: _plain(v) for k, v in values.items()}}) + "\n")


def _plain(value):
    return value.item() if isinstance(value, torch.Tensor) else value


def tracker_config(groups) -> dict:
    flat = {}
    for group in groups:
        for key, value in dataclasses.asdict(group).items():
            if key not in SECRET_ARGUMENTS:
                flat[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


