"""`--engine ray` on a local Ray cluster of 2 CPUs: the same rows as one process; a replica killed with a real
signal loses and duplicates nothing; after a killed driver, a rerun redoes only the unfinished shards."""

import functools
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import datasets
import pytest

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

from recaption.arguments import GenerationArguments, RunArguments  # noqa: E402
from recaption.caption import CaptionArguments, CaptionStep, caption  # noqa: E402
from recaption.ray_engine import init_ray, run_ray  # noqa: E402
from _tiny_captioners import save_tiny_captioner  # noqa: E402
from tests._slow_recaption_task import slow_caption_step  # noqa: E402
from tests.test_recaption_tasks import _rows  # noqa: E402
from tests.test_faults_input import write_source  # noqa: E402

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
ROWS, SHARD = 8, 1


def gen() -> GenerationArguments:
    return GenerationArguments(batch_size=4, max_new_tokens=6, dtype="float32")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    captioner = save_tiny_captioner(str(root / "blip"))
    source = write_source(root / "input.parquet", n=ROWS)
    single = root / "single"
    caption(RunArguments(source=source, output_dir=str(single), shard_size=SHARD), CaptionArguments(model=captioner),
            gen())
    return captioner, source, _rows(single)


@pytest.fixture(scope="module")
def cluster():
    init_ray(num_cpus=2, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


def _replica_processes() -> list:
    """This test's Ray replicas: worker processes under our local cluster named after the pool's class."""
    return [p for p in psutil.Process().children(recursive=True)
            if "ShardReplica" in " ".join(p.cmdline() or [])]


def test_a_replica_killed_mid_run_is_retried_and_the_rows_equal_one_process(setup, cluster, tmp_path):
    captioner, source, single_rows = setup
    run = RunArguments(source=source, output_dir=str(tmp_path / "out"), shard_size=SHARD, engine="ray",
                       num_replicas=2)
    args = CaptionArguments(model=captioner)
    make_step = functools.partial(slow_caption_step, 1.0, run, args, gen())
    result = {}
    thread = threading.Thread(target=lambda: result.update(run_ray(run, make_step, CaptionStep(run, args, gen(), None))))
    thread.start()
    deadline = time.time() + 300
    while not list((tmp_path / "out" / "shards").glob("*.json")) and time.time() < deadline:
        time.sleep(0.2)
    replicas = _replica_processes()
    assert replicas and list((tmp_path / "out" / "shards").glob("*.json"))
    os.kill(replicas[0].pid, signal.SIGKILL)  # mid-run: at most a few of the 8 one-second shards are done
    killed_at = len(list((tmp_path / "out" / "shards").glob("*.json")))
    thread.join(timeout=600)
    assert not thread.is_alive() and result.get("complete"), result
    assert killed_at < ROWS
    assert not psutil.pid_exists(replicas[0].pid) or replicas[0].status() == psutil.STATUS_ZOMBIE
    rows = _rows(tmp_path / "out")
    assert [r["id"] for r in rows] == sorted({r["id"] for r in rows}) and len(rows) == ROWS  # each id once
    assert rows == single_rows  # ids, captions, caption_model, caption_prompt_version, error
    assert not list((tmp_path / "out").glob("*/.*.tmp"))  # the killed replica's temporary file is gone


def test_after_the_driver_is_killed_a_rerun_redoes_only_unfinished_shards(setup, cluster, tmp_path):
    captioner, source, single_rows = setup
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_ARRAY")}
    driver = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "_slow_recaption_task.py"), "--source", source, "--output_dir", str(out),
         "--model", captioner, "--shard_size", str(SHARD), "--batch_size", "4", "--max_new_tokens", "6",
         "--dtype", "float32", "--engine", "ray", "--num_replicas", "1", "--cpus_per_replica", "1"],
        env={**env, "PYTHONPATH": str(ROOT), "SLOW_SHARD_SECONDS": "2"}, cwd=str(ROOT), start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not list((out / "shards").glob("*.json")) and driver.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert list((out / "shards").glob("*.json")), driver.communicate()[0][-3000:]
    started = psutil.Process(driver.pid).children(recursive=True)  # its local cluster and replicas
    os.killpg(driver.pid, signal.SIGKILL)  # the driver
    driver.wait()
    for process in started:  # what it started, which Ray puts in sessions of their own
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    before = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.json")}
    assert 0 < len(before) < ROWS

    summary = caption(RunArguments(source=source, output_dir=str(out), shard_size=SHARD, engine="ray"),
                      CaptionArguments(model=captioner), gen())
    after = {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("*.json")}
    assert {n: after[n] for n in before} == before  # finished shards were not redone
    assert summary["complete"] and summary["rows"] == ROWS and len(after) == ROWS
    assert _rows(out) == single_rows


def test_a_stream_on_ray_gives_the_same_chunks_and_rows_as_one_process(setup, cluster, tmp_path):
    captioner = setup[0]
    for f in range(3):  # three source shards, one unit of work each
        write_source(tmp_path / "in" / f"part-{f}.parquet", n=3, prefix=f"p{f}")
    source = str(tmp_path / "in" / "*.parquet")
    outputs = {}
    for name, extra in (("single", {}), ("ray", {"engine": "ray", "num_replicas": 2})):
        outputs[name] = tmp_path / name
        caption(RunArguments(source=source, output_dir=str(outputs[name]), shard_size=2, streaming=True, **extra),
                CaptionArguments(model=captioner), gen())
    names = {name: sorted(p.name for p in (out / "shards").glob("*.json")) for name, out in outputs.items()}
    assert names["ray"] == names["single"] and len(names["ray"]) == 6  # 2 chunks per source shard
    assert _rows(outputs["ray"]) == _rows(outputs["single"])


def test_rewrite_on_ray_gives_the_same_rows_as_one_process(setup, cluster, tmp_path):
    """The rewrite step (VeCap from AltText + caption, a chat LM) runs on the same pool as captioning."""
    from recaption.rewrite import RewriteArguments, rewrite
    from _tiny_captioners import save_tiny_chat_lm

    captioner, source, _ = setup
    captioned = tmp_path / "captioned"
    caption(RunArguments(source=source, output_dir=str(captioned), shard_size=SHARD), CaptionArguments(model=captioner),
            gen())
    args = RewriteArguments(model=save_tiny_chat_lm(str(tmp_path / "lm")), num_few_shot=1, max_words=6)
    outputs = {}
    for name, extra in (("single", {}), ("ray", {"engine": "ray", "num_replicas": 2})):
        outputs[name] = tmp_path / name
        summary = rewrite(RunArguments(source=str(captioned / "data"), output_dir=str(outputs[name]), shard_size=2,
                                       **extra), args, gen())
        assert summary["complete"] and summary["rows"] == ROWS
    rows = {name: _rows(out) for name, out in outputs.items()}
    assert rows["ray"] == rows["single"]  # ids, vecap, rewrite_model, rewrite_prompt_version, fallbacks
    assert {"vecap", "rewrite_prompt_version"} <= set(rows["ray"][0])


DRIVER_PROBE = """
import importlib, sys
import recaption.ray_engine
recaption.ray_engine.run_ray = lambda *args, **kwargs: print(
    "LOADED", sorted(name for name in ("torch", "torchvision", "accelerate") if name in sys.modules))
importlib.import_module("recaption." + sys.argv[1]).main(sys.argv[2:])
"""


@pytest.mark.parametrize("step", ["caption", "rewrite"])
def test_the_ray_driver_checks_the_source_without_loading_torch(step, tmp_path):
    """Under `--engine ray` the driver checks the source and schedules; torch, torchvision and accelerate load in
    the replicas only (they were seconds of a Ray run's start-up on a small machine)."""
    source = tmp_path / "input.parquet"
    if step == "caption":
        write_source(source, n=2)
    else:
        datasets.Dataset.from_dict({"id": ["a", "b"], "alt_text": ["x", "y"], "caption": ["c", "d"]}).to_parquet(
            str(source))
    result = subprocess.run([sys.executable, "-c", DRIVER_PROBE, step, "--source", str(source), "--output_dir",
                             str(tmp_path / "out"), "--engine", "ray"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "LOADED []" in result.stdout, result.stdout


START_PROBE = """
import sys, threading
import ray
import recaption.ray_engine as engine
def refused(address, **kwargs):
    raise ConnectionError(f"no Ray cluster at {address}")
ray.init = refused
try:
    engine.init_ray("10.0.0.1:6379")
except ConnectionError as e:
    print("RAISED", e)
print("IMPORTING", [t.name for t in threading.enumerate() if t.name == "import ray.data"])
print("IMPORTED", "ray.data" in sys.modules)
"""


def test_a_failed_cluster_start_still_finishes_importing_ray_data_before_raising():
    """Ray Data is imported while the cluster starts (it fits in that wait); when the start fails, its error
    is raised after that import has ended, so no half-imported `ray.data` is left behind the error."""
    result = subprocess.run([sys.executable, "-c", START_PROBE], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "RAISED no Ray cluster at 10.0.0.1:6379" in result.stdout
    assert "IMPORTING []" in result.stdout and "IMPORTED True" in result.stdout, result.stdout
