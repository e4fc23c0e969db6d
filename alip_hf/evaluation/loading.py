"""Loading a task's split: its images, class names and labels, or its captions per image."""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alip_hf import data as data_lib
from alip_hf import sources
from alip_hf.evaluation.archives import unpack_members
from alip_hf.evaluation.classnames import named_list
from alip_hf.evaluation.long_retrieval import IMAGE, load_long_split
from alip_hf.evaluation.presets import LONG_RETRIEVAL_LAYOUTS, WDS_LAYOUT, EvalTask, hub_files_folder, task_folder

# The image members CLIP_benchmark's `wds/` loader accepts, in its order of preference.
WDS_IMAGE_EXTENSIONS = ("webp", "png", "jpg", "jpeg")

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Loading a task's data
# ----------------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------------
# CLIP_benchmark's WebDataset layout
# ----------------------------------------------------------------------------------------------------------------


def wds_root(task: EvalTask, split: str | None = None) -> Path:
    """The local folder of the task's CLIP_benchmark WebDataset copy: `source` itself when it is a folder, else
    the Hub repository's snapshot (only `<split>/*` and the top-level `.txt` files are downloaded)."""

    def snapshot() -> str:
        from huggingface_hub import snapshot_download

        patterns = ["*.txt"] + ([f"{split}/*"] if split else [])
        return snapshot_download(task.source, repo_type="dataset", revision=task.revision, allow_patterns=patterns)

    return task_folder(task, "a copy in CLIP_benchmark's WebDataset layout", snapshot)


def wds_shards(root: Path, split: str) -> list[Path]:
    """`<root>/<split>/0.tar ... N-1.tar`, N from `<split>/nshards.txt` as CLIP_benchmark's loader reads it.

    Raises:
        FileNotFoundError: no `nshards.txt` (CLIP_benchmark requires it), or a shard it names is missing (a
            partial download would silently evaluate a subset).
    """
    folder = root / split
    count_file = folder / "nshards.txt"
    if not count_file.is_file():
        present = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise FileNotFoundError(f"{count_file} not found: not a split of a CLIP_benchmark WebDataset copy "
                                f"(splits present: {present})")
    count = int(count_file.read_text().strip())
    shards = [folder / f"{i}.tar" for i in range(count)]
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: nshards.txt says {count} shards, missing {missing[:5]}")
    extra = sorted(p.name for p in folder.glob("*.tar") if p not in shards)
    if extra:
        logger.warning("%s: shards %s are not counted in nshards.txt and are not read (as by CLIP_benchmark)",
                       folder, extra)
    return shards


def wds_text_list(root: Path, file_name: str) -> list[str]:
    """A list file of the copy (`classnames.txt`, `zeroshot_classification_templates.txt`), one entry per line,
    each stripped, as CLIP_benchmark's `build_wds_dataset` reads it."""
    path = root / file_name
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the CLIP_benchmark WebDataset copy has no {file_name}")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]


def load_wds_split(root: Path, split: str):
    """The split's shards through `datasets`' `webdataset` builder: one column per member extension (`webp`,
    `cls`, `txt`, `npy`, ...), rows in shard order then member order, as CLIP_benchmark iterates them."""
    import datasets

    files = [str(s) for s in wds_shards(root, split)]
    return datasets.load_dataset("webdataset", data_files={split: files}, split=split)


def _wds_image_column(dataset, task: EvalTask) -> str:
    found = [ext for ext in WDS_IMAGE_EXTENSIONS if ext in dataset.column_names]
    if len(found) != 1:
        raise ValueError(f"{task.name}: expected one image member among {WDS_IMAGE_EXTENSIONS}, found {found} in "
                         f"{dataset.column_names}")
    return found[0]


def resolve_list(task: EvalTask, spec, kind) -> list[str]:
    """`named_list`, with `wds:<file>` read from the task's WebDataset copy."""
    if isinstance(spec, str) and spec.startswith("wds:"):
        if task.layout != WDS_LAYOUT:
            raise ValueError(f"{task.name}: {spec!r} needs a CLIP_benchmark WebDataset source (layout={WDS_LAYOUT!r})")
        return wds_text_list(wds_root(task), spec.split(":", 1)[1])
    return named_list(spec, kind)


# ----------------------------------------------------------------------------------------------------------------
# WinoGAViL: the files of nlphuji/winogavil
# ----------------------------------------------------------------------------------------------------------------

WINOGAVIL_CSV = "winogavil_dataset.csv"
WINOGAVIL_IMAGES_ZIP = "winogavil_images.zip"
WINOGAVIL_IMAGES_DIR = "winogavil_images"  # the zip's one folder; a candidate's image is `<name>.jpg` in it
WINOGAVIL_COLUMNS = ("ID", "cue", "candidates", "associations")  # `candidates`, `associations`: JSON lists


@dataclass
class AssociationInstance:
    """One WinoGAViL game: the cue, the candidate image names (in the published order) and the associated ones."""

    id: str
    cue: str
    candidates: list[str]
    associations: list[str]


def winogavil_root(task: EvalTask) -> Path:
    """The local folder holding the task's `winogavil_dataset.csv`: `source` itself when it is a folder, else the
    Hub repository's CSV and image zip (`hf_hub_download`; cached, works offline once cached)."""
    return task_folder(task, f"{WINOGAVIL_CSV} and {WINOGAVIL_IMAGES_ZIP} (a copy of nlphuji/winogavil)",
                       lambda: hub_files_folder(task, WINOGAVIL_CSV, WINOGAVIL_IMAGES_ZIP))


def load_winogavil(task: EvalTask) -> tuple[list[AssociationInstance], Path]:
    """The games of `winogavil_dataset.csv` and the folder of their candidate images (`<name>.jpg`).

    The images come from `winogavil_images/` beside the CSV when it is there (an unpacked zip), else from
    `winogavil_images.zip`, whose members the games use are unpacked once into `winogavil_images/` beside it.

    Raises:
        FileNotFoundError: the CSV, or both the image folder and the zip, are missing (naming the path).
        ValueError: a column is missing, a list cell is not JSON, or an association is not among the candidates
            (naming the file and the game's row and ID).
    """
    root = winogavil_root(task)
    csv_path = root / WINOGAVIL_CSV
    if not csv_path.is_file():
        raise FileNotFoundError(f"{task.name}: {csv_path} not found (nlphuji/winogavil's layout: {WINOGAVIL_CSV}, "
                                f"{WINOGAVIL_IMAGES_ZIP})")
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in WINOGAVIL_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{csv_path}: no column(s) {missing}; columns: {reader.fieldnames}")
        instances = [_association_instance(csv_path, line, row) for line, row in enumerate(reader, start=2)]
    if not instances:
        raise ValueError(f"{task.name}: {csv_path} has no rows")
    names = {name for instance in instances for name in instance.candidates}
    return instances, _winogavil_images(root, names)


def _association_instance(csv_path: Path, line: int, row: dict) -> AssociationInstance:
    try:
        candidates, associations = json.loads(row["candidates"]), json.loads(row["associations"])
    except json.JSONDecodeError as error:
        raise ValueError(f"{csv_path} line {line} (ID {row['ID']!r}): candidates / associations are not JSON "
                         f"lists ({error})") from error
    if not associations or not set(associations) <= set(candidates):
        raise ValueError(f"{csv_path} line {line} (ID {row['ID']!r}): associations {associations} are not a "
                         f"non-empty subset of the candidates {candidates}")
    return AssociationInstance(str(row["ID"]), row["cue"], list(candidates), list(associations))


def _winogavil_images(root: Path, names: set[str]) -> Path:
    members = [f"{WINOGAVIL_IMAGES_DIR}/{name}.jpg" for name in sorted(names)]
    unpack_members(root / WINOGAVIL_IMAGES_ZIP, members, root, "candidate images of the games")
    return root / WINOGAVIL_IMAGES_DIR


def winogavil_prompt(cue: str) -> str:
    """DataComp's text for a cue (eval_utils/wino_eval.py): lower-cased, after "A" or, before a vowel, "An"."""
    cue = cue.lower()
    return f"{'An' if cue[:1] in 'aeiou' else 'A'} {cue}"


# ----------------------------------------------------------------------------------------------------------------
# Any task
# ----------------------------------------------------------------------------------------------------------------


def load_split(task: EvalTask, split: str):
    """The rows of `split` (filtered by `task.row_filter`, then cut to `task.first_rows`), images left undecoded, and
    the image column name.

    Raises:
        ValueError: a missing column, no image column to pick, or no rows.
    """
    if task.layout == WDS_LAYOUT:
        dataset = load_wds_split(wds_root(task, split), split)
        image_column = task.image_column or _wds_image_column(dataset, task)
    elif task.layout in LONG_RETRIEVAL_LAYOUTS:
        dataset, image_column = load_long_split(task, split), task.image_column or IMAGE
    else:
        dataset = sources.load_source(task.source, split=split)
        image_column = task.image_column or _only_image_column(dataset, task)
    columns = {"image": image_column, "label": task.label_column}
    columns.update({f"caption {i}": c for i, c in enumerate(task.caption_columns)})
    if task.row_filter:
        columns["row_filter"] = task.row_filter[0]
    sources.require_columns(dataset, columns)
    if task.row_filter:
        column, value = task.row_filter
        dataset = dataset.filter(lambda v: v == value, input_columns=column)
    if task.first_rows is not None and len(dataset) > task.first_rows:
        dataset = dataset.select(range(task.first_rows))
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
        names = resolve_list(task, task.class_names, "classnames")
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

    A caption cell is a string or a list of strings (with `task.caption_lines`, a string holds one caption per
    line, split as CLIP_benchmark's `str.splitlines`); empty strings are not captions.

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
            if task.caption_lines and isinstance(cell, str):
                cell = cell.splitlines()
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


