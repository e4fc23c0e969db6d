"""Image and text features computed once per sample across processes, and the zero-shot classifier
(prompt-ensembled class embeddings) with its cache."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from alip_hf import data as data_lib
from alip_hf.evaluation.classnames import check_templates
from alip_hf.io import replaced_atomically
from alip_hf.models import core_model


# ----------------------------------------------------------------------------------------------------------------
# Features, computed once per sample across processes
# ----------------------------------------------------------------------------------------------------------------


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


# `--dtype` names; fp32 runs without autocast.
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Mixed precision for the towers (`dtype` None: none). The features leave it as float32, so similarities,
    the classifier and every metric are computed in float32."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def encode_images(model, processor, images: Sequence, batch_size: int = 64, accelerator=None,
                  desc: str = "images", autocast_dtype: torch.dtype | None = None, row_ids: Sequence | None = None,
                  source: str | None = None) -> torch.Tensor:
    """Images (PIL images or undecoded dataset cells) -> `(N, projection_dim)` L2-normalised float32 features.

    `processor` is anything whose `image_processor` (or itself) maps PIL images to `pixel_values`;
    `autocast_dtype` runs the image tower under `torch.autocast` in that dtype. An image that does not decode
    stops the evaluation with a `ValueError` naming `source`, its row (index, and id from `row_ids`) and file:
    skipping it would change the denominators of every metric.
    """
    model = core_model(model, accelerator)
    device, dtype = _device_and_dtype(model)
    image_processor = getattr(processor, "image_processor", None) or processor

    def encode(rows):
        decoded = [decode_row(cell, row, source or desc, row_ids) for row, cell in rows]
        pixels = image_processor(decoded, return_tensors="pt")
        pixel_values = pixels["pixel_values"].to(device=device, dtype=dtype)
        with autocast(device, autocast_dtype):
            features = model.get_image_features(pixel_values=pixel_values).pooler_output
        return F.normalize(features.float(), dim=-1)

    return _run_sharded(list(enumerate(images)), encode, batch_size, accelerator, desc)


def decode_row(cell, row: int, source: str = "images", row_ids: Sequence | None = None):
    """One evaluation image as RGB; a decoding failure names the row, its id and its file."""
    try:
        return data_lib.decode_image(cell).convert("RGB")
    except Exception as error:  # noqa: BLE001 - any decoder failure: report where it happened
        where = f"row {row}" + (f" (id {row_ids[row]!r})" if row_ids is not None else "")
        path = cell.get("path") if isinstance(cell, dict) else cell if isinstance(cell, str) else None
        raise ValueError(f"{source}: the image of {where}{f', file {path}' if path else ''} does not decode "
                         f"({type(error).__name__}: {error}); remove or replace it") from error


def text_limit(model, accelerator=None) -> int | None:
    """The number of tokens (start and end included) texts are cut to: the text tower's positions,
    `config.text_config.max_position_embeddings` (77 for CLIP, 248 for a Long-CLIP model), whatever length its
    tokenizer was saved with, since a longer text cannot be encoded and a shorter cut would drop text the model
    reads. `None` for a model without that config: the tokenizer's own `model_max_length` applies."""
    config = getattr(core_model(model, accelerator), "config", None)
    positions = getattr(getattr(config, "text_config", None), "max_position_embeddings", None)
    return int(positions) if positions else None


def tokenize(processor, texts: list[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
    """`input_ids`/`attention_mask` `(B, L)`, padded to the longest text, truncated to `max_length` tokens (default:
    the tokenizer's `model_max_length`)."""
    tokenizer_call = processor if callable(processor) else processor.tokenizer
    limit = {"max_length": max_length} if max_length else {}
    encoded = tokenizer_call(text=texts, padding=True, truncation=True, return_tensors="pt", **limit)
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded.get("attention_mask")}


def texts_over_limit(processor, texts: Sequence[str], max_length: int | None) -> int:
    """How many of `texts` have more than `max_length` tokens (start and end included): those `encode_texts` cuts."""
    tokenizer_call = processor if callable(processor) else processor.tokenizer
    if max_length is None:
        max_length = getattr(getattr(processor, "tokenizer", processor), "model_max_length", None)
    if not texts or not max_length:
        return 0
    ids = tokenizer_call(text=list(texts), padding=False, truncation=False, return_tensors=None)["input_ids"]
    return sum(len(row) > max_length for row in ids)


@torch.no_grad()
def encode_texts(model, processor, texts: Sequence[str], batch_size: int = 256, accelerator=None,
                 desc: str = "texts", autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Texts -> `(T, projection_dim)` L2-normalised float32 features (the processor's tokenizer and cleaning, each
    text cut to `text_limit(model)` tokens; the text tower under autocast in `autocast_dtype`, if given)."""
    model = core_model(model, accelerator)
    device, _ = _device_and_dtype(model)
    limit = text_limit(model)

    def encode(batch):
        inputs = {k: v.to(device) for k, v in tokenize(processor, list(batch), limit).items() if v is not None}
        with autocast(device, autocast_dtype):
            features = model.get_text_features(**inputs).pooler_output
        return F.normalize(features.float(), dim=-1)

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
    def key(model, processor, class_names: Sequence[str], templates: Sequence[str],
            autocast_dtype: torch.dtype | None = None) -> str:
        tokenizer = getattr(processor, "tokenizer", processor)
        # The tokenizer is identified by its output on every prompt's class-name slot and a probe string.
        probe = tokenize(processor, [*class_names, " ".join(templates)])["input_ids"]
        payload = [type(tokenizer).__name__, list(class_names), list(templates)]
        if autocast_dtype is not None:  # kept out of the key otherwise, so that existing caches stay valid
            payload.append(str(autocast_dtype))
        payload = json.dumps(payload)
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
            with replaced_atomically(self.cache_dir / f"{key}.pt", "wb") as file:
                torch.save(classifier, file)


DEFAULT_CACHE = ClassifierCache()


def zeroshot_classifier(model, processor, class_names: Sequence[str], templates: Sequence[str],
                        batch_size: int = 256, accelerator=None, cache: ClassifierCache | None = None,
                        autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Prompt-ensembled class embeddings `(D, C)`: for each class, the mean of its L2-normalised template
    embeddings, renormalised (CLIP_benchmark's `zero_shot_classifier`).

    All `C * len(templates)` prompts are encoded in batches of `batch_size` regardless of class boundaries.
    """
    templates = check_templates(templates)
    if len(class_names) == 0:
        raise ValueError("class_names: the list is empty")
    cache = DEFAULT_CACHE if cache is None else cache
    core = core_model(model, accelerator)
    key = cache.key(core, processor, class_names, templates, autocast_dtype)
    cached = cache.get(key)
    if cached is not None:
        return cached
    prompts = [template.format(name) for name in class_names for template in templates]
    embeddings = encode_texts(model, processor, prompts, batch_size, accelerator, desc="class prompts",
                              autocast_dtype=autocast_dtype)
    embeddings = embeddings.view(len(class_names), len(templates), -1).mean(dim=1)
    classifier = (embeddings / embeddings.norm(dim=-1, keepdim=True)).T.contiguous()
    cache.put(key, classifier)
    return classifier


