"""Loading image-text data from any source, and the training input pipeline.

Column names are the data contract of `alip_hf.schema` (re-exported here for convenience).

The pipeline (second half of the file): decode an image (corrupt ones are skipped and counted), draw its
crop (`ImageTransform`, RandomResizedCrop scale (0.9, 1.0) as the official ALIP code), pick its text(s) with
the recipe's `TextSelector`, tokenise a batch padded to its longest text (`Collator`, through the processor's `tokenize`), and order
map-style data in global batches shared by all processes (`GlobalBatchSampler`) or stream it
(`StreamingExamples`).
"""

from __future__ import annotations

import glob
import io
import itertools
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

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

_FILE_BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".tar": "webdataset"}


def _data_files(source: str) -> list[str]:
    """Files named by a path or a glob, sorted so every process sees the same order."""
    return sorted(glob.glob(source)) if any(ch in source for ch in "*?[") else [source]


def load_source(
    source: str, split: str = "train", streaming: bool = False, config_name: str | None = None,
    cache_dir: str | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    """Loads image-text data from a `save_to_disk` directory, local files, WebDataset shards or the Hub.

    Args:
        source: one of
            - a directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`;
            - a Parquet/JSON(L)/CSV file or a glob of them (`data/*.parquet`), all read as `split`;
            - a directory of such files or of WebDataset shards, split by file name as on the Hub
              (`train-00000-of-00004.parquet`, `test.parquet`, `train/0000.tar`);
            - WebDataset `.tar` shards (img2dataset's format): a file, a glob, or a brace pattern
              (`shards/{00000..00099}.tar`);
            - a Hub dataset id (`org/name`).
        split: the split to read.
        streaming: return an `IterableDataset` that reads lazily.
        config_name: the configuration (subset) of a Hub dataset or dataset directory (`load_dataset`'s `name`).
        cache_dir: where `datasets` caches what it downloads and prepares.

    Raises:
        FileNotFoundError: a local path or pattern that matches nothing.
        ValueError: a split that the source does not have, or files of mixed or unknown formats.
    """
    hub = {"name": config_name, "cache_dir": cache_dir}
    if config_name is not None and (_is_saved_dataset(source) if os.path.isdir(source) else _looks_local(source)):
        raise ValueError(f"--dataset_config_name {config_name!r}: {source!r} is a saved dataset or data files, "
                         "which have no configurations; it applies to Hub datasets and dataset directories")
    if os.path.isdir(source) and _is_saved_dataset(source):
        loaded = datasets.load_from_disk(source)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"{source} has splits {list(loaded)}, not {split!r}")
            loaded = loaded[split]
        return loaded.to_iterable_dataset() if streaming else loaded
    if os.path.isdir(source):
        check_webdataset_shards(sorted(glob.glob(os.path.join(source, "**", "*.tar"), recursive=True)))
        # Split names come from the file names, as on the Hub (`train-00000.parquet`, `test/...`).
        return _load_files(source, source, split=split, streaming=streaming, **hub)
    if "{" in source and ".tar" in source:
        files = _expand_braces(source)
    elif _looks_local(source):
        files = _data_files(source)
        if not files or not all(os.path.exists(f) for f in files):
            raise FileNotFoundError(f"no data files found at {source!r}")
    else:
        return datasets.load_dataset(source, split=split, streaming=streaming, **hub)
    builders = {_FILE_BUILDERS.get(Path(f).suffix) for f in files}
    if len(builders) != 1 or None in builders:
        raise ValueError(f"{source!r}: expected files of one format among {sorted(_FILE_BUILDERS)}, got {files[:5]}")
    builder = builders.pop()
    if builder == "webdataset":
        check_webdataset_shards(files)
    return _load_files(source, builder, data_files={split: files}, split=split, streaming=streaming,
                       cache_dir=cache_dir)


def _load_files(source: str, path: str, split: str, **kwargs):
    """`datasets.load_dataset` on local files, with an error naming the source when they hold no rows (datasets
    says "Instruction 'train' corresponds to no data!" for empty Parquet files and raises a bare StopIteration
    for empty JSON ones)."""
    try:
        return datasets.load_dataset(path, split=split, **kwargs)
    except StopIteration:
        raise ValueError(f"{source} (split {split!r}) has no rows: its files are empty") from None
    except ValueError as error:
        if "corresponds to no data" in str(error):
            raise ValueError(f"{source} (split {split!r}) has no rows") from error
        raise


def local_files(source: str) -> list[str] | None:
    """The local files `source` reads (as `load_source` resolves it), sorted; `None` for a Hub id.

    A directory gives every file under it except hidden ones (`.cache`, temporary files)."""
    if os.path.isdir(source):
        found = []
        for root, dirs, files in os.walk(source):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            found += [os.path.join(root, f) for f in sorted(files) if not f.startswith(".")]
        return found
    if "{" in source and ".tar" in source:
        return _expand_braces(source)
    if _looks_local(source):
        return _data_files(source)
    return None


# ----------------------------------------------------------------------------------------------------------------
# WebDataset shards cut short
#
# A tar cut off between two members, or inside a member header, reads as a shorter, valid archive: datasets'
# webdataset builder (5.x) and the `webdataset` package (1.x) both stop there without an error, so a download
# killed half-way trains or captions on part of the shard silently. A cut inside a member's data raises tarfile's
# "unexpected end of data" instead, without naming the file (datasets) or only deep in a traceback. Every tar
# written whole ends with the end-of-archive marker (two zero blocks, padded to a multiple of 512 bytes), so
# checking the last 1024 bytes finds a cut shard at the cost of one small read per shard.
# ----------------------------------------------------------------------------------------------------------------


def check_webdataset_shards(files: list[str]) -> None:
    """Fails fast on the first shard that does not end with the end-of-archive marker.

    Raises:
        ValueError: naming the file, the member it ends in or after, and how many samples it holds whole. A
            cut shard is refused rather than skipped: its samples would be missing from training and from every
            recaption step's output (whose row count must equal the source's).
    """
    for path in files:
        size = os.path.getsize(path)
        if size >= 1024 and size % 512 == 0:
            with open(path, "rb") as f:
                f.seek(size - 1024)
                if f.read(1024) == bytes(1024):
                    continue
        raise ValueError(_truncation_report(path, size))


def _truncation_report(path: str, size: int) -> str:
    """What a cut shard still holds whole: the number of complete samples and where it ends."""
    import tarfile

    keys, counts, cut_in = [], [], None  # sample keys in order, members per key, the member cut off
    try:
        with tarfile.open(path, "r:") as tar:
            while True:
                member = tar.next()
                if member is None:
                    break
                if member.offset_data + member.size > size:
                    cut_in = member.name
                    break
                key = member.name.split(".", 1)[0]  # webdataset's sample key: the name up to the first dot
                if not keys or keys[-1] != key:
                    keys.append(key)
                    counts.append(0)
                counts[-1] += 1
    except tarfile.TarError:
        pass  # the header after the last complete member is cut: what was counted is what there is
    members = sum(counts)
    # The last sample read is whole unless the cut member belongs to it or it has fewer members than the others.
    last_cut = bool(keys) and ((cut_in is not None and cut_in.split(".", 1)[0] == keys[-1])
                               or counts[-1] < max(counts))
    whole = len(keys) - int(last_cut)
    where = f"inside member {cut_in!r}" if cut_in else f"after {members} members without the end-of-archive marker"
    return (f"WebDataset shard {path} is truncated ({size} bytes, ends {where}): only {whole} samples "
            "can be read from it whole, and readers would stop there without an error. Download or write the "
            "shard again, or leave it out of the source.")


def _is_saved_dataset(path: str) -> bool:
    return any((Path(path) / name).exists() for name in ("dataset_info.json", "dataset_dict.json", "state.json"))


def _looks_local(source: str) -> bool:
    return os.path.exists(source) or source.startswith((".", "/", "~")) or any(ch in source for ch in "*?[") or (
        Path(source).suffix in _FILE_BUILDERS
    )


def _expand_braces(pattern: str) -> list[str]:
    """`a/{000..002}.tar` -> `["a/000.tar", "a/001.tar", "a/002.tar"]` (img2dataset's shard notation)."""
    head, rest = pattern.split("{", 1)
    body, tail = rest.split("}", 1)
    if ".." in body:
        lo, hi = body.split("..")
        items = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    return [f for item in items for f in _expand_braces(head + item + tail)] if "{" in tail else [
        head + item + tail for item in items
    ]


def require_columns(dataset: datasets.Dataset | datasets.IterableDataset, columns: dict[str, str | None]) -> None:
    """Fails at once, listing the available columns, when a needed column is missing.

    Args:
        dataset: the loaded data.
        columns: role -> column name (e.g. `{"image": "jpg", "text": "txt"}`); `None` names are skipped.
    """
    available = list(dataset.column_names or (dataset.features or {}).keys())
    for role, name in columns.items():
        if name is None or name in available:
            continue
        hint = f"; run `{PRODUCED_BY[role]}` first to add it" if role in PRODUCED_BY else ""
        raise ValueError(f"column {name!r} ({role}) not found; available columns: {available}{hint}")


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


def undecoded_images(dataset, image_column: str):
    """The dataset with `image_column` left as bytes, so that a corrupt image fails in our code, not in `datasets`."""
    features = dataset.features
    if features is not None and isinstance(features.get(image_column), datasets.Image):
        return dataset.cast_column(image_column, datasets.Image(decode=False))
    return dataset


def _is_empty(text: Any, clean: Callable[[str], str] | None = None) -> bool:
    """Whether `text` would train as an empty prompt: missing, not a string, or nothing printable left after the
    processor's cleaning (`&nbsp;` becomes a space under CLIP's cleaning; control characters print nothing)."""
    if text is None or not isinstance(text, str):
        return True
    if clean is not None:
        text = clean(text)
    return not any(ch.isprintable() and not ch.isspace() for ch in text)


_TEXT_DTYPES = ("string", "large_string")


def require_text_columns(dataset, columns: dict[str, str], source: str = "the data") -> None:
    """Fails at once when a text column is not of string type (ints, lists, ...), naming the column and its type.

    Features unknown up front (some streams) are judged from the first row.
    """
    features = dataset.features or {}
    first = None
    for role, name in columns.items():
        feature = features.get(name)
        if feature is None and isinstance(dataset, datasets.IterableDataset):
            first = first if first is not None else next(iter(dataset), {})
            value = first.get(name)
            if value is None or isinstance(value, str):
                continue
            kind = type(value).__name__
        elif isinstance(feature, datasets.Value) and feature.dtype in _TEXT_DTYPES:
            continue
        else:
            kind = getattr(feature, "dtype", None) or type(feature).__name__
        raise ValueError(f"text column {name!r} ({role}) of {source} holds {kind}, not strings; pass the column "
                         "with the text (--text_column / --caption_column / --vecap_column) or cast it to string")


@dataclass
class ExampleBuilder:
    """Turns one raw row into a training example, or `None` (with the reason) when it must be skipped.

    A row is skipped when its image does not decode or one of the texts the recipe reads is missing, not a
    string, or empty after `clean` (see `_is_empty`).
    """

    image_column: str
    selector: TextSelector  # alip_hf.recipes.TextSelector
    transform: ImageTransform
    seed: int = 0
    clean: Callable[[str], str] | None = None  # the collator's text cleaning: a text empty after it is skipped
    id_column: str | None = None  # carried into the example as "id" (per-sample logs are joined on it)

    def __call__(self, row: dict, epoch: int, index: int) -> tuple[dict | None, str | None]:
        for role, column in self.selector.columns.items():
            if _is_empty(row.get(column), self.clean):
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
            example["id"] = str(row[self.id_column])
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
    columns = list(build.selector.columns.values())

    def reasons(batch: dict) -> dict:
        out = []
        for i in range(len(batch[build.image_column])):
            row = {c: batch[c][i] for c in batch}
            if any(_is_empty(row.get(c), build.clean) for c in columns):
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
    """

    def __init__(self, dataset, build: ExampleBuilder, rank: int = 0, world_size: int = 1, shuffle_block: int = 0,
                 seed: int = 0, source: str = "the stream"):
        self.dataset, self.build, self.rank, self.world_size = dataset, build, rank, world_size
        self.source = source
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
                    example["stats"] = {**example["stats"], **pending}
                    pending = {k: 0 for k in pending}
                    produced = True
                    self._state = {"epoch": epoch, "block": block, "position": position, "offset": j + 1,
                                   "produced": True, "dataset": block_state}
                    yield example
                block, position, offset, block_state = block + 1, position + len(rows_in_block), 0, next_block_state
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
