"""Running tasks: features once per split, each task's runner, and the flat `eval/<dataset>/<metric>` view."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alip_hf import sources
from alip_hf.evaluation.classnames import check_templates
from alip_hf.evaluation.features import (
    AUTOCAST_DTYPES,
    ClassifierCache,
    encode_images,
    encode_texts,
    text_limit,
    texts_over_limit,
    zeroshot_classifier,
)
from alip_hf.evaluation.loading import (
    captions_per_image,
    class_names_and_labels,
    load_split,
    load_winogavil,
    resolve_list,
    winogavil_prompt,
)
from alip_hf.evaluation.metrics import (
    association_jaccard,
    classification_metrics,
    group_metric,
    linear_probe,
    mean_recall_at_1,
    recall_curve,
    retrieval_metrics,
    winogavil_metrics,
)
from alip_hf.evaluation.presets import (
    ASSOCIATION,
    LINEAR_PROBE,
    RECALL_CURVE_MAX_K,
    RECALL_KS,
    RETRIEVAL,
    ZEROSHOT,
    EvalTask,
    resolve_tasks,
)
from alip_hf.io import write_json_atomic
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
    dtype: str = "fp32"  # autocast dtype of the towers (`AUTOCAST_DTYPES`); similarities are float32 always

    def __post_init__(self):
        if self.dtype not in AUTOCAST_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(AUTOCAST_DTYPES)}, got {self.dtype!r}")

    @property
    def autocast_dtype(self):
        return AUTOCAST_DTYPES[self.dtype]


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
        if task.expected_rows is not None and split == task.split and len(full_dataset) != task.expected_rows:
            logger.warning("%s: %s split %r has %d rows, the published copy %d: scores are not comparable with "
                           "published ones", task.name, task.source, split, len(full_dataset), task.expected_rows)
        dataset = _limit(full_dataset, self.settings)
        key = (task.source, task.revision, split, task.row_filter, image_column, len(dataset))
        if key not in self.features:
            self.features[key] = encode_images(self.model, self.processor, dataset[image_column],
                                               self.settings.batch_size, self.accelerator,
                                               desc=f"{task.name} {role or split} images",
                                               autocast_dtype=self.settings.autocast_dtype,
                                               row_ids=dataset[ID] if ID in dataset.column_names else None,
                                               source=f"{task.source} split {split!r}")
        return dataset, self.features[key], full_dataset


def run_zeroshot(model, processor, task: EvalTask, settings: EvalSettings, images: SplitFeatures,
                 accelerator=None, cache: ClassifierCache | None = None) -> dict:
    dataset, image_embeds, full_dataset = images(task, task.split)
    names, labels = class_names_and_labels(task, dataset, full_dataset)
    empty = _warn_empty_classes(task, names, labels)
    templates = check_templates(resolve_list(task, task.templates, "templates"))
    classifier = zeroshot_classifier(model, processor, names, templates, settings.text_batch_size, accelerator, cache,
                                     autocast_dtype=settings.autocast_dtype)
    logits = ZEROSHOT_LOGIT_SCALE * image_embeds @ classifier  # float32: the features are
    metrics = classification_metrics(logits, labels)
    if task.group_metric is not None:
        sources.require_columns(dataset, {"group metadata": "npy"})
        metrics[task.group_metric] = group_metric(task.group_metric, logits, labels, np.asarray(dataset["npy"]))
    details = {"num_images": len(labels), "num_rows": len(full_dataset), "num_classes": len(names),
               "num_templates": len(templates), "classes_without_images": len(empty)}
    return {"metrics": metrics, **details}


def run_retrieval(model, processor, task: EvalTask, settings: EvalSettings, images: SplitFeatures,
                  accelerator=None, cache=None) -> dict:
    dataset, image_embeds, _ = images(task, task.split)
    texts, text_image_index = captions_per_image(task, dataset)
    limit = text_limit(model, accelerator)
    truncated = texts_over_limit(processor, texts, limit)
    if truncated:
        logger.warning("%s: %d of %d captions are longer than the model's %s text positions and are cut to them",
                       task.name, truncated, len(texts), limit)
    text_embeds = encode_texts(model, processor, texts, settings.text_batch_size, accelerator,
                               desc=f"{task.name} captions", autocast_dtype=settings.autocast_dtype)
    metrics = retrieval_metrics(image_embeds, text_embeds, text_image_index, settings.recall_ks)
    # Kept out of `metrics`, whose scalar names are CLIP_benchmark's (and train.py's logged keys).
    curve = {}
    if settings.recall_curve_max_k > 0:
        curve = {"recall_curve": recall_curve(image_embeds, text_embeds, text_image_index,
                                              settings.recall_curve_max_k)}
    return {"metrics": metrics, "num_images": len(dataset), "num_texts": len(texts),
            "caption_columns": list(task.caption_columns), "text_positions": limit, "texts_truncated": truncated,
            **curve}


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


def run_association(model, processor, task: EvalTask, settings: EvalSettings, images: SplitFeatures,
                    accelerator=None, cache=None) -> dict:
    """WinoGAViL as DataComp scores it: each game's cue (`winogavil_prompt`) against its candidate images, the
    top K taken, K the number of associations; Jaccard index per game, averaged per candidate count."""
    games, image_dir = load_winogavil(task)
    num_rows = len(games)
    if task.expected_rows is not None and num_rows != task.expected_rows:
        logger.warning("%s: %s has %d games, the published copy %d: scores are not comparable with published ones",
                       task.name, task.source, num_rows, task.expected_rows)
    if settings.max_samples is not None and num_rows > settings.max_samples:
        games = [games[i] for i in np.linspace(0, num_rows - 1, settings.max_samples).round().astype(int)]
    names = sorted({name for game in games for name in game.candidates})  # each image encoded once
    row_of = {name: i for i, name in enumerate(names)}
    image_embeds = encode_images(model, processor, [str(image_dir / f"{name}.jpg") for name in names],
                                 settings.batch_size, accelerator, desc=f"{task.name} candidate images",
                                 autocast_dtype=settings.autocast_dtype, row_ids=names, source=str(image_dir))
    cue_embeds = encode_texts(model, processor, [winogavil_prompt(game.cue) for game in games],
                              settings.text_batch_size, accelerator, desc=f"{task.name} cues",
                              autocast_dtype=settings.autocast_dtype)
    jaccards = []
    for game, cue in zip(games, cue_embeds):
        candidates = image_embeds[[row_of[name] for name in game.candidates]]  # (C, D)
        is_association = torch.tensor([name in game.associations for name in game.candidates])
        jaccards.append(association_jaccard(candidates @ cue, is_association))
    metrics = winogavil_metrics(jaccards, [len(game.candidates) for game in games])
    return {"metrics": metrics, "num_images": len(names), "num_games": len(games), "num_rows": num_rows}


RUNNERS = {ZEROSHOT: run_zeroshot, RETRIEVAL: run_retrieval, LINEAR_PROBE: run_linear_probe,
           ASSOCIATION: run_association}


def main_score(task: EvalTask, metrics: dict) -> float | None:
    """The value of the task's main metric (`mean_recall@1`, DataComp's retrieval score, is derived)."""
    if task.main_metric == "mean_recall@1":
        return mean_recall_at_1(metrics) if "text_retrieval_recall@1" in metrics else None
    return metrics.get(task.main_metric)


def run_task(model, processor, task: EvalTask, settings: EvalSettings, images: SplitFeatures, accelerator=None,
             cache: ClassifierCache | None = None, model_name: str = "model") -> dict:
    """One task's record in CLIP_benchmark's shape (`dataset`, `model`, `task`, `metrics`) plus the split,
    source, sizes, settings, the main metric and its value (`main_score`)."""
    start = time.perf_counter()
    result = RUNNERS[task.task](model, processor, task, settings, images, accelerator, cache)
    logger.info("%s %s: %s", task.name, task.task, result["metrics"])
    record = {"dataset": task.name, "model": model_name, "task": task.task, "split": task.split,
              "source": task.source, **result, "settings": asdict(settings),
              "seconds": round(time.perf_counter() - start, 3),
              "status": "ok", "main_metric": task.main_metric, "main_score": main_score(task, result["metrics"])}
    if task.revision:
        record["revision"] = task.revision
    if task.first_rows is not None:
        record["first_rows"] = task.first_rows
    if task.expected_rows is not None:
        record["expected_rows"] = task.expected_rows
    return record


def run_evaluation(model, processor, tasks, split: str | None = None, accelerator=None,
                   settings: EvalSettings | None = None, cache: ClassifierCache | None = None,
                   model_name: str | None = None) -> list[dict]:
    """Runs every task; returns one record per task (`run_task`). Every process returns the same records; an
    error stops the run (`run_and_save` records it and goes on)."""
    settings = settings or EvalSettings()
    model_name = model_name or _model_name(model, accelerator)
    images = SplitFeatures(model, processor, settings, accelerator)
    return [run_task(model, processor, task, settings, images, accelerator, cache, model_name)
            for task in resolve_tasks(tasks, split)]


def _model_name(model, accelerator=None) -> str:
    config = getattr(core_model(model, accelerator), "config", None)
    return getattr(config, "name_or_path", "") or "model"


def record_key(record: dict) -> tuple:
    """What identifies a result within a results file: dataset, task and split."""
    return record["dataset"], record["task"], record.get("split")


def run_and_save(model, processor, tasks: list[EvalTask], output: str | os.PathLike, accelerator=None,
                 settings: EvalSettings | None = None, cache: ClassifierCache | None = None,
                 model_name: str | None = None, summarize=None) -> dict:
    """Runs the tasks one by one, rewriting the results file `output` (atomically) after each, so that a crash
    loses only the task in progress; a rerun skips the tasks `output` already holds as finished and retries
    failed ones. A task that raises is recorded with `status: "failed"` and its error, and the others still run.

    Args:
        summarize: `records -> dict` of suite summaries stored under `"suites"` (e.g. DataComp's average).

    Returns:
        The payload written: `{"model", "created", "num_processes", "results": [...], "suites": {...}}`.

    Raises:
        ValueError: `output` holds results of another model or of other settings (a rerun must not mix them).
    """
    settings = settings or EvalSettings()
    model_name = model_name or _model_name(model, accelerator)
    main = accelerator is None or accelerator.is_main_process
    records = _finished_records(output, model_name, settings)
    done = {record_key(r) for r in records if r.get("status", "ok") == "ok"}
    images = SplitFeatures(model, processor, settings, accelerator)
    payload = {}
    for task in tasks:
        key = (task.name, task.task, task.split)
        if images.features and all(source != task.source for source, *_ in images.features):
            images.features.clear()  # a suite's datasets one after another: keep only the current one's features
        if key in done:
            logger.info("%s %s: already in %s, skipped", task.name, task.task, output)
            continue
        try:
            record = run_task(model, processor, task, settings, images, accelerator, cache, model_name)
        except Exception as error:  # recorded, and the suite goes on: one broken dataset must not lose the rest
            logger.exception("%s %s failed", task.name, task.task)
            record = {"dataset": task.name, "model": model_name, "task": task.task, "split": task.split,
                      "source": task.source, "status": "failed", "error": f"{type(error).__name__}: {error}",
                      "settings": asdict(settings)}
        records = [r for r in records if record_key(r) != key] + [record]
        payload = _payload(model_name, records, accelerator, summarize)
        if main:
            write_json_atomic(output, payload)
    payload = _payload(model_name, records, accelerator, summarize)
    if main:
        write_json_atomic(output, payload)
    return payload


def _payload(model_name: str, records: list[dict], accelerator, summarize) -> dict:
    payload = {"model": model_name, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "num_processes": accelerator.num_processes if accelerator is not None else 1, "results": records}
    if summarize is not None:
        payload["suites"] = summarize(records)
    return payload


def _finished_records(output, model_name: str, settings: EvalSettings) -> list[dict]:
    """The records of an earlier run in `output`, if any; refuses a file of another model or other settings."""
    path = Path(output)
    if not path.exists():
        return []
    previous = json.loads(path.read_text(encoding="utf-8"))
    if previous.get("model") != model_name:
        raise ValueError(f"{output} holds results of model {previous.get('model')!r}, not {model_name!r}: "
                         "pass another --output (a results file is one model's)")
    records = list(previous.get("results", []))
    ours = json.loads(json.dumps(asdict(settings)))  # as stored: tuples become lists
    for record in records:
        if record.get("status", "ok") == "ok" and record.get("settings") != ours:
            raise ValueError(f"{output}: {record['dataset']} {record['task']} was evaluated with settings "
                             f"{record.get('settings')}, this run uses {ours}: pass another --output, or the same "
                             "settings to resume")
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


