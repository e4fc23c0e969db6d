"""Pushing to the Hub (against a mocked HfApi that records calls), one flag style across commands, the
run_clip.py flag names, and file permissions."""

import importlib
import os
import stat
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from transformers import get_cosine_schedule_with_warmup

from alip_hf import hub, train
from alip_hf.io import make_staging_dir, save_directory_atomically, write_text_atomic
from alip_hf.training.arguments import ARGUMENT_GROUPS, TrainArguments, parse_args
from alip_hf.training.optim import build_optimizer


class RecordingApi:
    """Stands in for `huggingface_hub.HfApi`: records every call with its arguments."""

    calls: list = []

    def __init__(self, token=None, **kwargs):
        RecordingApi.calls.append(("HfApi", {"token": token}))

    def __getattr__(self, name):
        def record(*args, **kwargs):
            RecordingApi.calls.append((name, {"args": args, **kwargs}))
            return mock.Mock(pr_url=None)
        return record


@pytest.fixture
def api(monkeypatch):
    RecordingApi.calls = []
    monkeypatch.setattr(hub, "HfApi", RecordingApi)
    monkeypatch.setenv("HF_TOKEN", "hf_env_token")
    return RecordingApi


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    import huggingface_hub

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))


def _calls(api, name):
    return [kwargs for call, kwargs in api.calls if call == name]


# ----------------------------------------------------------------------------------------------------------------
# train.py --push_to_hub
# ----------------------------------------------------------------------------------------------------------------


def test_train_pushes_the_run_with_every_hub_option_and_without_checkpoints(tiny_data, tmp_path, api):
    train.main(tiny_data.argv(tmp_path, "--save_steps", "1", "--push_to_hub", "true", "--hub_model_id", "me/tiny",
                              "--hub_private_repo", "true", "--hub_revision", "exp-1", "--hub_commit_message",
                              "step 2", "--hub_token", "hf_flag_token"))
    assert _calls(api, "HfApi") == [{"token": "hf_flag_token"}]  # the flag wins over HF_TOKEN
    (create,) = _calls(api, "create_repo")
    assert create["args"] == ("me/tiny",) and create["private"] is True and create["exist_ok"] is True
    (branch,) = _calls(api, "create_branch")
    assert branch["branch"] == "exp-1" and branch["exist_ok"] is True
    (upload,) = _calls(api, "upload_folder")
    assert upload["repo_id"] == "me/tiny" and upload["folder_path"] == str(tmp_path)
    assert upload["revision"] == "exp-1" and upload["commit_message"] == "step 2" and upload["create_pr"] is False
    assert (tmp_path / "checkpoints").is_dir()
    import fnmatch

    files = [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()]
    kept = [f for f in files if not any(fnmatch.fnmatch(f, pattern) for pattern in upload["ignore_patterns"])]
    assert "model.safetensors" in kept and "README.md" in kept and "clip_export/config.json" in kept
    assert not [f for f in kept if f.startswith("checkpoints/")]


def test_push_with_a_pull_request_and_the_token_from_the_environment(tmp_path, api):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    hub.push_folder(tmp_path, "me/m", hub.HubOptions(create_pr=True))
    assert _calls(api, "HfApi") == [{"token": "hf_env_token"}]
    assert not _calls(api, "create_branch")
    (upload,) = _calls(api, "upload_folder")
    assert upload["create_pr"] is True and upload["revision"] is None


def test_push_without_a_token_names_the_ways_to_give_one(tmp_path, api, no_token):
    with pytest.raises(ValueError, match="--hub_token.*HF_TOKEN.*hf auth login"):
        hub.push_folder(tmp_path, "me/m", hub.HubOptions())
    assert not _calls(api, "create_repo")


def test_train_without_a_token_fails_before_training(tiny_data, tmp_path, api, no_token):
    with pytest.raises(ValueError, match="--hub_token"):
        train.main(tiny_data.argv(tmp_path, "--push_to_hub", "true", "--hub_model_id", "me/tiny"))
    assert not (tmp_path / "metrics.jsonl").exists() and not _calls(api, "create_repo")


def test_pull_request_and_branch_together_are_refused():
    with pytest.raises(ValueError, match="--hub_create_pr.*--hub_revision"):
        TrainArguments(hub_create_pr=True, hub_revision="dev")


def test_converters_push_their_output(tmp_path, api):
    from conftest import tiny_alip_config

    from alip_hf.convert.cli import main as convert
    from modeling_alip import ALIPModel

    ALIPModel(tiny_alip_config()).save_pretrained(tmp_path / "alip")
    convert(["to_clip", "--model_name_or_path", str(tmp_path / "alip"), "--output_dir", str(tmp_path / "clip"),
             "--push_to_hub", "--hub_model_id", "me/clip", "--hub_create_pr", "true", "--hub_commit_message", "export"])
    (upload,) = _calls(api, "upload_folder")
    assert upload["folder_path"] == str(tmp_path / "clip") and upload["create_pr"] is True
    assert upload["commit_message"] == "export"
    with pytest.raises(ValueError, match="--hub_model_id"):
        convert(["to_clip", "--model_name_or_path", str(tmp_path / "alip"), "--output_dir", str(tmp_path / "c2"),
                 "--push_to_hub"])


# ----------------------------------------------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------------------------------------------

COMMAND_PARSERS = {
    "train": lambda: __import__("transformers").HfArgumentParser(ARGUMENT_GROUPS),
    "eval": lambda: __import__("transformers").HfArgumentParser(importlib.import_module("alip_hf.eval").EvalArguments),
    "recaption.publish": lambda: importlib.import_module("recaption.publish").build_parser(),
    **{f"alip_hf.convert {name}": (lambda name=name: importlib.import_module("alip_hf.convert.cli").build_parser(name))
       for name in ("from_open_clip", "to_clip", "to_open_clip", "from_veclip")},
}


@pytest.mark.parametrize("command", sorted(COMMAND_PARSERS))
def test_no_command_has_a_dashed_long_option(command):
    # Each flag's own name; HfArgumentParser also accepts a dashed spelling of every flag as an alias.
    parser = COMMAND_PARSERS[command]()
    options = [next(o for o in action.option_strings if o.startswith("--")) for action in parser._actions
               if any(o.startswith("--") for o in action.option_strings)]
    assert len(options) > 3 and not [o for o in options if "-" in o[2:]], options


@pytest.mark.parametrize("command", ["alip_hf.convert from_open_clip", "alip_hf.convert to_clip",
                                     "alip_hf.convert to_open_clip", "alip_hf.convert from_veclip",
                                     "recaption.publish"])
def test_every_pushing_command_has_the_hub_options(command):
    parser = COMMAND_PARSERS[command]()
    options = {o for action in parser._actions for o in action.option_strings}
    assert {"--hub_private_repo", "--hub_revision", "--hub_commit_message", "--hub_create_pr", "--hub_token"} <= options


def test_run_clip_flag_names_parse_to_the_same_meaning(tmp_path):
    model_args, data_args, train_args, _ = parse_args([
        "--model_revision", "v1", "--cache_dir", str(tmp_path), "--trust_remote_code", "true",
        "--dataset_config_name", "2017", "--max_train_samples", "10", "--lr_scheduler_type", "linear",
        "--hub_private_repo", "true", "--overwrite_output_dir", "true"])
    assert (model_args.model_revision, model_args.cache_dir, model_args.trust_remote_code) == ("v1", str(tmp_path), True)
    assert (data_args.dataset_config_name, data_args.max_train_samples) == ("2017", 10)
    assert (train_args.lr_scheduler_type, train_args.hub_private_repo, train_args.overwrite_output_dir) == (
        "linear", True, True)


def test_default_schedule_is_the_previous_cosine_with_warmup_step_for_step():
    params = [torch.nn.Parameter(torch.zeros(2, 2))]
    args = TrainArguments(learning_rate=1e-3, warmup_steps=3)
    optimizer, scheduler = build_optimizer(torch.nn.Linear(2, 2), args, max_steps=20)
    reference_optimizer = torch.optim.AdamW(params, lr=1e-3)
    reference = get_cosine_schedule_with_warmup(reference_optimizer, 3, 20)
    for _ in range(20):
        assert scheduler.get_last_lr()[0] == reference.get_last_lr()[0]
        optimizer.step(), reference_optimizer.step(), scheduler.step(), reference.step()


@pytest.mark.parametrize("kind, at_end", [("linear", 0.0), ("constant_with_warmup", 1e-3)])
def test_other_schedules_come_from_transformers_get_scheduler(kind, at_end):
    args = TrainArguments(learning_rate=1e-3, warmup_steps=2, lr_scheduler_type=kind)
    optimizer, scheduler = build_optimizer(torch.nn.Linear(2, 2), args, max_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step(), scheduler.step()
    assert lrs[0] == 0.0 and lrs[2] == pytest.approx(1e-3) and scheduler.get_last_lr()[0] == pytest.approx(at_end)


def test_max_train_samples_trains_on_the_first_rows_only(tiny_data, tmp_path):
    from conftest import read_metrics

    # 16 of the 48 rows with batch 8: one epoch is 2 optimizer steps (all rows would give 6).
    train.main(_without_max_steps(tiny_data.argv(tmp_path, "--max_train_samples", "16", "--num_train_epochs", "1")))
    assert [row["step"] for row in read_metrics(tmp_path)] == [1, 2]


def _without_max_steps(argv):
    i = argv.index("--max_steps")
    return argv[:i] + argv[i + 2:]


def test_a_second_fresh_run_into_the_same_output_dir_is_refused_unless_overwritten(tiny_data, tmp_path):
    train.main(tiny_data.argv(tmp_path, "--max_steps", "1", "--save_steps", "1"))
    with pytest.raises(FileExistsError, match="--overwrite_output_dir"):
        train.main(tiny_data.argv(tmp_path, "--max_steps", "1"))
    train.main(tiny_data.argv(tmp_path, "--max_steps", "1", "--overwrite_output_dir", "true"))
    assert not list((tmp_path / "checkpoints").glob("step_*"))  # the earlier run's would be `latest` otherwise


def test_dataset_config_name_is_refused_for_data_files(tiny_data, tmp_path):
    with pytest.raises(ValueError, match="--dataset_config_name"):
        train.main(tiny_data.argv(tmp_path, "--dataset_config_name", "2017"))


# ----------------------------------------------------------------------------------------------------------------
# --eval_data default
# ----------------------------------------------------------------------------------------------------------------


def test_eval_data_defaults_to_the_demo_data_only_when_training_on_it(tiny_data, tmp_path):
    _, demo, _, _ = parse_args([])
    assert demo.eval_data is not None and Path(demo.eval_data).name == "demo_data"
    _, own, _, _ = parse_args(["--train_data", str(tiny_data.train)])
    assert own.eval_data is None
    argv = tiny_data.argv(tmp_path)
    i = argv.index("--eval_data")
    del argv[i:i + 2]
    metrics = train.main(argv)
    assert not [k for k in metrics if k.startswith("eval/")]
    from huggingface_hub import ModelCard

    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.eval_results is None and "model-index" not in card.data.to_dict()
    assert "demo" not in card.text.split("## Evaluation")[1].lower() and "_Not evaluated._" in card.text


# ----------------------------------------------------------------------------------------------------------------
# Permissions
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_written_files_and_directories_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_text_atomic(tmp_path / "a.txt", "x")
        save_directory_atomically(tmp_path / "dir", lambda d: (d / "f").write_text("y"))
        staging = make_staging_dir(tmp_path / "s")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode(tmp_path / "a.txt") == 0o666 & ~umask
    assert mode(tmp_path / "dir") == mode(staging) == 0o777 & ~umask
    assert mode(tmp_path / "dir" / "f") == 0o666 & ~umask


def test_a_trained_run_is_readable_by_the_group(tiny_data, tmp_path):
    script = (f"import os, sys; os.umask(0o002); sys.path.insert(0, {str(Path(__file__).parent)!r}); "
              "from alip_hf import train; train.main(sys.argv[1:])")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", script, *tiny_data.argv(tmp_path / "run", "--max_steps", "1")],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for path in [tmp_path / "run", *(tmp_path / "run").rglob("*")]:
        expected = 0o775 if path.is_dir() else 0o664
        assert stat.S_IMODE(path.stat().st_mode) & 0o060 == expected & 0o060, path


def test_no_script_declares_a_dashed_flag():
    root = Path(__file__).parents[1]
    sources = [p for folder in ("alip_hf", "modeling_alip", "recaption", "scripts", "benchmarks")
               for p in (root / folder).rglob("*.py")]
    dashed = [f"{p.relative_to(root)}: {m}" for p in sources
              for m in __import__("re").findall(r"""add_argument\(\s*["'](--[a-z0-9]+-[\w-]*)""", p.read_text())]
    assert sources and not dashed, dashed


def test_model_revision_cache_dir_and_remote_code_reach_from_pretrained(monkeypatch, tmp_path):
    from alip_hf import models
    from alip_hf.training.arguments import ModelArguments

    seen = {}

    def fake_from_pretrained(cls, source, **kwargs):
        seen["model"] = (source, kwargs)
        model = modeling_alip.ALIPModel(modeling_alip.ALIPConfig(**models.MODEL_CONFIGS["tiny"]))
        return model, {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}

    import transformers

    import modeling_alip
    from alip_hf import pretrained

    monkeypatch.setattr(modeling_alip.ALIPModel, "from_pretrained", classmethod(fake_from_pretrained))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda source, **kw: seen.setdefault("tok", kw) and modeling_alip.clip_tokenizer())
    monkeypatch.setattr(pretrained, "saved_processor_files", lambda *a, **kw: ["preprocessor_config.json"])
    monkeypatch.setattr(transformers.AutoImageProcessor, "from_pretrained",
                        lambda source, **kw: seen.setdefault("image", kw) and transformers.CLIPImageProcessor())
    args = ModelArguments(model_name_or_path="org/model", tokenizer_name_or_path="org/tok", model_revision="v2",
                          cache_dir=str(tmp_path), trust_remote_code=True)
    model = models.build_model(args, seed=0)
    models.build_processor(args, model)
    assert seen["model"][0] == "org/model"
    assert seen["model"][1] == {"output_loading_info": True, "trust_remote_code": False, "revision": "v2",
                                "cache_dir": str(tmp_path)}
    assert seen["tok"] == {"revision": "v2", "cache_dir": str(tmp_path), "trust_remote_code": True}
    assert seen["image"] == {"revision": "v2", "cache_dir": str(tmp_path), "trust_remote_code": True}


def test_dataset_config_name_and_cache_dir_reach_load_dataset(monkeypatch, tmp_path):
    from alip_hf import data

    seen = {}
    monkeypatch.setattr(data.datasets, "load_dataset", lambda *a, **kw: seen.update(args=a, kwargs=kw) or "loaded")
    assert data.load_source("org/pairs", split="train", config_name="2017", cache_dir=str(tmp_path)) == "loaded"
    assert seen["args"] == ("org/pairs",)
    assert seen["kwargs"] == {"split": "train", "streaming": False, "name": "2017", "cache_dir": str(tmp_path)}


def test_the_token_is_never_written_to_the_run(tiny_data, tmp_path, api):
    train.main(tiny_data.argv(tmp_path, "--save_steps", "1", "--push_to_hub", "true", "--hub_model_id", "me/tiny",
                              "--hub_token", "hf_secret_token_123"))
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and b"hf_secret_token_123" in p.read_bytes()]
    assert not leaked, leaked
