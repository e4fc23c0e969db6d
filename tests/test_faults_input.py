"""Faults in the input: recaption runs that would mix two sources or two models, WebDataset shards cut short,
images and texts that read wrongly, and data or flags that cannot train. Each test reproduces one case of
docs/reliability.md ("Recaption and input data") against the real readers (datasets, webdataset, PIL)."""

import io
import json
import tarfile

import datasets
import numpy as np
import pytest
from conftest import read_metrics, write_parquet
from PIL import Image

import recaption.identity as identity
import recaption.resume as resume
import recaption.run as run_module
from alip_hf import data, sources, train
from alip_hf import evaluation as ev
from alip_hf.schema import ALT_TEXT, ID, IMAGE
from modeling_alip import clean_clip_text
from recaption.caption import CaptionArguments, caption
from recaption.arguments import GenerationArguments, RunArguments
from _tiny_captioners import save_tiny_captioner

ROWS, SHARD = 10, 3  # 4 shards: 3 + 3 + 3 + 1 rows
INPUT_FEATURES = datasets.Features({ID: datasets.Value("string"), IMAGE: datasets.Image(),
                                    ALT_TEXT: datasets.Value("string")})


def png(seed: int, size=(14, 18)) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_source(path, n: int = ROWS, prefix: str = "img") -> str:
    rows = {ID: [f"{prefix}-{i:03d}" for i in range(n)], IMAGE: [{"bytes": png(i), "path": None} for i in range(n)],
            ALT_TEXT: [f"alt {i}" for i in range(n)]}
    datasets.Dataset.from_dict(rows, features=INPUT_FEATURES).to_parquet(str(path))
    return str(path)


def run_args(source, out, **kw) -> RunArguments:
    return RunArguments(source=str(source), output_dir=str(out), **{"shard_size": SHARD, **kw})


def gen() -> GenerationArguments:
    return GenerationArguments(batch_size=4, max_new_tokens=6, dtype="float32")


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so nothing on the way out handles it."""


def caption_killed_after(shards: int, monkeypatch, *args):
    """Runs `caption(*args)` and kills it as the marker of shard `shards` (0-based) is about to be written."""
    write = run_module.atomic_write_json
    written = []

    def marker_then_kill(path, payload):
        if "/shards/" in str(path):
            if len(written) == shards:
                raise Killed
            written.append(path)
        write(path, payload)

    monkeypatch.setattr(run_module, "atomic_write_json", marker_then_kill)
    with pytest.raises(Killed):
        caption(*args)
    monkeypatch.setattr(run_module, "atomic_write_json", write)


def hub_source(monkeypatch):
    """Makes the source look like a Hub dataset: no files to vouch for it, only each finished shard's ids."""
    for module in (run_module, resume):
        monkeypatch.setattr(module, "source_identity", lambda args: {"source": "org/name", "split": args.split})


def markers(out) -> list[str]:
    return sorted(p.name for p in (out / "shards").glob("*.json"))


@pytest.fixture(scope="module")
def captioner(tmp_path_factory):
    return save_tiny_captioner(str(tmp_path_factory.mktemp("captioner") / "blip"))


# ----------------------------------------------------------------------------------------------------------------
# recaption: mixed inputs or models are refused
# ----------------------------------------------------------------------------------------------------------------


def test_source_replaced_between_a_kill_and_the_restart_is_refused_naming_the_shard(captioner, tmp_path, monkeypatch):
    source, out = tmp_path / "input.parquet", tmp_path / "out"
    write_source(source)
    caption_killed_after(2, monkeypatch, run_args(source, out), CaptionArguments(model=captioner), gen())
    assert markers(out) == ["train-00000.json", "train-00001.json"]
    write_source(source, n=7, prefix="other")  # the same path, other rows
    with pytest.raises(ValueError, match=r"source changed \(files: input.parquet.*train-00000, train-00001.*"
                                         r"--overwrite_output_dir"):
        caption(run_args(source, out), CaptionArguments(model=captioner), gen())
    assert markers(out) == ["train-00000.json", "train-00001.json"] and not (out / "summary.json").exists()
    # Starting over as the error says gives the new source's rows only.
    summary = caption(run_args(source, out, overwrite_output_dir=True), CaptionArguments(model=captioner), gen())
    written = data.load_source(str(out / "data"))
    assert summary["rows"] == 7 and sorted(written[ID]) == [f"other-{i:03d}" for i in range(7)]


@pytest.mark.parametrize("streaming", [False, True])
def test_changed_ids_of_a_finished_shard_are_refused_even_when_the_source_looks_the_same(
        captioner, tmp_path, monkeypatch, streaming):
    # A Hub source shows no files; its rows are checked through each finished shard's ids.
    hub_source(monkeypatch)
    source, out = tmp_path / "input.parquet", tmp_path / "out"
    write_source(source)
    caption_killed_after(2, monkeypatch, run_args(source, out, streaming=streaming), CaptionArguments(model=captioner),
                         gen())
    write_source(source, prefix="new")  # the same number of rows, other ids
    # (a stream's first chunk of its first source shard is train-00000-00000)
    with pytest.raises(ValueError, match=r"finished shard train-00000[- ].*input ids changed.*'img-000'.*'new-000'"
                                         r".*--overwrite_output_dir"):
        caption(run_args(source, out, streaming=streaming), CaptionArguments(model=captioner), gen())
    assert len(markers(out)) == 2


def test_finished_run_rerun_after_the_source_changed_is_refused_not_skipped(captioner, tmp_path):
    source, out = tmp_path / "input.parquet", tmp_path / "out"
    write_source(source)
    first = caption(run_args(source, out), CaptionArguments(model=captioner), gen())
    again = caption(run_args(source, out), CaptionArguments(model=captioner), gen())  # unchanged: every shard skipped
    assert (first["rows"], again["rows"]) == (ROWS, ROWS) and again["counts"] == first["counts"]
    write_source(source, n=14)  # 4 more rows: shard 3 now has other ids, shard 4 is new
    with pytest.raises(ValueError, match=r"another configuration: source changed.*input.parquet"):
        caption(run_args(source, out), CaptionArguments(model=captioner), gen())


def test_finished_shards_beyond_a_shorter_source_are_refused(captioner, tmp_path, monkeypatch):
    hub_source(monkeypatch)
    source, out = tmp_path / "input.parquet", tmp_path / "out"
    write_source(source)
    caption(run_args(source, out), CaptionArguments(model=captioner), gen())
    write_source(source, n=6)  # shards 0 and 1 keep their ids; 2 and 3 would be left over from the old source
    with pytest.raises(ValueError, match=r"finished shards train-00002, train-00003 beyond the source's 6 rows"):
        caption(run_args(source, out), CaptionArguments(model=captioner), gen())


def test_local_model_weights_replaced_at_the_same_path_are_refused(tmp_path, monkeypatch):
    model, source, out = str(tmp_path / "blip"), tmp_path / "input.parquet", tmp_path / "out"
    save_tiny_captioner(model, seed=0)
    write_source(source)
    caption_killed_after(2, monkeypatch, run_args(source, out), CaptionArguments(model=model), gen())
    before = json.loads((out / "run_config.json").read_text())["model_identity"]["files"]["model.safetensors"]
    save_tiny_captioner(model, seed=1)  # other weights, same directory, same caption_model label
    with pytest.raises(ValueError, match=rf"model weights changed \(files: model.safetensors \(sha256 {before[:12]} "
                                         r"-> sha256 [0-9a-f]{12}\).*train-00000, train-00001"):
        caption(run_args(source, out), CaptionArguments(model=model), gen())
    assert len(markers(out)) == 2
    # The recorded digest is the file's sha256 (the digest the Hub shows for LFS files).
    import hashlib

    assert before != hashlib.sha256((tmp_path / "blip" / "model.safetensors").read_bytes()).hexdigest()


@pytest.mark.parametrize("layout", ["same", "output_contains_source", "output_inside_source"])
def test_output_dir_overlapping_the_source_is_refused_before_anything_is_deleted(tmp_path, layout):
    source_dir = tmp_path / "source"
    source_dir.mkdir()
    write_source(source_dir / "train-00000.parquet")
    source, out = {"same": (source_dir, source_dir),
                   "output_contains_source": (source_dir / "train-00000.parquet", tmp_path),
                   "output_inside_source": (source_dir, source_dir / "captions")}[layout]
    with pytest.raises(ValueError, match=r"--output_dir .* (is|contains|lies inside) --source"):
        run_args(source, out, overwrite_output_dir=True)
    assert (source_dir / "train-00000.parquet").exists()
    run_args(source_dir / "train-00000.parquet", tmp_path / "elsewhere", overwrite_output_dir=True)  # apart: fine


# ----------------------------------------------------------------------------------------------------------------
# WebDataset shards cut short
# ----------------------------------------------------------------------------------------------------------------

SAMPLES = 40


def write_tar(path, n: int = SAMPLES) -> list[int]:
    """`n` samples of a `.jpg` (PNG bytes) and a `.txt`; returns each member's header offset."""
    offsets = []
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            for ext, payload in (("jpg", png(i)), ("txt", f"a photo number {i}".encode())):
                offsets.append(tar.offset)
                info = tarfile.TarInfo(f"{i:05d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return offsets


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A whole shard and three cuts of it that keep 22 whole samples: between members, inside the header of
    sample 22's image, inside the data of sample 22's image."""
    root = tmp_path_factory.mktemp("wds")
    whole = root / "whole.tar"
    offsets = write_tar(whole)
    raw = whole.read_bytes()
    cuts = {"between_members": offsets[44], "inside_a_header": offsets[44] + 100, "inside_data": offsets[44] + 512 + 100}
    paths = {"whole": whole}
    for name, cut in cuts.items():
        paths[name] = root / f"{name}.tar"
        paths[name].write_bytes(raw[:cut])
    return paths


def test_readers_stop_silently_at_a_cut_between_members(shards):
    """The fault as the readers show it: datasets' webdataset builder and the webdataset package both read 22 of
    the 40 samples of a shard cut between two members, without an error."""
    import webdataset

    cut = str(shards["between_members"])
    read = datasets.load_dataset("webdataset", data_files={"train": [cut]}, split="train", streaming=True)
    assert sum(1 for _ in read) == 22
    assert sum(1 for _ in webdataset.WebDataset(cut, shardshuffle=False)) == 22


@pytest.mark.parametrize("cut", ["between_members", "inside_a_header", "inside_data"])
@pytest.mark.parametrize("streaming", [False, True])
def test_truncated_shard_fails_at_load_naming_the_file_and_its_whole_samples(shards, cut, streaming):
    with pytest.raises(ValueError, match=rf"WebDataset shard {shards[cut]} is truncated .*only 22 samples"):
        data.load_source(str(shards[cut]), streaming=streaming)


def test_whole_shard_reads_every_sample(shards):
    assert len(data.load_source(str(shards["whole"]))) == SAMPLES


def test_train_and_caption_refuse_a_truncated_shard_among_whole_ones(shards, tiny_data, captioner, tmp_path):
    pattern = str(shards["whole"].parent / "*.tar")  # the whole shard and the three cut ones
    with pytest.raises(ValueError, match=r"WebDataset shard .*between_members.tar is truncated"):
        train.main(tiny_data.argv(tmp_path / "train", "--recipe", "clip", "--image_column", "jpg",
                                  "--text_column", "txt", data_file=pattern))
    with pytest.raises(ValueError, match=r"WebDataset shard .*between_members.tar is truncated"):
        caption(run_args(pattern, tmp_path / "caption", image_column="jpg"), CaptionArguments(model=captioner), gen())
    assert not (tmp_path / "caption").exists()


# ----------------------------------------------------------------------------------------------------------------
# Images and texts read wrongly
# ----------------------------------------------------------------------------------------------------------------


def encoded(array: np.ndarray, format: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=format)
    return buffer.getvalue()


def test_16bit_png_decodes_to_its_scaled_8bit_values():
    values = np.array([[0, 257, 1000, 32768], [40000, 65278, 65534, 65535]], dtype=np.uint16)
    cell = {"bytes": encoded(values, "PNG"), "path": None}
    assert Image.open(io.BytesIO(cell["bytes"])).mode == "I;16"
    # PIL's own conversion clips every value above 255: the image turns white.
    assert (np.asarray(Image.open(io.BytesIO(cell["bytes"])).convert("RGB")) == 255).mean() > 0.7
    rgb = np.asarray(data.decode_image(cell).convert("RGB"))
    expected = np.rint(values / 257.0).astype(np.uint8)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 4, 3)
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel], expected)


def test_float_tiffs_decode_to_scaled_8bit_values():
    unit = np.array([[0.0, 0.1, 0.25], [0.5, 0.999, 1.0]], dtype=np.float32)
    cell = {"bytes": encoded(unit, "TIFF"), "path": None}
    assert Image.open(io.BytesIO(cell["bytes"])).mode == "F"
    assert np.asarray(Image.open(io.BytesIO(cell["bytes"])).convert("RGB")).max() <= 1  # PIL's: all black
    np.testing.assert_array_equal(np.asarray(data.decode_image(cell).convert("RGB"))[..., 1],
                                  np.rint(unit.astype(np.float64) * 255).astype(np.uint8))
    wide = np.array([[-2.0, 0.0], [3.0, 6.0]], dtype=np.float32)  # outside [0, 1]: stretched from min to max
    decoded = np.asarray(data.decode_image({"bytes": encoded(wide, "TIFF"), "path": None}))
    np.testing.assert_array_equal(decoded, np.rint((wide + 2.0) * 255 / 8.0).astype(np.uint8))


def test_eight_bit_images_decode_unchanged():
    rgb = np.random.default_rng(0).integers(0, 255, (5, 6, 3), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(data.decode_image(encoded(rgb, "PNG"))), rgb)


BLANK_TEXTS = ["&nbsp;", "\x00\x07\x1b", " \u200b\t"]  # HTML space, control characters, zero-width space


def test_texts_that_clean_to_nothing_are_skipped_texts():
    assert all(clean_clip_text(t).strip() == "" or not clean_clip_text(t).isprintable() for t in BLANK_TEXTS)
    assert all(sources.is_empty_text(t) for t in BLANK_TEXTS)
    assert not sources.is_empty_text("&amp; co") and not sources.is_empty_text("a cat")
    # One rule, whatever the tokenizer's cleaning: "&nbsp;" and "&amp;nbsp;" are empty, as after CLIP's cleaning.
    assert sources.is_empty_text("\x00\x07") and sources.is_empty_text("&nbsp;") and sources.is_empty_text("&amp;nbsp;")


def test_texts_that_clean_to_nothing_are_counted_by_a_run_with_the_clip_tokenizer(tmp_path):
    rows = {ID: [f"r{i}" for i in range(12)], IMAGE: [{"bytes": png(i), "path": None} for i in range(12)],
            ALT_TEXT: BLANK_TEXTS + [f"a photo of thing {i}" for i in range(9)]}
    datasets.Dataset.from_dict(rows, features=INPUT_FEATURES).to_parquet(str(tmp_path / "blank.parquet"))
    train.main(["--train_data", str(tmp_path / "blank.parquet"), "--output_dir", str(tmp_path / "run"),
                "--model_config", "tiny", "--recipe", "clip", "--per_device_train_batch_size", "4", "--max_steps", "1",
                "--eval_data", "none", "--report_to", "none", "--warmup_steps", "0", "--logging_steps", "1"])
    assert read_metrics(tmp_path / "run")[-1]["data/skipped_texts"] == 3


def test_text_column_of_ints_is_an_error_naming_the_column_and_type(tiny_data, tmp_path):
    rows = {ID: ["a", "b", "c", "d"], IMAGE: [{"bytes": png(i), "path": None} for i in range(4)], ALT_TEXT: [1, 2, 3, 4]}
    features = datasets.Features({ID: datasets.Value("string"), IMAGE: datasets.Image(), ALT_TEXT: datasets.Value("int64")})
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "ints.parquet"))
    with pytest.raises(ValueError, match=r"text column 'alt_text' .*holds int64, not strings"):
        train.main(tiny_data.argv(tmp_path / "run", "--recipe", "clip", data_file=tmp_path / "ints.parquet"))


def test_global_batch_of_one_is_refused(tiny_data, tmp_path):
    with pytest.raises(ValueError, match=r"global batch of 1 .*identically 0"):
        train.main(tiny_data.argv(tmp_path, "--recipe", "clip", "--per_device_train_batch_size", "1"))
    train.main(tiny_data.argv(tmp_path / "two", "--recipe", "clip", "--per_device_train_batch_size", "1",
                              "--gradient_accumulation_steps", "2", "--max_steps", "1"))  # 2 pairs: a real loss
    assert read_metrics(tmp_path / "two")[-1]["loss/total"] > 0


@pytest.mark.parametrize("kind", ["parquet", "jsonl"])
def test_empty_dataset_is_an_error_naming_the_source(tiny_data, tmp_path, kind):
    path = tmp_path / f"empty.{kind}"
    if kind == "parquet":
        datasets.Dataset.from_dict({ID: [], IMAGE: [], ALT_TEXT: []}, features=INPUT_FEATURES).to_parquet(str(path))
    else:
        path.write_text("")
    with pytest.raises(ValueError, match=rf"{path}.* has no rows"):
        train.main(tiny_data.argv(tmp_path / "run", "--recipe", "clip", data_file=path))


@pytest.mark.parametrize("streaming", [False, True])
def test_data_where_every_row_is_invalid_is_an_error_naming_the_source(tiny_data, tmp_path, streaming):
    path = write_parquet(tmp_path / "bad.parquet", 6, corrupt=(0, 1, 2, 3), empty_text=(4, 5))
    flags = ["--streaming", "--shuffle_buffer", "0"] if streaming else []
    with pytest.raises(ValueError, match=rf"no usable row in --train_data {path}.*4 unreadable images, 2 missing"):
        train.main(tiny_data.argv(tmp_path / "run", "--recipe", "clip", *flags, data_file=path))


def test_empty_stream_is_an_error_naming_the_source(tiny_data, tmp_path):
    path = tmp_path / "empty.parquet"
    datasets.Dataset.from_dict({ID: [], IMAGE: [], ALT_TEXT: []}, features=INPUT_FEATURES).to_parquet(str(path))
    with pytest.raises(ValueError, match=rf"--train_data {path}.* yielded no rows"):
        train.main(tiny_data.argv(tmp_path / "run", "--recipe", "clip", "--streaming", data_file=path))


def test_eval_on_a_corrupt_image_names_the_row_its_id_and_the_source(tmp_path):
    from conftest import tiny_alip_config

    from modeling_alip import ALIPModel, ALIPProcessor

    config = tiny_alip_config()
    model, processor = ALIPModel(config).eval(), ALIPProcessor.from_config(config)
    images = [{"bytes": png(0), "path": None}, {"bytes": b"not an image", "path": "photos/b.jpg"},
              {"bytes": png(2), "path": None}]
    features = datasets.Features({ID: datasets.Value("string"), IMAGE: datasets.Image(),
                                  "label": datasets.Value("string")})
    datasets.Dataset.from_dict({ID: ["a", "b", "c"], IMAGE: images, "label": ["cat", "dog", "cat"]},
                               features=features).to_parquet(str(tmp_path / "test.parquet"))
    task = ev.EvalTask("pets", "zeroshot", str(tmp_path / "test.parquet"), label_column="label",
                       templates=("a {}",))
    with pytest.raises(ValueError, match=r"test.parquet split 'test': the image of row 1 \(id 'b'\), "
                                         r"file photos/b.jpg does not decode"):
        ev.run_evaluation(model, processor, task)


def test_max_text_length_beyond_an_already_stretched_text_context_is_refused_naming_it(tiny_data, tmp_path):
    from conftest import tiny_alip_config

    from modeling_alip import ALIPModel

    model = ALIPModel(tiny_alip_config())
    model.stretch_text_positions(100)
    model.save_pretrained(tmp_path / "stretched")
    with pytest.raises(ValueError, match=r"already stretched"):
        train.main(tiny_data.argv(tmp_path / "out", "--recipe", "clip", "--max_text_length", "120",
                                  "--model_name_or_path", str(tmp_path / "stretched")))


def test_model_file_digests_are_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    import hashlib
    import os

    monkeypatch.setattr(identity, "_FILE_DIGESTS", {})
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights")
    stat = os.stat(weights)
    key = f"{os.path.realpath(weights)}|{stat.st_size}|{stat.st_mtime_ns}"
    (tmp_path / identity.DIGEST_CACHE).write_text(json.dumps({key: "f" * 64}))
    identity.load_digest_cache(str(tmp_path))
    assert identity.file_sha256(str(weights)) == "f" * 64  # from the cache: the file is not read again
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # rewritten: another mtime
    assert identity.file_sha256(str(weights)) == hashlib.sha256(b"weights").hexdigest()


def test_model_identity_covers_what_from_pretrained_reads_not_logs_or_subdirectories(tmp_path):
    from recaption.identity import model_identity

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"weights v1")
    before = model_identity(str(tmp_path), None, None)
    (tmp_path / "README.md").write_text("a card written after the audit")
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "checkpoints" / "step_000001").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_000001" / "model.safetensors").write_bytes(b"older weights")
    assert model_identity(str(tmp_path), None, None) == before
    (tmp_path / "model.safetensors").write_bytes(b"weights v2")
    assert model_identity(str(tmp_path), None, None) != before
