"""The data contract (`alip_hf.sources`): one rule for empty texts, one name for the demo data, and errors that
name the damaged file, in every command (training, recaption, the audit, evaluation)."""

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_rows, read_metrics, tiny_alip_config, write_parquet

from alip_hf import sources, train
from alip_hf.evaluation.loading import load_split
from alip_hf.evaluation.presets import EvalTask
from alip_hf.resources import DEMO_DATA
from alip_hf.schema import ALT_TEXT, CAPTION, ERROR, GATE_COLUMNS, ID, IMAGE
from alip_hf.training.arguments import parse_args
from modeling_alip import ALIPModel, ALIPProcessor
from recaption.audit import AuditArguments, audit
from recaption.arguments import GenerationArguments, RunArguments
from recaption.source import load_input
from recaption.rewrite import RewriteArguments, rewrite
from _tiny_captioners import save_tiny_chat_lm

ODD_TEXTS = ["&nbsp;", "\u200b", "\x00"]  # an HTML no-break space, a zero-width space, NUL


# ---- empty texts: one rule ----------------------------------------------------------------------------------------


def test_the_empty_text_rule():
    assert all(sources.is_empty_text(t) for t in [*ODD_TEXTS, None, 3, "", " \t\n", "&amp;nbsp;", "\u200b\u200c"])
    assert not any(sources.is_empty_text(t) for t in ["a", "&amp; co", "\u200bcat", "日本"])


def _save_audit_model(path: Path) -> Path:
    model = ALIPModel(tiny_alip_config())
    for gate in ("lcg.text_caption", "dcg.image_text", "dcg.image_caption"):  # as after training
        model.gates.get_submodule(gate).running_mean.fill_(0.5)
    model.save_pretrained(path)
    ALIPProcessor.from_config(model.config).save_pretrained(path)
    return path


@pytest.mark.slow  # a tiny training run, a tiny chat LM and an audit with a tiny model
def test_odd_texts_are_empty_alike_in_training_recaption_and_the_audit(tiny_data, tmp_path):
    rows = make_rows(16)
    odd_text, odd_caption = ["row-0000", "row-0001", "row-0002"], ["row-0003", "row-0004", "row-0005"]
    for k, text in enumerate(ODD_TEXTS):
        rows[ALT_TEXT][k], rows[CAPTION][3 + k] = text, text
    path = tmp_path / "odd.parquet"
    datasets.Dataset.from_dict(rows, features=datasets.load_dataset("parquet", data_files=str(
        write_parquet(tmp_path / "plain.parquet", 1)), split="train").features).to_parquet(str(path))

    # Training (the ALIP recipe reads both texts) skips exactly these six rows, whatever its tokenizer's cleaning.
    train.main(tiny_data.argv(tmp_path / "run", "--recipe", "alip", "--max_steps", "1", data_file=path))
    assert read_metrics(tmp_path / "run")[-1]["data/skipped_texts"] == 6

    # The audit scores none of them, naming the empty column.
    audit(RunArguments(source=str(path), output_dir=str(tmp_path / "audit"), shard_size=8),
          AuditArguments(model=str(_save_audit_model(tmp_path / "model")), batch_size=8, report=False))
    audited = sources.load_source(str(tmp_path / "audit" / "data"))
    errors = dict(zip(audited[ID], audited[ERROR]))
    assert sorted(i for i, e in errors.items() if e.startswith("empty_text")) == odd_text
    assert sorted(i for i, e in errors.items() if e.startswith("empty_caption")) == odd_caption

    # The rewrite does not prompt the LLM with them: no caption to rewrite.
    rewrite(RunArguments(source=str(path), output_dir=str(tmp_path / "rewrite"), shard_size=8),
            RewriteArguments(model=save_tiny_chat_lm(str(tmp_path / "lm"))),
            GenerationArguments(batch_size=8, max_new_tokens=4, dtype="float32"))
    rewritten = sources.load_source(str(tmp_path / "rewrite" / "data"))
    fallback = dict(zip(rewritten[ID], rewritten["vecap_fallback"]))
    assert sorted(i for i, reason in fallback.items() if reason == "no_caption") == odd_caption


# ---- `demo`: one name for the bundled data ------------------------------------------------------------------------


def test_demo_names_the_bundled_data_in_every_command():
    assert sources.resolve_source("demo") == str(DEMO_DATA) and sources.is_demo_data("demo")
    assert len(sources.load_source("demo", split="test")) == 394
    assert sources.local_files("demo") == sources.local_files(str(DEMO_DATA))
    source = load_input(RunArguments(source="demo", output_dir="/tmp/unused-demo-out", split="test"), {"image": IMAGE})
    assert len(source.dataset) == 394 and source.id_column == ID  # recaption.caption / rewrite / audit
    assert parse_args(["--train_data", "demo"])[1].train_data == str(DEMO_DATA)
    task = EvalTask("demo", "retrieval", "demo", "test", caption_columns=(ALT_TEXT,))  # eval.py --dataset demo
    assert len(load_split(task, "test")[0]) == 394


@pytest.mark.slow  # a subprocess that imports datasets and torch: ~20 s
def test_audit_of_demo_runs_offline_on_a_fresh_cache(tmp_path):
    """`python -m recaption.audit --source demo` as docs/audit.md shows it, with nothing cached."""
    ids = sources.load_source("demo", split="test")[ID][:5]
    log = tmp_path / "run" / "sample_weights"
    log.mkdir(parents=True)
    pq.write_table(pa.table({ID: ids, "step": [1] * 5, **{c: [0.5] * 5 for c in GATE_COLUMNS}}),
                   log / "train-00000-of-00001.parquet")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets")}
    done = subprocess.run([sys.executable, "-m", "recaption.audit", "--source", "demo", "--split", "test",
                           "--sample_weights", str(log), "--output_dir", str(tmp_path / "out"), "--report", "false",
                           "--shard_size", "200"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    audited = sources.load_source(str(tmp_path / "out" / "data"), split="test")
    assert len(audited) == 394 and sum(not e for e in audited[ERROR]) == 5


# ---- damaged files are named -------------------------------------------------------------------------------------


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


@pytest.mark.parametrize("link", [tarfile.SYMTYPE, tarfile.LNKTYPE], ids=["symlink", "hardlink"])
@pytest.mark.parametrize("streaming", [False, True], ids=["map-style", "streaming"])
def test_a_tar_member_that_is_a_link_names_the_shard_and_the_member(tmp_path, link, streaming):
    shards = tmp_path / "shards"
    shards.mkdir()
    for number in range(2):
        with tarfile.open(shards / f"{number:05d}.tar", "w") as tar:
            for key in range(2):
                _add(tar, f"{number}{key}.txt", b"a cat")
                _add(tar, f"{number}{key}.json", b'{"id": "x"}')
                if number == 1 and key == 1:
                    info = tarfile.TarInfo(f"{number}{key}.jpg")
                    info.type, info.linkname = link, "10.txt"
                    tar.addfile(info)
                else:
                    _add(tar, f"{number}{key}.jpg", b"jpeg")
    with pytest.raises(ValueError, match=r"00001\.tar: member '11\.jpg' is a (symbolic|hard) link to '10\.txt'"):
        sources.load_source(str(shards / "*.tar"), streaming=streaming)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
@pytest.mark.parametrize("streaming", [False, True], ids=["map-style", "streaming"])
def test_text_data_that_is_not_utf8_names_the_file_and_the_line(tmp_path, suffix, streaming):
    path = tmp_path / f"rows{suffix}"
    good = [b'{"alt_text": "a cat"}\n', b'{"alt_text": "a dog"}\n'] if suffix == ".jsonl" else [b"alt_text\n",
                                                                                               b"a cat\n"]
    bad = b'{"alt_text": "caf\xe9"}\n' if suffix == ".jsonl" else b"caf\xe9\n"
    path.write_bytes(b"".join([*good, bad]))
    with pytest.raises(ValueError, match=rf"{path}, line 3: not valid UTF-8"):
        list(sources.load_source(str(path), streaming=streaming))


@pytest.mark.parametrize("streaming", [False, True], ids=["map-style", "streaming"])
def test_random_bytes_named_parquet_name_the_file(tmp_path, streaming):
    folder = tmp_path / "data"
    folder.mkdir()
    write_parquet(folder / "train-00000-of-00002.parquet", 4)
    (folder / "train-00001-of-00002.parquet").write_bytes(os.urandom(256))
    with pytest.raises(ValueError, match=r"train-00001-of-00002\.parquet: not a Parquet file"):
        sources.load_source(str(folder), streaming=streaming)
    with pytest.raises(ValueError, match=r"train-00001-of-00002\.parquet: not a Parquet file"):
        sources.load_source(str(folder / "*.parquet"), streaming=streaming)


# ---- ids of per-sample logs, and streams too short for a batch -------------------------------------------------------


@pytest.mark.parametrize("streaming", [False, True], ids=["map-style", "streaming"])
def test_duplicate_ids_with_log_sample_weights_are_refused_naming_them(tiny_data, tmp_path, streaming):
    rows = make_rows(16)
    rows[ID][5] = rows[ID][2]  # row-0002 twice
    path = tmp_path / "dup.parquet"
    datasets.Dataset.from_dict(rows).cast_column(IMAGE, datasets.Image()).to_parquet(str(path))
    flags = ["--streaming", "--log_sample_weights_steps", "1", "--shuffle_buffer", "0"] if streaming else [
        "--log_sample_weights"]
    with pytest.raises(ValueError, match=r"id.*'row-0002'.*must be unique"):
        train.main(tiny_data.argv(tmp_path / "run", "--recipe", "alip", *flags, data_file=path))


def test_a_stream_with_fewer_usable_rows_than_a_batch_is_refused_as_map_style_data_is(tiny_data, tmp_path):
    path = write_parquet(tmp_path / "few.parquet", 6, empty_text=(0, 1, 2, 3, 4))  # one usable row, batch 8
    with pytest.raises(ValueError, match="fewer than one global batch"):
        train.main(tiny_data.argv(tmp_path / "map", "--recipe", "clip", data_file=path))
    with pytest.raises(ValueError, match=r"1 usable row\(s\) per pass, fewer than one batch of 8"):
        train.main(tiny_data.argv(tmp_path / "stream", "--recipe", "clip", "--streaming", data_file=path))
