"""Zero-shot classification, image-text retrieval and linear-probe evaluation of CLIP-style models.

Works with any model that has transformers CLIP's feature methods, `get_image_features(pixel_values)` and
`get_text_features(input_ids, attention_mask)` (whose `pooler_output` is the projected feature): `ALIPModel`,
exported `CLIPModel` directories, VeCLIP checkpoints, any transformers CLIP. It never looks at the model type.

Metric names and definitions are CLIP_benchmark's, and the numbers equal its to the last digit on the same
model and data (tests/test_eval_parity.py):
- zero-shot classification: `acc1`, `acc5`, `mean_per_class_recall`, with prompt-ensembled class embeddings
  (mean of the L2-normalised template embeddings, renormalised) and logits `100 * image @ classes`;
- retrieval: `image_retrieval_recall@k` (text -> image) and `text_retrieval_recall@k` (image -> text), a query
  counting as a hit when at least one of its matches is among the top k; every image may have several captions;
- linear probe: `lp_acc1`, `lp_acc5`, `lp_mean_per_class_recall` of a logistic regression on frozen image
  features, its regularisation chosen on a validation split and refit on train + validation (CLIP paper, A.3).

Retrieval records also hold the recall for every k up to 50 (`recall_curve`); `--plot` draws it (matplotlib).

    python eval.py --model runs/alip-tiny --preset demo --output results.json
    python eval.py --model DIR --preset flickr30k --plot recall.png           # recall@k curves, k = 1..50
    python eval.py --model DIR --dataset data/val.parquet --task zeroshot_classification \
        --image_column jpg --label_column cls --class_names classes.txt
    accelerate launch --num_processes 2 eval.py --model DIR --preset imagenet1k   # sharded, no duplicates

From training: `evaluate_model(model, processor, "demo", accelerator=accelerator)` -> `{"eval/demo/acc1": ...}`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shlex
import sys
import tempfile
import time
import warnings
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import data as data_lib

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent
DEMO_DATA = ROOT / "demo_data"
MODEL_CARD_TEMPLATE = ROOT / "model_card.md"
RECALL_KS = (1, 5, 10)
# The recall curve stored with retrieval results runs over k = 1..50 (or to the candidate count, if smaller).
RECALL_CURVE_MAX_K = 50
# CLIP_benchmark's task names, so that its tooling reads our results files.
ZEROSHOT, RETRIEVAL, LINEAR_PROBE = "zeroshot_classification", "zeroshot_retrieval", "linear_probe"
TASKS = (ZEROSHOT, RETRIEVAL, LINEAR_PROBE)
TASK_ALIASES = {"zeroshot": ZEROSHOT, "classification": ZEROSHOT, "retrieval": RETRIEVAL, "lp": LINEAR_PROBE}
# CLIP's logit scale for zero-shot classification (a constant, not the model's learned scale: argmax and top-k
# are unaffected, and CLIP_benchmark uses 100).
ZEROSHOT_LOGIT_SCALE = 100.0
# The linear probe's sweep of the inverse regularisation C (CLIP searched lambda = 1/C over [1e-6, 1e6]).
LINEAR_PROBE_CS = tuple(float(c) for c in np.logspace(-6, 6, 13))


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
        preset = _preset_of_source(tasks)
        resolved = PRESETS[preset] if preset else [_contract_retrieval_task(tasks, split or "test")]
    else:
        raise TypeError(f"tasks: expected a preset name, a source or an EvalTask, got {type(tasks).__name__}")
    return [replace(t) if split is None else replace(t, split=split) for t in resolved]


def _preset_of_source(source: str) -> str | None:
    """The name of the preset whose data is the local path `source` (train.py's `--eval_data demo_data`)."""
    for name, tasks in PRESETS.items():
        preset = tasks[0].source
        if os.path.exists(source) and os.path.exists(preset) and os.path.samefile(source, preset):
            return name
    return None


def _contract_retrieval_task(source: str, split: str) -> EvalTask:
    dataset = data_lib.load_source(source, split=split)
    columns = tuple(c for c in (data_lib.ALT_TEXT, data_lib.CAPTION) if c in dataset.column_names)
    if not columns:
        raise ValueError(f"{source}: not a preset and has no {data_lib.ALT_TEXT!r} or {data_lib.CAPTION!r} column; "
                         f"pass a preset ({sorted(PRESETS)}) or an EvalTask")
    return EvalTask(Path(source).name or source, RETRIEVAL, source, split, caption_columns=columns)


# ----------------------------------------------------------------------------------------------------------------
# Loading a task's data
# ----------------------------------------------------------------------------------------------------------------


def load_split(task: EvalTask, split: str):
    """The rows of `split` (filtered by `task.row_filter`), images left undecoded, and the image column name.

    Raises:
        ValueError: a missing column, no image column to pick, or no rows.
    """
    dataset = data_lib.load_source(task.source, split=split)
    image_column = task.image_column or _only_image_column(dataset, task)
    columns = {"image": image_column, "label": task.label_column}
    columns.update({f"caption {i}": c for i, c in enumerate(task.caption_columns)})
    if task.row_filter:
        columns["row_filter"] = task.row_filter[0]
    data_lib.require_columns(dataset, columns)
    if task.row_filter:
        column, value = task.row_filter
        dataset = dataset.filter(lambda v: v == value, input_columns=column)
    if len(dataset) == 0:
        raise ValueError(f"{task.name}: {task.source} split {split!r} has no rows" +
                         (f" with {task.row_filter[0]} == {task.row_filter[1]!r}" if task.row_filter else ""))
    return data_lib.undecoded_images(dataset, image_column), image_column


def _only_image_column(dataset, task: EvalTask) -> str:
    import datasets

    found = [name for name, feature in dataset.features.items() if isinstance(feature, datasets.Image)]
    if len(found) != 1:
        raise ValueError(f"{task.name}: pass image_column; image columns found: {found} among {dataset.column_names}")
    return found[0]


def class_names_and_labels(task: EvalTask, dataset, full_dataset=None) -> tuple[list[str], np.ndarray]:
    """The class names and each row's class id `(N,)`.

    Integer labels index the class names; string labels are looked up among them. Class names not given by the
    task or a `ClassLabel` are the distinct strings of the label column of `full_dataset` (the whole split, so
    that evaluating a subset keeps every class as a candidate).

    Raises:
        ValueError: a missing label, an unknown class name, a label out of range, or a class-name list whose
            length differs from the dataset's `ClassLabel` count.
    """
    feature = dataset.features[task.label_column]
    labels = list(dataset[task.label_column])
    if task.class_names is not None:
        names = named_list(task.class_names, "classnames")
    elif hasattr(feature, "names"):
        names = list(feature.names)
    else:
        source_labels = labels if full_dataset is None else full_dataset[task.label_column]
        names = sorted({label for label in source_labels if isinstance(label, str)})
    if not names:
        raise ValueError(f"{task.name}: column {task.label_column!r} holds integer labels without ClassLabel names; "
                         "pass class_names")
    if hasattr(feature, "names") and len(feature.names) != len(names):
        raise ValueError(f"{task.name}: {len(names)} class names for {len(feature.names)} classes in column "
                         f"{task.label_column!r}; pass class_names matching the dataset's label order")
    index = {name: i for i, name in enumerate(names)}  # string labels are looked up before any renaming
    if task.class_name_style == "underscores":
        names = [n.replace("_", " ").replace("/", " ") for n in names]
    ids = np.empty(len(labels), dtype=np.int64)
    for row, label in enumerate(labels):
        if label is None:
            raise ValueError(f"{task.name}: row {row} has no label in column {task.label_column!r}")
        if isinstance(label, str):
            if label not in index:
                raise ValueError(f"{task.name}: row {row}: label {label!r} is not among the {len(names)} class names")
            label = index[label]
        if not 0 <= int(label) < len(names):
            raise ValueError(f"{task.name}: row {row}: label {label} out of range for {len(names)} classes")
        ids[row] = int(label)
    return names, ids


def captions_per_image(task: EvalTask, dataset) -> tuple[list[str], np.ndarray]:
    """All captions and, for each, the row of its image: `(texts, text_image_index (T,))`.

    A caption cell is a string or a list of strings; empty strings are not captions.

    Raises:
        ValueError: rows without any caption (they could never be retrieved, and would lower text retrieval
            recall without being a model error).
    """
    texts, image_index, missing = [], [], []
    columns = [dataset[c] for c in task.caption_columns]
    for row in range(len(dataset)):
        found = 0
        for column in columns:
            cell = column[row]
            for text in [cell] if isinstance(cell, str) or cell is None else cell:
                if isinstance(text, str) and text.strip():
                    texts.append(text)
                    image_index.append(row)
                    found += 1
        if not found:
            missing.append(row)
    if missing:
        raise ValueError(f"{task.name}: {len(missing)} images have no caption in columns {list(task.caption_columns)} "
                         f"(rows {missing[:10]}); filter them out (or fill them) before evaluating retrieval")
    return texts, np.asarray(image_index, dtype=np.int64)


# ----------------------------------------------------------------------------------------------------------------
# Features, computed once per sample across processes
# ----------------------------------------------------------------------------------------------------------------


def _core(model, accelerator):
    return accelerator.unwrap_model(model) if accelerator is not None else model


def _run_sharded(items: Sequence, encode, batch_size: int, accelerator=None, desc: str = "") -> torch.Tensor:
    """Applies `encode(batch_of_items) -> (b, D)` to all items, each process a share, and gathers the result.

    With an `accelerator`, the batches are dealt round-robin to processes; `gather_for_metrics` returns them in
    the original order and drops the samples Accelerate repeats to even out the last round, so every process
    gets exactly `(len(items), D)`, each item encoded once.
    """
    loader = torch.utils.data.DataLoader(range(len(items)), batch_size=batch_size, shuffle=False,
                                         collate_fn=lambda idx: torch.tensor(idx))
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.data_loader import prepare_data_loader

        # Not `accelerator.prepare`: that would register the loader for checkpointing on every evaluation.
        loader = prepare_data_loader(loader, accelerator.device, num_processes=accelerator.num_processes,
                                     process_index=accelerator.process_index, put_on_device=False)
    show = accelerator is None or accelerator.is_local_main_process
    outputs = []
    for indices in tqdm(loader, desc=desc, disable=not show, leave=False):
        features = encode([items[i] for i in indices.tolist()]).float()
        if accelerator is not None and accelerator.num_processes > 1:
            features = accelerator.gather_for_metrics(features)
        outputs.append(features.cpu())
    result = torch.cat(outputs)
    if len(result) != len(items):  # a sample dropped or repeated would bias every metric silently
        raise RuntimeError(f"{desc}: encoded {len(result)} features for {len(items)} items")
    return result


def _device_and_dtype(model) -> tuple[torch.device, torch.dtype]:
    parameter = next(model.parameters())
    return parameter.device, parameter.dtype


@torch.no_grad()
def encode_images(model, processor, images: Sequence, batch_size: int = 64, accelerator=None,
                  desc: str = "images") -> torch.Tensor:
    """Images (PIL images or undecoded dataset cells) -> `(N, projection_dim)` L2-normalised float32 features.

    `processor` is anything whose `image_processor` (or itself) maps PIL images to `pixel_values`.
    """
    model = _core(model, accelerator)
    device, dtype = _device_and_dtype(model)
    image_processor = getattr(processor, "image_processor", None) or processor

    def encode(cells):
        pixels = image_processor([data_lib.decode_image(c).convert("RGB") for c in cells], return_tensors="pt")
        pixel_values = pixels["pixel_values"].to(device=device, dtype=dtype)
        return F.normalize(model.get_image_features(pixel_values=pixel_values).pooler_output, dim=-1)

    return _run_sharded(images, encode, batch_size, accelerator, desc)


def tokenize(processor, texts: list[str]) -> dict[str, torch.Tensor]:
    """`input_ids`/`attention_mask` `(B, L)`, padded to the longest text, truncated to the context length."""
    tokenizer_call = processor if callable(processor) else processor.tokenizer
    encoded = tokenizer_call(text=texts, padding=True, truncation=True, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded.get("attention_mask")}


@torch.no_grad()
def encode_texts(model, processor, texts: Sequence[str], batch_size: int = 256, accelerator=None,
                 desc: str = "texts") -> torch.Tensor:
    """Texts -> `(T, projection_dim)` L2-normalised float32 features (the processor's tokenizer and cleaning)."""
    model = _core(model, accelerator)
    device, _ = _device_and_dtype(model)

    def encode(batch):
        inputs = {k: v.to(device) for k, v in tokenize(processor, list(batch)).items() if v is not None}
        return F.normalize(model.get_text_features(**inputs).pooler_output, dim=-1)

    return _run_sharded(texts, encode, batch_size, accelerator, desc)


# ----------------------------------------------------------------------------------------------------------------
# Zero-shot classifier with a cache
# ----------------------------------------------------------------------------------------------------------------


# model -> (weights state, fingerprint): the weights are hashed once per state, not once per lookup.
_FINGERPRINTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _weights_state(model) -> tuple:
    # Every in-place update (optimizer step, load_state_dict, `mul_`) bumps a tensor's version counter, and a
    # replaced tensor has a new identity and storage.
    return tuple((name, id(t), t._version, t.data_ptr()) for name, t in model.state_dict(keep_vars=True).items())


def model_fingerprint(model) -> str:
    """sha256 of every parameter and buffer (name, dtype, shape, bytes): changes whenever the weights do, so a
    cached classifier is never reused after a training step. The hash is recomputed only when a tensor was
    modified or replaced since the last call (about 0.5 s per pass for ViT-B/32 on one CPU core)."""
    state = _weights_state(model)
    memo = _FINGERPRINTS.get(model)
    if memo is not None and memo[0] == state:
        return memo[1]
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    _FINGERPRINTS[model] = (state, digest.hexdigest())
    return digest.hexdigest()


class ClassifierCache:
    """Zero-shot class embeddings `(D, C)` keyed by a hash of (weights, tokenizer, class names, templates).

    Held in memory (the `max_in_memory` most recently used); with `cache_dir` also written to
    `<cache_dir>/<key>.pt` (atomically) and read back by later runs. `hits`/`misses` count lookups.
    """

    def __init__(self, cache_dir: str | os.PathLike | None = None, max_in_memory: int = 16):
        self.cache_dir = Path(cache_dir) if cache_dir else None
        # Bounded: evaluating every N training steps adds one entry per evaluation (the weights changed).
        self.memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.max_in_memory = max_in_memory
        self.hits = self.misses = 0

    @staticmethod
    def key(model, processor, class_names: Sequence[str], templates: Sequence[str]) -> str:
        tokenizer = getattr(processor, "tokenizer", processor)
        # The tokenizer is identified by its output on every prompt's class-name slot and a probe string.
        probe = tokenize(processor, [*class_names, " ".join(templates)])["input_ids"]
        payload = json.dumps([type(tokenizer).__name__, list(class_names), list(templates)])
        digest = hashlib.sha256(payload.encode())
        digest.update(probe.numpy().tobytes())
        digest.update(model_fingerprint(model).encode())
        return digest.hexdigest()[:32]

    def get(self, key: str) -> torch.Tensor | None:
        if key in self.memory:
            self.hits += 1
            self.memory.move_to_end(key)
            return self.memory[key]
        path = self.cache_dir / f"{key}.pt" if self.cache_dir else None
        if path is not None and path.exists():
            self.hits += 1
            self._remember(key, torch.load(path, map_location="cpu", weights_only=True))
            return self.memory[key]
        self.misses += 1
        return None

    def _remember(self, key: str, classifier: torch.Tensor):
        self.memory[key] = classifier
        while len(self.memory) > self.max_in_memory:
            self.memory.popitem(last=False)

    def put(self, key: str, classifier: torch.Tensor):
        self._remember(key, classifier)
        if self.cache_dir is not None:
            with _replaced_atomically(self.cache_dir / f"{key}.pt", "wb") as file:
                torch.save(classifier, file)


DEFAULT_CACHE = ClassifierCache()


def zeroshot_classifier(model, processor, class_names: Sequence[str], templates: Sequence[str],
                        batch_size: int = 256, accelerator=None, cache: ClassifierCache | None = None) -> torch.Tensor:
    """Prompt-ensembled class embeddings `(D, C)`: for each class, the mean of its L2-normalised template
    embeddings, renormalised (CLIP_benchmark's `zero_shot_classifier`).

    All `C * len(templates)` prompts are encoded in batches of `batch_size` regardless of class boundaries.
    """
    templates = check_templates(templates)
    if len(class_names) == 0:
        raise ValueError("class_names: the list is empty")
    cache = DEFAULT_CACHE if cache is None else cache
    core = _core(model, accelerator)
    key = cache.key(core, processor, class_names, templates)
    cached = cache.get(key)
    if cached is not None:
        return cached
    prompts = [template.format(name) for name in class_names for template in templates]
    embeddings = encode_texts(model, processor, prompts, batch_size, accelerator, desc="class prompts")
    embeddings = embeddings.view(len(class_names), len(templates), -1).mean(dim=1)
    classifier = (embeddings / embeddings.norm(dim=-1, keepdim=True)).T.contiguous()
    cache.put(key, classifier)
    return classifier


# ----------------------------------------------------------------------------------------------------------------
# Metrics (pure functions of features)
# ----------------------------------------------------------------------------------------------------------------


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of rows of `logits (N, C)` whose label `(N,)` is among the k highest; NaN when `C < k`."""
    if logits.shape[1] < k:
        return float("nan")
    top = logits.topk(k, dim=1, largest=True, sorted=True).indices
    return int((top == labels.view(-1, 1)).any(dim=1).sum()) / len(labels)


def mean_per_class_recall(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Mean over the classes present in `labels` of the fraction of their rows predicted right (sklearn's
    `balanced_accuracy_score`, which CLIP_benchmark uses): classes without rows do not count."""
    classes = np.unique(labels)
    recalls = np.array([(predictions[labels == c] == c).mean() for c in classes], dtype=np.float64)
    return float(recalls.mean())


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor | np.ndarray, prefix: str = "") -> dict:
    """`acc1`, `acc5` (NaN with fewer than 5 classes) and `mean_per_class_recall` of `logits (N, C)`."""
    labels = torch.as_tensor(np.asarray(labels))
    if len(labels) == 0:
        raise ValueError("no samples to score")
    predictions = logits.argmax(dim=1).numpy()
    return {
        f"{prefix}acc1": topk_accuracy(logits, labels, 1),
        f"{prefix}acc5": topk_accuracy(logits, labels, 5),
        f"{prefix}mean_per_class_recall": mean_per_class_recall(predictions, labels.numpy()),
    }


def retrieval_metrics(image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_image_index, ks=RECALL_KS) -> dict:
    """Recall@k both ways, a query counting as a hit when at least one of its matches is in its top k.

    Args:
        image_embeds: `(I, D)` normalised. text_embeds: `(T, D)` normalised.
        text_image_index: `(T,)`, the image row of each text (several texts may share an image).
        ks: cut-offs; a k above the number of candidates scores every query as a hit (all are retrieved).

    Returns:
        `image_retrieval_recall@k` (text -> image, over T queries) and `text_retrieval_recall@k` (image -> text,
        over I queries), CLIP_benchmark's names.
    """
    text_image_index = torch.as_tensor(np.asarray(text_image_index), dtype=torch.long)
    scores = text_embeds @ image_embeds.T  # (T, I)
    metrics = {}
    for k in ks:
        image_hits, text_hits = _hits_in_top_k(scores, text_image_index, k)
        metrics[f"image_retrieval_recall@{k}"] = image_hits.any(1).float().mean().item()
        metrics[f"text_retrieval_recall@{k}"] = text_hits.any(1).float().mean().item()
    return metrics


def _hits_in_top_k(scores: torch.Tensor, text_image_index: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Whether each query's j-th most similar candidate is one of its matches, for j < k (or every candidate, if
    fewer): text -> image `(T, min(k, I))` and image -> text `(I, min(k, T))`, from `scores (T, I)`."""
    num_texts, num_images = scores.shape
    top_images = scores.topk(min(k, num_images), dim=1).indices  # (T, k)
    top_texts = scores.T.topk(min(k, num_texts), dim=1).indices  # (I, k)
    return top_images == text_image_index[:, None], text_image_index[top_texts] == torch.arange(num_images)[:, None]


def recall_curve(image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_image_index,
                 max_k: int = RECALL_CURVE_MAX_K) -> dict[str, list]:
    """`retrieval_metrics`' recall at every k from 1 to `max_k`, or to the larger candidate count if that is
    smaller (where every query is a hit both ways).

    The hits come from one top-K ranking per direction (`retrieval_metrics` ranks once per k, 25 times slower for
    K = 50), so the curve equals the R@1/5/10 values unless candidates tie exactly in score across the k-th place,
    which `topk` may break differently for different k.

    Args:
        image_embeds: `(I, D)` normalised. text_embeds: `(T, D)` normalised. text_image_index: `(T,)`.

    Returns:
        `{"k": [1, ..., K], "image_retrieval_recall": [K values], "text_retrieval_recall": [K values]}`, the
        recall at `k[i]` at index i, non-decreasing in k.
    """
    text_image_index = torch.as_tensor(np.asarray(text_image_index), dtype=torch.long)
    scores = text_embeds @ image_embeds.T  # (T, I)
    ks = list(range(1, min(max_k, max(scores.shape)) + 1))
    curve = {"k": ks}
    for name, hits in zip(("image_retrieval_recall", "text_retrieval_recall"),
                          _hits_in_top_k(scores, text_image_index, len(ks))):
        found = hits.cumsum(dim=1) > 0  # (queries, K): a match within the first j + 1 candidates
        # A count over queries, so exact in float32 and equal to `retrieval_metrics`' mean at the same k.
        curve[name] = [found[:, min(k, found.shape[1]) - 1].float().mean().item() for k in ks]
    return curve


def linear_probe(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                 test_labels: np.ndarray, val_features: np.ndarray | None = None, val_labels: np.ndarray | None = None,
                 val_fraction: float = 0.2, cs: Sequence[float] = LINEAR_PROBE_CS, seed: int = 0,
                 max_iter: int = 1000, num_classes: int | None = None) -> dict:
    """Logistic regression on frozen features `(N, D)`: C swept on validation, refit on train + validation.

    The CLIP paper (appendix A.3) searches the L2 penalty over [1e-6, 1e6] on a validation split with
    L-BFGS; here the sweep is `cs` (13 log-spaced values by default) followed by a finer pass of four values
    around the best (+-0.25 and +-0.5 decades), ties going to the stronger regularisation. Without a validation
    split, a stratified `val_fraction` of the training rows is held out (seeded). CLIP_benchmark's linear probe
    instead trains a torch linear layer with a weight-decay sweep, so `lp_*` numbers are comparable in meaning
    with its, not equal to the digit.

    Returns:
        `lp_acc1`, `lp_acc5`, `lp_mean_per_class_recall` (CLIP_benchmark's names) and `lp_C`, the chosen C.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    if val_features is None:
        stratify = train_labels if np.unique(train_labels, return_counts=True)[1].min() >= 2 else None
        train_features, val_features, train_labels, val_labels = train_test_split(
            train_features, train_labels, test_size=val_fraction, random_state=seed, stratify=stratify)

    def fit(c, x, y):
        # Weakly regularised fits (large C) on separable features do not converge within max_iter; the sweep
        # scores them on validation like the others, so the warning carries no information here.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return LogisticRegression(C=c, max_iter=max_iter, random_state=seed).fit(x, y)

    def val_accuracy(c):
        return float((fit(c, train_features, train_labels).predict(val_features) == val_labels).mean())

    scores = {c: val_accuracy(c) for c in tqdm(list(cs), desc="linear probe C sweep", leave=False)}
    best = max(sorted(scores), key=lambda c: scores[c])  # sorted ascending: a tie keeps the smallest C
    for c in (best * 10 ** d for d in (-0.5, -0.25, 0.25, 0.5)):
        scores[c] = val_accuracy(c)
    best = max(sorted(scores), key=lambda c: scores[c])
    classifier = fit(best, np.concatenate([train_features, val_features]), np.concatenate([train_labels, val_labels]))
    # The decision function's columns are the classes seen in training; classes never seen score -inf.
    num_classes = int(num_classes or max(classifier.classes_.max(), test_labels.max()) + 1)
    logits = np.full((len(test_features), num_classes), -np.inf)
    logits[:, classifier.classes_] = _class_scores(classifier, test_features)
    metrics = classification_metrics(torch.from_numpy(logits), test_labels, prefix="lp_")
    return {**metrics, "lp_C": best}


def _class_scores(classifier, features: np.ndarray) -> np.ndarray:
    """`(N, len(classes_))` scores; sklearn gives one score for two classes, turned into the logits (-s/2, s/2)."""
    scores = classifier.decision_function(features)
    return scores if scores.ndim == 2 else np.stack([-scores / 2, scores / 2], axis=1)


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
                                               desc=f"{task.name} {role or split} images")
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
    config = getattr(_core(model, accelerator), "config", None)
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


# ----------------------------------------------------------------------------------------------------------------
# Results file and model card
# ----------------------------------------------------------------------------------------------------------------


@contextmanager
def _replaced_atomically(path: str | os.PathLike, mode: Literal["w", "wb"] = "w"):
    """A temporary file beside `path` that replaces it once the block ends without error (else it is removed), so
    a reader never sees a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as file:
            yield file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, payload: Any):
    with _replaced_atomically(path) as file:
        json.dump(payload, file, indent=1, allow_nan=True)


def write_text_atomic(path: str | os.PathLike, text: str):
    with _replaced_atomically(path) as file:
        file.write(text)


def _records_from(results) -> list[dict]:
    """Records from a results file payload, a list of records, or train.py's flat `eval/<dataset>/<metric>`."""
    if isinstance(results, dict) and "results" in results:
        return list(results["results"])
    if isinstance(results, dict):
        grouped: dict[tuple[str, str], dict] = {}
        for key, value in results.items():
            parts = key.split("/")
            if len(parts) >= 3 and parts[0] == "eval":
                metric = "/".join(parts[2:])
                grouped.setdefault((parts[1], _task_of(metric)), {})[metric] = value
        return [{"dataset": d, "task": t, "split": "", "metrics": m} for (d, t), m in grouped.items()]
    return list(results)


def _task_of(metric: str) -> str:
    if metric.startswith("lp_"):
        return LINEAR_PROBE
    return RETRIEVAL if "retrieval_recall" in metric else ZEROSHOT


def _percent(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def results_table(results) -> str:
    """Markdown tables (one per task kind) of the records, values in percent."""
    records = _records_from(results)
    if not records:
        return "_Not evaluated._"
    sections = []
    titles = {ZEROSHOT: "Zero-shot classification", RETRIEVAL: "Retrieval", LINEAR_PROBE: "Linear probe"}
    for task, title in titles.items():
        rows = [r for r in records if r["task"] == task]
        if not rows:
            continue
        metrics = [m for m in rows[0]["metrics"] if m != "lp_C"]
        header = "| dataset | split | " + " | ".join(metrics) + " |"
        lines = [f"**{title}** (%)", "", header, "|---|---|" + "---:|" * len(metrics)]
        for r in rows:
            lines.append(f"| {r['dataset']} | {r.get('split', '')} | " +
                         " | ".join(_percent(r["metrics"].get(m)) for m in metrics) + " |")
        sections.append("\n".join(lines))
    return "\n\n".join(sections)


def _matplotlib():
    """matplotlib's `Figure` and Agg canvas, imported only when a plot is drawn (an optional dependency). The Agg
    canvas is attached per figure: the process-wide backend (a notebook's, say) is left alone."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import NullFormatter, ScalarFormatter
    except ImportError as error:
        raise ImportError("plotting recall@k curves needs matplotlib: pip install matplotlib "
                          "(or pip install -e '.[plot]')") from error
    return Figure, FigureCanvasAgg, ScalarFormatter, NullFormatter


def _curve_labels(records: list[dict]) -> list[str]:
    """One legend entry per record: the dataset, plus the model and the split where they tell records apart."""
    models = {r.get("model") for r in records}
    labels = [r["dataset"] + (f" ({Path(str(r.get('model'))).name})" if len(models) > 1 else "") for r in records]
    if len(set(labels)) < len(labels):
        labels = [f"{label} [{r.get('split', '')}]" for label, r in zip(labels, records)]
    return labels


def plot_recall_at_k(results, path: str | os.PathLike, figsize: tuple[float, float] = (10.0, 4.0),
                     dpi: int = 100) -> Path:
    """Draws the retrieval recall@k curves of every retrieval record, image -> text and text -> image side by side
    (log-scaled k, recall in percent, R@1/5/10 marked), and writes them to a PNG of `figsize * dpi` pixels.

    Args:
        results: records (`run_evaluation`), a results file's payload, or the path of a results file: the plot is
            drawn from each record's `recall_curve`, so it can be redrawn from `results.json` alone.
        path: the PNG, written atomically (its folder created).

    Raises:
        ImportError: matplotlib is missing (`pip install matplotlib`, or the `plot` extra).
        ValueError: no record has a recall curve (no retrieval task, `recall_curve_max_k=0`, or train.py's flat
            metrics, which hold R@1/5/10 only).
    """
    if isinstance(results, (str, os.PathLike)):
        results = json.loads(Path(results).read_text(encoding="utf-8"))
    records = [r for r in _records_from(results) if r.get("recall_curve")]
    if not records:
        raise ValueError("no retrieval results with a recall_curve to plot: evaluate a retrieval task "
                         "(recall_curve_max_k > 0)")
    Figure, FigureCanvasAgg, ScalarFormatter, NullFormatter = _matplotlib()
    figure = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2, sharey=True)
    max_k = max(r["recall_curve"]["k"][-1] for r in records)
    # CLIP_benchmark's names are those of the retrieved side: text_retrieval is image -> text.
    panels = (("text_retrieval_recall", "image \u2192 text"), ("image_retrieval_recall", "text \u2192 image"))
    for ax, (name, direction) in zip(axes, panels):
        for record, label in zip(records, _curve_labels(records)):
            ks = record["recall_curve"]["k"]
            marked = [i for i, k in enumerate(ks) if k in RECALL_KS]
            ax.plot(ks, [100 * v for v in record["recall_curve"][name]], marker="o", markevery=marked,
                    markersize=4, linewidth=1.5, label=label)
        ax.set_xscale("log")
        ax.set_xlim(0.9, 1.1 * max(max_k, 2))  # padded: the k = 1 markers and 100% lines stay off the frame
        ax.set_xticks([k for k in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if k <= max(max_k, 2)])
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(-2, 102)
        ax.set_yticks(range(0, 101, 20))
        ax.grid(True, which="major", alpha=0.3)
        ax.set_xlabel("k (log scale)")
        ax.set_title(f"{direction} ({name}@k)", fontsize=10)
    axes[0].set_ylabel("recall@k (%)")
    axes[1].legend(loc="lower right", fontsize=8)
    figure.suptitle("Retrieval recall@k (a query is a hit when one of its matches is in the top k)", fontsize=11)
    with _replaced_atomically(path, "wb") as file:
        figure.savefig(file, format="png", dpi=dpi)
    return Path(path)


def render_model_card(results, template: str | os.PathLike | None = None, **info) -> str:
    """The model card: `model_card.md` with its `{{placeholders}}` filled from the results and `info`.

    Args:
        results: records (`run_evaluation`), a results file's payload, or train.py's flat metrics.
        template: a template path (default: this repository's `model_card.md`).
        info: `model_name`, `base_model`, `description`, `train_args` (dict), `eval_command`, `recall_plot` (the
            path of `plot_recall_at_k`'s PNG, relative to the card: embedded as an image); missing ones get
            neutral defaults so every placeholder is filled.

    Raises:
        KeyError: a placeholder in the template that nothing fills.
    """
    train_args = info.pop("train_args", None) or {}
    records = _records_from(results)
    if train_args.get("eval_split"):  # train.py's flat metrics hold no split; its arguments name the one it used
        records = [{**r, "split": r.get("split") or train_args["eval_split"]} for r in records]
    recall_plot = info.pop("recall_plot", None)
    values = {
        "model_name": info.pop("model_name", None) or Path(str(train_args.get("output_dir", ""))).name
        or (records[0].get("model") if records else None) or "model",
        "base_model": info.pop("base_model", None) or train_args.get("model_name_or_path") or "trained from scratch",
        "description": info.pop("description", None) or "A CLIP-style dual encoder.",
        "training": _training_summary(train_args),
        "results_table": results_table(records),
        "eval_command": info.pop("eval_command", None) or _eval_command(records, train_args.get("eval_data")),
        "evaluated_datasets": ", ".join(sorted({r["dataset"] for r in records})) or "none",
        "recall_plot": f"![Retrieval recall@k]({Path(recall_plot).as_posix()})" if recall_plot else "",
    }
    values.update({k: str(v) for k, v in info.items()})
    text = Path(template or MODEL_CARD_TEMPLATE).read_text(encoding="utf-8")

    def fill(match):
        if match.group(1) not in values:
            name = match.group(1)
            raise KeyError(f"model card placeholder {{{{{name}}}}} has no value; pass it as {name}=")
        return str(values[match.group(1)])

    return re.sub(r"\{\{\s*(\w+)\s*\}\}", fill, text)


def _eval_command(records: list[dict], eval_data: str | None = None) -> str:
    """The eval.py command that evaluates the card's datasets again.

    The data is train.py's `--eval_data` when given, else the records' datasets when all are presets, else the
    demo preset; the split is added where the records share one that differs from the presets' own.
    """
    splits = {r.get("split") for r in records} - {None, ""}
    split = splits.pop() if len(splits) == 1 else None
    names = {r["dataset"] for r in records}
    if eval_data is None:
        presets = sorted(names) if names and names <= set(PRESETS) else ["demo"]
    elif eval_data in PRESETS or eval_data in PRESET_GROUPS:
        presets = [eval_data]
    else:
        presets = [name for name in [_preset_of_source(eval_data)] if name]
    if presets:
        flags = ["--preset", *presets]
        default_splits = {t.split for name in presets for t in resolve_tasks(name)}
        if split is not None and default_splits != {split}:
            flags += ["--split", split]
    else:  # train.py evaluated retrieval over the contract's caption columns; flat metrics do not say which it had
        columns = next((r["caption_columns"] for r in records if r.get("caption_columns")),
                       [data_lib.ALT_TEXT, data_lib.CAPTION])
        flags = ["--dataset", eval_data, "--task", RETRIEVAL, "--split", split or "test", "--caption_columns", *columns]
    return "python eval.py --model <this directory> " + shlex.join(flags)


def _training_summary(train_args: dict) -> str:
    if not train_args:
        return "Not recorded."
    keys = [k for k in ("recipe", "model_config", "model_name_or_path", "train_data", "max_steps",
                        "per_device_train_batch_size", "learning_rate", "seed") if k in train_args]
    return "\n".join(f"- `{k}`: `{train_args[k]}`" for k in keys) or "See the saved arguments."


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class EvalArguments:
    model: str = field(metadata={"help": "Model directory or Hub id (AutoModel + AutoProcessor)."})
    preset: list[str] = field(default_factory=list, metadata={
        "help": f"Presets or groups: {sorted(PRESETS)} / {sorted(PRESET_GROUPS)}."})
    dataset: str | None = field(default=None, metadata={
        "help": "Any source data.load_source reads (instead of --preset)."})
    task: str | None = field(default=None, metadata={
        "help": f"{TASKS} (aliases {sorted(TASK_ALIASES)}); with --preset, replaces a classification preset's task."})
    split: str | None = field(default=None, metadata={"help": "Evaluated split (default: the preset's, else 'test')."})
    train_split: str = field(default="train", metadata={"help": "Linear probe training split (--dataset)."})
    val_split: str | None = field(default=None, metadata={
        "help": "Linear probe validation split; default: 20%% of train."})
    image_column: str | None = field(default=None, metadata={"help": "Image column; default: the only Image column."})
    label_column: str | None = field(default=None, metadata={"help": "Class column (ints or class-name strings)."})
    caption_columns: list[str] = field(default_factory=list, metadata={"help": "Retrieval: caption column(s)."})
    class_names: str | None = field(default=None, metadata={
        "help": "File with one class name per line, 'imagenet', or 'clip_benchmark:<dataset>'."})
    templates: str = field(default="openai_imagenet", metadata={
        "help": "File with one template per line ('{}' = class name), 'openai_imagenet', 'simple_imagenet', or "
                "'clip_benchmark:<dataset>'."})
    name: str | None = field(default=None, metadata={"help": "Dataset name in the results (--dataset)."})
    output: str = field(default="results.json", metadata={"help": "Results JSON path."})
    model_card: str | None = field(default=None, metadata={"help": "Also render model_card.md to this path."})
    plot: str | None = field(default=None, metadata={
        "help": "Also draw the retrieval recall@k curves to this PNG (needs matplotlib; embedded in --model_card)."})
    recall_curve_max_k: int = field(default=RECALL_CURVE_MAX_K, metadata={
        "help": "Retrieval: store recall@k for k = 1..N in the results (the curves --plot draws); 0: none."})
    batch_size: int = field(default=64, metadata={"help": "Images per batch and process."})
    text_batch_size: int = field(default=256, metadata={"help": "Texts per batch and process."})
    max_samples: int | None = field(default=None, metadata={"help": "Evaluate the first N rows of each split only."})
    cache_dir: str | None = field(default=None, metadata={"help": "On-disk cache of zero-shot class embeddings."})
    seed: int = field(default=0, metadata={"help": "Seed of the linear probe's validation split and solver."})

    def __post_init__(self):
        if bool(self.preset) == bool(self.dataset):
            raise ValueError("pass exactly one of --preset or --dataset")
        if self.task is not None:
            self.task = TASK_ALIASES.get(self.task, self.task)
            if self.task not in TASKS:
                raise ValueError(f"--task must be one of {TASKS}, got {self.task!r}")
        if self.dataset and self.task is None:
            raise ValueError("--dataset needs --task")
        if self.batch_size < 1 or self.text_batch_size < 1:
            raise ValueError("--batch_size and --text_batch_size must be >= 1")
        if self.recall_curve_max_k < 0 or (self.plot and self.recall_curve_max_k < 1):
            raise ValueError("--recall_curve_max_k must be >= 0, and >= 1 with --plot")


def tasks_from_args(args: EvalArguments) -> list[EvalTask]:
    if args.preset:
        tasks = resolve_tasks(list(args.preset), args.split)
        if args.task is None:
            return tasks
        changed = [replace(t, task=args.task) for t in tasks if t.task != RETRIEVAL]
        if args.task == LINEAR_PROBE and any(t.train_split is None for t in changed):
            raise ValueError("--task linear_probe: a preset has no training split")
        return changed if args.task != RETRIEVAL else [t for t in tasks if t.task == RETRIEVAL]
    return [EvalTask(
        name=args.name or Path(args.dataset).name or args.dataset, task=args.task, source=args.dataset,
        split=args.split or "test", image_column=args.image_column, label_column=args.label_column,
        caption_columns=tuple(args.caption_columns), class_names=args.class_names, templates=args.templates,
        train_split=args.train_split, val_split=args.val_split)]


def load_model_and_processor(path: str, device: torch.device | str = "cpu"):
    """`AutoModel` + `AutoProcessor` (after registering ALIP); a directory saved without a processor gets CLIP's
    preprocessing at the model's size (`ALIPProcessor.from_config`)."""
    import modeling_alip  # noqa: F401 - registers ALIP with the Auto classes
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(path).to(device).eval()
    try:
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError, TypeError) as error:
        logger.warning("--model %s: no processor saved (%s); using CLIP's preprocessing", path, error)
        processor = modeling_alip.ALIPProcessor.from_config(model.config)
    return model, processor


def main(argv: list[str] | None = None) -> list[dict]:
    """Parses flags, evaluates, writes the results JSON (and model card) on the main process; returns records."""
    from accelerate import Accelerator
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(EvalArguments).parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    accelerator = Accelerator()
    tasks = tasks_from_args(args)
    if args.plot:  # fail before evaluating, not after
        _matplotlib()
        if not any(t.task == RETRIEVAL for t in tasks):
            raise ValueError("--plot draws retrieval recall@k curves, but no retrieval task is evaluated")
    model, processor = load_model_and_processor(args.model, accelerator.device)
    settings = EvalSettings(args.batch_size, args.text_batch_size, max_samples=args.max_samples, seed=args.seed,
                            recall_curve_max_k=args.recall_curve_max_k)
    records = run_evaluation(model, processor, tasks, accelerator=accelerator, settings=settings,
                             cache=ClassifierCache(args.cache_dir), model_name=args.model)
    if accelerator.is_main_process:
        payload = {"model": args.model, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   "num_processes": accelerator.num_processes, "results": records}
        write_json_atomic(args.output, payload)
        print(results_table(records))
        if args.plot:
            plot_recall_at_k(records, args.plot)
        if args.model_card:
            plot_link = os.path.relpath(args.plot, Path(args.model_card).resolve().parent) if args.plot else None
            card = render_model_card(records, model_name=Path(args.model).name, recall_plot=plot_link,
                                     eval_command="python eval.py " + " ".join(sys.argv[1:] if argv is None else argv))
            write_text_atomic(args.model_card, card)
    accelerator.wait_for_everyone()
    return records


if __name__ == "__main__":
    main()
