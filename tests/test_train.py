"""End-to-end training through `train.main([...])` on tiny data, plus the exactness of accumulation."""

import math
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from conftest import REPO_ROOT, make_rows, read_metrics
from safetensors.torch import load_file
from transformers import AutoTokenizer, CLIPImageProcessor

from alip_hf import data, train
from alip_hf.models import build_model
from alip_hf.recipes import RecipeArguments, get_recipe
from alip_hf.resources import CONFIGS_DIR
from alip_hf.training import checkpoints, loop
from alip_hf.training.arguments import parse_args
from modeling_alip import ALIPModel, ALIPProcessor

COMMON_KEYS = {"loss/total", "loss/text", "train/lr", "train/logit_scale", "data/skipped_images",
               "data/skipped_texts", "data/truncated_texts", "train/samples_per_second"}
ALIP_KEYS = {"loss/caption", "gate/lcg/weight_mean", "gate/lcg/running_mean", "gate/dcg/text_weight_mean",
             "gate/dcg/caption_weight_mean", "gate/dcg/text_running_mean", "gate/dcg/caption_running_mean"}


def _weights(output_dir) -> dict[str, torch.Tensor]:
    return load_file(str(output_dir / "model.safetensors"))


@pytest.mark.parametrize("recipe, extra_keys", [
    ("clip", set()), ("alip", ALIP_KEYS), ("veclip", {"data/vecap_fraction"})])
def test_each_recipe_trains_and_logs_its_stable_metric_keys(tiny_data, tmp_path, recipe, extra_keys):
    metrics = train.main(tiny_data.argv(tmp_path, "--recipe", recipe))
    logged = read_metrics(tmp_path)
    assert [row["step"] for row in logged] == [1, 2]
    for row in logged:
        assert COMMON_KEYS | extra_keys <= set(row), recipe
        assert math.isfinite(row["loss/total"])
    assert not (ALIP_KEYS - extra_keys) & set(logged[-1])  # no gate keys outside the gated recipe
    assert metrics["loss/total"] == logged[-1]["loss/total"]
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "train_args.yaml").exists()
    if recipe == "veclip":
        assert 0 <= logged[0]["data/vecap_fraction"] <= 1


def test_corrupt_images_and_empty_texts_are_skipped_counted_and_logged(tiny_data, tmp_path):
    train.main(tiny_data.argv(tmp_path, "--max_steps", "1", data_file=tiny_data.dirty))
    row = read_metrics(tmp_path)[-1]
    assert (row["data/skipped_images"], row["data/skipped_texts"]) == (2, 1)


def test_missing_column_fails_at_start_listing_available_columns(tiny_data, tmp_path):
    with pytest.raises(ValueError, match=r"column 'synthetic'.*available columns: \['id', 'image', 'alt_text'"):
        train.main(tiny_data.argv(tmp_path, "--caption_column", "synthetic"))
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("flags, message", [
    (["--lora_rank", "4"], "--lora_target_modules"),
    (["--push_to_hub", "true"], "--hub_model_id"),
    (["--freeze_vision", "true", "--freeze_text", "true"], "only logit_scale"),
    (["--gradient_accumulation_steps", "0"], "gradient_accumulation_steps"),
    (["--crop_scale_min", "0.95", "--crop_scale_max", "0.9"], "crop_scale_min"),
])
def test_invalid_flag_combinations_fail_before_training(tiny_data, tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        train.main(tiny_data.argv(tmp_path, *flags))


@pytest.mark.parametrize("flags", [["--mixed_precision", "fp8"], ["--recipe", "simclr"], ["--nonfinite", "ignore"]])
def test_invalid_choice_is_rejected_by_the_parser(tiny_data, tmp_path, flags):
    with pytest.raises(SystemExit):
        parse_args(tiny_data.argv(tmp_path, *flags))


def test_streaming_without_max_steps_is_rejected(tiny_data, tmp_path):
    argv = [a for a in tiny_data.argv(tmp_path, "--streaming", "true")]
    i = argv.index("--max_steps")
    del argv[i:i + 2]
    with pytest.raises(ValueError, match="--streaming needs --max_steps"):
        train.main(argv)


def test_streaming_run_trains_from_a_split_stream(tiny_data, tmp_path):
    train.main(tiny_data.argv(tmp_path, "--streaming", "true", "--shuffle_buffer", "16"))
    assert [row["step"] for row in read_metrics(tmp_path)] == [1, 2]


def test_yaml_config_with_flag_overrides(tiny_data, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("recipe: clip\nlearning_rate: 0.001\nmax_steps: 5\nreport_to: [none]\n")
    model_args, data_args, train_args, recipe_args = parse_args([str(config), "--max_steps", "3"])
    assert (recipe_args.recipe, train_args.learning_rate, train_args.max_steps) == ("clip", 0.001, 3)
    assert train_args.report_to == []
    *_, again = parse_args(["--config", str(config)])
    assert again.recipe == "clip"


def test_shipped_configs_parse():

    configs = sorted((CONFIGS_DIR).glob("*.yaml"))
    assert {c.name for c in configs} >= {"tiny.yaml", "alip-vit-b-32.yaml", "alip-vit-b-16.yaml",
                                          "clip-vit-b-32.yaml", "veclip-vit-b-16.yaml"}
    for config in configs:
        parse_args([str(config)])


def test_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_run(tiny_data, tmp_path):
    flags = ("--max_steps", "4", "--save_steps", "2", "--gradient_accumulation_steps", "2",
             "--per_device_train_batch_size", "4")
    train.main(tiny_data.argv(tmp_path / "full", *flags))
    train.main(tiny_data.argv(tmp_path / "cut", *flags, "--stop_after_steps", "2"))
    assert not (tmp_path / "cut" / "model.safetensors").exists()
    train.main(tiny_data.argv(tmp_path / "cut", *flags, "--resume_from_checkpoint", "latest"))
    full, resumed = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert full.keys() == resumed.keys() and any("running_mean" in k for k in full)
    for name in full:  # same process, same order of operations: bit-identical
        torch.testing.assert_close(resumed[name], full[name], rtol=0, atol=0, msg=name)
    losses = [r["loss/total"] for r in read_metrics(tmp_path / "full")]
    assert [r["loss/total"] for r in read_metrics(tmp_path / "cut")] == losses


def test_checkpoints_keep_the_last_k_and_are_complete(tiny_data, tmp_path):
    train.main(tiny_data.argv(tmp_path, "--max_steps", "3", "--save_steps", "1", "--save_total_limit", "2"))
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_000002", "step_000003"]
    assert (tmp_path / "checkpoints" / "step_000003" / checkpoints.STATE_FILE).exists()


def test_incomplete_checkpoint_is_never_picked_as_latest(tmp_path):
    (tmp_path / "checkpoints" / ".tmp-step_000004").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_000003").mkdir()  # no trainer_state.json: killed before completion
    assert checkpoints.resolve_checkpoint("latest", str(tmp_path)) is None


def test_lora_adapters_are_merged_into_the_saved_model(tiny_data, tmp_path):
    train.main(tiny_data.argv(tmp_path, "--lora_rank", "4", "--lora_target_modules", "q_proj", "v_proj",
                              "--learning_rate", "0.01"))
    saved = _weights(tmp_path)
    assert not [k for k in saved if "lora" in k]
    # The same initial weights without adapters: LoRA freezes every base weight, so a target weight can only
    # differ from its initial value through the merged adapter.
    model_args, _, train_args, _ = parse_args(tiny_data.argv(tmp_path))
    initial = build_model(model_args, seed=train_args.seed).state_dict()
    targets = [k for k in saved if k.endswith(("self_attn.q_proj.weight", "self_attn.v_proj.weight"))]
    assert len(targets) == 8  # 2 towers x 2 layers x (q, v)
    for name in targets:
        assert not torch.equal(saved[name], initial[name]), f"{name}: the adapter was not merged"
    for name in saved.keys() - set(targets):
        if "running_mean" not in name:
            torch.testing.assert_close(saved[name], initial[name], rtol=0, atol=0, msg=name)


def test_frozen_vision_tower_is_unchanged_after_training(tiny_data, tmp_path):
    train.main(tiny_data.argv(tmp_path / "a", "--max_steps", "1", "--freeze_vision", "true"))
    train.main(tiny_data.argv(tmp_path / "b", "--max_steps", "1", "--freeze_vision", "true",
                              "--learning_rate", "0.05", "--gradient_checkpointing", "true"))
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("vision_model."))
    assert not all(torch.equal(a[k], b[k]) for k in a if k.startswith("text_model."))


def _nan_loss(monkeypatch):
    """Every recipe's loss becomes NaN: they all form it with the pair losses of `modeling_alip.loss.PAIR_LOSSES`
    (`contrastive_loss` by default)."""
    from modeling_alip import loss

    original = loss.PAIR_LOSSES["clip"]

    def contrastive_loss(*args, **kwargs):
        value, diagnostics = original(*args, **kwargs)
        return value * float("nan"), diagnostics

    monkeypatch.setitem(loss.PAIR_LOSSES, "clip", contrastive_loss)


def test_nonfinite_loss_stops_the_run_naming_the_step(tiny_data, tmp_path, monkeypatch):
    _nan_loss(monkeypatch)
    with pytest.raises(FloatingPointError, match="at step 1"):
        train.main(tiny_data.argv(tmp_path))


def test_nonfinite_loss_skip_leaves_weights_and_counts_steps(tiny_data, tmp_path, monkeypatch):
    train.main(tiny_data.argv(tmp_path / "ref", "--max_steps", "1", "--learning_rate", "0"))
    _nan_loss(monkeypatch)
    train.main(tiny_data.argv(tmp_path / "nan", "--nonfinite", "skip"))
    assert read_metrics(tmp_path / "nan")[-1]["train/nonfinite_steps"] == 2
    ref, nan = _weights(tmp_path / "ref"), _weights(tmp_path / "nan")
    assert all(torch.equal(ref[k], nan[k]) for k in ref if "running_mean" not in k)


# ---- gradient accumulation ------------------------------------------------------------------------------------


def _micro_batches(tokenizer, recipe, rows: int, per_batch: int) -> list[dict]:
    build = data.ExampleBuilder(data.IMAGE, recipe.text_selector(), data.ImageTransform(30, train=False))
    raw = make_rows(rows, seed=4)
    examples = [build({k: v[i] for k, v in raw.items()}, 0, i)[0] for i in range(rows)]
    collate = data.Collator(ALIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tokenizer))
    return [collate(examples[i:i + per_batch]) for i in range(0, rows, per_batch)]


@pytest.mark.parametrize("recipe_name", ["alip", "clip"])
def test_accumulated_step_equals_one_k_times_larger_batch(tiny_data, tiny_config, recipe_name):
    tokenizer = AutoTokenizer.from_pretrained(tiny_data.tokenizer)
    recipe = get_recipe(RecipeArguments(recipe=recipe_name))
    results = []
    for k in (1, 4):
        torch.manual_seed(0)
        model = ALIPModel(tiny_config).train()
        accelerator = Accelerator(cpu=True)
        output = loop.forward_backward(model, model, recipe, _micro_batches(tokenizer, recipe, 12, 12 // k),
                                        accelerator, local_loss=False)
        torch.optim.SGD(model.parameters(), lr=0.1).step()  # plain SGD: the update is the gradient itself
        results.append((output.loss.detach(), dict(model.named_parameters()), dict(model.named_buffers())))
    (loss1, params1, buffers1), (loss4, params4, buffers4) = results
    torch.testing.assert_close(loss4, loss1, rtol=1e-5, atol=1e-6)
    for name, param in params1.items():
        torch.testing.assert_close(params4[name], param, rtol=1e-5, atol=1e-6, msg=name)
    for name, buffer in buffers1.items():  # the gates' running means moved once, on the whole batch
        torch.testing.assert_close(buffers4[name], buffer, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.slow  # a checkpoint per step and a second interpreter: 15-50 s on shared CPUs
def test_run_killed_by_sigkill_resumes_to_the_same_weights(tiny_data, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    flags = ("--max_steps", "12", "--save_steps", "1", "--save_total_limit", "2")
    train.main(tiny_data.argv(tmp_path / "full", *flags))
    killed = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))
    process = subprocess.Popen([sys.executable, str(REPO_ROOT / "train.py"), *tiny_data.argv(killed, *flags)],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not checkpoints._checkpoints(str(killed)) and time.time() < deadline and process.poll() is None:
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (killed / "model.safetensors").exists(), "the run finished before it was killed"
    assert checkpoints._checkpoints(str(killed)), "killed before the first checkpoint"
    train.main(tiny_data.argv(killed, *flags, "--resume_from_checkpoint", "latest"))
    full, resumed = _weights(tmp_path / "full"), _weights(killed)
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], rtol=0, atol=0, msg=name)


def test_evaluation_runs_every_eval_steps_and_at_the_end(tiny_data, tmp_path):
    argv = tiny_data.argv(tmp_path, "--eval_steps", "1", "--max_steps", "2")
    i = argv.index("--eval_data")
    argv[i + 1:i + 2] = [str(tiny_data.train)]
    metrics = train.main([*argv, "--eval_split", "train"])
    logged = read_metrics(tmp_path)
    assert any(k.startswith("eval/train.parquet/") for k in logged[0]), logged[0].keys()
    eval_keys = {k for k in metrics if k.startswith("eval/")}
    assert eval_keys and eval_keys <= set(logged[-1])
    assert "| " in (tmp_path / "README.md").read_text()  # model card with a results table


def test_defaults_train_alip_on_the_bundled_demo_data_as_configs_demo_yaml_says():
    defaults = parse_args([])
    model_args, data_args, train_args, recipe_args = defaults
    assert (model_args.model_config, recipe_args.recipe) == ("small", "alip")
    assert data_args.train_data.endswith("demo_data") and data_args.eval_data.endswith("demo_data")
    from_yaml = parse_args([str(CONFIGS_DIR / "demo.yaml")])
    for default, spelled_out in zip(defaults, from_yaml):
        default_values, yaml_values = dict(vars(default)), dict(vars(spelled_out))
        for name in ("train_data", "eval_data"):  # relative in the file, absolute as defaults
            if name in default_values:
                default_values[name], yaml_values[name] = Path(default_values[name]).name, Path(yaml_values[name]).name
        assert default_values == yaml_values


@pytest.mark.slow  # reads the 2,900 demo images once and evaluates on the 394 test images
def test_default_run_on_demo_data_trains_saves_and_evaluates(tmp_path):
    metrics = train.main(["--output_dir", str(tmp_path), "--max_steps", "2", "--report_to", "none"])
    assert any(k.startswith("eval/demo") for k in metrics), sorted(metrics)
    assert (tmp_path / "clip_export" / "config.json").exists() and (tmp_path / "model.safetensors").exists()


def test_bf16_autocast_trains_on_cpu(tiny_data, tmp_path):
    train.main(tiny_data.argv(tmp_path, "--max_steps", "1", "--mixed_precision", "bf16"))
    assert math.isfinite(read_metrics(tmp_path)[-1]["loss/total"])


def test_training_continues_from_a_saved_model_directory(tiny_data, tmp_path):
    train.main(tiny_data.argv(tmp_path / "first", "--max_steps", "1"))
    argv = tiny_data.argv(tmp_path / "second", "--max_steps", "1", "--learning_rate", "0")
    i = argv.index("--tokenizer_name_or_path")
    del argv[i:i + 2]  # the tokenizer comes from the model directory
    train.main([*argv, "--model_name_or_path", str(tmp_path / "first")])
    first, second = _weights(tmp_path / "first"), _weights(tmp_path / "second")
    for name in first:  # lr 0: only the gates' running means move
        if "running_mean" not in name:
            torch.testing.assert_close(second[name], first[name], rtol=0, atol=0, msg=name)


def test_gradient_checkpointing_is_enabled_and_gives_the_same_weights(tiny_data, tmp_path):
    model_args, *_ = parse_args(tiny_data.argv(tmp_path, "--gradient_checkpointing", "true"))
    assert build_model(model_args, seed=0).is_activation_checkpointing
    train.main(tiny_data.argv(tmp_path / "plain", "--max_steps", "1"))
    train.main(tiny_data.argv(tmp_path / "ckpt", "--max_steps", "1", "--gradient_checkpointing", "true"))
    plain, ckpt = _weights(tmp_path / "plain"), _weights(tmp_path / "ckpt")
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow  # three streaming runs: 10-25 s on shared CPUs
def test_streaming_run_resumes_to_the_same_weights(tiny_data, tmp_path):
    flags = ("--streaming", "true", "--shuffle_buffer", "16", "--max_steps", "3", "--save_steps", "1")
    train.main(tiny_data.argv(tmp_path / "full", *flags))
    train.main(tiny_data.argv(tmp_path / "cut", *flags, "--stop_after_steps", "1"))
    train.main(tiny_data.argv(tmp_path / "cut", *flags, "--resume_from_checkpoint", "latest"))
    full, resumed = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], rtol=0, atol=0, msg=name)


# ---- the sigmoid loss (--loss siglip) and the unweighted loss of ALIP ----------------------------------------


@pytest.mark.parametrize("recipe", ["clip", "alip", "veclip"])
def test_each_recipe_trains_with_the_sigmoid_loss_and_the_model_records_it(tiny_data, tmp_path, recipe):
    train.main(tiny_data.argv(tmp_path, "--recipe", recipe, "--loss", "siglip"))
    logged = read_metrics(tmp_path)
    assert [row["step"] for row in logged] == [1, 2] and all(math.isfinite(row["loss/total"]) for row in logged)
    assert logged[0]["train/logit_bias"] != -10.0  # the bias learns
    model = ALIPModel.from_pretrained(tmp_path)
    assert (model.config.loss, model.config.adaptive_loss) == ("siglip", recipe == "alip")
    assert "logit_bias" in _weights(tmp_path)
    torch.testing.assert_close(model.logit_bias.detach(), _weights(tmp_path)["logit_bias"])


def test_alip_logs_the_unweighted_loss_beside_the_weighted_one(tiny_data, tmp_path):
    train.main(tiny_data.argv(tmp_path, "--recipe", "alip"))
    for row in read_metrics(tmp_path):
        for path in ("text", "caption"):
            assert math.isfinite(row[f"loss/unweighted/{path}"])
        assert row["loss/unweighted/total"] == pytest.approx(row["loss/unweighted/text"] + row["loss/unweighted/caption"])
    # the weighted loss moves with the gates; the unweighted one is CLIP's loss of the same embeddings
    assert row["loss/total"] != pytest.approx(row["loss/unweighted/total"])


@pytest.mark.parametrize("recipe_name", ["alip", "clip"])
def test_accumulated_sigmoid_step_equals_one_k_times_larger_batch(tiny_data, recipe_name):
    from conftest import tiny_alip_config

    tokenizer = AutoTokenizer.from_pretrained(tiny_data.tokenizer)
    recipe = get_recipe(RecipeArguments(recipe=recipe_name, loss="siglip"))
    config = tiny_alip_config(**recipe.model_config())
    results = []
    for k in (1, 4):
        torch.manual_seed(0)
        model = ALIPModel(config).train()
        accelerator = Accelerator(cpu=True)
        output = loop.forward_backward(model, model, recipe, _micro_batches(tokenizer, recipe, 12, 12 // k),
                                        accelerator, local_loss=False)
        assert model.logit_bias.grad is not None
        torch.optim.SGD(model.parameters(), lr=0.1).step()  # plain SGD: the update is the gradient itself
        results.append((output.loss.detach(), dict(model.named_parameters()), dict(model.named_buffers())))
    (loss1, params1, buffers1), (loss4, params4, buffers4) = results
    torch.testing.assert_close(loss4, loss1, rtol=1e-5, atol=1e-6)
    for name, param in params1.items():  # logit_bias included: its gradient is kept once, not k times
        torch.testing.assert_close(params4[name], param, rtol=1e-5, atol=1e-6, msg=name)
    for name, buffer in buffers1.items():
        torch.testing.assert_close(buffers4[name], buffer, rtol=1e-6, atol=1e-7, msg=name)
