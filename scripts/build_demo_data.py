"""Builds `demo_data/`: a small real image-text dataset from Debian's public-domain Open Clip Art packages.

Source: `openclipart-png` (raster versions of every drawing) and `openclipart-svg` (the same drawings as SVG,
whose RDF metadata carries the artist's title and keyword tags), both installed under `/usr/share/openclipart`:

    png/<category>/<subcategory>/<name>.png     the image (RGBA, often transparent)
    svg/<category>/<subcategory>/<name>.svg     <metadata><rdf:RDF><cc:Work> dc:title, dc:subject/rdf:Bag/rdf:li

One row per drawing, in the project's data contract (`data.FEATURES`) plus `category`:
    id        relative path without extension, e.g. "animals/birds/new_penguin_charles_mcco_01"
    image     the PNG composited on white, fitted into `image_size` x `image_size` on a white canvas, JPEG bytes
    alt_text  the artist's title (dc:title), whitespace-normalised only; the file name when there is no title
    caption   "clip art of " + the artist's keyword tags: a stand-in for a captioning model's output
    vecap     "<alt_text>: <caption>": a fixed template standing in for VeCLIP's LLM rewrite
    category  the top-level directory with spaces ("signs and symbols"): ~15 classes for zero-shot evaluation

Rendering uses the PNG package (no SVG renderer needed); SVG files are parsed only for metadata. The same
packages and the same Pillow/pyarrow/datasets versions give byte-identical files.

    python scripts/build_demo_data.py                  # reads /usr/share/openclipart, writes alip_hf/demo_data/
    python scripts/build_demo_data.py --install        # first `apt-get install` the two packages (as root)
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gzip
import hashlib
import io
import re
import subprocess
import sys
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import datasets
from PIL import Image, ImageOps
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout: `alip_hf` is at the root

from alip_hf import data  # noqa: E402
from alip_hf.io import write_with_atomically  # noqa: E402

SOURCE_PACKAGES = ("openclipart-png", "openclipart-svg")
DEFAULT_SOURCE_ROOT = "/usr/share/openclipart"
APT_COMMAND = ["apt-get", "install", "-y", "--no-install-recommends", *SOURCE_PACKAGES]
CATEGORY = "category"
FEATURES = datasets.Features({**data.FEATURES, CATEGORY: datasets.Value("string")})
SPLIT_FILES = {"train": "train-00000-of-00001.parquet", "test": "test-00000-of-00001.parquet"}

# "unsorted" is the library's inbox and "special" holds gradients, patterns and page templates: neither names
# what a drawing shows, so neither can be a zero-shot class.
EXCLUDED_CATEGORIES = ("unsorted", "special")
# Tags that are library bookkeeping, not content: "hash" and "magick" mark the upload tool, "unsorted" a status.
NOISE_TAGS = frozenset({"", "hash", "magick", "unsorted"})
MAX_TAGS = 8
CAPTION_MODEL = "keywords"  # caption = the artist's keyword tags, not a captioning model
CAPTION_PROMPT_VERSION = "clip-art-of-tags-v1"
REWRITE_MODEL = "template"  # vecap = a fixed template, not an LLM
REWRITE_PROMPT_VERSION = "title-colon-caption-v1"

_NS = {
    "dc": "http://purl.org/dc/elements/1.1/",
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
    "cc": "http://web.resource.org/cc/",
}


@dataclasses.dataclass(frozen=True)
class Clip:
    """One drawing: its stable id, the raster file, the SVG file holding its metadata, its class."""

    id: str
    png_path: Path
    svg_path: Path
    category: str


@dataclasses.dataclass(frozen=True)
class SvgMetadata:
    title: str
    tags: tuple[str, ...]
    creator: str


@dataclasses.dataclass
class Summary:
    """What the build saw and did; printed at the end and rendered into the dataset card."""

    png_files: int = 0
    symlinks: int = 0  # the same drawing filed under a second category: counted once, under its real path
    excluded: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # category -> files
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # reason -> files
    missing_metadata: int = 0  # no SVG or no cc:Work: alt_text falls back to the file name
    rows: dict = dataclasses.field(default_factory=dict)  # split -> category -> rows
    num_bytes: dict = dataclasses.field(default_factory=dict)  # split -> size of its Arrow table
    versions: dict = dataclasses.field(default_factory=dict)  # package -> Debian version

    def lines(self) -> list[str]:
        total = {split: sum(counts.values()) for split, counts in self.rows.items()}
        return [
            f"PNG files: {self.png_files} (+{self.symlinks} symlinked aliases, not repeated)",
            f"excluded categories (files): {dict(sorted(self.excluded.items()))}",
            f"skipped images: {dict(sorted(self.skipped.items())) or 0}",
            f"rows without SVG metadata (alt_text = file name): {self.missing_metadata}",
            f"rows: {total}",
        ]


# ---------------------------------------------------------------------------------------------------------
# Finding the drawings


def find_clips(source_root: Path) -> tuple[list[Clip], Summary]:
    """Lists every real PNG file under `source_root/png` (symlinks are aliases of files listed elsewhere)."""
    summary = Summary()
    clips = []
    for png_path in sorted((source_root / "png").rglob("*.png")):
        if png_path.is_symlink():
            summary.symlinks += 1
            continue
        summary.png_files += 1
        relative = png_path.relative_to(source_root / "png").with_suffix("")
        top = relative.parts[0] if len(relative.parts) > 1 else "unsorted"
        clip = Clip(
            id=relative.as_posix(),
            png_path=png_path,
            svg_path=(source_root / "svg" / relative).with_suffix(".svg"),
            category=top.replace("_", " "),
        )
        clips.append(clip)
    return clips, summary


def select_categories(clips: list[Clip], min_per_category: int, summary: Summary) -> dict[str, list[Clip]]:
    """Groups clips by category, dropping the excluded ones and those too small to evaluate on."""
    by_category = collections.defaultdict(list)
    for clip in clips:
        by_category[clip.category].append(clip)
    excluded = {name.replace("_", " ") for name in EXCLUDED_CATEGORIES}
    kept = {}
    for category, members in sorted(by_category.items()):
        if category in excluded or len(members) < min_per_category:
            summary.excluded[category] = len(members)
        else:
            kept[category] = members
    return kept


def hash_rank(key: str) -> str:
    """A stable pseudo-random order: sha1 of the id (Python's `hash` is salted per process)."""
    return hashlib.sha1(key.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Texts


def normalise_whitespace(text: str | None) -> str:
    return " ".join((text or "").split())


def read_svg_metadata(svg_path: Path) -> SvgMetadata | None:
    """Title, keyword tags (in the file's order) and creator from the SVG's `cc:Work`; None if absent or broken."""
    try:
        work = ET.parse(svg_path).getroot().find(".//cc:Work", _NS)
    except (OSError, ET.ParseError):
        return None
    if work is None:
        return None
    tags = tuple(li.text or "" for li in work.findall("dc:subject/rdf:Bag/rdf:li", _NS))
    creator = work.findtext("dc:creator/cc:Agent/dc:title", default="", namespaces=_NS)
    return SvgMetadata(normalise_whitespace(work.findtext("dc:title", default="", namespaces=_NS)), tags, creator)


def clean_tags(tags: tuple[str, ...], creator: str) -> list[str]:
    """Lower-cased, `_`/`-` as spaces, bookkeeping tags and the artist's own name dropped, first occurrence kept."""
    creator = normalise_whitespace(creator).lower()
    cleaned = []
    for tag in tags:
        tag = normalise_whitespace(re.sub(r"[_\-]+", " ", tag.lower()))
        if tag not in NOISE_TAGS and tag != creator and tag not in cleaned:
            cleaned.append(tag)
    return cleaned[:MAX_TAGS]


def make_caption(tags: list[str], clip_id: str) -> str:
    """"clip art of penguin, animal, bird"; without usable tags, the directory names stand in for them."""
    if not tags:
        tags = [part.replace("_", " ") for part in reversed(clip_id.split("/")[:-1])]
    return "clip art of " + ", ".join(tags)


def make_vecap(alt_text: str, caption: str) -> str:
    """The title and the caption joined by a fixed template (VeCLIP asks an LLM to fuse them instead)."""
    return f"{alt_text}: {caption}" if alt_text else caption


# ---------------------------------------------------------------------------------------------------------
# Images


class SkipImage(Exception):
    """A file that cannot become a row; the message is the reason counted in the summary."""


def render_thumbnail(png_bytes: bytes, image_size: int, max_pixels: int) -> Image.Image:
    """Composites a (transparent) PNG on white and fits it, aspect preserved, into a white square.

    Returns:
        an RGB image of `image_size` x `image_size`.

    Raises:
        SkipImage: unreadable, or larger than `max_pixels` (a few files are >100 megapixels; decoding one takes
            gigabytes of memory for a 64-pixel thumbnail).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(png_bytes))
            if image.width * image.height > max_pixels:
                raise SkipImage("too large")
            image.load()
        except Image.DecompressionBombError as error:
            raise SkipImage("too large") from error
        except (OSError, SyntaxError, ValueError) as error:
            raise SkipImage("unreadable") from error
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    image = Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    # Box-reduce big drawings first: Lanczos on the full canvas is slow and gains nothing at 64 pixels.
    factor = max(image.size) // (4 * image_size)
    if factor > 1:
        image = image.reduce(factor)
    return ImageOps.pad(image, (image_size, image_size), Image.Resampling.LANCZOS, color=(255, 255, 255))


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    """JPEG without chroma subsampling: clip art is flat colour with sharp edges, which 4:2:0 smears."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, subsampling=0, optimize=True)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------------------
# Rows and splits


def make_row(clip: Clip, image_bytes: bytes, metadata: SvgMetadata | None) -> dict:
    """One row of `FEATURES`."""
    file_name = clip.id.rsplit("/", 1)[-1]
    alt_text = (metadata.title if metadata else "") or file_name
    caption = make_caption(clean_tags(metadata.tags, metadata.creator) if metadata else [], clip.id)
    return {
        data.ID: clip.id,
        data.IMAGE: {"bytes": image_bytes, "path": None},
        data.ALT_TEXT: alt_text,
        data.CAPTION: caption,
        data.VECAP: make_vecap(alt_text, caption),
        data.CAPTION_MODEL: CAPTION_MODEL,
        data.CAPTION_PROMPT_VERSION: CAPTION_PROMPT_VERSION,
        data.REWRITE_MODEL: REWRITE_MODEL,
        data.REWRITE_PROMPT_VERSION: REWRITE_PROMPT_VERSION,
        data.ERROR: "",
        CATEGORY: clip.category,
    }


def collect_rows(
    by_category: dict[str, list[Clip]], per_category: int, image_size: int, quality: int, max_pixels: int,
    summary: Summary,
) -> dict[str, list[dict]]:
    """Renders up to `per_category` drawings per category, taken in hash order so the sample is stable.

    A skipped file gives its place to the next one in hash order. Identical PNG files filed under two names
    are kept once (the first in hash order), so no image can sit in both splits.
    """
    rows = {}
    seen_digests = set()
    total = sum(min(per_category, len(members)) for members in by_category.values())
    with tqdm(total=total, desc="rendering", unit="img") as progress:
        for category, members in by_category.items():
            rows[category] = []
            for clip in sorted(members, key=lambda clip: hash_rank(clip.id)):
                if len(rows[category]) == per_category:
                    break
                png_bytes = clip.png_path.read_bytes()
                digest = hashlib.sha1(png_bytes).digest()
                try:
                    if digest in seen_digests:
                        raise SkipImage("duplicate")
                    thumbnail = render_thumbnail(png_bytes, image_size, max_pixels)
                except SkipImage as reason:
                    summary.skipped[str(reason)] += 1
                    continue
                seen_digests.add(digest)
                metadata = read_svg_metadata(clip.svg_path)
                summary.missing_metadata += metadata is None
                rows[category].append(make_row(clip, encode_jpeg(thumbnail, quality), metadata))
                progress.update()
    return rows


def split_rows(rows: dict[str, list[dict]], test_fraction: float) -> dict[str, list[dict]]:
    """Stratified, deterministic split: in each category the `test_fraction` of ids first in hash order are test.

    Every category with at least two rows has at least one test row and keeps at least one train row.
    """
    splits = {"train": [], "test": []}
    for members in rows.values():
        ranked = sorted(members, key=lambda row: hash_rank("split/" + row[data.ID]))
        n_test = min(max(round(len(ranked) * test_fraction), 1), len(ranked) - 1) if len(ranked) > 1 else 0
        splits["test"] += ranked[:n_test]
        splits["train"] += ranked[n_test:]
    return {name: sorted(split, key=lambda row: row[data.ID]) for name, split in splits.items()}


# ---------------------------------------------------------------------------------------------------------
# Writing


def write_atomic(path: Path, write) -> None:
    """Calls `write(temp_path)` on a temporary file next to `path`, then renames it into place."""
    write_with_atomically(path, write)


def write_split(split_rows_: list[dict], path: Path) -> int:
    """One Parquet file with `FEATURES` stored in its schema, so `datasets` decodes `image` without hints.

    Returns:
        the size of the split's Arrow table in bytes (the card's `num_bytes`).
    """
    columns = {name: [row[name] for row in split_rows_] for name in FEATURES}
    dataset = datasets.Dataset.from_dict(columns, features=FEATURES)
    write_atomic(path, lambda temp_name: dataset.to_parquet(temp_name))
    return dataset.data.nbytes


def debian_version(source_root: Path, package: str) -> str:
    """The package version from its Debian changelog (works for `apt-get install` and for `dpkg -x` trees)."""
    changelog = source_root.parent / "doc" / package / "changelog.Debian.gz"
    try:
        with gzip.open(changelog, "rt", encoding="utf-8") as file:
            match = re.match(r"\S+ \(([^)]+)\)", file.readline())
    except OSError:
        return "unknown"
    return match.group(1) if match else "unknown"


# ---------------------------------------------------------------------------------------------------------
# Entry point


def build(
    source_root: str | Path = DEFAULT_SOURCE_ROOT,
    output_dir: str | Path = "alip_hf/demo_data",
    *,
    image_size: int = 64,
    per_category: int = 400,
    min_per_category: int = 30,
    test_fraction: float = 0.12,
    quality: int = 90,
    max_pixels: int = 2**26,
) -> Summary:
    """Writes `train`/`test` Parquet files and the dataset card to `output_dir`; returns what it did.

    Raises:
        FileNotFoundError: `source_root` has no `png/` directory (the packages are not installed).
        ValueError: no category has `min_per_category` drawings, or a split would be empty.
    """
    source_root, output_dir = Path(source_root), Path(output_dir)
    if not (source_root / "png").is_dir():
        raise FileNotFoundError(
            f"--source_root {source_root}: no png/ directory; install the packages with "
            f"`{' '.join(APT_COMMAND)}` (or pass --install), or pass the openclipart directory of a `dpkg -x` tree"
        )
    clips, summary = find_clips(source_root)
    by_category = select_categories(clips, min_per_category, summary)
    if not by_category:
        raise ValueError(f"{source_root}: no category has --min_per_category={min_per_category} drawings")
    rendered = collect_rows(by_category, per_category, image_size, quality, max_pixels, summary)
    splits = split_rows(rendered, test_fraction)
    for name, rows in splits.items():
        if not rows:  # an empty Parquet split cannot be loaded back
            raise ValueError(f"{source_root}: the {name} split is empty; lower --min_per_category or change "
                             f"--test_fraction={test_fraction}")
    summary.rows = {
        name: dict(sorted(collections.Counter(row[CATEGORY] for row in rows).items())) for name, rows in splits.items()
    }
    summary.versions = {package: debian_version(source_root, package) for package in SOURCE_PACKAGES}
    output_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        summary.num_bytes[name] = write_split(rows, output_dir / SPLIT_FILES[name])
    settings = dict(image_size=image_size, per_category=per_category, min_per_category=min_per_category,
                    test_fraction=test_fraction, quality=quality)
    card = render_card(summary, settings)
    write_atomic(output_dir / "README.md", lambda temp_name: Path(temp_name).write_text(card, encoding="utf-8"))
    return summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source_root", default=DEFAULT_SOURCE_ROOT, help="directory holding png/ and svg/")
    parser.add_argument("--output_dir", default="alip_hf/demo_data", help="where the Parquet files and README.md go")
    parser.add_argument("--install", action="store_true", help=f"run `{' '.join(APT_COMMAND)}` when missing (root)")
    parser.add_argument("--image_size", type=int, default=64, help="side of the square output images, pixels")
    parser.add_argument("--per_category", type=int, default=400, help="at most this many drawings per category")
    parser.add_argument("--min_per_category", type=int, default=30, help="drop categories with fewer drawings")
    parser.add_argument("--test_fraction", type=float, default=0.12, help="share of each category held out")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality, 1-95")
    parser.add_argument("--max_pixels", type=int, default=2**26, help="skip source images with more pixels")
    args = parser.parse_args(argv)
    if not 0 < args.test_fraction < 1:
        parser.error(f"--test_fraction must be in (0, 1), got {args.test_fraction}")
    if not 1 <= args.quality <= 95:
        parser.error(f"--quality must be in [1, 95], got {args.quality}")
    if args.image_size < 1 or args.per_category < 1 or args.min_per_category < 1:
        parser.error("--image_size, --per_category and --min_per_category must be positive")
    return args


def main(argv: list[str] | None = None) -> Summary:
    args = parse_args(argv)
    if args.install and not (Path(args.source_root) / "png").is_dir():
        subprocess.run(APT_COMMAND, check=True)
    summary = build(
        args.source_root, args.output_dir, image_size=args.image_size, per_category=args.per_category,
        min_per_category=args.min_per_category, test_fraction=args.test_fraction, quality=args.quality,
        max_pixels=args.max_pixels,
    )
    print("\n".join(summary.lines()))
    return summary


# ---------------------------------------------------------------------------------------------------------
# Dataset card (numbers filled in from the build, never typed)


def _counts_table(summary: Summary) -> str:
    categories = sorted(set().union(*(counts.keys() for counts in summary.rows.values())))
    lines = ["| category | train | test |", "|---|---:|---:|"]
    for category in categories:
        train, test = (summary.rows[split].get(category, 0) for split in ("train", "test"))
        lines.append(f"| {category} | {train} | {test} |")
    totals = {split: sum(counts.values()) for split, counts in summary.rows.items()}
    lines.append(f"| **total** | **{totals['train']}** | **{totals['test']}** |")
    return "\n".join(lines)


def render_card(summary: Summary, settings: dict) -> str:
    """The Hub dataset card: YAML header (license, configs, features, split sizes) and how each column is made."""
    totals = {split: sum(counts.values()) for split, counts in summary.rows.items()}
    features_yaml = "\n".join(
        f"  - name: {name}\n    dtype: {'image' if isinstance(feature, datasets.Image) else feature.dtype}"
        for name, feature in FEATURES.items()
    )
    versions = ", ".join(f"`{package}` {version}" for package, version in summary.versions.items())
    skipped = ", ".join(f"{count} {reason}" for reason, count in sorted(summary.skipped.items())) or "none"
    excluded = ", ".join(f"{name} ({count})" for name, count in sorted(summary.excluded.items()))
    flags = " ".join(f"--{key.replace('_', '-')} {value}" for key, value in settings.items())
    return f"""---
license: cc0-1.0
pretty_name: Open Clip Art demo (alip-hf)
language:
- en
task_categories:
- zero-shot-image-classification
- image-to-text
size_categories:
- 1K<n<10K
configs:
- config_name: default
  data_files:
  - split: train
    path: {SPLIT_FILES['train']}
  - split: test
    path: {SPLIT_FILES['test']}
dataset_info:
  features:
{features_yaml}
  splits:
  - name: train
    num_bytes: {summary.num_bytes['train']}
    num_examples: {totals['train']}
  - name: test
    num_bytes: {summary.num_bytes['test']}
    num_examples: {totals['test']}
---

# Open Clip Art demo dataset

{totals['train'] + totals['test']} real public-domain clip-art drawings with their artists' titles and keyword
tags, at {settings['image_size']}x{settings['image_size']} pixels, in this project's data contract. It exists so
that the quickstart, the smoke tests and the examples run on real images and real noisy text without a download.
**It is not a benchmark**: it is small, the classes are coarse and overlap, and `caption`/`vecap` are not what a
captioning model or an LLM would write.

## Source

Debian's {versions} (upstream: the Open Clip Art Library, release 0.18). Debian's copyright file states that
every drawing is dedicated to the public domain ("Creative Commons Public Domain Dedication"); the SVG metadata of
nearly all drawings names `http://web.resource.org/cc/PublicDomain` as its license. This derived dataset is
released under CC0 1.0.

Built with `python scripts/build_demo_data.py {flags}`; the same packages and library versions give
byte-identical files.

## Columns

| column | how it is made |
|---|---|
| `id` | the drawing's path under `png/` without extension, e.g. `animals/birds/new_penguin_charles_mcco_01` |
| `image` | the PNG from `openclipart-png`, composited on white (clip art is transparent), fitted aspect-preserved into a white {settings['image_size']}x{settings['image_size']} square, JPEG quality {settings['quality']} without chroma subsampling |
| `alt_text` | the artist's title (`dc:title` in the SVG from `openclipart-svg`), whitespace-normalised only, so realistically noisy ("Part of the Flat Icon Collection (Wed Aug 25 23:29:46 2004)", titles in Italian); the file name when the SVG has no metadata |
| `caption` | **a stand-in for a captioning model's output**, built from the artist's keyword tags (`dc:subject`): `clip art of <tag>, <tag>, ...`, tags lower-cased, `_`/`-` as spaces, the bookkeeping tags {sorted(NOISE_TAGS - {""})} and the artist's own name dropped, duplicates removed, at most {MAX_TAGS}; the directory names when no tag is left |
| `vecap` | **a stand-in for VeCLIP's LLM rewrite**: the fixed template `<alt_text>: <caption>` |
| `caption_model`, `caption_prompt_version` | `{CAPTION_MODEL}`, `{CAPTION_PROMPT_VERSION}` |
| `rewrite_model`, `rewrite_prompt_version` | `{REWRITE_MODEL}`, `{REWRITE_PROMPT_VERSION}` |
| `error` | empty on every row (drawings that could not be used are left out, see below) |
| `category` | the top-level directory of the drawing, `_` as spaces: the class for zero-shot classification |

Tags often contain the category's own word ("animal", "food"), so a model trained on `caption` sees its class
names; that is intended for a demo and one more reason not to treat scores on it as a benchmark.

## Selection and splits

- Symlinked files (the same drawing filed under a second category) are counted once, under their real path;
  {summary.symlinks} aliases were skipped. Byte-identical PNG files are kept once.
- Categories left out, with their file counts: {excluded}. `unsorted` and `special` name no content; the
  others have fewer than {settings['min_per_category']} drawings.
- At most {settings['per_category']} drawings per category, taken in the order of the sha1 of the `id`
  (`computer`, `shapes` and `signs and symbols` each hold over a thousand, mostly near-identical icons, stars and flags).
- Images skipped while rendering: {skipped}. Rows whose SVG had no metadata: {summary.missing_metadata}.
- `test` holds {settings['test_fraction']:.0%} of each category: the ids first in the order of sha1("split/" + id).
  Every test category occurs in train; no id is in both splits.

{_counts_table(summary)}

## Use

```python
from alip_hf import data
test = data.load_source("alip_hf/demo_data", split="test")
```

Intended for the quickstart, smoke tests and tutorials of this project. Not for reporting results.
"""


if __name__ == "__main__":
    main()
