"""Running tasks: features once per split, each task's runner, and the flat `eval/<dataset>/<metric>` view."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from alip_hf.evaluation.classnames import check_templates, named_list
from alip_hf.evaluation.features import (
    ClassifierCache,
    encode_images,
    encode_texts,
    zeroshot_classifier,
)
from alip_hf.evaluation.loading import (
    captions_per_image,
    class_names_and_labels,
    load_split,
)
from alip_hf.evaluation.metrics import (
    classification_metrics,
    linear_probe,
    recall_curve,
    retrieval_metrics,
)
from alip_hf.evaluation.presets import (
    LINEAR_PROBE,
    RECALL_CURVE_MAX_K,
    RECALL_KS,
    RETRIEVAL,
    ZEROSHOT,
    EvalTask,
    resolve_tasks,
)
from alip_hf.models import core_model
from alip_hf.schema import ID

logger = logging.getLogger(__name__)

# CLIP's logit scale for zero-shot classification (a constant, not the model's learned scale: argmax and top-k
# are unaffected, and CLIP_benchmark uses 100).
ZEROSHOT_LOGIT_SCALE = 100.0


# ----------------------------------------------------------------------------------------------------------------
# Running tasks
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class EvalSettings:
    """Settings recorded with every result."""

    batch_size: int = 64
    text_batch_size: int = 256
    recall_ks: tuple[int, ...] = RECALL_KS
    max_samples: int | None = None  # evaluate the first N rows only (smoke runs; recorded in the results)
    seed: int = 0
    recall_curve_max_k: int = RECALL_CURVE_MAX_K  # retrieval: the recall curve's last k (0: no curve)


def _limit(dataset, settings: EvalSettings):
    """At most `max_samples` rows, evenly spaced over the split (datasets are often sorted by class, so the
    first rows would cover few classes)."""
    if settings.max_samples is not None and len(dataset) > settings.max_samples:
        return dataset.select(np.linspace(0, len(dataset) - 1, settings.max_samples).round().astype(int).tolist())
    return dataset


def _warn_empty_classes(task: EvalTask, names: list[str], labels: np.ndarray) -> list[str]:
    empty = [names[c] for c in sorted(set(range(len(names))) - set(labels.tolist()))]
    if empty:
        logger.warning("%s: %d of %d classes have no images (%s...); mean_per_class_recall averages the others and "
                       "their names stay candidates in zero-shot", task.name, len(empty), len(names), empty[:5])
    return empty


class SplitFeatures:
    """Image features of evaluated splits, computed once per evaluation run and shared by its tasks (the demo
    preset's zero-shot and retrieval tasks read the same images)."""

    def __init__(self, model, processor, settings: EvalSettings, accelerator=None):
        self.model, self.processor, self.settings, self.accelerator = model, processor, settings, accelerator
        self.features: dict[tuple, torch.Tensor] = {}

    def __call__(self, task: EvalTask, split: str, role: str = "") -> tuple[Any, torch.Tensor, Any]:
        """`(evaluated rows of the split, their image features (N, D), the whole split)`."""
        full_dataset, image_column = load_split(task, split)
        dataset = _limit(full_dataset, self.settings)
        key = (task.source, split, task.row_filter, image_column, len(dataset))
        if key not in self.features:
            self.features[key] = encode_images(self.model, self.processor, dataset[image_column],
                                               self.settings.batch_size, self.accelerator,
                                               desc=f"{task.name} {role or split} images",
                                               row_ids=dataset[ID] if ID in dataset.column_names else None,
                                               source=f"{task.source} split {split!r}")
        return dataset, self.features[key], full_dataset


def run_zeroshot(model, processor, task: EvalTask, settings: EvalSettings, images: SplitFeatures,
                 accelerator=None, cache: ClassifierCache | None = None) -> dict:
    dataset, image_embeds, full_dataset = images(task, task.split)
    names, labels = class_names_and_labels(task, dataset, full_dataset)
    empty = _warn_empty_classes(task, names, labels)
    templates = check_templates(named_list(task.templates, "templates"))
    classifier = zeroshot_classifier(model, processor, names, templates, settings.text_batch_size, accelerator, cache)
    logits = ZEROSHOT_LOGIT_SCALE * image_embeds @ classifier
    details = {"num_images": len(labels), "num_classes": len(names), "num_templates": len(templates),
               "classes_without_images": len(empty)}
    return {"metrics": classification_metrics(logits, labels), **details}


def run_retrieval(model, processor, task: EvalTask, settings: EvalSettings, images: SplitFeatures,
                  accelerator=None, cache=None) -> dict:
    dataset, image_embeds, _ = images(task, task.split)
    texts, text_image_index = captions_per_image(task, dataset)
    text_embeds = encode_texts(model, processor, texts, settings.text_batch_size, accelerator,
                               desc=f"{task.name} captions")
    metrics = retrieval_metrics(image_embeds, text_embeds, text_image_index, settings.recall_ks)
    # Kept out of `metrics`, whose scalar names are CLIP_benchmark's (and train.py's logged keys).
    curve = {}
    if settings.recall_curve_max_k > 0:
        curve = {"recall_curve": recall_curve(image_embeds, text_embeds, text_image_index,
                                              settings.recall_curve_max_k)}
    return {"metrics": metrics, "num_images": len(dataset), "num_texts": len(texts),
            "caption_columns": list(task.caption_columns), **curve}


def run_linear_probe(model, processor, task: EvalTask, settings: EvalSettings, images: SplitFeatures,
                     accelerator=None, cache=None) -> dict:
    features, labels = {}, {}
    names, train_split = None, None
    for role, split in (("train", task.train_split), ("val", task.val_split), ("test", task.split)):
        if split is None:
            continue
        dataset, split_features, full_dataset = images(task, split, role)
        train_split = full_dataset if train_split is None else train_split  # class names come from train
        names, labels[role] = class_names_and_labels(task, dataset, train_split)
        features[role] = split_features.numpy()
    empty = _warn_empty_classes(task, names, labels["train"])
    metrics = [None]
    if accelerator is None or accelerator.is_main_process:
        metrics[0] = linear_probe(features["train"], labels["train"], features["test"], labels["test"],
                                  features.get("val"), labels.get("val"), task.val_fraction, seed=settings.seed,
                                  num_classes=len(names))
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(metrics)  # one fit, on the main process; every process returns its result
    return {"metrics": metrics[0], "num_train_images": len(labels["train"]), "num_images": len(labels["test"]),
            "num_classes": len(names), "classes_without_train_images": len(empty)}


RUNNERS = {ZEROSHOT: run_zeroshot, RETRIEVAL: run_retrieval, LINEAR_PROBE: run_linear_probe}


def run_evaluation(model, processor, tasks, split: str | None = None, accelerator=None,
                   settings: EvalSettings | None = None, cache: ClassifierCache | None = None,
                   model_name: str | None = None) -> list[dict]:
    """Runs every task; returns one record per task in CLIP_benchmark's shape (`dataset`, `model`, `task`,
    `metrics`) plus the split, source, sizes and settings. Every process returns the same records."""
    settings = settings or EvalSettings()
    config = getattr(core_model(model, accelerator), "config", None)
    model_name = model_name or getattr(config, "name_or_path", "") or "model"
    images = SplitFeatures(model, processor, settings, accelerator)
    records = []
    for task in resolve_tasks(tasks, split):
        start = time.perf_counter()
        result = RUNNERS[task.task](model, processor, task, settings, images, accelerator, cache)
        records.append({
            "dataset": task.name, "model": model_name, "task": task.task, "split": task.split,
            "source": task.source, **result, "settings": asdict(settings),
            "seconds": round(time.perf_counter() - start, 3),
        })
        logger.info("%s %s: %s", task.name, task.task, result["metrics"])
    return records


def flatten_results(records: list[dict]) -> dict[str, float]:
    """`{"eval/<dataset>/<metric>": value}`, the keys train.py logs."""
    return {f"eval/{r['dataset']}/{name}": float(value) for r in records for name, value in r["metrics"].items()}


def evaluate_model(model, processor, tasks="demo", split: str | None = None, accelerator=None,
                   batch_size: int = 64, max_samples: int | None = None,
                   cache: ClassifierCache | None = None) -> dict[str, float]:
    """Evaluation for a training loop: `{"eval/<dataset>/<metric>": value}` on every process.

    Args:
        model: anything with `get_image_features`/`get_text_features` (wrapped models are unwrapped by
            `accelerator`). The caller puts it in eval mode.
        processor: image processor + tokenizer (e.g. `ALIPProcessor`, `CLIPProcessor`).
        tasks: see `resolve_tasks` (preset names, `EvalTask`s, a data source).
        accelerator: shards the samples over processes (each encoded once) and gathers the features.
    """
    settings = EvalSettings(batch_size=batch_size, max_samples=max_samples)
    return flatten_results(run_evaluation(model, processor, tasks, split, accelerator, settings, cache))


