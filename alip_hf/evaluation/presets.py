"""Evaluation tasks (`EvalTask`) and the named presets and preset groups `eval.py --preset` runs."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from alip_hf import schema
from alip_hf.resources import DEMO_DATA

logger = logging.getLogger(__name__)

# CLIP_benchmark's task names, so that its tooling reads our results files.
ZEROSHOT, RETRIEVAL, LINEAR_PROBE = "zeroshot_classification", "zeroshot_retrieval", "linear_probe"
TASKS = (ZEROSHOT, RETRIEVAL, LINEAR_PROBE)
TASK_ALIASES = {"zeroshot": ZEROSHOT, "classification": ZEROSHOT, "retrieval": RETRIEVAL, "lp": LINEAR_PROBE}
# What retrieval reports: recall@k for these k, and the recall curve over k = 1..50 (or to the candidate count).
RECALL_KS = (1, 5, 10)
RECALL_CURVE_MAX_K = 50


# ----------------------------------------------------------------------------------------------------------------
# Tasks and presets
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class EvalTask:
    """One evaluation: a task on one split of one dataset, with the columns it reads.

    Attributes:
        name: the dataset's name in results (`cifar10`, `demo`).
        task: one of `TASKS`.
        source: anything `data.load_source` reads (Hub id, `save_to_disk` dir, files, WebDataset shards).
        split: the evaluated split (the test split of a linear probe).
        image_column: `None` picks the dataset's only `datasets.Image` column.
        label_column: classification tasks: integer class ids (a `ClassLabel`) or class-name strings.
        caption_columns: retrieval: columns holding a caption or a list of captions; all count as matches.
        class_names: a list or a name for `named_list`; `None`: the `ClassLabel` names, else the sorted
            distinct strings of `label_column`.
        class_name_style: `"underscores"` turns `_` and `/` into spaces (Food-101, SUN397 folder names).
        templates: a list or a name for `named_list`.
        row_filter: `(column, value)`: keep only rows whose `column` equals `value` (Karpathy splits stored
            as a column, as in Flickr30k on the Hub).
        train_split, val_split: linear probe: the training split and an optional validation split (without one,
            `val_fraction` of the training rows, stratified, is held out).
    """

    name: str
    task: str
    source: str
    split: str = "test"
    image_column: str | None = None
    label_column: str | None = None
    caption_columns: tuple[str, ...] = ()
    class_names: str | tuple[str, ...] | None = None
    class_name_style: Literal["as_is", "underscores"] = "as_is"
    templates: str | tuple[str, ...] = "openai_imagenet"
    row_filter: tuple[str, str] | None = None
    train_split: str | None = None
    val_split: str | None = None
    val_fraction: float = 0.2

    def __post_init__(self):
        self.task = TASK_ALIASES.get(self.task, self.task)
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS} (or {sorted(TASK_ALIASES)}), got {self.task!r}")
        if self.task == RETRIEVAL and not self.caption_columns:
            raise ValueError(f"{self.name}: a retrieval task needs caption_columns")
        if self.task != RETRIEVAL and not self.label_column:
            raise ValueError(f"{self.name}: a {self.task} task needs label_column")
        if self.task == LINEAR_PROBE and not self.train_split:
            raise ValueError(f"{self.name}: a linear probe needs train_split")


def _classification(name, source, split, image, label, templates, class_names=None, train_split="train", **kw):
    return EvalTask(name, ZEROSHOT, source, split, image, label, class_names=class_names, templates=templates,
                    train_split=train_split, **kw)


# Usual Hub layouts of the benchmarks (dataset id, split, columns). The 11 zero-shot datasets are those of ALIP's
# Table 2 (CIFAR-10/100, Food-101, Pets, Flowers, SUN397, Cars, DTD, Caltech-101, Aircraft, ImageNet); templates
# are CLIP's per dataset as CLIP_benchmark ships them. Class names: CLIP's curated lists where CLIP_benchmark has
# them, else the dataset's own `ClassLabel` names; a list whose length differs from the label count is an error.
PRESETS: dict[str, list[EvalTask]] = {
    "demo": [
        EvalTask("demo", ZEROSHOT, str(DEMO_DATA), "test", "image", "category", train_split="train",
                 templates=("clip art of {}.", "a drawing of {}.", "an illustration of {}.")),
        EvalTask("demo", RETRIEVAL, str(DEMO_DATA), "test", "image", caption_columns=("alt_text", "caption")),
    ],
    "cifar10": [_classification("cifar10", "uoft-cs/cifar10", "test", "img", "label", "clip_benchmark:cifar10")],
    "cifar100": [_classification("cifar100", "uoft-cs/cifar100", "test", "img", "fine_label",
                                 "clip_benchmark:cifar100")],
    "food101": [_classification("food101", "ethz/food101", "validation", "image", "label",
                                "clip_benchmark:food101", class_name_style="underscores")],
    "pets": [_classification("pets", "timm/oxford-iiit-pet", "test", "image", "label", "clip_benchmark:pets",
                             "clip_benchmark:pets")],
    "flowers": [_classification("flowers", "nelorth/oxford-flowers", "test", "image", "label",
                                "clip_benchmark:flowers", "clip_benchmark:flowers")],
    "sun397": [_classification("sun397", "tanganke/sun397", "test", "image", "label", "clip_benchmark:sun397",
                               class_name_style="underscores")],
    "cars": [_classification("cars", "tanganke/stanford_cars", "test", "image", "label", "clip_benchmark:cars")],
    "dtd": [_classification("dtd", "tanganke/dtd", "test", "image", "label", "clip_benchmark:dtd")],
    "caltech101": [_classification("caltech101", "flwrlabs/caltech101", "train", "image", "label",
                                   "clip_benchmark:caltech101", train_split=None)],
    "fgvc_aircraft": [_classification("fgvc_aircraft", "HuggingFaceM4/FGVC-Aircraft", "test", "image", "variant",
                                      "clip_benchmark:fgvc_aircraft")],
    "imagenet1k": [_classification("imagenet1k", "ILSVRC/imagenet-1k", "validation", "image", "label",
                                   "openai_imagenet", "imagenet")],
    # Karpathy test splits: 1000 Flickr30k images (split column), 5000 COCO images; five captions each.
    "flickr30k": [EvalTask("flickr30k", RETRIEVAL, "nlphuji/flickr30k", "test", "image", caption_columns=("caption",),
                           row_filter=("split", "test"))],
    "mscoco": [EvalTask("mscoco", RETRIEVAL, "nlphuji/mscoco_2014_5k_test_image_text_retrieval", "test", "image",
                        caption_columns=("caption",))],
}
PRESET_GROUPS = {
    "alip_zeroshot": ["cifar10", "cifar100", "food101", "pets", "flowers", "sun397", "cars", "dtd", "caltech101",
                      "fgvc_aircraft", "imagenet1k"],
    "retrieval": ["flickr30k", "mscoco"],
}


def resolve_tasks(tasks, split: str | None = None) -> list[EvalTask]:
    """Turns preset names, `EvalTask`s, or a data source into a list of `EvalTask`.

    Args:
        tasks: an `EvalTask`, a preset or group name (`"demo"`, `"alip_zeroshot"`), a preset's source path
            (train.py's `--eval_data demo_data`), a list of these, or any other source in the data contract:
            retrieval over the contract's text columns it has (`alt_text`, `caption`).
        split: overrides the evaluated split.
    """
    if isinstance(tasks, (list, tuple)):
        return [t for item in tasks for t in resolve_tasks(item, split)]
    if isinstance(tasks, EvalTask):
        resolved = [tasks]
    elif tasks in PRESET_GROUPS:
        resolved = [t for name in PRESET_GROUPS[tasks] for t in PRESETS[name]]
    elif tasks in PRESETS:
        resolved = PRESETS[tasks]
    elif isinstance(tasks, str):
        preset = preset_of_source(tasks)
        resolved = PRESETS[preset] if preset else [_contract_retrieval_task(tasks, split or "test")]
    else:
        raise TypeError(f"tasks: expected a preset name, a source or an EvalTask, got {type(tasks).__name__}")
    return [replace(t) if split is None else replace(t, split=split) for t in resolved]


def preset_of_source(source: str) -> str | None:
    """The name of the preset whose data is the local path `source` (train.py's `--eval_data demo_data`)."""
    for name, tasks in PRESETS.items():
        preset = tasks[0].source
        if os.path.exists(source) and os.path.exists(preset) and os.path.samefile(source, preset):
            return name
    return None


def _contract_retrieval_task(source: str, split: str) -> EvalTask:
    from alip_hf.data import (
        load_source,  # torch and datasets only when a task is built, not for --help
    )

    dataset = load_source(source, split=split)
    columns = tuple(c for c in (schema.ALT_TEXT, schema.CAPTION) if c in dataset.column_names)
    if not columns:
        raise ValueError(f"{source}: not a preset and has no {schema.ALT_TEXT!r} or {schema.CAPTION!r} column; "
                         f"pass a preset ({sorted(PRESETS)}) or an EvalTask")
    return EvalTask(Path(source).name or source, RETRIEVAL, source, split, caption_columns=columns)


