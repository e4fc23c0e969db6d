"""Class names and prompt templates: CLIP_benchmark's and open_clip's lists, files, checks."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Literal, Sequence


# ----------------------------------------------------------------------------------------------------------------
# Class names and prompt templates
# ----------------------------------------------------------------------------------------------------------------


def clip_benchmark_metadata(kind: Literal["classnames", "templates"], key: str) -> list[str]:
    """Class names or templates that CLIP_benchmark ships for dataset `key` (`en_classnames.json`,
    `en_zeroshot_classification_templates.json`)."""
    from importlib import resources

    name = "en_classnames.json" if kind == "classnames" else "en_zeroshot_classification_templates.json"
    table = json.loads((resources.files("clip_benchmark.datasets") / name).read_text(encoding="utf-8"))
    if key not in table:
        raise KeyError(f"CLIP_benchmark has no {kind} for {key!r}; it has {sorted(table)}")
    return list(table[key])


def named_list(spec: str | Sequence[str], kind: Literal["classnames", "templates"]) -> list[str]:
    """Resolves a class-name or template list given by name or literally.

    Args:
        spec: a list of strings; `"openai_imagenet"` / `"simple_imagenet"` / `"imagenet"` (open_clip's
            ImageNet templates or class names); `"clip_benchmark:<dataset>"`; or a path to a text file with
            one entry per line.
    """
    if not isinstance(spec, str):
        return list(spec)
    if spec.startswith("clip_benchmark:"):
        return clip_benchmark_metadata(kind, spec.split(":", 1)[1])
    if spec in ("openai_imagenet", "simple_imagenet", "imagenet"):
        from open_clip import zero_shot_metadata as meta

        if kind == "classnames":
            return list(meta.IMAGENET_CLASSNAMES)
        templates = meta.OPENAI_IMAGENET_TEMPLATES if spec != "simple_imagenet" else meta.SIMPLE_IMAGENET_TEMPLATES
        return [template("{}") for template in templates]  # open_clip's templates are callables
    if os.path.isfile(spec):
        return [line.strip() for line in Path(spec).read_text(encoding="utf-8").splitlines() if line.strip()]
    raise ValueError(f"--{kind.replace('classnames', 'class_names')}: {spec!r} is neither a known list nor a file")


def check_templates(templates: Sequence[str]) -> list[str]:
    """Templates with exactly one class-name slot, CLIP_benchmark's `{c}` written as `{}`.

    Raises:
        ValueError: no templates, or a template without a slot or with several (its prompts would not name
            the class, or name it twice).
    """
    templates = [t.replace("{c}", "{}") for t in templates]
    if not templates:
        raise ValueError("templates: the list is empty")
    for template in templates:
        if template.count("{}") != 1 or re.search(r"\{(?!\})", template.replace("{}", "")):
            raise ValueError(f"template {template!r} must contain exactly one '{{}}' (or '{{c}}') for the class name")
    return templates


