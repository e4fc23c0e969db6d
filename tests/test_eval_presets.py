"""The benchmark presets on local copies in CLIP_benchmark's published WebDataset layout (tests/_wds_layout.py):
columns, class names and templates from the copy, equality with CLIP_benchmark's own `wds/` loader, DataComp's
suite, resumable runs that record failures, --data_root, --dtype, --task on one dataset, --compare."""

import builtins
import json
import math

import numpy as np
import pytest
import torch

from _wds_layout import random_images, write_winogavil_copy, write_wds_copy
from alip_hf import eval as eval_cli
from alip_hf import evaluation as ev
from alip_hf.evaluation import loading, metrics, presets, reports, runners
from alip_hf.resources import DEMO_DATA
from conftest import tiny_alip_config
from modeling_alip import ALIPModel, ALIPProcessor

clip_benchmark_builder = pytest.importorskip("clip_benchmark.datasets.builder")
cb_zeroshot = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
cb_retrieval = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")

# The CLIP_benchmark list each copy's classnames.txt was written from, where the package ships it.
CLIP_BENCHMARK_CLASSNAMES = {"flowers": "flowers", "pets": "pets", "caltech101": "caltech101_vtab",
                             "imagenet1k": "imagenet1k", "eurosat": "eurosat", "gtsrb": "gtsrb", "mnist": "mnist"}
CLASSIFICATION_PRESETS = sorted({name for group in ("datacomp", "clip_benchmark_vtab", "alip_zeroshot")
                                 for name in ev.PRESET_GROUPS[group]
                                 if ev.PRESETS[name][0].task == "zeroshot_classification"})


@pytest.fixture(scope="module")
def model_and_processor():
    config = tiny_alip_config()
    torch.manual_seed(0)
    return ALIPModel(config).eval(), ALIPProcessor.from_config(config)


def repo_dir(data_root, preset):
    return data_root / presets.PRESETS[preset][0].source.split("/")[-1]


def class_names_for(preset, count=5):
    key = CLIP_BENCHMARK_CLASSNAMES.get(preset)
    return ev.clip_benchmark_metadata("classnames", key) if key else [f"{preset} class {i}" for i in range(count)]


def templates_for(preset):
    try:
        return ev.clip_benchmark_metadata("templates", preset)
    except KeyError:
        return ev.clip_benchmark_metadata("templates", "imagenet1k")


def write_classification_copy(data_root, preset, n=10, seed=0):
    names = class_names_for(preset)
    labels = [(7 * i + 1) % len(names) for i in range(n)]
    task = presets.PRESETS[preset][0]
    metadata = [[i % 3, i] for i in range(n)] if task.group_metric else None
    write_wds_copy(repo_dir(data_root, preset), random_images(n, seed), labels=labels, class_names=names,
                   templates=templates_for(preset), metadata=metadata)
    return names, labels


def write_retrieval_copy(data_root, preset="flickr30k", n=9, seed=1):
    rng = np.random.default_rng(seed)
    words = ["a", "red", "dog", "on", "green", "grass", "two", "cats", "near", "house"]
    captions = [[" ".join(rng.choice(words, 5)) for _ in range(rng.integers(1, 6))] for _ in range(n)]
    write_wds_copy(repo_dir(data_root, preset), random_images(n, seed), captions=captions)
    return captions


# --------------------------------------------------------------------------------------------------------------
# Every preset reads its copy's published layout
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", CLASSIFICATION_PRESETS)
def test_classification_preset_reads_cls_ids_classnames_and_templates_of_its_wds_copy(preset, tmp_path):
    names, labels = write_classification_copy(tmp_path, preset)
    task = presets.with_data_root(presets.PRESETS[preset][0], tmp_path)
    dataset, image_column = loading.load_split(task, task.split)
    got_names, got_labels = loading.class_names_and_labels(task, dataset)
    assert image_column == "webp" and len(dataset) == len(labels)
    assert got_names == names and got_labels.tolist() == labels  # row order = shard order, then key order
    assert loading.resolve_list(task, task.templates, "templates") == templates_for(preset)


def test_flowers_labels_index_the_copy_classnames_so_label_1_is_hard_leaved_pocket_orchid(tmp_path):
    # The old nelorth/oxford-flowers preset mapped string-sorted ClassLabel names ('1', '10', '100', ...) onto
    # CLIP_benchmark's list: label 1 scored as the wrong flower. Here `.cls` 1 indexes classnames.txt line 2.
    names, _ = write_classification_copy(tmp_path, "flowers")
    write_wds_copy(repo_dir(tmp_path, "flowers"), random_images(2), labels=[1, 101], class_names=names,
                   templates=templates_for("flowers"))
    task = presets.with_data_root(presets.PRESETS["flowers"][0], tmp_path)
    dataset, _ = loading.load_split(task, "test")
    got_names, labels = loading.class_names_and_labels(task, dataset)
    assert [got_names[i] for i in labels] == ["hard-leaved pocket orchid", "blackberry lily"]


def test_shards_are_read_in_numeric_order_as_clip_benchmark_reads_them(tmp_path):
    write_wds_copy(tmp_path / "c", random_images(12), labels=list(range(12)), class_names=[str(i) for i in range(12)],
                   shard_size=1)  # 0.tar ... 11.tar: a name sort would put 10.tar and 11.tar after 1.tar
    dataset = loading.load_wds_split(tmp_path / "c", "test")
    assert dataset["__key__"] == [f"s{i:07d}" for i in range(12)] and dataset["cls"] == list(range(12))


def test_a_split_without_nshards_or_with_a_missing_shard_is_an_error_naming_the_file(tmp_path):
    write_classification_copy(tmp_path, "cifar10", n=10)
    root = repo_dir(tmp_path, "cifar10")
    task = presets.with_data_root(presets.PRESETS["cifar10"][0], tmp_path)
    (root / "test" / "1.tar").unlink()
    with pytest.raises(FileNotFoundError, match=r"nshards.txt says 3 shards, missing \['1.tar'\]"):
        loading.load_split(task, "test")
    (root / "test" / "nshards.txt").unlink()
    with pytest.raises(FileNotFoundError, match="nshards.txt not found"):
        loading.load_split(task, "test")


def test_unknown_preset_lists_the_presets_and_suggests_the_closest():
    with pytest.raises(ValueError, match=r"unknown preset 'cifar-10'. Did you mean 'cifar10'.*groups: \["):
        eval_cli.main(["--model", "m", "--preset", "cifar-10"])
    with pytest.raises(ValueError, match="Did you mean 'cifar10'"):
        ev.resolve_tasks("cifar-10")


def test_datacomp_group_is_its_suite_with_its_metric_per_task():
    tasks = ev.resolve_tasks("datacomp")
    assert len(tasks) + len(presets.DATACOMP_UNSUPPORTED) == presets.DATACOMP_NUM_TASKS == 38
    main = {t.name: t.main_metric for t in tasks}
    assert {n for n, m in main.items() if m == "mean_per_class_recall"} == {"caltech101", "fgvc_aircraft",
                                                                            "flowers", "pets"}
    assert (main["flickr30k"], main["mscoco"]) == ("mean_recall@1", "mean_recall@1")
    assert (main["iwildcam"], main["fmow"], main["dollar_street"], main["geode"]) == (
        "F1-macro_all", "acc_worst_region", "acc_top5_wg", "acc_wg")
    assert main["winogavil"] == "jaccard_score_10-12" and presets.DATACOMP_UNSUPPORTED == {}
    assert sum(m == "acc1" for m in main.values()) == 38 - 4 - 2 - 4 - 1
    # tasklist.yml's order: Flickr, MSCOCO, WinoGAViL, then WILDS
    assert list(main)[30:34] == ["flickr30k", "mscoco", "winogavil", "iwildcam"]
    assert len(ev.resolve_tasks("alip_zeroshot")) == 11 and len(ev.resolve_tasks("clip_benchmark_vtab")) == 19


# --------------------------------------------------------------------------------------------------------------
# Equality with CLIP_benchmark's own wds loader
# --------------------------------------------------------------------------------------------------------------


class OpenClipStyle(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def encode_image(self, pixel_values):
        return self.model.get_image_features(pixel_values=pixel_values).pooler_output

    def encode_text(self, input_ids):
        return self.model.get_text_features(input_ids=input_ids).pooler_output


def reference_loader(processor, root, name, batch_size=8, collate_fn=None):
    transform = lambda image: processor(images=[image.convert("RGB")])["pixel_values"][0]  # noqa: E731
    dataset = clip_benchmark_builder.build_dataset(f"wds/{name}", root=str(root), transform=transform, split="test",
                                                   task=clip_benchmark_builder.get_dataset_default_task(name))
    kwargs = {"collate_fn": collate_fn} if collate_fn else {}
    return dataset, torch.utils.data.DataLoader(dataset, batch_size=batch_size, **kwargs)


def test_wds_zeroshot_equals_clip_benchmark_read_through_its_own_wds_loader(model_and_processor, tmp_path,
                                                                              monkeypatch):
    model, processor = model_and_processor
    # CLIP_benchmark 1.6.2's `accuracy` calls float() on a 1-element array, which NumPy 2 rejects.
    monkeypatch.setattr(cb_zeroshot, "float", lambda x: builtins.float(np.asarray(x).reshape(-1)[0]), raising=False)
    names = class_names_for("pets")
    rng = np.random.default_rng(5)
    labels = rng.integers(0, len(names), 40).tolist()
    write_wds_copy(repo_dir(tmp_path, "pets"), random_images(40, 6), labels=labels, class_names=names,
                   templates=["a photo of a {c}, a type of pet.", "a low resolution photo of a {c}."], shard_size=16)
    task = presets.with_data_root(presets.PRESETS["pets"][0], tmp_path)
    (record,) = ev.run_evaluation(model, processor, task, settings=ev.EvalSettings(batch_size=16))

    dataset, loader = reference_loader(processor, repo_dir(tmp_path, "pets"), "pets")
    assert dataset.classes == names
    reference = cb_zeroshot.evaluate(OpenClipStyle(model), loader,
                                     lambda t: processor(text=list(t), padding="max_length")["input_ids"],
                                     dataset.classes, dataset.templates, device="cpu", amp=False)
    assert record["metrics"] == reference
    assert record["main_score"] == reference["mean_per_class_recall"] and 0 < reference["acc5"] < 1
    assert (record["num_images"], record["num_classes"], record["num_templates"]) == (40, 37, 2)


def test_wds_retrieval_equals_clip_benchmark_read_through_its_own_wds_loader(model_and_processor, tmp_path):
    model, processor = model_and_processor
    captions = write_retrieval_copy(tmp_path, "flickr30k", n=20)
    task = presets.with_data_root(presets.PRESETS["flickr30k"][0], tmp_path)
    (record,) = ev.run_evaluation(model, processor, task)

    _, loader = reference_loader(processor, repo_dir(tmp_path, "flickr30k"), "flickr30k",
                                 collate_fn=clip_benchmark_builder.image_captions_collate_fn)
    reference = cb_retrieval.evaluate(OpenClipStyle(model), loader,
                                      lambda t: processor(text=list(t), padding="max_length")["input_ids"],
                                      device="cpu", amp=False, recall_k_list=[1, 5, 10])
    assert record["metrics"] == reference
    assert record["num_texts"] == sum(len(c) for c in captions)
    assert record["main_score"] == pytest.approx(
        (reference["text_retrieval_recall@1"] + reference["image_retrieval_recall@1"]) / 2, abs=0)


# --------------------------------------------------------------------------------------------------------------
# WILDS / fairness metrics and the suite average
# --------------------------------------------------------------------------------------------------------------


def test_group_metrics_match_hand_counts_and_sklearn():
    from sklearn.metrics import f1_score

    logits = torch.tensor([[3.0, 1, 0, 0, 0, 0], [0, 3.0, 1, 0, 0, 0], [0, 0, 1, 0, 0, 3.0], [3.0, 0, 0, 0, 0, 1]])
    labels = np.array([0, 1, 2, 5])  # top-1: hit, hit, miss, miss; top-5: all hits (each label ranks 1st or 2nd)
    groups = np.array([[0, 9], [1, 9], [1, 9], [2, 9]])  # first metadata field: the group
    assert metrics.group_metric("acc_wg", logits, labels, groups) == 0.0  # group 2: 0 of 1
    assert metrics.group_metric("acc_worst_region", logits[:3], labels[:3], groups[:3]) == 0.5  # group 1: 1 of 2
    assert metrics.group_metric("acc_top5_wg", logits, labels, groups) == 1.0
    assert metrics.group_metric("F1-macro_all", logits, labels, groups) == pytest.approx(
        f1_score(labels, [0, 1, 5, 0], average="macro", labels=[0, 1, 2, 5]), abs=1e-12)


def test_group_metric_preset_reads_the_npy_metadata_end_to_end(model_and_processor, tmp_path):
    model, processor = model_and_processor
    write_classification_copy(tmp_path, "geode", n=12)
    task = presets.with_data_root(presets.PRESETS["geode"][0], tmp_path)
    (record,) = ev.run_evaluation(model, processor, task)
    assert record["main_metric"] == "acc_wg" and record["main_score"] == record["metrics"]["acc_wg"]
    assert 0 <= record["metrics"]["acc_wg"] <= record["metrics"]["acc1"]


def test_datacomp_average_is_the_mean_of_the_main_metrics_and_says_what_is_missing():
    names = ev.PRESET_GROUPS["datacomp"]
    records = [{"dataset": n, "task": ev.PRESETS[n][0].task, "split": "test", "metrics": {}, "status": "ok",
                "main_score": (i + 1) / 100} for i, n in enumerate(names) if n != "objectnet"]
    summary = reports.datacomp_summary(records)["datacomp"]
    assert summary["average"] == pytest.approx(np.mean([r["main_score"] for r in records]), abs=1e-12)
    assert (summary["num_tasks"], summary["complete"]) == (37, False)
    assert summary["missing"] == ["objectnet"]
    assert summary["groups"]["ImageNet"] == records[names.index("imagenet1k")]["main_score"]
    assert summary["groups"]["ImageNet dist. shifts"] is None
    retrieval = [r["main_score"] for r in records if r["dataset"] in ("flickr30k", "mscoco", "winogavil")]
    assert summary["groups"]["Retrieval"] == pytest.approx(np.mean(retrieval), abs=1e-12)
    vtab = [r["main_score"] for r in records if r["dataset"] in presets.DATACOMP_GROUPS["VTAB"]]
    assert len(vtab) == 13 and summary["groups"]["VTAB"] == pytest.approx(np.mean(vtab), abs=1e-12)


# --------------------------------------------------------------------------------------------------------------
# The CLI: resumable, failures recorded, --data_root, --task on one dataset, --dtype, --compare
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture
def saved_model(model_and_processor, tmp_path):
    model, processor = model_and_processor
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    return str(tmp_path / "model")


def test_failing_dataset_is_recorded_the_others_run_and_a_rerun_resumes(saved_model, tmp_path, monkeypatch):
    write_classification_copy(tmp_path / "mirror", "cifar10")
    write_retrieval_copy(tmp_path / "mirror", "mscoco")
    out = tmp_path / "results.json"
    argv = ["--model", saved_model, "--preset", "cifar10", "flowers", "mscoco", "--data_root",
            str(tmp_path / "mirror"), "--output", str(out)]
    with pytest.raises(SystemExit, match="1 of 3 evaluations failed \\(flowers\\)"):
        eval_cli.main(argv)
    first = json.loads(out.read_text())["results"]
    assert [(r["dataset"], r["status"]) for r in first] == [("cifar10", "ok"), ("flowers", "failed"),
                                                             ("mscoco", "ok")]
    assert first[1]["error"].startswith("FileNotFoundError:") and "wds_vtab-flowers" in first[1]["error"]

    write_classification_copy(tmp_path / "mirror", "flowers")
    ran = []
    original = runners.run_task
    monkeypatch.setattr(runners, "run_task", lambda *a, **k: ran.append(a[2].name) or original(*a, **k))
    records = eval_cli.main(argv)
    assert ran == ["flowers"]
    assert [r["status"] for r in records] == ["ok", "ok", "ok"]
    assert [r["metrics"] for r in records if r["dataset"] != "flowers"] == [
        r["metrics"] for r in first if r["dataset"] != "flowers"]
    with pytest.raises(ValueError, match="settings"):  # other settings would mix results: refused
        eval_cli.main(argv + ["--batch_size", "7"])


def test_results_are_written_after_each_dataset(saved_model, tmp_path, monkeypatch):
    write_classification_copy(tmp_path, "cifar10")
    write_classification_copy(tmp_path, "mnist")
    out = tmp_path / "results.json"
    seen = []
    original = runners.run_task

    def run_task(*args, **kwargs):
        seen.append([r["dataset"] for r in json.loads(out.read_text())["results"]] if out.exists() else [])
        return original(*args, **kwargs)

    monkeypatch.setattr(runners, "run_task", run_task)
    eval_cli.main(["--model", saved_model, "--preset", "cifar10", "mnist", "--data_root", str(tmp_path),
                   "--output", str(out)])
    assert seen == [[], ["cifar10"]]


def test_several_tasks_on_one_dataset_load_the_model_once_and_encode_images_once(saved_model, tmp_path,
                                                                                 monkeypatch):
    calls = {"model": 0, "images": []}
    load, encode = eval_cli.load_model_and_processor, runners.encode_images
    monkeypatch.setattr(eval_cli, "load_model_and_processor",
                        lambda *a, **k: calls.__setitem__("model", calls["model"] + 1) or load(*a, **k))
    monkeypatch.setattr(runners, "encode_images", lambda *a, **k: calls["images"].append(len(a[2])) or encode(*a, **k))
    records = eval_cli.main(["--model", saved_model, "--dataset", str(DEMO_DATA), "--split", "test", "--task",
                             "zeroshot", "retrieval", "--label_column", "category", "--caption_columns", "alt_text",
                             "--max_samples", "20", "--output", str(tmp_path / "r.json")])
    assert [r["task"] for r in records] == ["zeroshot_classification", "zeroshot_retrieval"]
    assert calls == {"model": 1, "images": [20]}


def test_bf16_autocast_keeps_float32_similarities_close_to_fp32(model_and_processor, monkeypatch):
    model, processor = model_and_processor
    settings = dict(max_samples=40, recall_curve_max_k=0)
    fp32 = ev.run_evaluation(model, processor, "demo", settings=ev.EvalSettings(**settings))
    dtypes = []
    original = runners.encode_images
    monkeypatch.setattr(runners, "encode_images",
                        lambda *a, **k: (lambda f: dtypes.append(f.dtype) or f)(original(*a, **k)))
    bf16 = ev.run_evaluation(model, processor, "demo", settings=ev.EvalSettings(dtype="bf16", **settings))
    assert dtypes == [torch.float32]
    for a, b in zip(fp32, bf16):
        assert a["settings"]["dtype"] == "fp32" and b["settings"]["dtype"] == "bf16"
        for name, value in a["metrics"].items():
            if not math.isnan(value):  # bf16 towers move a few near-tied ranks among 40 images
                assert abs(b["metrics"][name] - value) <= 0.15, name
    with pytest.raises(ValueError, match="dtype"):
        ev.EvalSettings(dtype="int8")


def test_compare_renders_a_markdown_table_and_vector_plots(tmp_path):
    def results(model, acc, recall):
        return {"model": model, "results": [
            {"dataset": "cifar10", "task": "zeroshot_classification", "status": "ok", "main_metric": "acc1",
             "main_score": acc, "metrics": {"acc1": acc}},
            {"dataset": "flowers", "task": "zeroshot_classification", "status": "failed", "error": "x"},
            {"dataset": "mscoco", "task": "zeroshot_retrieval",  # a results file from before main_score
             "metrics": {"text_retrieval_recall@1": recall, "image_retrieval_recall@1": recall / 2}}]}

    paths = []
    for model, acc, recall in (("runs/clip", 0.5, 0.2), ("runs/alip", 0.625, 0.3)):
        paths.append(tmp_path / f"{model.split('/')[1]}.json")
        paths[-1].write_text(json.dumps(results(model, acc, recall)))
    pytest.importorskip("matplotlib")
    table_path = tmp_path / "table.md"
    table = eval_cli.main(["--compare", *map(str, paths), "--compare_output", str(table_path),
                           "--plot", str(tmp_path / "cmp.svg")]) or table_path.read_text()
    assert "| dataset | runs/clip | runs/alip |" in table
    assert "| cifar10 | 50.00 | **62.50** |" in table and "| mscoco | 15.00 | **22.50** |" in table
    assert "flowers" not in table and "| mean of 2 shared rows | 32.50 | 42.50 |" in table
    assert "<svg" in (tmp_path / "cmp.svg").read_text()
    reports.plot_comparison(paths, tmp_path / "cmp.pdf")
    assert (tmp_path / "cmp.pdf").read_bytes().startswith(b"%PDF")


@pytest.mark.slow  # about 50 s on one core: 37 small copies through datasets, one tiny model
def test_datacomp_preset_runs_its_suite_on_a_mirror_and_stores_the_average(saved_model, tmp_path):
    mirror = tmp_path / "mirror"
    for name in ev.PRESET_GROUPS["datacomp"]:
        if name == "winogavil":
            write_winogavil_copy(mirror / "winogavil", WINOGAVIL_GAMES)
        elif ev.PRESETS[name][0].task == "zeroshot_retrieval":
            write_retrieval_copy(mirror, name, n=6)
        else:
            write_classification_copy(mirror, name, n=6)
    out = tmp_path / "results.json"
    records = eval_cli.main(["--model", saved_model, "--preset", "datacomp", "--data_root", str(mirror),
                             "--output", str(out), "--recall_curve_max_k", "0"])
    assert len(records) == 38 and {r["status"] for r in records} == {"ok"}
    summary = json.loads(out.read_text())["suites"]["datacomp"]
    assert summary["average"] == pytest.approx(np.mean([r["main_score"] for r in records]), abs=1e-12)
    assert (summary["num_tasks"], summary["missing"], summary["complete"]) == (38, [], True)
    assert all(r["expected_rows"] != r.get("num_rows", r["num_images"]) for r in records)  # small copies, logged


# --------------------------------------------------------------------------------------------------------------
# WinoGAViL: nlphuji/winogavil's files, DataComp's metric
# --------------------------------------------------------------------------------------------------------------

# (cue, candidates, associations): games with 5, 6, 10 and 12 candidates, as the published split has.
_NAMES = [f"img{i:02d}" for i in range(14)]
WINOGAVIL_GAMES = [
    ("werewolf", _NAMES[:5], _NAMES[:2]),
    ("ocean", _NAMES[3:9], _NAMES[4:7]),
    ("igloo", _NAMES[:10], [_NAMES[1], _NAMES[8]]),
    ("bee", _NAMES[2:14], _NAMES[5:9]),
    ("Apple", _NAMES[4:14], [_NAMES[13]]),
]


def test_association_jaccard_takes_the_top_k_and_scores_the_overlap():
    scores = torch.tensor([0.9, 0.1, 0.8, 0.7, 0.2])
    # K = 2 associations (0 and 1); the top 2 are 0 and 2: |{0}| / |{0, 1, 2}| = 1/3.
    assert metrics.association_jaccard(scores, torch.tensor([True, True, False, False, False])) == 1 / 3
    assert metrics.association_jaccard(scores, torch.tensor([True, False, True, False, False])) == 1.0
    assert metrics.association_jaccard(scores, torch.tensor([False, True, False, False, True])) == 0.0
    got = metrics.winogavil_metrics([1.0, 0.5, 0.0, 0.25, 1.0], [5, 6, 10, 12, 12])
    assert got == pytest.approx({"avg_jaccard_score": 2.75 / 5, "jaccard_score_5": 1.0, "jaccard_score_6": 0.5,
                                 "jaccard_score_10": 0.0, "jaccard_score_12": 0.625, "jaccard_score_5-6": 0.75,
                                 "jaccard_score_10-12": 1.25 / 3}, abs=1e-12)
    assert math.isnan(metrics.winogavil_metrics([1.0], [5])["jaccard_score_10-12"])


def test_winogavil_prompt_is_datacomps():
    assert [loading.winogavil_prompt(c) for c in ("Apple", "werewolf", "Ice cream")] == [
        "An apple", "A werewolf", "An ice cream"]


def test_winogavil_preset_reads_the_published_files_and_scores_as_datacomp(model_and_processor, tmp_path):
    from sklearn.metrics import jaccard_score

    model, processor = model_and_processor
    root = write_winogavil_copy(tmp_path / "winogavil", WINOGAVIL_GAMES)
    task = presets.with_data_root(presets.PRESETS["winogavil"][0], tmp_path)
    assert task.source == str(root)
    (record,) = ev.run_evaluation(model, processor, task)

    # DataComp's recipe (eval_utils/wino_eval.py), step by step, on the same files: the cue's prompt against its
    # candidates' images, the top K (K = associations), sklearn's Jaccard of the candidate masks.
    import csv
    import json
    import zipfile

    from PIL import Image

    def features(images):
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        return torch.nn.functional.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)

    expected, sizes = [], []
    with zipfile.ZipFile(root / "winogavil_images.zip") as zf, open(root / "winogavil_dataset.csv") as f, \
            torch.no_grad():
        for row in csv.DictReader(f):
            candidates, associations = json.loads(row["candidates"]), json.loads(row["associations"])
            images = [Image.open(zf.open(f"winogavil_images/{c}.jpg")).convert("RGB") for c in candidates]
            cue = row["cue"].lower()
            text = processor(text=[("An " if cue[0] in "aeiou" else "A ") + cue], return_tensors="pt", padding=True)
            text_features = torch.nn.functional.normalize(model.get_text_features(
                input_ids=text["input_ids"], attention_mask=text["attention_mask"]).pooler_output, dim=-1)
            logits = (text_features @ features(images).T).squeeze(0).numpy()
            y_true = np.isin(candidates, associations)
            y_pred = np.isin(np.arange(len(candidates)), np.argsort(logits)[-int(y_true.sum()):])
            expected.append(jaccard_score(y_true, y_pred))
            sizes.append(len(candidates))
    assert record["metrics"] == pytest.approx(metrics.winogavil_metrics(expected, sizes), abs=1e-12)
    assert record["main_metric"] == "jaccard_score_10-12"
    assert record["main_score"] == record["metrics"]["jaccard_score_10-12"]
    assert (record["num_games"], record["num_images"]) == (5, 14)
    assert (root / "winogavil_images" / "img00.jpg").is_file()  # unpacked once; a rerun reads the folder
    (again,) = ev.run_evaluation(model, processor, task)
    assert again["metrics"] == record["metrics"]


def test_winogavil_files_missing_or_malformed_are_errors_naming_the_file(model_and_processor, tmp_path):
    model, processor = model_and_processor
    task = presets.with_data_root(presets.PRESETS["winogavil"][0], tmp_path)
    with pytest.raises(FileNotFoundError, match="winogavil_dataset.csv"):
        loading.load_winogavil(task)
    root = write_winogavil_copy(tmp_path / "winogavil", WINOGAVIL_GAMES[:1])
    (root / "winogavil_images.zip").unlink()
    with pytest.raises(FileNotFoundError, match="winogavil_images.zip not found"):
        loading.load_winogavil(task)
    (root / "winogavil_dataset.csv").write_text("ID,cue,candidates,associations\n7,x,\"[\"\"a\"\"]\",\"[\"\"b\"\"]\"\n")
    with pytest.raises(ValueError, match=r"line 2 \(ID '7'\): associations \['b'\] are not"):
        loading.load_winogavil(task)


def test_datacomp_preset_on_an_empty_data_root_records_38_tasks_each_with_its_error(saved_model, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "results.json"
    with pytest.raises(SystemExit, match="38 of 38 evaluations failed"):
        eval_cli.main(["--model", saved_model, "--preset", "datacomp", "--data_root", str(empty), "--output", str(out)])
    records = json.loads(out.read_text())["results"]
    assert [r["dataset"] for r in records] == ev.PRESET_GROUPS["datacomp"] and len(records) == 38
    assert {r["status"] for r in records} == {"failed"}
    for record in records:
        assert str(empty) in record["error"], record
    assert "winogavil_dataset.csv" in records[32]["error"]
    summary = json.loads(out.read_text())["suites"]["datacomp"]
    assert (summary["num_tasks"], summary["average"], len(summary["missing"])) == (0, None, 38)
