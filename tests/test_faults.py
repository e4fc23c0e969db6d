"""Training under faults: bad eval data, non-finite steps, resumes that do not match, two writers, incomplete or
tampered checkpoints. Each test reproduces one fault and checks that the run either continues correctly (what
it skipped counted) or stops at once with an error naming the file, row, flag or checkpoint field.

Rows of docs/reliability.md point here."""

import json
import logging
import math
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO_ROOT, read_metrics, write_parquet
from safetensors.torch import load_file

from alip_hf import train
from alip_hf.training import checkpoints, loop, run, trainer
from modeling_alip import ALIPModel, ALIPOutput

CKPT = "checkpoints"


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _assert_same(a: dict, b: dict, what: str):
    assert a.keys() == b.keys()
    for name in a:  # same process, same operations: bit-identical
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=f"{what}: {name}")


def _step(output_dir: Path, step: int) -> Path:
    return output_dir / CKPT / f"step_{step:06d}"


# ---- 1. eval data checked at start; the model saved before the final evaluation --------------------------------


def _with_eval(argv: list[str], eval_data, split="train") -> list[str]:
    i = argv.index("--eval_data")
    return [*argv[:i + 1], str(eval_data), *argv[i + 2:], "--eval_split", split]


def test_missing_eval_data_fails_before_training(tiny_data, tmp_path):
    missing = tmp_path / "no_such_dir" / "eval.parquet"
    with pytest.raises(ValueError, match=f"--eval_data {missing}.*cannot be loaded"):
        train.main(_with_eval(tiny_data.argv(tmp_path / "out"), missing))
    assert not (tmp_path / "out" / "metrics.jsonl").exists() and not (tmp_path / "out" / CKPT).exists()


def test_corrupt_eval_image_fails_before_training_naming_the_row(tiny_data, tmp_path):
    bad = write_parquet(tmp_path / "eval.parquet", 8, corrupt=(5,))
    with pytest.raises(ValueError, match=r"eval\.parquet split 'train', column 'image', row 5 \(id 'row-0005'\)"):
        train.main(_with_eval(tiny_data.argv(tmp_path / "out"), bad))
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_eval_data_without_a_caption_column_fails_before_training(tiny_data, tmp_path):
    import datasets

    path = tmp_path / "images_only.parquet"
    datasets.Dataset.from_parquet(str(tiny_data.train)).remove_columns(["alt_text", "caption"]).to_parquet(str(path))
    with pytest.raises(ValueError, match="images_only.parquet.*no 'alt_text' or 'caption' column"):
        train.main(_with_eval(tiny_data.argv(tmp_path / "out"), path))
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # before training, not after it


def test_failing_final_evaluation_keeps_the_saved_model(tiny_data, tmp_path, monkeypatch):
    def fails(*args, **kwargs):
        raise RuntimeError("evaluation crashed")

    monkeypatch.setattr(trainer, "evaluate", fails)
    with pytest.raises(RuntimeError, match="evaluation crashed"):
        train.main(_with_eval(tiny_data.argv(tmp_path), tiny_data.train))
    for name in ("model.safetensors", "config.json", "tokenizer.json", "README.md", "clip_export/config.json"):
        assert (tmp_path / name).exists(), name
    assert [row["step"] for row in read_metrics(tmp_path)] == [1, 2]


def test_final_evaluation_is_logged_and_in_the_card_after_the_save(tiny_data, tmp_path):
    metrics = train.main(_with_eval(tiny_data.argv(tmp_path), tiny_data.train))
    logged = read_metrics(tmp_path)
    assert [row["step"] for row in logged] == [1, 2, 2]  # the step's training metrics, then its evaluation
    assert {k for k in logged[-1] if k != "step"} == {k for k in metrics if k.startswith("eval/")} != set()
    assert "| " in (tmp_path / "README.md").read_text()


# ---- 2. --nonfinite skip leaves every buffer as it was -----------------------------------------------------------


def _poison_embeddings_at(monkeypatch, call: int):
    """An inf added to the image embeddings of the `call`-th forward pass: the gates then move their running
    means to NaN, and the loss and the gradients are NaN."""
    original, calls = ALIPModel.forward, []

    def forward(self, *args, **kwargs):
        output = original(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == call:
            output.image_embeds = output.image_embeds + float("inf")
        return output

    monkeypatch.setattr(ALIPModel, "forward", forward)


def _no_update_at(monkeypatch, call: int):
    """The reference: the `call`-th step runs no forward pass at all (its batch is drawn and dropped)."""
    original, calls = loop.forward_backward, []

    def forward_backward(model, core, recipe, micro_batches, accelerator, local_loss):
        calls.append(1)
        if len(calls) == call:
            return ALIPOutput(loss=torch.tensor(float("inf")))
        return original(model, core, recipe, micro_batches, accelerator, local_loss)

    monkeypatch.setattr(loop, "forward_backward", forward_backward)


def test_skipped_step_equals_the_run_without_that_batch(tiny_data, tmp_path, monkeypatch):
    flags = ("--max_steps", "5", "--logging_steps", "5", "--nonfinite", "skip")
    with monkeypatch.context() as patch:
        _poison_embeddings_at(patch, 3)
        train.main(tiny_data.argv(tmp_path / "poisoned", *flags, "--save_steps", "1", "--save_total_limit", "5"))
    with monkeypatch.context() as patch:
        _no_update_at(patch, 3)
        train.main(tiny_data.argv(tmp_path / "reference", *flags))
    poisoned = _weights(tmp_path / "poisoned")
    assert any("running_mean" in name for name in poisoned)
    # The step itself: weights, gate running means and optimizer state exactly as after step 2.
    _assert_same(_weights(_step(tmp_path / "poisoned", 2)), _weights(_step(tmp_path / "poisoned", 3)), "step 3")
    before, after = (torch.load(_step(tmp_path / "poisoned", s) / "optimizer.bin", weights_only=True) for s in (2, 3))
    for key in before["state"]:
        _assert_same(before["state"][key], after["state"][key], f"optimizer state {key}")
    # And the rest of the run: the same as a run in which step 3 computed nothing.
    _assert_same(_weights(tmp_path / "reference"), poisoned, "final")
    assert all(torch.isfinite(t).all() for t in poisoned.values())
    assert read_metrics(tmp_path / "poisoned")[-1]["train/nonfinite_steps"] == 1


def test_skipped_step_with_accumulation_restores_the_gates(tiny_data, tmp_path, monkeypatch):
    # k = 2: per step, two cached forward passes (the gates run once on them), then two recomputed ones. Poison
    # step 2's first cached pass.
    _poison_embeddings_at(monkeypatch, 5)
    flags = ("--max_steps", "2", "--gradient_accumulation_steps", "2", "--per_device_train_batch_size", "4",
             "--nonfinite", "skip", "--save_steps", "1")
    train.main(tiny_data.argv(tmp_path, *flags))
    _assert_same(_weights(_step(tmp_path, 1)), _weights(_step(tmp_path, 2)), "skipped step 2")


def test_finite_loss_with_an_overflowing_gradient_is_skipped_too(tiny_data, tmp_path, monkeypatch):
    original, calls = loop.forward_backward, []

    def forward_backward(model, core, *args):
        output = original(model, core, *args)
        calls.append(1)
        if len(calls) == 2:  # the loss stays finite; one gradient is not
            core.text_projection.weight.grad[0, 0] = float("inf")
        return output

    monkeypatch.setattr(loop, "forward_backward", forward_backward)
    train.main(tiny_data.argv(tmp_path, "--nonfinite", "skip", "--save_steps", "1"))
    _assert_same(_weights(_step(tmp_path, 1)), _weights(_step(tmp_path, 2)), "skipped step 2")
    last = read_metrics(tmp_path)[-1]
    assert last["train/nonfinite_steps"] == 1 and math.isfinite(last["loss/total"])


def test_diverging_run_stops_naming_the_skipped_steps(tiny_data, tmp_path):
    flags = ("--max_steps", "20", "--learning_rate", "1e6", "--nonfinite", "skip", "--max_consecutive_nonfinite", "3",
             "--save_steps", "1", "--save_total_limit", "20")
    with pytest.raises(FloatingPointError, match=r"3 steps in a row .*\(steps \[\d+, \d+, \d+\];"):
        train.main(tiny_data.argv(tmp_path, *flags))
    assert not (tmp_path / "model.safetensors").exists()  # no final model with NaN in it
    for path in checkpoints._checkpoints(str(tmp_path)):  # and every checkpoint's buffers are finite
        assert all(torch.isfinite(v).all() for k, v in _weights(path).items() if "running_mean" in k), path.name


# ---- 3. run identity, own checkpoints only, one writer -----------------------------------------------------------


@pytest.fixture
def cut_run(tiny_data, tmp_path_factory):
    """A run of 4 steps stopped after step 2, with a checkpoint at each step (copied per test)."""
    cache = tmp_path_factory.getbasetemp() / "cut_run"
    if not cache.exists():
        train.main(tiny_data.argv(cache, "--max_steps", "4", "--save_steps", "1", "--stop_after_steps", "2"))

    def copy(to: Path) -> Path:
        shutil.copytree(cache, to)
        return to

    return copy


FLAGS = ("--max_steps", "4", "--save_steps", "1")


@pytest.mark.parametrize("change, field", [
    pytest.param(("--recipe", "clip"), "recipe", id="recipe"),
    pytest.param(("--per_device_train_batch_size", "4"), "per_device_train_batch_size", id="batch"),
    pytest.param(("--gradient_accumulation_steps", "2"), "gradient_accumulation_steps", id="accumulation"),
    pytest.param(("--seed", "7"), "seed", id="seed"),
    pytest.param(("--learning_rate", "0.1"), "learning_rate: checkpoint 0.0005, now 0.1", id="learning_rate"),
    pytest.param(("--max_steps", "6"), "max_steps: checkpoint 4, now 6", id="max_steps"),
    pytest.param(("--model_config", "small"), "model_config", id="model"),
    pytest.param((), "train_data", id="data"),  # the dirty file instead of the clean one (below)
])
def test_resume_with_other_settings_is_refused_naming_the_field(tiny_data, tmp_path, cut_run, change, field):
    out = cut_run(tmp_path / "out")
    argv = tiny_data.argv(out, *FLAGS, "--resume_from_checkpoint", "latest", *change,
                          data_file=None if change else tiny_data.dirty)
    with pytest.raises(ValueError, match=rf"belongs to a run with other settings: .*{field}") as error:
        train.main(argv)
    assert "--resume_allow_changes" in str(error.value)
    assert len(read_metrics(out)) == 2  # nothing was appended


def test_allowed_learning_rate_change_is_applied_and_recorded(tiny_data, tmp_path, cut_run):
    import math

    out = cut_run(tmp_path / "out")
    train.main(tiny_data.argv(out, *FLAGS, "--resume_from_checkpoint", "latest", "--learning_rate", "0.1",
                              "--resume_allow_changes", "learning_rate"))
    lrs = [row["train/lr"] for row in read_metrics(out)]
    cosine = [0.5 * (1 + math.cos(math.pi * s / 4)) for s in (1, 2, 3, 4)]  # warm-up 0, 4 steps
    assert lrs == pytest.approx([5e-4 * cosine[0], 5e-4 * cosine[1], 0.1 * cosine[2], 0.1 * cosine[3]], rel=1e-12)
    recorded = yaml.safe_load((out / "train_args.yaml").read_text())
    assert recorded["learning_rate"] == 0.1
    assert recorded["resume_changes"] == [{"step": 2, "checkpoint": str(_step(out, 2)), "field": "learning_rate",
                                           "checkpoint_value": 0.0005, "value": 0.1}]
    state = checkpoints.read_state(_step(out, 4))
    assert state["run"]["identity"]["learning_rate"] == 0.1 and state["run"]["changes"] == recorded["resume_changes"]
    # The continued run keeps its id; resuming it again with the new rate needs no flag.
    assert state["run"]["run_id"] == checkpoints.read_state(_step(out, 2))["run"]["run_id"] == recorded["run_id"]


def test_allowed_change_names_must_be_run_settings(tiny_data, tmp_path, cut_run):
    out = cut_run(tmp_path / "out")
    with pytest.raises(ValueError, match="--resume_allow_changes lerning_rate: not run settings"):
        train.main(tiny_data.argv(out, *FLAGS, "--resume_from_checkpoint", "latest",
                                  "--resume_allow_changes", "lerning_rate"))


def test_new_run_in_an_old_runs_output_dir_is_refused_unless_overwrite(tiny_data, tmp_path, cut_run):
    out = cut_run(tmp_path / "out")
    old_id = checkpoints.read_state(_step(out, 2))["run"]["run_id"]
    with pytest.raises(FileExistsError, match=r"holds checkpoints of another run \(step_000001, step_000002\)"):
        train.main(tiny_data.argv(out, *FLAGS))
    assert len(read_metrics(out)) == 2 and checkpoints.read_state(_step(out, 2))["run"]["run_id"] == old_id
    train.main(tiny_data.argv(out, "--max_steps", "3", "--save_steps", "1", "--save_total_limit", "2",
                              "--overwrite_output_dir", "true"))
    kept = checkpoints._checkpoints(str(out))
    assert [p.name for p in kept] == ["step_000002", "step_000003"]  # its own two newest, none of the old run's
    assert {checkpoints.read_state(p)["run"]["run_id"] for p in kept} != {old_id}
    assert [row["step"] for row in read_metrics(out)] == [1, 2, 3]


def _hold_lock(output_dir: Path) -> subprocess.Popen:
    """Another process holding the output directory's lock, as a running train.py does."""
    code = ("import sys, time; from alip_hf.training.run import OutputDirLock; "
            f"OutputDirLock({str(output_dir)!r}).acquire(); print('held', flush=True); time.sleep(120)")
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_second_writer_on_one_output_dir_fails_naming_the_holder(tiny_data, tmp_path):
    holder = _hold_lock(tmp_path)
    try:
        with pytest.raises(RuntimeError, match=rf"in use by another train.py \(pid {holder.pid} on host "
                                               rf"{socket.gethostname()}"):
            train.main(tiny_data.argv(tmp_path))
    finally:
        holder.kill()
        holder.wait()
    assert not (tmp_path / "metrics.jsonl").exists() and (tmp_path / run.LOCK_FILE).exists()


def test_stale_lock_of_a_dead_process_is_taken_over(tiny_data, tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / run.LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with caplog.at_level(logging.WARNING):
        train.main(tiny_data.argv(tmp_path, "--max_steps", "1"))
    assert f"stale lock of process {dead.pid}" in caplog.text
    assert (tmp_path / "model.safetensors").exists() and not (tmp_path / run.LOCK_FILE).exists()


# ---- 4. incomplete newest checkpoint: fall back; named incomplete checkpoint: error ----------------------------


@pytest.fixture
def full_run(tiny_data, tmp_path_factory):
    """The uninterrupted 4-step run the resumed runs must equal."""
    path = tmp_path_factory.getbasetemp() / "full_run"
    if not path.exists():
        train.main(tiny_data.argv(path, *FLAGS))
    return path


@pytest.mark.parametrize("damage, message", [
    pytest.param(lambda f: f.unlink(), "model.safetensors is missing", id="missing"),
    pytest.param(lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2]),
                 r"model.safetensors is \d+ bytes, \d+ when saved \(truncated or replaced\)", id="truncated"),
])
def test_incomplete_newest_checkpoint_falls_back_to_the_previous(tiny_data, tmp_path, cut_run, full_run, caplog,
                                                                 damage, message):
    out = cut_run(tmp_path / "out")
    damage(_step(out, 2) / "model.safetensors")
    with caplog.at_level(logging.WARNING):
        train.main(tiny_data.argv(out, *FLAGS, "--resume_from_checkpoint", "latest"))
    assert re.search(rf"checkpoint .*step_000002 is not usable \({message}\); falling back", caplog.text)
    _assert_same(_weights(full_run), _weights(out), "resumed from step 1")


def test_no_complete_checkpoint_for_latest_is_an_error_not_a_fresh_start(tiny_data, tmp_path, cut_run):
    out = cut_run(tmp_path / "out")
    for step in (1, 2):
        (_step(out, step) / "model.safetensors").unlink()
    with pytest.raises(FileExistsError, match=r"latest: none of the checkpoints .*\(step_000001, step_000002\) is "
                                              "complete"):
        train.main(tiny_data.argv(out, *FLAGS, "--resume_from_checkpoint", "latest"))
    assert len(read_metrics(out)) == 2  # the old run's log is kept


def test_named_incomplete_checkpoint_is_an_error_naming_the_file(tiny_data, tmp_path, cut_run):
    out = cut_run(tmp_path / "out")
    (_step(out, 2) / "optimizer.bin").unlink()
    with pytest.raises(checkpoints.CheckpointError, match=r"step_000002: not a complete checkpoint: optimizer.bin is "
                                                           "missing"):
        train.main(tiny_data.argv(out, *FLAGS, "--resume_from_checkpoint", str(_step(out, 2))))


# ---- 5. no pickled code runs on resume ---------------------------------------------------------------------------


class _WritesMarker:
    """Unpickling this creates `path`: what a crafted checkpoint file could do with `weights_only=False`."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __reduce__(self):
        return (Path.touch, (self.path,))


def _craft(path: Path, marker: Path, update_manifest: bool):
    path.write_bytes(pickle.dumps(_WritesMarker(marker), protocol=2))
    if update_manifest:  # a tampered checkpoint whose manifest was rewritten too: only safe loading protects
        state = checkpoints.read_state(path.parent)
        state["files"][path.name] = path.stat().st_size
        (path.parent / checkpoints.STATE_FILE).write_text(json.dumps(state))


def test_crafted_pickle_does_write_the_marker_when_unpickled(tmp_path):
    # The payload used below is live: plain unpickling runs it.
    pickle.loads(pickle.dumps(_WritesMarker(tmp_path / "marker")))
    assert (tmp_path / "marker").exists()


@pytest.mark.parametrize("name", ["custom_checkpoint_0.pkl", "optimizer.bin", "random_states_0.pkl"])
def test_crafted_pickle_in_a_named_checkpoint_is_refused_and_never_run(tiny_data, tmp_path, cut_run, name):
    out, marker = cut_run(tmp_path / "out"), tmp_path / "marker"
    _craft(_step(out, 2) / name, marker, update_manifest=name != "custom_checkpoint_0.pkl")
    with pytest.raises(checkpoints.CheckpointError, match=name.replace(".", r"\.")):
        train.main(tiny_data.argv(out, *FLAGS, "--resume_from_checkpoint", str(_step(out, 2))))
    assert not marker.exists()


def test_crafted_pickle_in_the_newest_checkpoint_is_ignored_by_latest(tiny_data, tmp_path, cut_run, full_run):
    out, marker = cut_run(tmp_path / "out"), tmp_path / "marker"
    _craft(_step(out, 2) / "custom_checkpoint_0.pkl", marker, update_manifest=False)
    train.main(tiny_data.argv(out, *FLAGS, "--resume_from_checkpoint", "latest"))
    assert not marker.exists()
    _assert_same(_weights(full_run), _weights(out), "resumed from step 1")


def test_resume_reads_every_torch_file_with_weights_only(tiny_data, tmp_path, cut_run, monkeypatch):
    out, calls = cut_run(tmp_path / "out"), []
    original = torch.load

    def recording_load(*args, **kwargs):
        calls.append((str(args[0]), kwargs.get("weights_only")))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    train.main(tiny_data.argv(out, *FLAGS, "--resume_from_checkpoint", "latest"))
    assert {Path(f).name for f, _ in calls} >= {"optimizer.bin", "random_states_0.pkl"}
    assert all(weights_only is True for _, weights_only in calls), calls
    assert not list(_step(out, 4).glob("custom_checkpoint_*.pkl")) and (_step(out, 4) / "scheduler.json").exists()


def test_no_source_file_unpickles_with_weights_only_false():
    regex = re
    offenders = []
    for folder in ("alip_hf", "modeling_alip", "recaption"):
        for path in (REPO_ROOT / folder).rglob("*.py"):
            text = path.read_text()
            for match in regex.finditer(r"torch\.load\(([^)]*)\)", text):
                if "weights_only=True" not in match.group(1):
                    offenders.append(f"{path.relative_to(REPO_ROOT)}: {match.group(0)}")
            if regex.search(r"\bpickle\.loads?\(|register_for_checkpointing\(", text):
                offenders.append(f"{path.relative_to(REPO_ROOT)}: pickle / register_for_checkpointing")
    assert not offenders, offenders


# ---- 6. the checkpoint's own record, nothing to resume, a full disk, a finished output directory -------------------


def _edit_json(path: Path, **changes):
    values = json.loads(path.read_text())
    for key, value in changes.items():
        *parents, last = key.split(".")
        target = values
        for parent in parents:
            target = target[parent]
        target[last] = value
    path.write_text(json.dumps(values, indent=1))  # as written (same size for a same-length value)


def _copy_checkpoint(out: Path, step: int, to: Path) -> Path:
    """A checkpoint kept under a name of the user's (so that its directory name says nothing about its step)."""
    shutil.copytree(_step(out, step), to)
    return to


@pytest.mark.parametrize("edit, resume, message", [
    # The state says 999 in a 4-step run; the checkpoint is step 2 (it would "resume at 999", train nothing, and
    # save step 2's weights as the final model).
    pytest.param(lambda out, saved: _edit_json(_step(out, 2) / checkpoints.STATE_FILE, global_step=999), "latest",
                 "global_step is 999, but the checkpoint is step_000002", id="global_step-vs-directory"),
    pytest.param(lambda out, saved: _edit_json(saved / checkpoints.STATE_FILE, global_step=1), "saved",
                 r"global_step is 1, but scheduler.json is at step 2 \(last_epoch\)", id="global_step-vs-schedule"),
    # scheduler.json edited too (same size, so the manifest still matches): the optimizer's own count tells.
    pytest.param(lambda out, saved: (_edit_json(saved / checkpoints.STATE_FILE, global_step=1),
                                     _edit_json(saved / checkpoints.SCHEDULER_FILE, last_epoch=1)), "saved",
                 r"global_step is 1 \(0 skipped\), but the optimizer state \(optimizer.bin\) has taken 2 update",
                 id="global_step-vs-optimizer"),
    # A learning-rate change smuggled past the identity check by editing the recorded identity.
    pytest.param(lambda out, saved: _edit_json(_step(out, 2) / checkpoints.STATE_FILE,
                                               **{"run.identity.learning_rate": 0.1}), "latest",
                 r"learning_rate is 0.1 in the run identity, but scheduler.json's base rates are \[0.0005, 0.0005\]",
                 id="learning_rate-vs-schedule"),
])
def test_trainer_state_contradicting_the_checkpoint_is_refused_naming_the_field(tiny_data, tmp_path, cut_run, edit,
                                                                                resume, message):
    out = cut_run(tmp_path / "out")
    saved = _copy_checkpoint(out, 2, tmp_path / "saved")
    edit(out, saved)
    argv = tiny_data.argv(out, *FLAGS, "--resume_from_checkpoint", "latest" if resume == "latest" else str(saved))
    if "learning_rate" in message:
        argv += ["--learning_rate", "0.1"]
    with pytest.raises(checkpoints.CheckpointError, match=rf"trainer_state.json does not match the checkpoint's own "
                                                           rf"record: {message}"):
        train.main(argv)
    assert len(read_metrics(out)) == 2 and not (out / "model.safetensors").exists()  # nothing trained or saved


def test_resume_latest_without_any_checkpoint_stops_naming_the_output_dir(tiny_data, tmp_path):
    mistyped = tmp_path / "alip-dmeo"
    with pytest.raises(checkpoints.CheckpointError, match=rf"--resume_from_checkpoint latest: no valid checkpoint "
                                                           rf"found in output directory \({mistyped};"):
        train.main(tiny_data.argv(mistyped, "--resume_from_checkpoint", "latest"))
    assert not (mistyped / "metrics.jsonl").exists() and not (mistyped / "model.safetensors").exists()


def test_resume_path_that_does_not_exist_says_so(tiny_data, tmp_path):
    missing = tmp_path / "checkpoints" / "step_000009"
    with pytest.raises(checkpoints.CheckpointError, match=rf"--resume_from_checkpoint {missing}: no such directory$"):
        train.main(tiny_data.argv(tmp_path, "--resume_from_checkpoint", str(missing)))


def _fill_disk_at_step(monkeypatch, failing_step: int, error: Exception, free_bytes: int | None = None):
    """The optimizer file of the checkpoint of `failing_step` is half written, then `error` (a full disk)."""
    import accelerate.checkpointing

    original, calls = accelerate.checkpointing.save, []

    def save(obj, path, *args, **kwargs):
        if Path(path).name == "optimizer.bin":
            calls.append(path)
            if len(calls) == failing_step:
                Path(path).write_bytes(b"\0" * 4096)
                raise error
        return original(obj, path, *args, **kwargs)

    monkeypatch.setattr(accelerate.checkpointing, "save", save)
    if free_bytes is not None:
        usage = shutil.disk_usage
        monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(p)._replace(free=free_bytes))


@pytest.mark.parametrize("error, free_bytes", [
    pytest.param(OSError(28, "No space left on device"), None, id="ENOSPC"),
    # torch's zip writer reports a full disk without the errno: the free space tells.
    pytest.param(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4160 vs 4048"), 0,
                 id="torch-unexpected-pos"),
])
def test_full_disk_during_a_checkpoint_save_names_the_directory_and_leaves_nothing_half_written(
        tiny_data, tmp_path, full_run, monkeypatch, error, free_bytes):
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        _fill_disk_at_step(patch, 2, error, free_bytes)
        with pytest.raises(checkpoints.CheckpointSaveError,
                           match=rf"saving checkpoint step_000002 in {out / CKPT} failed: no space left on device"):
            train.main(tiny_data.argv(out, *FLAGS))
    assert sorted(p.name for p in (out / CKPT).iterdir()) == ["step_000001"]  # no .tmp-step_000002, no step 2
    train.main(tiny_data.argv(out, *FLAGS, "--resume_from_checkpoint", "latest"))
    _assert_same(_weights(full_run), _weights(out), "resumed after the full disk")


def _user_namespaces() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0
    except OSError:
        return False


@pytest.mark.skipif(not _user_namespaces(), reason="needs `unshare -rm` to mount a small tmpfs without root")
@pytest.mark.parametrize("size", [
    pytest.param("4m", id="model-file-fails"),  # model.safetensors (6.5 MB) does not fit: safetensors' error
    pytest.param("12m", id="optimizer-file-fails"),  # optimizer.bin does not: torch's "unexpected pos"
])
def test_a_really_full_disk_during_a_checkpoint_save(tiny_data, tmp_path, size):
    mount = tmp_path / "small_disk"
    mount.mkdir()
    argv = tiny_data.argv(mount / "out", "--save_steps", "1")
    script = ('mount -t tmpfs -o size="$1" tmpfs "$2" || exit 99; shift 2; "$@"; status=$?; '
              'echo "left: $(ls -A "$0/out/checkpoints" | tr "\\n" " ")"; exit $status')
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script, str(mount), size, str(mount), sys.executable,
                             str(REPO_ROOT / "train.py"), *argv], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1"))
    assert result.returncode == 1, result.stderr[-3000:]
    assert re.search(rf"CheckpointSaveError: saving checkpoint step_000001 in {mount / 'out' / CKPT} failed: no space "
                     "left on device", result.stderr), result.stderr[-3000:]
    assert re.search(r"^left: *$", result.stdout, re.M), result.stdout  # no .tmp-step_000001, no step_000001


def test_finished_output_dir_is_not_trained_over(tiny_data, tmp_path):
    train.main(tiny_data.argv(tmp_path))
    model, log = (tmp_path / "model.safetensors").read_bytes(), (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(FileExistsError, match=rf"Output directory \({tmp_path}\) already holds a trained model "
                                              r"\(model.safetensors, config.json\).*--overwrite_output_dir.*"
                                              "--resume_from_checkpoint latest"):
        train.main(tiny_data.argv(tmp_path))
    assert (tmp_path / "model.safetensors").read_bytes() == model and (tmp_path / "metrics.jsonl").read_text() == log
    train.main(tiny_data.argv(tmp_path, "--overwrite_output_dir", "true", "--max_steps", "3"))
    assert [row["step"] for row in read_metrics(tmp_path)] == [1, 2, 3]


def test_output_dir_with_an_earlier_runs_log_is_not_trained_over(tiny_data, tmp_path):
    train.main(tiny_data.argv(tmp_path, "--max_steps", "3", "--stop_after_steps", "1"))  # no checkpoint, its log
    with pytest.raises(FileExistsError, match=r"holds the outputs of an earlier run \(metrics.jsonl, train_args.yaml\)"
                                              ".*--overwrite_output_dir"):
        train.main(tiny_data.argv(tmp_path))
    assert len(read_metrics(tmp_path)) == 1
