"""recaption.audit: per-row gate values from a trained model, filtering, noise-detection AUC, the report, and
train.py --log_sample_weights, on a tiny model and tiny data."""

import json
import math
from pathlib import Path
from unittest import mock

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score
from conftest import make_rows, read_metrics, tiny_alip_config

from alip_hf import train
from alip_hf.data import load_source, undecoded_images
from alip_hf.evaluation.features import model_fingerprint
from alip_hf.evaluation.noise import precision_at_fraction, roc_auc, top_fraction
from alip_hf.schema import (
    AUDIT_MODEL,
    AUDIT_SCORES,
    CLIP_SCORE,
    ERROR,
    GATE_COLUMNS,
    ID,
    LCG_WEIGHT,
    LCG_WEIGHT_RAW,
    SIMILARITY_IMAGE_TEXT,
    SIMILARITY_TEXT_CAPTION,
)
from alip_hf.training.sample_weights import SampleWeightLog
from modeling_alip import ALIPModel, ALIPProcessor
from recaption.audit import AuditArguments, GateScorer, audit
from recaption.arguments import RunArguments

ROWS = 14
BAD_IMAGE, EMPTY_CAPTION, HTML_TEXT = 3, 5, 6
MEANS = {"lcg.text_caption": 0.75, "dcg.image_text": -0.15, "dcg.image_caption": -0.05}  # near the rows' medians


def _features(columns):
    types = {"image": datasets.Image(), "noisy": datasets.Value("bool")}
    return datasets.Features({c: types.get(c, datasets.Value("string")) for c in columns})


def write_rows(path: Path, drop: tuple[str, ...] = ()) -> Path:
    rows = make_rows(ROWS, seed=3, corrupt=(BAD_IMAGE,))
    rows["caption"][EMPTY_CAPTION] = ""
    rows["alt_text"][HTML_TEXT] = "<b>bold</b> & cat"
    rows["noisy"] = [i % 3 == 0 for i in range(ROWS)]
    rows["kind"] = ["swapped" if i % 3 == 0 else ("partial" if i % 3 == 1 else "clean") for i in range(ROWS)]
    rows = {k: v for k, v in rows.items() if k not in drop}
    datasets.Dataset.from_dict(rows, features=_features(list(rows))).to_parquet(str(path))
    return path


def save_model(path: Path, trained: bool = True) -> Path:
    torch.manual_seed(0)
    model = ALIPModel(tiny_alip_config())
    if trained:
        with torch.no_grad():
            for name, value in MEANS.items():
                model.gates.get_submodule(name).running_mean.fill_(value)
    model.save_pretrained(path)
    ALIPProcessor.from_config(model.config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    return {"root": root, "model": save_model(root / "model"), "untrained": save_model(root / "untrained", False),
            "data": write_rows(root / "data.parquet"), "no_caption": write_rows(root / "nocap.parquet", ("caption",))}


def run_args(assets, out, **kw) -> RunArguments:
    return RunArguments(source=str(assets["data"]), output_dir=str(out), **{"shard_size": 5, **kw})


def audit_args(assets, **kw) -> AuditArguments:
    return AuditArguments(**{"model": str(assets["model"]), "batch_size": 4, "report": False, **kw})


def read_output(out: Path) -> datasets.Dataset:
    """The written shards, images left undecoded (one of them is not an image)."""
    return undecoded_images(load_source(str(out / "data"), split="train"), "image")


@pytest.fixture(scope="module")
def audited(assets):
    out = assets["root"] / "audited"
    summary = audit(run_args(assets, out), audit_args(assets, keep_fraction=0.5, noise_column="noisy", report=True))
    return out, summary


# ----------------------------------------------------------------------------------------------------------------
# Scores


def test_every_row_gets_the_scores_joined_on_id_with_provenance(assets, audited):
    out, summary = audited
    rows = read_output(out)
    assert len(rows) == ROWS and sorted(rows[ID]) == sorted(f"row-{i:04d}" for i in range(ROWS))
    assert set(AUDIT_SCORES) | {AUDIT_MODEL, ERROR, "noisy", "alt_text", "caption"} <= set(rows.column_names)
    by_id = {r[ID]: r for r in rows}
    bad, empty = by_id[f"row-{BAD_IMAGE:04d}"], by_id[f"row-{EMPTY_CAPTION:04d}"]
    assert bad[ERROR].startswith("unreadable_image") and math.isnan(bad[LCG_WEIGHT])
    assert empty[ERROR].startswith("empty_caption") and math.isnan(empty[LCG_WEIGHT])
    good = [r for r in rows if not r[ERROR]]
    assert len(good) == ROWS - 2 and all(math.isfinite(r[s]) for r in good for s in AUDIT_SCORES)
    config = json.loads((out / "run_config.json").read_text())
    model = ALIPModel.from_pretrained(assets["model"])
    assert config["weights_sha256"] == model_fingerprint(model)
    assert config["gates"]["H_tc"] == pytest.approx(MEANS["lcg.text_caption"])
    assert good[0][AUDIT_MODEL] == f"{assets['model']}@{config['weights_sha256'][:12]}"
    assert summary["failures"] == 2 and summary["counts"]["failed/unreadable_image"] == 1


def test_values_follow_the_gate_equations_with_the_trained_running_means(audited):
    rows = [r for r in read_output(audited[0]) if not r[ERROR]]
    s_tc = np.array([r[SIMILARITY_TEXT_CAPTION] for r in rows])
    raw = np.exp(2.0 * (s_tc - MEANS["lcg.text_caption"]))  # lcg_gamma 2: W^s = exp(gamma (S_tc - H_tc))
    np.testing.assert_allclose([r[LCG_WEIGHT_RAW] for r in rows], raw, rtol=1e-5)
    np.testing.assert_allclose([r[LCG_WEIGHT] for r in rows], np.minimum(raw, 1), rtol=1e-5)
    inconsistent = [r[LCG_WEIGHT_RAW] < 1 for r in rows]
    assert any(inconsistent) and not all(inconsistent)  # both branches of the DCG rule are exercised
    for r, applies in zip(rows, inconsistent):  # the DCG weight applies only where the texts disagree
        s_xt = r[SIMILARITY_IMAGE_TEXT]
        expected = math.exp(2 * (s_xt - MEANS["dcg.image_text"])) if applies else 1.0
        assert r["dcg_text_weight"] == pytest.approx(expected, rel=1e-5)
    # Without --clip_score_model the CLIP-score is the audited model's own image-text cosine.
    assert [r[CLIP_SCORE] for r in rows] == [r[SIMILARITY_IMAGE_TEXT] for r in rows]


def test_scores_do_not_depend_on_the_batch_and_the_gates_never_update(assets):
    scorer = GateScorer(str(assets["model"]))
    before = {k: v.clone() for k, v in scorer.model.gates.state_dict().items()}
    rows = make_rows(6, seed=5)
    images = [Image.open(__import__("io").BytesIO(c["bytes"])) for c in rows["image"]]
    together = scorer(images, rows["alt_text"], rows["caption"])
    one_by_one = [scorer(images[i:i + 1], rows["alt_text"][i:i + 1], rows["caption"][i:i + 1]) for i in range(6)]
    for column in AUDIT_SCORES:
        np.testing.assert_allclose(together[column], [o[column][0] for o in one_by_one], rtol=1e-5, atol=1e-6)
    assert not scorer.model.training
    for key, value in scorer.model.gates.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_a_separate_clip_score_model_gives_its_own_cosine(assets, tmp_path):
    from transformers import CLIPModel

    torch.manual_seed(7)
    CLIPModel(tiny_alip_config()).save_pretrained(tmp_path / "clip")
    out = tmp_path / "out"
    audit(run_args(assets, out), audit_args(assets, clip_score_model=str(tmp_path / "clip")))
    rows = [r for r in read_output(out) if not r[ERROR]]
    assert any(abs(r[CLIP_SCORE] - r[SIMILARITY_IMAGE_TEXT]) > 1e-3 for r in rows)
    assert json.loads((out / "run_config.json").read_text())["clip_score_model"] == str(tmp_path / "clip")


def test_killed_run_resumes_scoring_only_the_unfinished_shard(assets, audited, tmp_path):
    out = tmp_path / "out"
    audit(run_args(assets, out), audit_args(assets))
    first = {r[ID]: r for r in read_output(out)}
    (out / "shards" / "train-00001.json").unlink()  # as if killed while writing shard 1
    (out / "data" / "train-00001.parquet").unlink()
    calls = []
    original = GateScorer.__call__
    with mock.patch.object(GateScorer, "__call__", lambda self, i, t, c: calls.append(len(i)) or original(self, i, t, c)):
        audit(run_args(assets, out), audit_args(assets, batch_size=2))  # another batch size: same scores, resumes
    assert sum(calls) == 4  # shard 1 only: rows 5..9, of which row 5 (empty caption) is not scorable
    again = {r[ID]: r for r in read_output(out)}
    assert sorted(again) == sorted(first)
    for row_id, row in first.items():
        for column in AUDIT_SCORES:
            assert again[row_id][column] == pytest.approx(row[column], rel=1e-5, nan_ok=True)


def test_a_streamed_source_gets_the_same_scores(assets, audited, tmp_path):
    out = tmp_path / "out"
    audit(run_args(assets, out, streaming=True), audit_args(assets))
    streamed = {r[ID]: r for r in read_output(out)}
    for row in read_output(audited[0]):
        for column in AUDIT_SCORES:
            assert streamed[row[ID]][column] == pytest.approx(row[column], rel=1e-5, nan_ok=True)


# ----------------------------------------------------------------------------------------------------------------
# Filtering and detection


def test_keep_fraction_writes_the_top_rows_and_counts_dropped_rows_per_reason(audited):
    out, summary = audited
    rows = [r for r in read_output(out)]
    scored = sorted((r for r in rows if not r[ERROR]), key=lambda r: (-r[LCG_WEIGHT_RAW], r[ID]))
    kept = load_source(str(out / "filtered"), split="train")
    assert sorted(kept[ID]) == sorted(r[ID] for r in scored[:6])  # round(0.5 * 12 scored rows)
    assert isinstance(kept[0]["image"], Image.Image)  # the datasets features survive the filter
    report = json.loads((out / "filter_summary.json").read_text())
    assert report == summary["filter"]
    assert report["dropped_by_reason"] == {"empty_caption": 1, "outside_keep_fraction": 6, "unreadable_image": 1}
    assert report["kept"] + report["dropped"] == ROWS


def test_keep_above_keeps_rows_at_or_above_the_threshold_and_refilters_without_rescoring(assets, audited, tmp_path):
    out = tmp_path / "out"
    audit(run_args(assets, out), audit_args(assets))
    rows = [r for r in read_output(out) if not r[ERROR]]
    threshold = float(np.median([r[LCG_WEIGHT] for r in rows]))
    with mock.patch.object(GateScorer, "__call__", side_effect=AssertionError("rescored")):
        summary = audit(run_args(assets, out), audit_args(assets, score=LCG_WEIGHT, keep_above=threshold))
    expected = sorted(r[ID] for r in rows if r[LCG_WEIGHT] >= threshold)
    assert sorted(load_source(str(out / "filtered"), split="train")[ID]) == expected
    assert summary["filter"]["dropped_by_reason"]["below_keep_above"] == len(rows) - len(expected)


def test_roc_auc_equals_sklearn_with_ties():
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(5, 200))
        labels = rng.random(n) < rng.uniform(0.1, 0.9)
        if labels.all() or not labels.any():
            continue
        scores = np.round(rng.normal(size=n) + labels * rng.uniform(0, 2), int(rng.integers(0, 3)))  # ties
        assert roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12), trial
    assert math.isnan(roc_auc(np.ones(4, bool), np.arange(4.0)))


def test_precision_at_fraction_counts_kept_clean_and_dropped_noisy():
    is_clean = np.array([True, True, False, True, False, False])
    scores = np.array([0.9, 0.8, 0.7, 0.1, 0.2, 0.3])
    assert top_fraction(scores, 0.5).tolist() == [True, True, True, False, False, False]
    assert precision_at_fraction(is_clean, scores, 0.5) == {"kept_clean_precision": 2 / 3,
                                                            "dropped_noisy_precision": 2 / 3}
    # Ties at the cut are broken by key, whatever the row order.
    assert top_fraction(np.array([1.0, 1.0, 0.0]), 1 / 3, keys=np.array(["b", "a", "c"])).tolist() == [False, True, False]


def test_noise_detection_reports_each_scores_auc_on_the_written_columns(audited):
    out, summary = audited
    detection = json.loads((out / "noise_detection.json").read_text())
    rows = [r for r in read_output(out) if not r[ERROR]]
    clean = np.array([not r["noisy"] for r in rows])
    assert set(detection["scores"]) == set(AUDIT_SCORES) and detection["kept_fraction"] == 0.5
    for column in AUDIT_SCORES:
        expected = roc_auc_score(clean, [r[column] for r in rows])
        assert detection["scores"][column]["auc"] == pytest.approx(expected, abs=1e-9), column
        assert detection["scores"][column]["rows"] == len(rows)


def test_categorical_noise_column_with_clean_value_reports_auc_per_category(assets, audited, tmp_path):
    out = tmp_path / "out"
    summary = audit(run_args(assets, out), audit_args(assets, noise_column="kind"))
    detection = summary["noise_detection"]
    assert detection["noisy"] == sum(1 for i in range(ROWS) if i % 3 != 2)
    assert set(detection["auc_by_category"]) == {"partial", "swapped"}
    with pytest.raises(ValueError, match=r"--noise_column 'kind' is categorical but no row has --clean_value 'ok'"):
        audit(run_args(assets, out), audit_args(assets, noise_column="kind", clean_value="ok"))


# ----------------------------------------------------------------------------------------------------------------
# Report


def test_report_has_the_histogram_contact_sheet_and_an_html_page_of_the_extreme_rows(audited):
    out, summary = audited
    report = out / "report"
    for name in ("weights_histogram.png", "contact_sheet.png"):
        with Image.open(report / name) as image:
            assert image.format == "PNG" and image.width > 400 and image.height > 200
    page = (report / "index.html").read_text()
    rows = sorted((r for r in read_output(out) if not r[ERROR]), key=lambda r: r[LCG_WEIGHT_RAW])
    for row in rows[:8] + rows[-8:]:
        assert row[ID] in page
    assert page.count("data:image/png;base64,") == 16 and 'src="weights_histogram.png"' in page
    # 12 scored rows: the 8 lowest and 8 highest cover all of them, the row with markup in its web text too.
    assert "<b>bold</b>" not in page and "&lt;b&gt;bold&lt;/b&gt; &amp; cat" in page
    assert summary["report"]["index.html"] == str(report / "index.html")


# ----------------------------------------------------------------------------------------------------------------
# Bad input


def test_plain_clip_checkpoint_is_refused_naming_the_missing_gate_buffers(assets, tmp_path):
    from transformers import CLIPModel

    CLIPModel(tiny_alip_config()).save_pretrained(tmp_path / "clip")
    with pytest.raises(ValueError, match=r"no gate running means \(gates\.lcg\.text_caption\.running_mean.*plain CLIP"):
        audit(run_args(assets, tmp_path / "out"), audit_args(assets, model=str(tmp_path / "clip")))


def test_model_whose_gates_never_trained_is_refused(assets, tmp_path):
    with pytest.raises(ValueError, match="running means are all at their initial value 1.0"):
        audit(run_args(assets, tmp_path / "out"), audit_args(assets, model=str(assets["untrained"])))


def test_source_without_the_caption_column_names_it_and_the_step_that_adds_it(assets, tmp_path):
    args = RunArguments(source=str(assets["no_caption"]), output_dir=str(tmp_path / "out"))
    with pytest.raises(ValueError, match=r"column 'caption' \(caption\) not found.*recaption\.caption"):
        audit(args, audit_args(assets))


@pytest.mark.parametrize("kwargs, message", [
    (dict(score=LCG_WEIGHT, keep_above=1.5), r"--keep_above 1.5 is outside \[0.0, 1.0\], the range of --score lcg_weight"),
    (dict(score=LCG_WEIGHT_RAW, keep_above=-0.1), r"outside \[0.0, inf\]"),
    (dict(keep_fraction=0.0), r"--keep_fraction must be in \(0, 1\]"),
    (dict(keep_fraction=0.5, keep_above=0.5), "not both"),
    (dict(sample_weights="x"), "exactly one of --model"),
    (dict(score="loss"), "--score 'loss'"),
])
def test_invalid_arguments_are_refused_naming_the_flag(assets, kwargs, message):
    with pytest.raises(ValueError, match=message):
        audit_args(assets, **kwargs)


def test_missing_noise_column_is_named_before_scoring(assets, tmp_path):
    with pytest.raises(ValueError, match=r"column 'is_noisy' \(noise\) not found"):
        audit(run_args(assets, tmp_path / "out"), audit_args(assets, noise_column="is_noisy"))


# ----------------------------------------------------------------------------------------------------------------
# train.py --log_sample_weights


def test_log_sample_weights_writes_every_sample_of_the_last_epoch_once(tiny_data, tmp_path):
    # 48 rows, batch 16, 2 micro-batches per step: 3 micro-batches per epoch, 6 steps = 4 epochs; step 5 holds the
    # last micro-batch of epoch 2 and the first of epoch 3.
    train.main(tiny_data.argv(tmp_path, "--recipe", "alip", "--max_steps", "6", "--gradient_accumulation_steps", "2",
                              "--per_device_train_batch_size", "16", "--log_sample_weights"))
    table = pq.read_table(tmp_path / "sample_weights" / "train-00000-of-00001.parquet").to_pylist()
    assert sorted(r[ID] for r in table) == [f"row-{i:04d}" for i in range(48)]
    assert {r["epoch"] for r in table} == {3} and {r["step"] for r in table} == {5, 6}
    assert set(GATE_COLUMNS) <= set(table[0])
    assert all(0 < r[LCG_WEIGHT] <= 1 for r in table)
    metrics = read_metrics(tmp_path)
    step6 = [r for r in table if r["step"] == 6]
    # The logged values are those the loss used: their mean is the logged batch mean.
    assert np.mean([r[LCG_WEIGHT] for r in step6]) == pytest.approx(metrics[-1]["gate/lcg/weight_mean"], rel=1e-5)


def test_log_sample_weights_steps_records_every_nth_step_and_feeds_the_audit_report(tiny_data, tmp_path):
    train.main(tiny_data.argv(tmp_path / "run", "--recipe", "alip", "--max_steps", "4",
                              "--log_sample_weights_steps", "2"))
    table = pq.read_table(tmp_path / "run" / "sample_weights").to_pylist()
    assert sorted({r["step"] for r in table}) == [2, 4] and len(table) == 16
    out = tmp_path / "audit"
    summary = audit(RunArguments(source=str(tiny_data.train), output_dir=str(out), shard_size=20),
                    AuditArguments(sample_weights=str(tmp_path / "run" / "sample_weights"), keep_fraction=0.5))
    rows = read_output(out)
    logged = {r[ID]: r for r in sorted(table, key=lambda r: r["step"])}  # the last record of an id wins
    for row in rows:
        if row[ID] in logged:
            assert row[LCG_WEIGHT] == pytest.approx(logged[row[ID]][LCG_WEIGHT])
        else:
            assert row[ERROR].startswith("not_logged") and math.isnan(row[LCG_WEIGHT])
    assert summary["filter"]["kept"] == round(0.5 * len(logged))
    assert (out / "report" / "index.html").exists()


def test_log_sample_weights_is_refused_for_a_recipe_without_gates_and_for_a_stream_without_steps(tiny_data, tmp_path):
    with pytest.raises(ValueError, match="--recipe clip has no per-sample gate values"):
        train.main(tiny_data.argv(tmp_path, "--recipe", "clip", "--log_sample_weights"))
    with pytest.raises(ValueError, match="needs --log_sample_weights_steps"):
        SampleWeightLog(None, str(tmp_path), max_steps=4, accumulation=1, batches_per_epoch=None)

