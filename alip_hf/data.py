"""The training input pipeline: decoding, image transforms, text selection, tokenisation, collation, sampling.

Where data comes from, which column is a row's id and which texts count as empty are the data contract's rules
(`alip_hf.sources`); the column names are `alip_hf.schema`'s (re-exported here for convenience).

Decode an image (corrupt ones are skipped and counted), draw its crop (`ImageTransform`, RandomResizedCrop scale
(0.9, 1.0) as the official ALIP code), pick its text(s) with the recipe's `TextSelector`, tokenise a batch padded
to its longest text (`Collator`, through the processor's `tokenize`), and order map-style data in global batches
shared by all processes (`GlobalBatchSampler`) or stream it (`StreamingExamples`).
"""

from __future__ import annotations

import io
import itertools
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import datasets
import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

if TYPE_CHECKING:
    from alip_hf.recipes import TextSelector

from alip_hf.schema import (  # noqa: F401  (re-exported: the contract's names are part of this module's API)
    ALT_TEXT,
    CAPTION,
    CAPTION_MODEL,
    CAPTION_PROMPT_VERSION,
    ERROR,
    FEATURES,
    ID,
    IMAGE,
    PRODUCED_BY,
    REWRITE_MODEL,
    REWRITE_PROMPT_VERSION,
    VECAP,
)
from alip_hf.sources import read_id
# Moved to the data contract (`alip_hf.sources`); importable from here too for existing callers.
from alip_hf.sources import (  # noqa: F401
    load_source, local_files, require_columns, require_text_columns, undecoded_images,
)

# ----------------------------------------------------------------------------------------------------------------
# Training pipeline: decoding, image transforms, text selection, tokenisation, collation, sampling.
#
# Everything random is seeded per sample from `(seed, epoch, index)`, never from a process's global RNG, so a
# resumed run, a run with more DataLoader workers and a run split over more processes all see the same crops
# and the same drawn texts for the same sample.
# ----------------------------------------------------------------------------------------------------------------

logger = logging.getLogger(__name__)

# The official ALIP training transform: RandomResizedCrop(scale=(0.9, 1.0), bicubic) (src/open_alip/transform.py).
ALIP_CROP_SCALE = (0.9, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)  # torchvision's default aspect-ratio range, which the official code keeps
CLIP_MEAN, CLIP_STD = tuple(OPENAI_CLIP_MEAN), tuple(OPENAI_CLIP_STD)  # transformers' constants, CLIP's normalisation


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random generator of one sample in one epoch: independent of process, worker and resume point."""
    return np.random.default_rng([seed, epoch, index])


def random_resized_crop_params(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                               rng: np.random.Generator, attempts: int = 10) -> tuple[int, int, int, int]:
    """`(top, left, crop_height, crop_width)` of a RandomResizedCrop, drawn from the sample's numpy generator.

    The distribution of torchvision's `RandomResizedCrop.get_params` (area fraction uniform in `scale`, log
    aspect ratio uniform in `log(ratio)`, the first of `attempts` tries that fits, else a centre crop clamped to
    `ratio`), drawn from `rng` in one call instead of torch's global generator: reseeding torch per sample cost
    more than the crop itself. The crops differ from the earlier torch-drawn
    ones for the same seed; their distribution does not.
    """
    draws = rng.random(2 * attempts + 2).tolist()  # one call; per-element numpy scalars cost more than the maths
    area, log_lo, log_hi = height * width, math.log(ratio[0]), math.log(ratio[1])
    for k in range(attempts):
        target_area = area * (scale[0] + (scale[1] - scale[0]) * draws[2 * k])
        aspect = math.exp(log_lo + (log_hi - log_lo) * draws[2 * k + 1])
        w, h = round(math.sqrt(target_area * aspect)), round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            # top and left uniform over the valid positions, as torch.randint(0, n + 1)
            return int(draws[-2] * (height - h + 1)), int(draws[-1] * (width - w + 1)), h, w
    in_ratio = width / height  # fallback: the largest centred crop whose aspect ratio is within `ratio`
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def to_normalized_tensor(image: Image.Image, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """RGB PIL image -> `(3, H, W)` float tensor `(x / 255 - mean) / std`.

    The operations of torchvision's `to_tensor` + `normalize`, in the same order (so the same values), without
    their per-call checks and conversions, which cost more than the arithmetic on small images.
    `mean`, `std`: `(3, 1, 1)`.
    """
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    return pixels.to(dtype=torch.get_default_dtype()).div(255).sub_(mean).div_(std)


@dataclass
class ImageTransform:
    """PIL image -> `(3, image_size, image_size)` normalised float tensor.

    Training: RandomResizedCrop with `crop_scale` (official ALIP: (0.9, 1.0)) and bicubic resampling, its crop
    drawn from the sample's own generator. Evaluation: bicubic resize of the short side + center crop.
    """

    image_size: int
    train: bool = True
    crop_scale: tuple[float, float] = ALIP_CROP_SCALE
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD

    def __post_init__(self):
        self._mean = torch.tensor(self.mean, dtype=torch.get_default_dtype()).view(-1, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.get_default_dtype()).view(-1, 1, 1)

    def __call__(self, image: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        image = image.convert("RGB")
        if self.train:
            top, left, height, width = self._crop_params(image, rng)
            # torchvision's resized_crop on a PIL image: PIL crop, then PIL bicubic resize (antialiased).
            image = image.crop((left, top, left + width, top + height)).resize(
                (self.image_size, self.image_size), Image.Resampling.BICUBIC)
        else:
            image = TF.resize(image, self.image_size, InterpolationMode.BICUBIC, antialias=True)
            image = TF.center_crop(image, [self.image_size, self.image_size])
        return to_normalized_tensor(image, self._mean, self._std)

    def _crop_params(self, image: Image.Image, rng: np.random.Generator | None) -> tuple[int, int, int, int]:
        return random_resized_crop_params(image.height, image.width, self.crop_scale, CROP_RATIO,
                                          rng if rng is not None else np.random.default_rng())

    @classmethod
    def from_image_processor(cls, image_processor, train: bool, crop_scale=ALIP_CROP_SCALE) -> "ImageTransform":
        """Size, mean and std from a transformers `CLIPImageProcessor` (or anything with the same attributes)."""
        size = None
        for spec in (getattr(image_processor, "crop_size", None), getattr(image_processor, "size", None)):
            size = size or _size_from(spec)
        if size is None:
            raise ValueError(f"{type(image_processor).__name__} has neither crop_size nor size")
        return cls(
            image_size=int(size),
            train=train,
            crop_scale=tuple(crop_scale),
            mean=tuple(getattr(image_processor, "image_mean", None) or CLIP_MEAN),
            std=tuple(getattr(image_processor, "image_std", None) or CLIP_STD),
        )


def _size_from(spec) -> int | None:
    """Edge length from an int, a dict or transformers' `SizeDict` (`height` or `shortest_edge`)."""
    if spec is None or isinstance(spec, int):
        return spec
    for key in ("height", "shortest_edge"):
        value = spec.get(key) if isinstance(spec, dict) else getattr(spec, key, None)
        if value:
            return int(value)
    return None


def decode_image(value: Any) -> Image.Image:
    """Decodes an image cell: a PIL image, `{"bytes", "path"}` (datasets' undecoded `Image`), bytes or a path.

    High-bit-depth single-channel images (16-bit PNGs: mode `I;16`/`I`; float TIFFs: mode `F`) come back as
    8-bit `L` images scaled from their value range (`to_8bit`): PIL's own `convert("RGB")` clips them, which
    turns a 16-bit PNG white and a float image in [0, 1] black.

    Raises whatever PIL raises on a corrupt image; callers skip and count those.
    """
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, dict):
        image = Image.open(io.BytesIO(value["bytes"])) if value.get("bytes") else Image.open(value["path"])
    elif isinstance(value, (bytes, bytearray)):
        image = Image.open(io.BytesIO(value))
    elif isinstance(value, str):
        image = Image.open(value)
    else:
        raise TypeError(f"cannot decode an image from {type(value).__name__}")
    image.load()  # PIL opens lazily; force the decode here so truncated files fail now
    return to_8bit(image) if image.mode in _HIGH_BIT_DEPTH else image


_HIGH_BIT_DEPTH = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def to_8bit(image: Image.Image) -> Image.Image:
    """A single-channel `I;16`, `I` or `F` image as an 8-bit `L` image, its values scaled, never clipped.

    The scale is the value range the data declares: 16-bit integers (`I;16*`, as PIL reads 16-bit PNGs) map
    [0, 65535] -> [0, 255] (divide by 257, so 65535 -> 255 exactly); 32-bit integers (`I`) are taken as 8-bit
    values when they lie in [0, 255] and as 16-bit ones when they lie in [0, 65535]; floats within [0, 1] map
    [0, 1] -> [0, 255]; anything else (negative values, floats above 1, integers beyond 16 bits) is stretched
    from its own minimum to its maximum. Rounded to the nearest integer.
    """
    values = np.asarray(image, dtype=np.float64)
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if image.mode == "I" and low >= 0 and high <= 255:
        scaled = values
    elif image.mode.startswith("I;16") or (image.mode == "I" and low >= 0 and high <= 65535):
        scaled = values / 257.0
    elif image.mode == "F" and low >= 0 and high <= 1:
        scaled = values * 255.0
    else:
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))  # 2-D uint8: mode L


@dataclass
class ExampleBuilder:
    """Turns one raw row into a training example, or `None` (with the reason) when it must be skipped.

    A row is skipped when its image does not decode or a text path of the recipe has no text: every source of
    the path empty by the data contract's rule (`alip_hf.sources.is_empty_text`: missing, not a string, or
    nothing printable). An empty source among others is a fallback, drawn and counted by the path.
    """

    image_column: str
    selector: TextSelector  # alip_hf.recipes.TextSelector
    transform: ImageTransform
    seed: int = 0
    id_column: str | None = None  # carried into the example as "id" (per-sample logs are joined on it); `json.id`
    # reads a field of img2dataset's metadata column (`alip_hf.sources.read_id`)

    def __call__(self, row: dict, epoch: int, index: int) -> tuple[dict | None, str | None]:
        if not self.selector.usable(row):
            return None, "skipped_texts"
        try:
            image = decode_image(row[self.image_column])
        except Exception as error:  # noqa: BLE001 - any decoder failure means a corrupt image, never fatal
            logger.debug("skipping row %s: %s", index, error)
            return None, "skipped_images"
        rng = sample_rng(self.seed, epoch, index)
        texts, stats = self.selector.select(row, rng)
        example = {"pixel_values": self.transform(image, rng), **texts, "stats": stats}
        if self.id_column is not None:
            example["id"] = read_id(row, self.id_column)
        return example, None


class MapStyleExamples(torch.utils.data.Dataset):
    """A map-style dataset whose items are `(epoch, index)` pairs produced by [`GlobalBatchSampler`].

    Rows were validated by [`filter_valid_rows`] beforehand, so every item yields an example and every batch
    keeps its size: the contrastive loss gathers equal-sized batches from all processes.
    """

    def __init__(self, dataset, build: ExampleBuilder):
        self.dataset, self.build = dataset, build

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        epoch, index = item
        example, reason = self.build(self.dataset[int(index)], epoch, int(index))
        if example is None:
            raise RuntimeError(f"row {index} failed after validation ({reason}); was the data modified meanwhile?")
        return example


def filter_valid_rows(dataset, build: ExampleBuilder, num_proc: int | None = None) -> tuple[Any, dict[str, int]]:
    """Drops rows with a corrupt image or a missing/empty text, and counts them.

    Returns `(filtered dataset, {"skipped_images": n, "skipped_texts": m})`. The check decodes every image once
    (datasets caches the result for file-backed data).
    """
    def reasons(batch: dict) -> dict:
        out = []
        for i in range(len(batch[build.image_column])):
            row = {c: batch[c][i] for c in batch}
            if not build.selector.usable(row):
                out.append("skipped_texts")
                continue
            try:
                decode_image(row[build.image_column])
                out.append("")
            except Exception:  # noqa: BLE001 - counted, never fatal
                out.append("skipped_images")
        return {"_skip_reason": out}

    checked = dataset.map(reasons, batched=True, batch_size=256, num_proc=num_proc,
                          input_columns=None, desc="checking images and texts")
    counts = {"skipped_images": 0, "skipped_texts": 0}
    for reason in checked["_skip_reason"]:
        if reason:
            counts[reason] += 1
    kept = checked.filter(lambda r: [x == "" for x in r], input_columns="_skip_reason", batched=True)
    return kept.remove_columns("_skip_reason"), counts


class StreamingExamples(torch.utils.data.IterableDataset):
    """Examples from this process's part of an `IterableDataset`, shuffled in blocks, cycling over epochs.

    Resumable in constant time: `state_dict()` (torchdata's `Stateful` protocol, which `StatefulDataLoader`
    calls in each worker) is the `datasets` stream state at the start of the current block plus the offset in
    it; `load_state_dict()` makes the next iteration re-read that one block (undecoded rows, at most
    `shuffle_block` of them) and continue after the last example yielded. Nothing before the block is replayed.

    Shuffling: rows are read in blocks of `shuffle_block` and each block is permuted by a generator seeded from
    `(seed, epoch, rank, worker, block)`; the shard order comes from the underlying dataset (`shuffle` with a
    one-row buffer). Deviation from `IterableDataset.shuffle(buffer_size)`: `datasets`' buffer carries half of
    its rows into the next fill, and its content is lost on resume (`datasets` documents this), so a resumed run
    would see other rows; disjoint blocks are restored exactly.

    Rows that fail are skipped here and counted in the next example's `stats`, so the counts reach the training
    loop through the batches. The stream never ends (training length is `max_steps`), so processes whose shards
    hold different numbers of valid rows never wait for each other at an epoch boundary.

    A pass that reads rows but yields none of them ends with a `ValueError` naming `source` and the counts (a
    stream of only invalid rows would otherwise end the DataLoader and the run with a bare `StopIteration`); so
    does a pass that reads no rows at all, except in a DataLoader worker that datasets gave no shard.

    A whole pass that yields fewer than `min_rows` examples (one batch) is refused as map-style data with fewer
    usable rows than a global batch is (`GlobalBatchSampler`): the stream would fill each batch with the same
    rows repeated. With the builder's `id_column` set (per-sample logs), an id yielded twice in one pass is refused,
    as map-style data with duplicate ids is: the log could not be joined on it. Both checks cover the passes a
    run reads from their start (a pass resumed in its middle is not checked again).
    """

    def __init__(self, dataset, build: ExampleBuilder, rank: int = 0, world_size: int = 1, shuffle_block: int = 0,
                 seed: int = 0, source: str = "the stream", min_rows: int = 1):
        self.dataset, self.build, self.rank, self.world_size = dataset, build, rank, world_size
        self.source, self.min_rows = source, min_rows
        self.shuffle_block, self.seed = shuffle_block, seed
        self._state = self._resume = None

    def _part(self, worker_id: int, num_workers: int):
        """The rows of this process and DataLoader worker: whole shards where there are enough of them.

        The split is done here, not by `datasets`' automatic split inside DataLoader workers: that one loads a
        saved state into the unsplit stream first and fails on a worker's state (datasets 5.2).
        """
        from datasets.distributed import split_dataset_by_node

        parts = self.world_size * num_workers
        if parts == 1:
            return self.dataset
        strategy = "shards" if self.dataset.num_shards >= parts else "examples"
        return split_dataset_by_node(self.dataset, rank=self.rank * num_workers + worker_id, world_size=parts,
                                     strategy=strategy)

    def state_dict(self) -> dict:
        """Where the next example comes from: `{epoch, block, position, offset, produced, dataset}` (JSON-able)."""
        return dict(self._state) if self._state is not None else {}

    def load_state_dict(self, state: dict) -> None:
        self._resume = dict(state) if state else None

    def _check_unique(self, row_id: str, seen: set[str]) -> None:
        if row_id in seen:
            raise ValueError(f"--log_sample_weights: id {row_id!r} occurs twice in {self.source} (column "
                             f"{self.build.id_column!r}); the per-sample log is joined on ids, so they must be "
                             "unique. Pass --id_column with a column that identifies each row.")
        seen.add(row_id)

    def _block_order(self, epoch: int, block: int, size: int, worker_id: int) -> np.ndarray:
        if not self.shuffle_block:
            return np.arange(size)
        return np.random.default_rng([self.seed, epoch, self.rank, worker_id, block]).permutation(size)

    def __iter__(self) -> Iterator[dict]:
        worker = torch.utils.data.get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        part = self._part(worker_id, num_workers)
        block_size = max(self.shuffle_block, 1)
        resume, self._resume = self._resume, None
        pending = {"skipped_images": 0, "skipped_texts": 0}
        for epoch in itertools.count(resume["epoch"] if resume else 0):
            part.set_epoch(epoch)
            start = resume if resume and resume["epoch"] == epoch else None
            # `datasets` applies a loaded state only to the epoch it was saved in; None starts the epoch afresh.
            part.load_state_dict(start["dataset"] if start else None)
            block, position = (start["block"], start["position"]) if start else (0, 0)
            offset, produced = (start["offset"], start["produced"]) if start else (0, False)
            block_state = start["dataset"] if start else None
            rows_read, skipped = 0, {"skipped_images": 0, "skipped_texts": 0}
            whole_pass = start is None  # the checks below need the pass from its first row
            yielded, seen_ids = 0, set()
            # `.iter(batch_size=1)` rather than `iter(part)`: inside a DataLoader worker the latter would split
            # the (already split) stream among the workers a second time.
            rows = ({key: values[0] for key, values in batch.items()} for batch in part.iter(batch_size=1))
            while True:
                rows_in_block = list(itertools.islice(rows, block_size))
                if not rows_in_block:
                    break
                next_block_state = part.state_dict()  # after the block's last row: where the next block starts
                rows_read += len(rows_in_block)
                order = self._block_order(epoch, block, len(rows_in_block), worker_id)
                for j in range(offset, len(rows_in_block)):
                    # Per-sample seeds from the stream position: unique per process and DataLoader worker.
                    index = ((position + int(order[j])) * 4096 + worker_id) * 4096 + self.rank
                    example, reason = self.build(rows_in_block[order[j]], epoch, index)
                    if example is None:
                        pending[reason] += 1
                        skipped[reason] += 1
                        continue
                    if whole_pass and "id" in example:
                        self._check_unique(example["id"], seen_ids)
                    example["stats"] = {**example["stats"], **pending}
                    yielded += 1
                    pending = {k: 0 for k in pending}
                    produced = True
                    self._state = {"epoch": epoch, "block": block, "position": position, "offset": j + 1,
                                   "produced": True, "dataset": block_state}
                    yield example
                block, position, offset, block_state = block + 1, position + len(rows_in_block), 0, next_block_state
            if produced and whole_pass and yielded < self.min_rows:
                raise ValueError(f"{self.source} (process {self.rank}) has {yielded} usable row(s) per pass, fewer "
                                 f"than one batch of {self.min_rows}: every batch would repeat the same rows "
                                 f"({skipped['skipped_images']} unreadable images, {skipped['skipped_texts']} "
                                 "missing or empty texts were skipped). Use more data or a smaller batch.")
            if produced:
                continue
            if rows_read:
                raise ValueError(f"no usable row in {self.source} (process {self.rank}): all {rows_read} rows "
                                 f"read were skipped ({skipped['skipped_images']} unreadable images, "
                                 f"{skipped['skipped_texts']} missing or empty texts)")
            if worker is None or worker.num_workers == 1:
                raise ValueError(f"{self.source} yielded no rows (process {self.rank})")
            return  # a DataLoader worker without a shard of the stream


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Yields this process's share of each global batch as a list of `(epoch, index)` items.

    Epoch `e` is a permutation of all rows seeded by `(seed, e)`; global batch `b` of it is rows
    `[b*G, (b+1)*G)` with `G = per_process_batch * world_size`, and process `r` takes the `r`-th slice. One
    process with batch `G` and `n` processes with batch `G/n` thus see the same global batches in the same
    order, and resuming at batch `start` needs no replay. The incomplete tail of each epoch is dropped.
    """

    def __init__(self, num_rows: int, per_process_batch: int, num_batches: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, start: int = 0):
        global_batch = per_process_batch * world_size
        if num_rows < global_batch:
            raise ValueError(f"the dataset has {num_rows} usable rows, fewer than one global batch of {global_batch}")
        self.num_rows, self.batch, self.rank, self.world_size = num_rows, per_process_batch, rank, world_size
        self.seed, self.start, self.num_batches = seed, start, num_batches
        self.batches_per_epoch = num_rows // global_batch

    def __len__(self) -> int:
        return max(self.num_batches - self.start, 0)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        permutation, permutation_epoch = None, -1
        for batch in range(self.start, self.num_batches):
            epoch, position = divmod(batch, self.batches_per_epoch)
            if epoch != permutation_epoch:
                permutation = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
                permutation_epoch = epoch
            begin = (position * self.world_size + self.rank) * self.batch
            yield [(epoch, int(i)) for i in permutation[begin : begin + self.batch]]


@dataclass
class Collator:
    """Examples -> model batch: `pixel_values (B, 3, H, W)`, `input_ids`/`attention_mask (B, L)`, optionally
    `caption_input_ids`/`caption_attention_mask (B, L')`, `stats` (summed integer counts, including
    `truncated_texts`), and `ids` (list of `B` str) when the examples carry their id."""

    processor: Any  # an `ALIPProcessor`: its `tokenize` is the one tokenisation path (cleaning included)
    max_length: int = 77

    def __call__(self, examples: list[dict]) -> dict:
        batch = {"pixel_values": torch.stack([e["pixel_values"] for e in examples])}
        text, truncated = self.processor.tokenize([e["text"] for e in examples], self.max_length)
        batch.update(text)
        if examples[0].get("caption") is not None:
            caption, caption_truncated = self.processor.tokenize([e["caption"] for e in examples], self.max_length)
            batch["caption_input_ids"] = caption["input_ids"]
            batch["caption_attention_mask"] = caption["attention_mask"]
            truncated += caption_truncated
        stats = {"truncated_texts": truncated, "skipped_images": 0, "skipped_texts": 0}
        for example in examples:
            for key, value in example["stats"].items():
                stats[key] = stats.get(key, 0) + value
        batch["stats"] = stats
        if "id" in examples[0]:
            batch["ids"] = [e["id"] for e in examples]
        return batch
