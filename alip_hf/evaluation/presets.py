"""Evaluation tasks (`EvalTask`) and the named presets and preset groups `eval.py --preset` runs."""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Literal

from alip_hf import schema
from alip_hf.resources import DEMO_DATA


# CLIP_benchmark's task names, so that its tooling reads our results files.
ZEROSHOT, RETRIEVAL, LINEAR_PROBE = "zeroshot_classification", "zeroshot_retrieval", "linear_probe"
# WinoGAViL's task (DataComp's `misc/winogavil`): given a cue and candidate images, pick the K associated ones.
ASSOCIATION = "image_association"
TASKS = (ZEROSHOT, RETRIEVAL, LINEAR_PROBE, ASSOCIATION)
TASK_ALIASES = {"zeroshot": ZEROSHOT, "classification": ZEROSHOT, "retrieval": RETRIEVAL, "lp": LINEAR_PROBE,
                "association": ASSOCIATION}
# What retrieval reports: recall@k for these k, and the recall curve over k = 1..50 (or to the candidate count).
RECALL_KS = (1, 5, 10)
RECALL_CURVE_MAX_K = 50


# ----------------------------------------------------------------------------------------------------------------
# Tasks and presets
# ----------------------------------------------------------------------------------------------------------------


# `class_names` / `templates` specs read from a CLIP_benchmark WebDataset copy, next to its `<split>/` folders.
WDS_CLASSNAMES = "wds:classnames.txt"
WDS_TEMPLATES = "wds:zeroshot_classification_templates.txt"
WDS_LAYOUT = "clip_benchmark_wds"
# The files of the Hub dataset `nlphuji/winogavil` (what its loading script downloads, and so what DataComp reads):
# `winogavil_dataset.csv` and `winogavil_images.zip` holding `winogavil_images/<candidate>.jpg`.
WINOGAVIL_LAYOUT = "winogavil"
# Long-caption retrieval sets, each read from its publisher's files (alip_hf/evaluation/long_retrieval.py): Long-CLIP's
# `Urban1k.zip`, ShareGPT4V's `share-captioner_coco_lcs_sam_1246k_1107.json`, DOCCI's `docci_descriptions.jsonlines`
# + `images/`, DCI's `densely_captioned_images/` (`splits.json`, `annotations/`, `photos/`).
URBAN1K_LAYOUT, SHAREGPT4V_LAYOUT, DOCCI_LAYOUT, DCI_LAYOUT = "urban1k", "sharegpt4v", "docci", "dci"
LONG_RETRIEVAL_LAYOUTS = (URBAN1K_LAYOUT, SHAREGPT4V_LAYOUT, DOCCI_LAYOUT, DCI_LAYOUT)


@dataclass
class EvalTask:
    """One evaluation: a task on one split of one dataset, with the columns it reads.

    Attributes:
        name: the dataset's name in results (`cifar10`, `demo`).
        task: one of `TASKS`.
        source: anything `sources.load_source` reads (Hub id, `save_to_disk` dir, files, WebDataset shards); with
            `layout="clip_benchmark_wds"`, a Hub dataset repository in CLIP_benchmark's WebDataset layout
            (`clip-benchmark/wds_cifar10`) or a local copy of one.
        split: the evaluated split (the test split of a linear probe).
        image_column: `None` picks the dataset's only `datasets.Image` column.
        label_column: classification tasks: integer class ids (a `ClassLabel`) or class-name strings.
        caption_columns: retrieval: columns holding a caption or a list of captions; all count as matches.
        class_names: a list or a name for `named_list` (`WDS_CLASSNAMES`: the copy's `classnames.txt`); `None`:
            the `ClassLabel` names, else the sorted distinct strings of `label_column`.
        class_name_style: `"underscores"` turns `_` and `/` into spaces (Food-101, SUN397 folder names).
        templates: a list or a name for `named_list` (`WDS_TEMPLATES`: the copy's template file).
        row_filter: `(column, value)`: keep only rows whose `column` equals `value` (Karpathy splits stored
            as a column).
        train_split, val_split: linear probe: the training split and an optional validation split (without one,
            `val_fraction` of the training rows, stratified, is held out).
        layout: `"datasets"` (anything `sources.load_source` reads) or `"clip_benchmark_wds"`: `<split>/N.tar`
            shards (members `<key>.webp|png|jpg|jpeg`, `<key>.cls`, `<key>.txt`, `<key>.npy`), `<split>/
            nshards.txt`, `classnames.txt`, `zeroshot_classification_templates.txt`, `dataset_type.txt`; or
            `"winogavil"` (`WINOGAVIL_LAYOUT`): `winogavil_dataset.csv` + `winogavil_images.zip` (or the
            `winogavil_images/` folder it unpacks to); or one of `LONG_RETRIEVAL_LAYOUTS` (`"urban1k"`,
            `"sharegpt4v"`, `"docci"`, `"dci"`): a long-caption retrieval set in its publisher's files, read as
            rows `id`, `image` (a file path), `caption` (alip_hf/evaluation/long_retrieval.py).
        revision: the Hub revision of `source` (branch, tag or commit).
        caption_lines: retrieval: a caption cell holds several captions, one per line (CLIP_benchmark's `.txt`).
        main_metric: the metric a suite averages (DataComp's `main_metric`; `acc1` where it names none).
        group_metric: a WILDS / fairness metric that needs each image's metadata (`.npy`, first field: the
            group): `F1-macro_all`, `acc_worst_region`, `acc_top5_wg`, `acc_wg`.
        first_rows: evaluate the first N rows of the split in its published order (ShareGPT4V-1k: Long-CLIP's first
            1000 entries of the ShareGPT4V json); recorded with the results.
        expected_rows: the split's published row count; a copy with another count is logged and recorded.
        title: the dataset's name in DataComp's tables (`Oxford Flowers-102`) or its publisher's (`Urban1k`).
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
    layout: Literal["datasets", "clip_benchmark_wds", "winogavil", "urban1k", "sharegpt4v", "docci", "dci"] = "datasets"
    revision: str | None = None
    caption_lines: bool = False
    main_metric: str | None = None
    group_metric: str | None = None
    first_rows: int | None = None
    expected_rows: int | None = None
    title: str | None = None

    def __post_init__(self):
        self.task = TASK_ALIASES.get(self.task, self.task)
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS} (or {sorted(TASK_ALIASES)}), got {self.task!r}")
        if self.task == RETRIEVAL and not self.caption_columns:
            raise ValueError(f"{self.name}: a retrieval task needs caption_columns")
        if self.task in (ZEROSHOT, LINEAR_PROBE) and not self.label_column:
            raise ValueError(f"{self.name}: a {self.task} task needs label_column")
        if self.task == LINEAR_PROBE and not self.train_split:
            raise ValueError(f"{self.name}: a linear probe needs train_split")
        if self.first_rows is not None and self.first_rows < 1:
            raise ValueError(f"{self.name}: first_rows must be >= 1, got {self.first_rows}")
        if self.group_metric is not None and self.group_metric not in GROUP_METRICS:
            raise ValueError(f"{self.name}: group_metric must be one of {GROUP_METRICS}, got {self.group_metric!r}")
        if self.main_metric is None:
            self.main_metric = {ZEROSHOT: "acc1", RETRIEVAL: "mean_recall@1", LINEAR_PROBE: "lp_acc1",
                                ASSOCIATION: WINOGAVIL_MAIN_METRIC}[self.task]
        elif self.task == LINEAR_PROBE and not self.main_metric.startswith("lp_"):
            self.main_metric = "lp_" + self.main_metric  # a classification preset turned into a linear probe


# WILDS and fairness metrics of DataComp's suite (eval_utils/wilds_eval.py, fairness_eval.py).
GROUP_METRICS = ("F1-macro_all", "acc_worst_region", "acc_top5_wg", "acc_wg")
# WinoGAViL's main metric in DataComp's tasklist.yml: the mean Jaccard index over the instances with 10 or 12
# candidates (the hard half of the game).
WINOGAVIL_MAIN_METRIC = "jaccard_score_10-12"
MEAN_PER_CLASS_RECALL = "mean_per_class_recall"

# ----------------------------------------------------------------------------------------------------------------
# The benchmark presets: CLIP_benchmark's WebDataset copies on the Hub
# ----------------------------------------------------------------------------------------------------------------
# Every preset reads CLIP_benchmark's own WebDataset copy of its dataset: the images, the `.cls` label ids and
# the `classnames.txt` / `zeroshot_classification_templates.txt` that CLIP_benchmark's `wds/` loader and DataComp's
# evaluation read, so our numbers compare with theirs directly and label order cannot drift (a `.cls` id indexes
# `classnames.txt`). What was checked for each is in docs/evaluation.md.

CLIP_BENCHMARK_ORG = "clip-benchmark"
# DataComp's evaluation downloads `djghosh/wds_<task>_test` (download_evalsets.py); the WILDS and fairness sets
# are read from there, the copies DataComp scores, with their per-image metadata (`.npy`).
DATACOMP_ORG = "djghosh"


def _wds(name: str, repo: str, title: str | None = None, rows: int | None = None, main: str | None = None,
         group: str | None = None, train: bool = True, org: str = CLIP_BENCHMARK_ORG, revision: str = "main",
         task: str = ZEROSHOT) -> EvalTask:
    """A task on CLIP_benchmark's WebDataset copy `<org>/<repo>` (test split)."""
    if task == RETRIEVAL:
        return EvalTask(name, RETRIEVAL, f"{org}/{repo}", "test", caption_columns=("txt",), layout=WDS_LAYOUT,
                        revision=revision, caption_lines=True, main_metric=main, expected_rows=rows, title=title)
    return EvalTask(name, ZEROSHOT, f"{org}/{repo}", "test", label_column="cls", class_names=WDS_CLASSNAMES,
                    templates=WDS_TEMPLATES, train_split="train" if train else None, layout=WDS_LAYOUT,
                    revision=revision, main_metric=group or main, group_metric=group, expected_rows=rows, title=title)


_MPCR = MEAN_PER_CLASS_RECALL
# (preset, repository, DataComp's title, test rows as DataComp's tasklist.yml gives them, main metric)
_DATACOMP_TASKS = [
    _wds("caltech101", "wds_vtab-caltech101", "Caltech-101", 6085, _MPCR),
    _wds("cifar10", "wds_cifar10", "CIFAR-10", 10000),
    _wds("cifar100", "wds_vtab-cifar100", "CIFAR-100", 10000),
    _wds("clevr_count_all", "wds_vtab-clevr_count_all", "CLEVR Counts", 15000),
    _wds("clevr_closest_object_distance", "wds_vtab-clevr_closest_object_distance", "CLEVR Distance", 15000),
    _wds("country211", "wds_country211", "Country211", 21100),
    _wds("dtd", "wds_vtab-dtd", "Describable Textures", 1880),
    _wds("eurosat", "wds_vtab-eurosat", "EuroSAT", 5400),
    _wds("fgvc_aircraft", "wds_fgvc_aircraft", "FGVC Aircraft", 3333, _MPCR),
    _wds("food101", "wds_food101", "Food-101", 25250),
    _wds("gtsrb", "wds_gtsrb", "GTSRB", 12630),
    _wds("imagenet1k", "wds_imagenet1k", "ImageNet 1k", 50000),
    _wds("imagenet_sketch", "wds_imagenet_sketch", "ImageNet Sketch", 50889),
    _wds("imagenetv2", "wds_imagenetv2", "ImageNet v2", 10000, train=False),
    _wds("imagenet-a", "wds_imagenet-a", "ImageNet-A", 7500, train=False),
    _wds("imagenet-o", "wds_imagenet-o", "ImageNet-O", 2000, train=False),
    _wds("imagenet-r", "wds_imagenet-r", "ImageNet-R", 30000, train=False),
    _wds("kitti_closest_vehicle_distance", "wds_vtab-kitti_closest_vehicle_distance", "KITTI Vehicle Distance", 711),
    _wds("mnist", "wds_mnist", "MNIST", 10000),
    _wds("objectnet", "wds_objectnet", "ObjectNet", 18574, train=False),
    _wds("flowers", "wds_vtab-flowers", "Oxford Flowers-102", 6149, _MPCR),
    _wds("pets", "wds_vtab-pets", "Oxford-IIIT Pet", 3669, _MPCR),
    _wds("voc2007", "wds_voc2007", "Pascal VOC 2007", 14976),
    _wds("pcam", "wds_vtab-pcam", "PatchCamelyon", 32768),
    _wds("renderedsst2", "wds_renderedsst2", "Rendered SST2", 1821),
    _wds("resisc45", "wds_vtab-resisc45", "RESISC45", 6300),
    _wds("cars", "wds_cars", "Stanford Cars", 8041),
    _wds("stl10", "wds_stl10", "STL-10", 8000),
    _wds("sun397", "wds_sun397", "SUN397", 108754),
    _wds("svhn", "wds_vtab-svhn", "SVHN", 26032),
    # Karpathy test splits, five captions per image (DataComp reads nlphuji's copies of the same 1k / 5k images).
    _wds("flickr30k", "wds_flickr30k", "Flickr", 1000, task=RETRIEVAL,
         revision="f8af3ceee1b944bf761340682621dfafd23974d2"),
    _wds("mscoco", "wds_mscoco_captions", "MSCOCO", 5000, task=RETRIEVAL),
    # DataComp reads `datasets.load_dataset("nlphuji/winogavil", split="test")` (eval_utils/wino_eval.py), whose
    # loading script reads the repository's CSV and image zip: the same two files are read here, without the script.
    EvalTask("winogavil", ASSOCIATION, "nlphuji/winogavil", "test", layout=WINOGAVIL_LAYOUT, expected_rows=3563,
             title="WinoGAViL"),
    _wds("iwildcam", "wds_wilds-iwildcam_test", "iWildCam", 42791, group="F1-macro_all", train=False,
         org=DATACOMP_ORG),
    _wds("camelyon17", "wds_wilds-camelyon17_test", "Camelyon17", 85054, train=False, org=DATACOMP_ORG),
    _wds("fmow", "wds_wilds-fmow_test", "FMoW", 22108, group="acc_worst_region", train=False, org=DATACOMP_ORG),
    _wds("dollar_street", "wds_dollar_street_test", "Dollar Street", 3503, group="acc_top5_wg", train=False,
         org=DATACOMP_ORG),
    _wds("geode", "wds_geode_test", "GeoDE", 12488, group="acc_wg", train=False, org=DATACOMP_ORG),
]
# DataComp's tasks that are not run here (none: the 38 scored tasks all are).
DATACOMP_UNSUPPORTED: dict[str, str] = {}
DATACOMP_NUM_TASKS = 38

# The rest of CLIP_benchmark's `vtab` collection (clip_benchmark/datasets/builder.py, `dataset_collection`).
_VTAB_EXTRA = [
    _wds("diabetic_retinopathy", "wds_vtab-diabetic_retinopathy"),
    _wds("dmlab", "wds_vtab-dmlab"),
    _wds("dsprites_label_orientation", "wds_vtab-dsprites_label_orientation"),
    _wds("dsprites_label_x_position", "wds_vtab-dsprites_label_x_position"),
    _wds("smallnorb_label_azimuth", "wds_vtab-smallnorb_label_azimuth"),
    _wds("smallnorb_label_elevation", "wds_vtab-smallnorb_label_elevation"),
]

# ----------------------------------------------------------------------------------------------------------------
# Long-caption retrieval: one long text per image, each set read from its publisher's files
# ----------------------------------------------------------------------------------------------------------------
# How models trained on long captions (Long-CLIP, DreamLIP, LoTLIP, FLAIR, TULIP, ...) are compared. The source is
# where the publisher's files live (`with_data_root` maps it to `<data_root>/<last part>`); what each set reads, which
# subset and which text, and what was checked for it: docs/evaluation.md, "Long-caption retrieval".


def _long(name: str, source: str, layout: str, split: str, rows: int, title: str, first_rows: int | None = None):
    return EvalTask(name, RETRIEVAL, source, split, caption_columns=("caption",), layout=layout, first_rows=first_rows,
                    expected_rows=rows, title=title)


_LONG_RETRIEVAL = [
    # Long-CLIP's Urban1k: `Urban1k.zip` on the Hub, `Urban1k/image/<n>.jpg` + `Urban1k/caption/<n>.txt`.
    _long("urban1k", "BeichenZhang/Urban1k", URBAN1K_LAYOUT, "test", 1000, "Urban1k"),
    # Long-CLIP's ShareGPT4V-1k: the first 1000 entries of the ShareGPT-4V-PT json (Long-CLIP issue #60).
    _long("sharegpt4v_1k", "Lin-Chen/ShareGPT4V", SHAREGPT4V_LAYOUT, "all", 1000, "ShareGPT4V-1k", first_rows=1000),
    # DOCCI's test split (5000 images, one human description each), from `docci_descriptions.jsonlines`.
    _long("docci", "google/docci", DOCCI_LAYOUT, "test", 5000, "DOCCI"),
    # DCI as LoTLIP (and FLAIR) evaluate it: every image of `splits.json` (7805), short + extra caption.
    _long("dci", "densely_captioned_images", DCI_LAYOUT, "all", 7805, "DCI"),
]

PRESETS: dict[str, list[EvalTask]] = {
    "demo": [
        EvalTask("demo", ZEROSHOT, str(DEMO_DATA), "test", "image", "category", train_split="train",
                 templates=("clip art of {}.", "a drawing of {}.", "an illustration of {}.")),
        EvalTask("demo", RETRIEVAL, str(DEMO_DATA), "test", "image", caption_columns=("alt_text", "caption")),
    ],
    **{t.name: [t] for t in _DATACOMP_TASKS + _VTAB_EXTRA + _LONG_RETRIEVAL},
}
PRESET_GROUPS = {
    # The 11 zero-shot classification datasets of the ALIP paper's zero-shot table (arXiv 2308.08428).
    "alip_zeroshot": ["cifar10", "cifar100", "food101", "pets", "flowers", "sun397", "cars", "dtd", "caltech101",
                      "fgvc_aircraft", "imagenet1k"],
    "retrieval": ["flickr30k", "mscoco"],
    # Long-caption retrieval, as Long-CLIP (Urban1k, ShareGPT4V-1k), LoTLIP / FLAIR (DCI) and DOCCI's users report it.
    "long_retrieval": [t.name for t in _LONG_RETRIEVAL],
    # DataComp's evaluation suite (tasklist.yml), its 38 scored tasks in its order.
    "datacomp": [t.name for t in _DATACOMP_TASKS],
    # CLIP_benchmark's `vtab` collection, in its order.
    "clip_benchmark_vtab": ["caltech101", "cifar100", "clevr_count_all", "clevr_closest_object_distance",
                            "diabetic_retinopathy", "dmlab", "dsprites_label_orientation", "dsprites_label_x_position",
                            "dtd", "eurosat", "kitti_closest_vehicle_distance", "flowers", "pets", "pcam", "resisc45",
                            "smallnorb_label_azimuth", "smallnorb_label_elevation", "sun397", "svhn"],
}
# DataComp's aggregate groups (aggregate_scores.py), by preset name.
DATACOMP_GROUPS = {
    "ImageNet": ["imagenet1k"],
    "ImageNet dist. shifts": ["imagenet_sketch", "imagenetv2", "imagenet-a", "imagenet-o", "imagenet-r", "objectnet"],
    "VTAB": ["caltech101", "cifar100", "clevr_count_all", "clevr_closest_object_distance", "dtd", "eurosat",
             "kitti_closest_vehicle_distance", "flowers", "pets", "pcam", "resisc45", "svhn", "sun397"],
    "Retrieval": ["flickr30k", "mscoco", "winogavil"],
}


def unknown_preset_message(name: str) -> str:
    """`name` is no preset: the valid names, and the closest ones."""
    valid = sorted(PRESETS) + sorted(PRESET_GROUPS)
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"unknown preset {name!r}.{hint} Presets: {sorted(PRESETS)}; groups: {sorted(PRESET_GROUPS)}"


def with_data_root(task: EvalTask, data_root: str | os.PathLike | None) -> EvalTask:
    """The task reading a local mirror: a Hub source `org/repo` becomes `<data_root>/<repo>` (what
    `huggingface-cli download <org>/<repo> --repo-type dataset --local-dir <data_root>/<repo>` writes, and
    DataComp's `--data_dir` layout for its `wds_<task>_test` copies), a folder name (DCI's
    `densely_captioned_images`) `<data_root>/<name>`; existing local sources stay."""
    if data_root is None or os.path.exists(task.source):
        return task
    return replace(task, source=str(Path(data_root) / task.source.rstrip("/").split("/")[-1]), revision=None)


def task_folder(task: EvalTask, holds: str, download: Callable[[], str | os.PathLike] | None = None) -> Path:
    """The local folder of the task's copy: `source` itself when it is a folder; else, where the publisher ships the
    files on the Hub and `source` is a Hub dataset id (`org/name`), the folder `download()` puts them in (the Hub
    cache: works offline once cached).

    Raises:
        FileNotFoundError: neither, naming what the folder must hold and where `--data_root` looks for it.
    """
    if os.path.isdir(task.source):
        return Path(task.source)
    if download is not None and not os.path.exists(task.source) and task.source.count("/") == 1:
        return Path(download())
    hub = ", nor a Hub dataset id (org/name)" if download is not None else ""
    raise FileNotFoundError(f"{task.name}: {task.source!r} is not a folder holding {holds}{hub}; pass --data_root DIR "
                            f"with the copy in DIR/{Path(task.source).name} (docs/evaluation.md)")


def hub_files_folder(task: EvalTask, *files: str) -> Path:
    """Downloads `files` of the Hub dataset `task.source` (at `task.revision`); the folder holding them."""
    from huggingface_hub import hf_hub_download

    paths = [hf_hub_download(task.source, name, repo_type="dataset", revision=task.revision) for name in files]
    return Path(paths[0]).parent


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
        if preset is None and not os.path.exists(tasks) and "/" not in tasks:
            # Neither a preset nor a local path nor a Hub id (`org/name`): a misspelt preset, most likely.
            raise ValueError(unknown_preset_message(tasks))
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
    from alip_hf.sources import load_source

    dataset = load_source(source, split=split)
    columns = tuple(c for c in (schema.ALT_TEXT, schema.CAPTION) if c in dataset.column_names)
    if not columns:
        raise ValueError(f"{source}: not a preset and has no {schema.ALT_TEXT!r} or {schema.CAPTION!r} column; "
                         f"pass a preset ({sorted(PRESETS)}) or an EvalTask")
    return EvalTask(Path(source).name or source, RETRIEVAL, source, split, caption_columns=columns)


