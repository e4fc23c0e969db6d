"""Long-caption retrieval sets read from their publishers' files: Urban1k, ShareGPT4V-1k, DOCCI and DCI.

Each reader returns one split as columns `id`, `image` (the image file's path) and `caption` (its one long text), in
the published order; `loading.load_split` hands it to the retrieval runner like any other split, so the metrics,
`--max_samples` and the errors naming an undecodable image's row and id are those of every retrieval task. What each
reader follows, and where that was checked, is in docs/evaluation.md ("Long-caption retrieval").

A copy is a local folder (`--data_root DIR` reads `DIR/<last part of the source>`); only Urban1k's publisher ships
its files on the Hub, so only Urban1k is downloaded when there is no local copy.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from pathlib import Path
from typing import Iterator

from alip_hf.evaluation.archives import archive_names, unpack_members
from alip_hf.evaluation.presets import DCI_LAYOUT, DOCCI_LAYOUT, SHAREGPT4V_LAYOUT, URBAN1K_LAYOUT, EvalTask
from alip_hf.evaluation.presets import hub_files_folder, task_folder
from alip_hf.schema import ID

logger = logging.getLogger(__name__)

IMAGE, CAPTION = "image", "caption"  # with `ID`, the columns of every long-caption split

# Long-CLIP's Urban1k (Hub dataset BeichenZhang/Urban1k): `Urban1k.zip` holding `Urban1k/image/<n>.jpg` and
# `Urban1k/caption/<n>.txt`, one long caption per image.
URBAN1K_ZIP, URBAN1K_DIR, URBAN1K_IMAGES, URBAN1K_CAPTIONS = "Urban1k.zip", "Urban1k", "image", "caption"
# ShareGPT4V's captioner json (Hub dataset Lin-Chen/ShareGPT4V); its `image` paths are relative to ShareGPT4V's
# `data/` folder (`sam/images/sa_545504.jpg`).
SHAREGPT4V_JSON = "share-captioner_coco_lcs_sam_1246k_1107.json"
# DOCCI (google/docci's loading script downloads both from storage.googleapis.com/docci/data/): one JSON object per
# line, and a tar of `images/<image_file>`.
DOCCI_DESCRIPTIONS, DOCCI_IMAGES_TAR, DOCCI_IMAGES_DIR = "docci_descriptions.jsonlines", "docci_images.tar.gz", "images"
DOCCI_FIELDS = ("example_id", "split", "image_file", "description")
# DCI (facebookresearch/DCI): `dci.tar.gz` unpacks to `densely_captioned_images/` with `splits.json` (split ->
# annotation file names), `annotations/<name>` and `photos/<image>` (the images of SA-1B's `sa_000138.tar`).
DCI_DIR, DCI_SPLITS, DCI_ANNOTATIONS, DCI_PHOTOS = "densely_captioned_images", "splits.json", "annotations", "photos"
DCI_FIELDS = ("image", "short_caption", "extra_caption")
ALL_SPLITS = "all"  # a list published without splits (ShareGPT4V), or every split of DCI's splits.json in its order


# ----------------------------------------------------------------------------------------------------------------
# Any set
# ----------------------------------------------------------------------------------------------------------------


def load_long_split(task: EvalTask, split: str):
    """The split as a `datasets.Dataset` with columns `id`, `image` (path strings) and `caption`."""
    import datasets

    return datasets.Dataset.from_dict(READERS[task.layout](task, split))


def _only_split(task: EvalTask, split: str, splits: tuple[str, ...]) -> None:
    if split not in splits:
        raise ValueError(f"{task.name}: no split {split!r}; the {task.layout} layout has {list(splits)}")


def _require_files(paths: list[Path], what: str) -> None:
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of the {len(paths)} {what} are missing: {', '.join(missing[:3])}"
                                f"{' ...' if len(missing) > 3 else ''}")


def _missing_fields(record, fields: tuple[str, ...]) -> list[str]:
    """The `fields` a parsed JSON `record` lacks (all of them when it is no object)."""
    return [f for f in fields if not isinstance(record, dict) or f not in record]


def _rows(ids: list[str], images: list[Path], captions: list[str]) -> dict[str, list]:
    return {ID: ids, IMAGE: [str(p) for p in images], CAPTION: captions}


# ----------------------------------------------------------------------------------------------------------------
# Urban1k (Long-CLIP)
# ----------------------------------------------------------------------------------------------------------------


def urban1k_split(task: EvalTask, split: str) -> dict[str, list]:
    """Urban1k as Long-CLIP's `eval/retrieval/Urban1k.py` reads it: each `caption/<n>.txt` paired with
    `image/<n>.jpg`, the caption being the file's first line; rows in the numeric order of `<n>`.

    Reads `Urban1k/` beside `Urban1k.zip`, unpacking the zip's `Urban1k/image/` and `Urban1k/caption/` members
    there once; a folder unpacked by hand without the zip is read as it is.

    Raises:
        FileNotFoundError: neither the zip nor the folder; a zip without `Urban1k/caption/` members; a caption
            without its image.
        ValueError: a split other than `test`; an empty caption file.
    """
    _only_split(task, split, ("test",))
    root = task_folder(task, f"{URBAN1K_ZIP} (or the {URBAN1K_DIR}/ folder it unpacks to)",
                       lambda: hub_files_folder(task, URBAN1K_ZIP))
    folder = _urban1k_folder(root)
    captions = sorted((folder / URBAN1K_CAPTIONS).glob("*.txt"), key=_numeric_stem)
    if not captions:
        raise FileNotFoundError(f"{folder / URBAN1K_CAPTIONS}: no <n>.txt caption files")
    images = [folder / URBAN1K_IMAGES / f"{path.stem}.jpg" for path in captions]
    _require_files(images, f"Urban1k images of the caption files in {folder / URBAN1K_CAPTIONS}")
    unpaired = len(list((folder / URBAN1K_IMAGES).glob("*.jpg"))) - len(images)
    if unpaired:
        logger.warning("%s: %d images have no caption file and are not evaluated", folder / URBAN1K_IMAGES, unpaired)
    return _rows([p.stem for p in captions], images, [_first_line(p) for p in captions])


def _urban1k_folder(root: Path) -> Path:
    archive = root / URBAN1K_ZIP
    if archive.is_file():
        names = archive_names(archive)
        members = [n for n in names if _is_urban1k_member(n)]
        if not any(n.split("/")[1] == URBAN1K_CAPTIONS for n in members):
            raise FileNotFoundError(f"{archive}: no {URBAN1K_DIR}/{URBAN1K_CAPTIONS}/<n>.txt members (it holds "
                                    f"{names[:3]}{' ...' if len(names) > 3 else ''})")
        unpack_members(archive, members, root, "Urban1k files")
    elif not (root / URBAN1K_DIR / URBAN1K_CAPTIONS).is_dir():
        raise FileNotFoundError(f"{archive} not found, nor the {root / URBAN1K_DIR}/ folder it unpacks to")
    return root / URBAN1K_DIR


def _is_urban1k_member(name: str) -> bool:
    parts = name.split("/")  # macOS' `._<name>` resource files are no images or captions
    return len(parts) == 3 and parts[0] == URBAN1K_DIR and parts[1] in (URBAN1K_IMAGES, URBAN1K_CAPTIONS) \
        and not parts[2].startswith(".")


def _numeric_stem(path: Path) -> tuple:
    return (0, int(path.stem), "") if path.stem.isdigit() else (1, 0, path.stem)


def _first_line(path: Path) -> str:
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or not lines[0].strip():
        raise ValueError(f"{path}: the first line is empty, so the image has no caption (an earlier upload of "
                         "Urban1k had an empty caption/592.txt, Long-CLIP issue #84): download the current Urban1k.zip")
    return lines[0].strip()


# ----------------------------------------------------------------------------------------------------------------
# ShareGPT4V-1k (Long-CLIP)
# ----------------------------------------------------------------------------------------------------------------


def sharegpt4v_split(task: EvalTask, split: str) -> dict[str, list]:
    """ShareGPT4V as Long-CLIP's `train/sharegpt4v.py` (`share4v_val_dataset`) reads it: the entries of
    `share-captioner_coco_lcs_sam_1246k_1107.json` in file order, only the first `task.first_rows` parsed (1000:
    Long-CLIP's validation set, issue #60); the caption is `conversations[1]["value"]` (the captioner's answer)
    with newlines turned into spaces; `image` is relative to the json's folder (Long-CLIP keeps both in one root)
    or, failing that, to its parent (ShareGPT4V's Data.md layout: `data/sharegpt4v/<json>`, `data/sam/images/`).

    Raises:
        FileNotFoundError: no json, or images missing under both folders.
        ValueError: a split other than `all`; an entry without `image` or a second turn from `gpt`.
    """
    _only_split(task, split, (ALL_SPLITS,))
    root = task_folder(task, f"{SHAREGPT4V_JSON} and the images its entries name (sam/images/...)")
    path = root / SHAREGPT4V_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (from the Hub dataset Lin-Chen/ShareGPT4V)")
    entries = itertools.islice(iter_json_array(path), task.first_rows)
    rows = [_sharegpt4v_entry(path, index, entry) for index, entry in enumerate(entries)]
    images = [image for _, image, _ in rows]
    base = next((b for b in (root, root.parent) if all((b / image).is_file() for image in images)), root)
    paths = [base / image for image in images]
    _require_files(paths, f"images of the first {len(paths)} entries of {path.name} (also looked under {root.parent})")
    return _rows([row_id for row_id, _, _ in rows], paths, [caption for _, _, caption in rows])


def _sharegpt4v_entry(path: Path, index: int, entry) -> tuple[str, str, str]:
    try:
        image, answer = entry["image"], entry["conversations"][1]
        text = answer["value"]
    except (KeyError, IndexError, TypeError) as error:
        keys = list(entry) if isinstance(entry, dict) else type(entry).__name__
        raise ValueError(f"{path}: entry {index} has no 'image' or 'conversations'[1]['value'] (the captioner's "
                         f"answer); it has {keys}") from error
    if answer.get("from") != "gpt":
        raise ValueError(f"{path}: entry {index} ({entry.get('id', image)!r}): conversations[1] is from "
                         f"{answer.get('from')!r}, not 'gpt': not ShareGPT4V's captioner json")
    return str(entry.get("id", image)), image, text.replace("\n", " ")


# One ShareGPT4V entry is a few kB; an item that does not parse within this many characters is malformed.
MAX_JSON_ITEM_CHARS = 1 << 26


def iter_json_array(path: Path, chunk_chars: int = 1 << 20) -> Iterator:
    """The items of the JSON array in `path`, parsed while the file is read in chunks: the ShareGPT4V json is
    1.5 GB, and Long-CLIP's `json.load(fp)[:1000]` parses all of it to keep 1000 entries.

    Raises:
        ValueError: the file is not a JSON array, or an item is malformed (naming the file and the item's index).
    """
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as file:
        buffer, pos = _next_token(file, "", 0, chunk_chars, path, 0)
        if buffer[pos] != "[":
            raise ValueError(f"{path}: not a JSON array (it starts with {buffer[pos]!r})")
        buffer, pos = _next_token(file, buffer, pos + 1, chunk_chars, path, 0)
        index = 0
        while buffer[pos] != "]":
            item, buffer, pos = _decode(decoder, file, buffer, pos, chunk_chars, path, index)
            yield item
            index += 1
            buffer, pos = _next_token(file, buffer, pos, chunk_chars, path, index)
            if buffer[pos] == ",":
                buffer, pos = _next_token(file, buffer, pos + 1, chunk_chars, path, index)
                if buffer[pos] == "]":
                    raise ValueError(f"{path}: a ',' after item {index - 1} and no item")
            elif buffer[pos] != "]":
                raise ValueError(f"{path}: {buffer[pos]!r} after item {index - 1}, where ',' or ']' belongs")


def _next_token(file, buffer: str, pos: int, chunk_chars: int, path: Path, index: int) -> tuple[str, int]:
    """`(buffer, pos)` with `pos` at the next non-space character, reading more of the file as needed."""
    while True:
        while pos < len(buffer) and buffer[pos] in " \t\r\n":
            pos += 1
        if pos < len(buffer):
            return buffer, pos
        chunk = file.read(chunk_chars)
        if not chunk:
            raise ValueError(f"{path}: the JSON array ends after {index} items without its closing ']'")
        buffer, pos = chunk, 0


def _decode(decoder, file, buffer: str, pos: int, chunk_chars: int, path: Path, index: int):
    """`(item, buffer, end)`: the item at `pos`, reading more of the file while the chunk's end cuts it."""
    while True:
        try:
            item, end = decoder.raw_decode(buffer, pos)
            # A number cut by the chunk's end ("12" of "12.5") parses; it is whole once a non-number character follows.
            cut = end == len(buffer) or (type(item) in (int, float) and buffer[end] in "0123456789.eE+-")
            if not cut:
                return item, buffer, end
            chunk = file.read(chunk_chars)
            if not chunk:
                return item, buffer, end
        except json.JSONDecodeError as error:
            # Cut by the chunk's end, or malformed: only more text tells, up to a bound on one item's size.
            chunk = file.read(chunk_chars) if len(buffer) - pos < MAX_JSON_ITEM_CHARS else ""
            if not chunk:
                raise ValueError(f"{path}: item {index} is not valid JSON ({error.msg})") from error
        buffer, pos = buffer[pos:] + chunk, 0


# ----------------------------------------------------------------------------------------------------------------
# DOCCI
# ----------------------------------------------------------------------------------------------------------------


def docci_split(task: EvalTask, split: str) -> dict[str, list]:
    """DOCCI's split as google/docci's loading script (`docci.py`) builds it: the lines of
    `docci_descriptions.jsonlines` whose `split` is `split` and whose `example_id` starts with it, the text
    `description`, the image `images/<image_file>`; images the folder lacks are unpacked once from
    `docci_images.tar.gz` (one pass through the 7.6 GB gzip stream).

    Raises:
        FileNotFoundError: no descriptions file; images missing and no tar (or not in it).
        ValueError: a line that is not a JSON object with `DOCCI_FIELDS`; no description of `split`.
    """
    root = task_folder(task, f"{DOCCI_DESCRIPTIONS} and {DOCCI_IMAGES_DIR}/ (or {DOCCI_IMAGES_TAR})")
    path = root / DOCCI_DESCRIPTIONS
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (https://storage.googleapis.com/docci/data/{DOCCI_DESCRIPTIONS})")
    records = _jsonlines(path, DOCCI_FIELDS)
    chosen = [r for r in records if r["split"] == split and r["example_id"].startswith(split)]
    if not chosen:
        raise ValueError(f"{path}: no description of split {split!r}; splits: {sorted({r['split'] for r in records})}")
    members = [f"{DOCCI_IMAGES_DIR}/{r['image_file']}" for r in chosen]
    unpack_members(root / DOCCI_IMAGES_TAR, members, root, f"DOCCI {split} images")
    return _rows([r["example_id"] for r in chosen], [root / m for m in members], [r["description"] for r in chosen])


def _jsonlines(path: Path, fields: tuple[str, ...]) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} line {line_number}: not JSON ({error.msg})") from error
            missing = _missing_fields(record, fields)
            if missing:
                raise ValueError(f"{path} line {line_number}: no field(s) {missing}")
            records.append(record)
    return records


# ----------------------------------------------------------------------------------------------------------------
# DCI (long-caption retrieval as LoTLIP and FLAIR evaluate it)
# ----------------------------------------------------------------------------------------------------------------

# LoTLIP's `split_caption` (dataloaders/dci_retrieval.py; FLAIR's `split_caption` is the same): a sentence ends at a
# newline, the end token `</s>` or a full stop.
_SENTENCE_END = re.compile(r"\n|</s>|[.]")


def lotlip_caption(short_caption: str, extra_caption: str) -> str:
    """LoTLIP's DCI text: `short_caption` and `extra_caption` on two lines (DCI's own "extended caption"), cut into
    sentences at newlines, `</s>` and full stops, each stripped, empty ones dropped, joined with ". " (so the
    last full stop goes)."""
    text = f"{short_caption}\n{extra_caption}"
    return ". ".join(part.strip() for part in _SENTENCE_END.split(text) if part.strip())


def dci_split(task: EvalTask, split: str) -> dict[str, list]:
    """DCI as LoTLIP's `dataloaders/dci_retrieval.py` (and FLAIR's `read_dci_pairs`) reads it: the annotation files
    `splits.json` lists, for `all` every split in the file's order (7805 images), each image `photos/<image>`
    with the text `lotlip_caption(short_caption, extra_caption)`.

    The copy is the `densely_captioned_images/` folder DCI's download script unpacks `dci.tar.gz` to, with SA-1B's
    `sa_000138.tar` extracted into its `photos/` (a folder holding `densely_captioned_images/` is read too).

    Raises:
        FileNotFoundError: no `splits.json`, annotation files or photos missing (naming the first few).
        ValueError: a split that `splits.json` lacks; an annotation file without `DCI_FIELDS`.
    """
    root = task_folder(task, f"{DCI_SPLITS}, {DCI_ANNOTATIONS}/ and {DCI_PHOTOS}/ (the folder dci.tar.gz unpacks to)")
    if not (root / DCI_SPLITS).is_file() and (root / DCI_DIR / DCI_SPLITS).is_file():
        root = root / DCI_DIR
    if not (root / DCI_SPLITS).is_file():
        raise FileNotFoundError(f"{root / DCI_SPLITS} not found (DCI's dci.tar.gz unpacks to {DCI_DIR}/{DCI_SPLITS})")
    splits = json.loads((root / DCI_SPLITS).read_text(encoding="utf-8"))
    if split != ALL_SPLITS and split not in splits:
        raise ValueError(f"{root / DCI_SPLITS}: no split {split!r}; splits: {[ALL_SPLITS, *splits]}")
    names = [n for part in splits.values() for n in part] if split == ALL_SPLITS else list(splits[split])
    files = [root / DCI_ANNOTATIONS / name for name in names]
    _require_files(files, f"DCI annotation files {DCI_SPLITS} lists")
    annotations = [_dci_annotation(path) for path in files]
    photos = [root / DCI_PHOTOS / a["image"] for a in annotations]
    _require_files(photos, f"DCI photos (SA-1B's sa_000138.tar extracted into {root / DCI_PHOTOS})")
    captions = [lotlip_caption(a["short_caption"], a["extra_caption"]) for a in annotations]
    return _rows([path.stem for path in files], photos, captions)


def _dci_annotation(path: Path) -> dict:
    annotation = json.loads(path.read_text(encoding="utf-8"))
    missing = _missing_fields(annotation, DCI_FIELDS)
    if missing:
        raise ValueError(f"{path}: no field(s) {missing} (a DCI annotation has {list(DCI_FIELDS)})")
    return annotation


READERS = {URBAN1K_LAYOUT: urban1k_split, SHAREGPT4V_LAYOUT: sharegpt4v_split, DOCCI_LAYOUT: docci_split,
           DCI_LAYOUT: dci_split}
