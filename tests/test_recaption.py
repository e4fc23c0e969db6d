"""recaption/: captioning, VeCap rewriting and publishing, end to end on tiny random models, offline.

The models' text is gibberish; what is tested is the plumbing: the join on id, provenance, fallbacks,
row counts, resume after a real SIGKILL, two processes, and that train.py's default columns come back
through `data.load_source`.
"""

import glob
import importlib.util
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from unittest import mock

import datasets
import numpy as np
import pytest
from PIL import Image

from alip_hf.data import (
    ALT_TEXT,
    CAPTION,
    ERROR,
    FEATURES,
    ID,
    IMAGE,
    VECAP,
    load_source,
)
from conftest import REPO_ROOT
from recaption.caption import CaptionArguments, Captioner, caption
from recaption.arguments import GenerationArguments, RunArguments
from alip_hf.hub import HubArguments
from recaption.publish import PublishArguments, publish, source_license
from recaption.rewrite import RewriteArguments, rewrite, select_vecap
from _tiny_captioners import (
    save_tiny_captioner,
    save_tiny_chat_captioner,
    save_tiny_chat_lm,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = 10
BAD_ROW = 4  # its image bytes are not an image
INPUT_FEATURES = datasets.Features({ID: FEATURES[ID], IMAGE: FEATURES[IMAGE], ALT_TEXT: FEATURES[ALT_TEXT]})


def png_bytes(seed: int) -> bytes:
    rng = np.random.RandomState(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.randint(0, 255, (20 + seed % 7, 26 + seed % 5, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def make_rows(n: int = ROWS, alt_prefix: str = "photo") -> dict:
    images = [{"bytes": png_bytes(i), "path": None} for i in range(n)]
    if n > BAD_ROW:
        images[BAD_ROW] = {"bytes": b"definitely not a png", "path": None}
    alt_texts = [f"{alt_prefix} {i} by Ada" for i in range(n)]
    return {ID: [f"img-{i:03d}" for i in range(n)], IMAGE: images, ALT_TEXT: alt_texts}


def write_parquet(path: str, rows: dict, order=None) -> str:
    dataset = datasets.Dataset.from_dict(rows, features=INPUT_FEATURES)
    if order is not None:
        dataset = dataset.select(order)
    dataset.to_parquet(path)
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("recaption")
    return {
        "root": root,
        "captioner": save_tiny_captioner(str(root / "captioner")),
        "lm": save_tiny_chat_lm(str(root / "lm")),
        "input": write_parquet(str(root / "input.parquet"), make_rows()),
    }


def run_args(source, output_dir, **kw) -> RunArguments:
    return RunArguments(source=str(source), output_dir=str(output_dir), **{"shard_size": 3, **kw})


def gen(**kw) -> GenerationArguments:
    return GenerationArguments(**{"batch_size": 4, "max_new_tokens": 8, "dtype": "float32", **kw})


@pytest.fixture(scope="module")
def captioned(assets):
    out = assets["root"] / "captioned"
    summary = caption(run_args(assets["input"], out), CaptionArguments(model=assets["captioner"]), gen())
    return out, summary


def by_id(dataset, column):
    return dict(zip(dataset[ID], dataset[column]))


# ----------------------------------------------------------------------------- caption


def test_caption_writes_one_row_per_input_with_provenance_and_counts_the_unreadable_image(captioned, assets):
    out, summary = captioned
    result = load_source(str(out / "data"))
    assert len(result) == ROWS and sorted(result[ID]) == sorted(make_rows()[ID])
    assert {CAPTION, "caption_model", "caption_prompt_version", ERROR} <= set(result.column_names)
    captions, errors = by_id(result, CAPTION), by_id(result, ERROR)
    bad = f"img-{BAD_ROW:03d}"
    assert captions[bad] == "" and "unreadable image" in errors[bad] and "'image'" in errors[bad]
    assert all(captions[i] and not errors[i] for i in captions if i != bad)
    assert set(result["caption_model"]) == {assets["captioner"]}
    assert set(result["caption_prompt_version"]) == {"none-v1"}
    assert isinstance(result[0][IMAGE], Image.Image)  # images stay decodable for train.py
    written = json.loads((out / "summary.json").read_text())
    assert written == summary and summary["rows"] == ROWS and summary["failures"] == 1
    words = [len(c.split()) for i, c in captions.items() if i != bad]
    assert summary["mean_caption_words"] == pytest.approx(sum(words) / len(words), abs=1e-3)
    config = json.loads((out / "run_config.json").read_text())
    assert config["generation"]["max_new_tokens"] == 8 and config["caption_prompt_version"] == "none-v1"
    # throughput per replica, from the shards' own times: rows over replica-seconds, tokens likewise
    markers = [json.loads(p.read_text()) for p in (out / "shards").glob("*.json")]
    seconds = sum(m["shard_seconds"] for m in markers)
    speed = summary["throughput"]
    assert speed["unit"] == "img" and speed["per_replica_per_second"] == pytest.approx(ROWS / seconds, rel=1e-2)
    assert speed["output_tokens_per_replica_per_second"] == pytest.approx(
        summary["counts"]["output_tokens"] / seconds, rel=1e-2)
    assert speed["replica_hours_per_100M"] == pytest.approx(1e8 / (ROWS / seconds) / 3600, rel=1e-2)


def test_captions_are_joined_on_id_and_never_see_the_alt_text(captioned, assets):
    out, _ = captioned
    reference = by_id(load_source(str(out / "data")), CAPTION)
    assert len(set(reference.values())) > ROWS // 2  # distinct captions, so a mis-join would show
    order = list(np.random.RandomState(0).permutation(ROWS))
    shuffled = write_parquet(str(assets["root"] / "shuffled.parquet"), make_rows(alt_prefix="other text"), order)
    out2 = assets["root"] / "captioned_shuffled"
    caption(run_args(shuffled, out2, shard_size=4), CaptionArguments(model=assets["captioner"]), gen(batch_size=3))
    result = load_source(str(out2 / "data"))
    assert result[ID] == [f"img-{i:03d}" for i in order]  # row order of the input is kept
    assert by_id(result, CAPTION) == reference


def test_batched_captions_equal_one_image_at_a_time(assets):
    captioner = Captioner(assets["captioner"], "", gen(batch_size=5))
    images = [Image.open(io.BytesIO(png_bytes(i))).convert("RGB") for i in range(5)]
    assert captioner(images) == [captioner([image])[0] for image in images]


def test_prompted_captions_equal_the_transformers_pipeline(assets):
    from transformers import pipeline

    images = [Image.open(io.BytesIO(png_bytes(i))).convert("RGB") for i in range(3)]
    pipe = pipeline("image-text-to-text", model=assets["captioner"])
    expected = pipe(images=images, text=["w5 w6"] * 3, max_new_tokens=8)
    got = Captioner(assets["captioner"], "w5 w6", gen(batch_size=3))(images)
    assert got == [e["generated_text"][len("w5 w6"):].strip() for e in expected]


def test_chat_vlm_with_the_veclip_preset_captions_from_a_user_turn(assets, tmp_path):
    model = save_tiny_chat_captioner(str(tmp_path / "chat_vlm"))
    source = write_parquet(str(tmp_path / "in.parquet"), make_rows(6))
    args = CaptionArguments(preset="veclip", model=model)
    summary = caption(run_args(source, tmp_path / "out"), args, gen(batch_size=4))
    result = load_source(str(tmp_path / "out" / "data"))
    assert summary["rows"] == 6 and summary["failures"] == 1
    assert set(result["caption_prompt_version"]) == {"veclip-v1"}
    captioner = Captioner(model, CaptionArguments(preset="veclip").prompt, gen(batch_size=4))
    assert captioner.is_chat and captioner.text.startswith("<|user|> <image> Describe the image concisely")
    images = [load_image_bytes(i) for i in range(3)]
    batched = captioner(images)
    assert batched == [captioner([image])[0] for image in images]
    assert all(text and "Describe" not in text and "assistant" not in text for text in batched)
    ok = [c for c, e in zip(result[CAPTION], result[ERROR]) if not e]
    assert len(ok) == 5 and all(ok)


def load_image_bytes(seed: int) -> Image.Image:
    return Image.open(io.BytesIO(png_bytes(seed))).convert("RGB")


def test_caption_with_a_prompt_stores_its_version_and_strips_the_prompt(assets):
    captioner = Captioner(assets["captioner"], "w5 w6", gen())
    texts = captioner([Image.open(io.BytesIO(png_bytes(0))).convert("RGB")])
    assert texts[0] and not texts[0].startswith("w5 w6")
    with pytest.raises(ValueError, match="--prompt needs --prompt_version"):
        CaptionArguments(prompt="describe it")
    with pytest.raises(ValueError, match="names a built-in prompt"):
        CaptionArguments(prompt="describe it", prompt_version="veclip-v1")
    assert CaptionArguments(preset="veclip").prompt.startswith("Describe the image concisely")


def test_missing_column_and_unusable_models_fail_at_once_naming_them(assets, tmp_path):
    source = write_parquet(str(tmp_path / "in.parquet"), make_rows(3))
    with pytest.raises(ValueError, match="'jpg'"):
        caption(run_args(source, tmp_path / "o1", image_column="jpg"), CaptionArguments(model=assets["captioner"]),
                gen())
    with pytest.raises(ValueError, match="no_such_model"):
        caption(run_args(source, tmp_path / "o2"), CaptionArguments(model=str(tmp_path / "no_such_model")), gen())
    with pytest.raises(ValueError, match="not an image-to-text model"):
        caption(run_args(source, tmp_path / "o3"), CaptionArguments(model=assets["lm"]), gen())
    with pytest.raises(ValueError, match="'caption'"):
        rewrite(run_args(source, tmp_path / "o4"), RewriteArguments(model=assets["lm"]), gen())
    with pytest.raises(ValueError, match="'uid'"):
        caption(run_args(source, tmp_path / "o5", id_column="uid"), CaptionArguments(model=assets["captioner"]), gen())


def test_duplicate_ids_are_an_error_naming_the_id(assets, tmp_path):
    rows = make_rows(3)
    rows[ID][2] = rows[ID][0]
    source = write_parquet(str(tmp_path / "dup.parquet"), rows)
    with pytest.raises(ValueError, match="img-000"):
        caption(run_args(source, tmp_path / "out"), CaptionArguments(model=assets["captioner"]), gen())


def test_resuming_with_another_configuration_is_refused(captioned, assets):
    out, _ = captioned
    with pytest.raises(ValueError, match="another configuration"):
        caption(run_args(assets["input"], out), CaptionArguments(model=assets["captioner"]), gen(max_new_tokens=5))


def test_webdataset_shards_streamed_use_key_as_id(assets, tmp_path):
    import tarfile

    for shard, keys in enumerate([range(0, 4), range(4, 7)]):
        with tarfile.open(tmp_path / f"{shard:05d}.tar", "w") as tar:
            for k in keys:
                for ext, payload in (("jpg", png_bytes(k)), ("txt", f"alt {k}".encode())):
                    info = tarfile.TarInfo(f"{k:06d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    out = tmp_path / "out"
    summary = caption(
        run_args(str(tmp_path / "{00000..00001}.tar"), out, image_column="jpg", streaming=True),
        CaptionArguments(model=assets["captioner"]),
        gen(),
    )
    result = load_source(str(out / "data"))
    assert summary["rows"] == 7 and sorted(result[ID]) == [f"{k:06d}" for k in range(7)]
    assert all(result[CAPTION]) and not any(result[ERROR])


# ----------------------------------------------------------------------------- rewrite


@pytest.mark.parametrize(
    "generated, expected, reason",
    [
        ("A red bus in London by Ada.", "A red bus in London by Ada.", "ok"),
        ('Caption: "A red bus in London."\nExtra notes', "A red bus in London.", "ok"),
        ("", "a red bus", "empty"),
        ("   \n  ", "a red bus", "empty"),
        ("I'm sorry, but I cannot help with that.", "a red bus", "refusal"),
        ("As an AI language model, I describe: a bus", "a red bus", "refusal"),
        ("Web text: London. Image description: a red bus", "a red bus", "echoed_prompt"),
        (" ".join(["word"] * 41), "a red bus", "too_long"),
        (" ".join(["word"] * 40), " ".join(["word"] * 40), "ok"),
    ],
)
def test_select_vecap_keeps_good_answers_and_falls_back_to_the_caption(generated, expected, reason):
    assert select_vecap("London bus", "a red bus", generated, max_words=40) == (expected, reason)


def test_custom_rewrite_prompt_file_is_checked_and_few_shot_turns_are_versioned(tmp_path):
    from recaption.prompts import load_rewrite_prompt

    path = tmp_path / "prompt.json"
    path.write_text(json.dumps({"version": "mine-v2", "template": "Merge {alt_text} only"}))
    with pytest.raises(ValueError, match="no {caption}"):
        load_rewrite_prompt(path=str(path))
    spec = {"version": "mine-v2", "template": "{alt_text} + {caption}", "examples": [["a", "b", "c"]]}
    path.write_text(json.dumps(spec))
    prompt = load_rewrite_prompt(path=str(path))
    messages = prompt.messages("London", "a bus", num_few_shot=1)
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[-1]["content"] == "London + a bus"
    assert prompt.versioned(1) == "mine-v2+1shot" and prompt.versioned(0) == "mine-v2"
    with pytest.raises(ValueError, match="--num_few_shot 2"):
        prompt.messages("x", "y", num_few_shot=2)
    with pytest.raises(ValueError, match="vecap-v1"):
        load_rewrite_prompt("vecap-v9")


def test_select_vecap_without_a_caption_gives_empty_text():
    assert select_vecap("London bus", "", "A red bus.") == ("", "no_caption")


@pytest.fixture(scope="module")
def rewritten(captioned, assets):
    out = assets["root"] / "rewritten"
    summary = rewrite(
        run_args(captioned[0] / "data", out, shard_size=4),
        RewriteArguments(model=assets["lm"], num_few_shot=1, max_words=6),
        gen(batch_size=3, max_new_tokens=8),
    )
    return out, summary


def test_rewrite_adds_vecap_with_provenance_and_counts_fallbacks(rewritten, captioned, assets):
    out, summary = rewritten
    result = load_source(str(out / "data"))  # train.py's default columns: caption and vecap
    assert len(result) == ROWS
    assert {CAPTION, VECAP, "rewrite_model", "rewrite_prompt_version"} <= set(result.column_names)
    assert by_id(result, CAPTION) == by_id(load_source(str(captioned[0] / "data")), CAPTION)
    assert set(result["rewrite_prompt_version"]) == {"vecap-v1+1shot"}
    assert set(result["rewrite_model"]) == {assets["lm"]}
    reasons = by_id(result, "vecap_fallback")
    vecap, captions = by_id(result, VECAP), by_id(result, CAPTION)
    assert reasons[f"img-{BAD_ROW:03d}"] == "no_caption" and vecap[f"img-{BAD_ROW:03d}"] == ""
    # 8 new tokens against max_words=6: some answers are too long and fall back to their caption.
    assert summary["fallbacks_by_reason"]["too_long"] >= 1
    assert all(vecap[i] == captions[i] for i, r in reasons.items() if r == "too_long")
    assert all(len(vecap[i].split()) <= 6 for i, r in reasons.items() if r == "")
    assert summary["fallbacks"] == sum(1 for r in reasons.values() if r)
    assert sum(summary["fallbacks_by_reason"].values()) == summary["fallbacks"]


def test_rewrite_batched_with_left_padding_equals_one_prompt_at_a_time(assets):
    from recaption.prompts import VECAP_V1
    from recaption.rewrite import RewriteStep, TransformersRewriter

    args = RewriteArguments(model=assets["lm"])
    batched = TransformersRewriter(args, gen(batch_size=4))
    single = TransformersRewriter(args, gen(batch_size=1))
    step = RewriteStep(args, gen(), VECAP_V1, batched)
    prompts = [step.chat_prompt("alt " * k, f"w{k} w{k + 1}") for k in range(1, 6)]  # lengths differ: padding
    assert len({len(p) for p in prompts}) == 5
    assert batched(prompts) == single(prompts)


def test_vllm_backend_without_vllm_names_the_package(captioned, assets, tmp_path):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed")
    with pytest.raises(ImportError, match="`vllm`"):
        rewrite(run_args(captioned[0] / "data", tmp_path / "o"), RewriteArguments(model=assets["lm"], backend="vllm"),
                gen())


# ----------------------------------------------------------------------------- resume, processes


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _cli(source, out, model, shard_size, batch_size=1, max_new_tokens=8):
    return ["-m", "recaption.caption", "--source", str(source), "--output_dir", str(out), "--model", model,
            "--shard_size", str(shard_size), "--batch_size", str(batch_size), "--max_new_tokens", str(max_new_tokens),
            "--dtype", "float32"]


def test_a_killed_run_resumes_to_exactly_one_row_per_input_row(assets, tmp_path):
    rows = 20
    source = write_parquet(str(tmp_path / "in.parquet"), make_rows(rows))
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, *_cli(source, out, assets["captioner"], 1, max_new_tokens=16)],
                               cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(glob.glob(str(out / "shards" / "*.json"))) < 3 and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = {p: os.path.getmtime(p) for p in glob.glob(str(out / "shards" / "*.json"))}
    assert 3 <= len(finished) < rows, "the run was not killed part-way"
    assert not (out / "summary.json").exists()

    summary = caption(run_args(source, out, shard_size=1), CaptionArguments(model=assets["captioner"]),
                      gen(batch_size=1, max_new_tokens=16))
    assert {p: os.path.getmtime(p) for p in finished} == finished  # finished shards were skipped
    result = load_source(str(out / "data"))
    assert summary["rows"] == rows and len(result) == rows and len(set(result[ID])) == rows
    assert len(glob.glob(str(out / "data" / "*.parquet"))) == rows
    assert not glob.glob(str(out / "*" / "*.tmp-*"))


def test_two_processes_split_the_shards_with_no_duplicate_and_no_dropped_tail(assets, tmp_path):
    rows = 11  # 6 shards of 2: an odd last shard, uneven between the two processes
    source = write_parquet(str(tmp_path / "in.parquet"), make_rows(rows))
    out = tmp_path / "out"
    # `--cpu` would make accelerate start one process; two gloo processes on CPU are `--multi_gpu` + ACCELERATE_USE_CPU.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               *_cli(source, out, assets["captioner"], 2, batch_size=2)]
    env = {**_env(), "ACCELERATE_USE_CPU": "true"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    markers = [json.loads(open(p).read()) for p in sorted(glob.glob(str(out / "shards" / "*.json")))]
    assert [m["index"] for m in markers] == list(range(6))
    assert {m["process_index"] for m in markers} == {0, 1}
    assert all(m["process_index"] == m["index"] % 2 for m in markers)
    result = load_source(str(out / "data"))
    assert sorted(result[ID]) == sorted(make_rows(rows)[ID])
    single = tmp_path / "single"
    caption(run_args(source, single, shard_size=2), CaptionArguments(model=assets["captioner"]), gen(batch_size=2))
    assert by_id(result, CAPTION) == by_id(load_source(str(single / "data")), CAPTION)


# ----------------------------------------------------------------------------- publish


def _assert_no_local_paths(text: str, *roots):
    for root in roots:
        assert str(root) not in text, f"local path {root} in the card"
    assert not re.search(r"(?<![\w.])/(tmp|root|home|work)/", text), "an absolute local path in the card"


def test_publish_dry_run_writes_a_card_with_datasets_metadata_provenance_and_no_local_paths(rewritten, assets,
                                                                                              tmp_path):
    from huggingface_hub import DatasetCard

    from recaption.publish import main as publish_main

    out, summary = rewritten
    target = publish_main(["--output_dir", str(out), "--dry_run", "--dry_run_dir", str(tmp_path / "hub"),
                           "--license", "cc-by-4.0"])
    text = open(os.path.join(target, "README.md"), encoding="utf-8").read()
    card = DatasetCard(text)
    for expected in (os.path.basename(assets["captioner"]), os.path.basename(assets["lm"]), "none-v1",
                     "vecap-v1+1shot", '"max_new_tokens": 8', f"Rows: {ROWS}", '"fallbacks": %d' % summary["fallbacks"],
                     "Merge them into one short caption", "img/s per replica", "output tokens/s per replica",
                     "replica-hours per 100M img", "row/s per replica"):
        assert expected in card.text, expected
    meta = card.data.to_dict()
    assert meta["license"] == "cc-by-4.0" and "synthetic-captions" in meta["tags"]
    # what datasets writes, with its own functions
    assert meta["configs"] == [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*"}]}]
    assert meta["dataset_info"]["splits"] == [{"name": "train", "num_bytes": mock.ANY, "num_examples": ROWS}]
    assert {f["name"] for f in meta["dataset_info"]["features"]} >= {ID, CAPTION, VECAP}
    _assert_no_local_paths(text, assets["root"], tmp_path)
    result = load_source(target)
    assert len(result) == ROWS and {CAPTION, VECAP} <= set(result.column_names)
    provenance_text = open(os.path.join(target, "provenance.json")).read()
    _assert_no_local_paths(provenance_text, assets["root"], tmp_path)
    assert [run["config"]["step"] for run in json.loads(provenance_text)["runs"]] == ["caption", "rewrite"]


class FakeDatasetRepo:
    """The Hub side of a dataset push, offline: `Dataset.push_to_hub` writes the README with datasets' own
    card-updating code (`_get_updated_dataset_card`) into a local folder; the card is read back from it; commits
    are recorded with their arguments."""

    def __init__(self, root, readme: str | None = None):
        self.root, self.commits, self.pushes = root, [], []
        root.mkdir(parents=True, exist_ok=True)
        if readme is not None:
            (root / "README.md").write_text(readme)

    def push_to_hub(self, dataset, repo_id, **kwargs):
        from datasets.arrow_dataset import _get_updated_dataset_card
        from datasets.splits import SplitInfo
        from fsspec.implementations.dirfs import DirFileSystem
        from fsspec.implementations.local import LocalFileSystem
        from huggingface_hub import CommitInfo

        self.pushes.append((repo_id, len(dataset), kwargs))
        fs = DirFileSystem(path=str(self.root), fs=LocalFileSystem())
        card, _ = _get_updated_dataset_card(
            fs=fs, config_name="default", splits_info=[SplitInfo(kwargs["split"], 1000, len(dataset))],
            features=dataset.features, data_dir="data", set_default=None, uploaded_sizes=[1000], deleted_sizes=[0],
            remove_other_splits=False)
        (self.root / "README.md").write_text(str(card))
        pr = "refs/pr/1" if kwargs.get("create_pr") else None
        return CommitInfo(commit_url="https://huggingface.co/datasets/me/x/commit/" + "1" * 40, commit_message="m",
                          commit_description="", oid="1" * 40, pr_url=pr and "https://huggingface.co/datasets/me/x/discussions/1")

    def download(self, repo_id, filename, repo_type=None, revision=None, token=None):
        self.downloads = getattr(self, "downloads", []) + [(repo_id, filename, repo_type, revision, token)]
        return str(self.root / filename)

    def create_commit(self, api, repo_id, operations, **kwargs):
        self.commits.append((repo_id, {op.path_in_repo: op.path_or_fileobj for op in operations}, kwargs))


@pytest.fixture
def fake_repo(tmp_path, monkeypatch):
    import huggingface_hub

    repo = FakeDatasetRepo(tmp_path / "repo")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setattr(datasets.Dataset, "push_to_hub", lambda ds, repo_id, **kw: repo.push_to_hub(ds, repo_id, **kw))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", repo.download)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit",
                        lambda api, repo_id, operations, **kw: repo.create_commit(api, repo_id, operations, **kw))
    return repo


def test_publish_pushes_the_data_then_adds_provenance_to_the_card_datasets_wrote(rewritten, fake_repo):
    from huggingface_hub import DatasetCard

    from recaption.publish import main as publish_main

    out, _ = rewritten
    url = publish_main(["--output_dir", str(out), "--hub_dataset_id", "me/tiny-vecap", "--license", "cc-by-4.0",
                        "--hub_private_repo", "true", "--hub_revision", "v2", "--hub_commit_message", "first"])
    assert url.endswith("datasets/me/tiny-vecap")
    ((repo_id, rows, push),) = fake_repo.pushes
    assert (repo_id, rows) == ("me/tiny-vecap", ROWS)
    assert push["private"] is True and push["revision"] == "v2" and push["token"] == "hf_test_token"
    assert push["commit_message"] == "first" and push["create_pr"] is False and push["split"] == "train"
    assert fake_repo.downloads == [("me/tiny-vecap", "README.md", "dataset", "v2", "hf_test_token")]
    ((repo_id, files, commit),) = fake_repo.commits
    assert commit["revision"] == "v2" and commit["repo_type"] == "dataset" and commit["commit_message"] == "first"
    card = DatasetCard(files["README.md"].decode())
    meta = card.data.to_dict()
    assert meta["dataset_info"]["splits"][0]["num_examples"] == ROWS  # written by datasets, kept
    assert meta["configs"][0]["data_files"] == [{"split": "train", "path": "data/train-*"}]
    assert meta["license"] == "cc-by-4.0" and "## How it was made" in card.text  # added by publish
    assert json.loads(files["provenance.json"])["license"] == "cc-by-4.0"


def test_publish_with_a_pull_request_puts_the_card_in_the_same_pull_request(rewritten, fake_repo):
    out, _ = rewritten
    publish(PublishArguments(output_dir=str(out), hub_dataset_id="me/x", license="cc-by-4.0"),
            HubArguments(hub_create_pr=True))
    assert fake_repo.pushes[0][2]["create_pr"] is True
    assert fake_repo.downloads[0][3] == "refs/pr/1" and fake_repo.commits[0][2]["revision"] == "refs/pr/1"


def test_publish_without_a_token_says_how_to_give_one(rewritten, monkeypatch, tmp_path):
    import huggingface_hub

    out, _ = rewritten
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(ValueError, match="--hub_token.*HF_TOKEN.*hf auth login"):
        publish(PublishArguments(output_dir=str(out), hub_dataset_id="me/x", license="cc-by-4.0"))


def test_publish_inherits_the_source_licence_and_refuses_an_unknown_one(rewritten, tmp_path):
    out, _ = rewritten
    with pytest.raises(ValueError, match="--license"):
        publish(PublishArguments(output_dir=str(out), hub_dataset_id="me/x"))
    source = tmp_path / "src"
    source.mkdir()
    (source / "README.md").write_text("---\nlicense: cc-by-sa-4.0\n---\n# data\n")
    assert source_license(str(source)) == "cc-by-sa-4.0"


def _publish_preview(out, preview) -> str:
    from recaption.publish import main as publish_main

    return publish_main(["--output_dir", str(out), "--dry_run", "--dry_run_dir", str(preview), "--license", "mit"])


def test_publish_refuses_a_missing_or_foreign_shard_naming_it(captioned, assets, tmp_path):
    import shutil

    out = tmp_path / "captions"
    shutil.copytree(captioned[0], out)
    _publish_preview(out, tmp_path / "ok")  # intact: publishes
    (out / "data" / "train-00001.parquet").unlink()  # deleted after the run
    with pytest.raises(ValueError, match=r"shard train-00001 .*data file data/train-00001.parquet is missing"):
        _publish_preview(out, tmp_path / "p1")
    shutil.copy(captioned[0] / "data" / "train-00001.parquet", out / "data")
    # the same shard made by another captioner on the same rows, copied over ours under the same name
    other = tmp_path / "other"
    caption(run_args(assets["input"], other), CaptionArguments(model=save_tiny_captioner(str(tmp_path / "blip2"),
                                                                                         seed=1)), gen())
    shutil.copy(other / "data" / "train-00002.parquet", out / "data")
    with pytest.raises(ValueError, match=r"shard train-00002 .*written by another model"):
        _publish_preview(out, tmp_path / "p2")
    shutil.copy(other / "shards" / "train-00002.json", out / "shards")  # with its marker: another run's
    with pytest.raises(ValueError, match=r"shard train-00002 .*made by another run"):
        _publish_preview(out, tmp_path / "p3")
    shutil.copy(captioned[0] / "shards" / "train-00002.json", out / "shards")
    shutil.copy(captioned[0] / "data" / "train-00002.parquet", out / "data")
    shutil.copy(other / "data" / "train-00001.parquet", out / "data" / "train-00009.parquet")  # no marker
    with pytest.raises(ValueError, match=r"shard train-00009 .*no completion marker"):
        _publish_preview(out, tmp_path / "p4")
    assert not (tmp_path / "p4").exists()  # nothing was written


def test_every_publish_dry_run_writes_a_fresh_preview(captioned, tmp_path):
    preview = tmp_path / "preview"
    _publish_preview(captioned[0], preview)
    (preview / "data" / "train-00099.parquet").write_bytes(b"stale")  # e.g. a shard of an earlier, longer run
    (preview / "notes.txt").write_text("stale")
    _publish_preview(captioned[0], preview)
    assert sorted(p.name for p in (preview / "data").iterdir()) == sorted(
        p.name for p in (captioned[0] / "data").glob("train-*.parquet"))
    assert not (preview / "notes.txt").exists()
    assert len(load_source(str(preview / "data"))) == ROWS


FREED_MEMORY_PROBE = """
import ctypes, resource, sys
from recaption.run import keep_freed_memory
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
if sys.argv[1] == "keep":
    keep_freed_memory()

def step():  # as a generate step on CPU: activations allocated, written, then all freed
    blocks = [libc.malloc(1 << 20) for _ in range(16)]
    for block in blocks:
        libc.memset(block, 1, 1 << 20)
    for block in blocks:
        libc.free(block)

step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc thresholds")
def test_freed_memory_is_kept_instead_of_faulted_in_again_every_step():
    """Without `keep_freed_memory` glibc returns each step's 16 MiB to the system and faults it in again (4096
    pages a step); with it, the steps after the first reuse the memory."""
    faults = {}
    for mode in ("default", "keep"):
        result = subprocess.run([sys.executable, "-c", FREED_MEMORY_PROBE, mode], cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=120, check=True)
        faults[mode] = int(result.stdout.split()[-1])
    assert faults["default"] > 20 * 2000, faults  # the probe shows the cost it is meant to remove
    assert faults["keep"] < faults["default"] / 20, faults
