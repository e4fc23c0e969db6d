"""Producers of the caption columns that train.py reads: each step adds columns to a dataset, joined on `id`.

    python -m recaption.caption   # `caption`: synthetic caption from the image alone (ALIP, VeCLIP)
    python -m recaption.rewrite   # `vecap`: LLM fusion of `alt_text` and `caption` (VeCLIP)
    python -m recaption.publish   # push the result to the Hub with a dataset card
    python -m recaption.audit     # ALIP gate values per row: filter noisy pairs, detection AUC, report

Each step is also a library call (`caption(...)`, `rewrite(...)`, `publish(...)`); runs are sharded over
Accelerate processes, scheduler tasks (`--num_tasks`, Slurm arrays) or a Ray actor pool (`--engine ray`),
resumable, and write atomically (see `recaption.run`).
"""

import importlib

# Resolved on first use, so that `python -m recaption.<step>` does not import the step twice.
_EXPORTS = {
    "AuditArguments": "recaption.audit",
    "audit": "recaption.audit",
    "CaptionArguments": "recaption.caption",
    "Captioner": "recaption.caption",
    "caption": "recaption.caption",
    "GenerationArguments": "recaption.arguments",
    "RunArguments": "recaption.arguments",
    "run_sharded": "recaption.run",
    "run_ray": "recaption.ray_engine",
    "PublishArguments": "recaption.publish",
    "publish": "recaption.publish",
    "render_card": "recaption.publish",
    "RewriteArguments": "recaption.rewrite",
    "rewrite": "recaption.rewrite",
    "select_vecap": "recaption.rewrite",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'recaption' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
