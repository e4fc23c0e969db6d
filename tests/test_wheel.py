"""The package as users install it: a wheel, installed non-editable into a fresh virtual environment, trains and
evaluates from a directory outside the checkout, with only the project's own top-level names."""

import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from _venvs import venv_seeing_the_running_interpreters_packages
from conftest import REPO_ROOT

OWN_TOP_LEVEL_NAMES = {"alip_hf", "modeling_alip", "recaption"}


def _run(cmd, cwd, env, timeout=600):
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # No build isolation: the build backend (setuptools) is the one installed, so this needs no network.
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
          str(REPO_ROOT)], cwd=out, env=dict(os.environ))
    (path,) = out.glob("*.whl")
    return path


def test_wheel_holds_only_the_projects_own_top_level_names_and_its_package_data(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == OWN_TOP_LEVEL_NAMES
    for data_file in ("alip_hf/model_card.md", "alip_hf/configs/demo.yaml", "alip_hf/configs/tiny.yaml",
                      "alip_hf/configs/accelerate/multi-gpu.yaml",
                      "alip_hf/demo_data/train-00000-of-00001.parquet", "alip_hf/demo_data/test-00000-of-00001.parquet",
                      "alip_hf/evaluate_modules/retrieval_recall/retrieval_recall.py"):
        assert data_file in names, data_file
    template = zipfile.ZipFile(wheel).read("alip_hf/model_card.md").decode()
    assert template == (REPO_ROOT / "model_card.md").read_text()  # the repository's template, not a link


def test_fresh_venv_sees_the_running_interpreters_dependencies_but_not_the_project(tmp_path):
    bin_dir = venv_seeing_the_running_interpreters_packages(tmp_path / "venv", with_pip=False)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = ("import importlib.util, transformers, torch; print(transformers.__file__); "
             "print([importlib.util.find_spec(name) is None for name in ('alip_hf', 'modeling_alip', 'recaption')])")
    out = _run([str(bin_dir / "python"), "-c", probe], cwd=tmp_path, env=env).stdout.split("\n")
    import transformers

    assert out[0] == transformers.__file__
    assert out[1] == "[True, True, True]", "the project must come only from the wheel installed in the venv"


def test_venv_made_from_inside_a_venv_sees_that_venvs_packages_not_only_the_base_interpreters(tmp_path):
    # How the README's test command runs for most users: inside a virtual environment whose packages the base
    # interpreter does not have. A package only in an outer venv must be importable in the test's venv
    # (`system_site_packages=True` exposes the base interpreter's packages only, and fails here).
    outer = tmp_path / "outer"
    venv.create(outer, system_site_packages=False, with_pip=False)
    outer_python = str(outer / "bin" / "python")
    outer_site = _run([outer_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                      cwd=tmp_path, env=dict(os.environ)).stdout.strip()
    (Path(outer_site) / "only_in_the_outer_venv.py").write_text("VALUE = 42\n")
    make_inner = ("import sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path; "
                  "from _venvs import venv_seeing_the_running_interpreters_packages as make; "
                  "print(make(Path(sys.argv[2]), with_pip=False))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    inner_bin = _run([outer_python, "-c", make_inner, str(REPO_ROOT / "tests"), str(tmp_path / "inner")],
                     cwd=tmp_path, env=env).stdout.strip()
    out = _run([str(Path(inner_bin) / "python"), "-c", "import only_in_the_outer_venv as m; print(m.VALUE)"],
               cwd=tmp_path, env=env).stdout.strip()
    assert out == "42"


@pytest.mark.slow  # about a minute: a virtual environment, a tiny training run and an evaluation
def test_installed_wheel_trains_and_evaluates_outside_the_checkout(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    bin_dir = venv_seeing_the_running_interpreters_packages(env_dir)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",
               VIRTUAL_ENV=str(env_dir))
    _run([str(bin_dir / "python"), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
         cwd=tmp_path, env=env)
    work = tmp_path / "elsewhere"  # not the checkout: nothing may be found relative to the working directory
    work.mkdir()
    where = _run([str(bin_dir / "python"), "-c", "import alip_hf, modeling_alip, recaption; "
                  "print(alip_hf.__file__, modeling_alip.__file__, recaption.__file__)"], cwd=work, env=env).stdout
    assert all(str(env_dir) in path for path in where.split()), where

    _run([str(bin_dir / "python"), "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "-m", "alip_hf.train", "tiny",
          "--max_steps", "2", "--per_device_train_batch_size", "8", "--output_dir", "run", "--report_to", "none"],
         cwd=work, env=env)
    run = work / "run"
    assert (run / "model.safetensors").is_file() and (run / "config.json").is_file()
    assert (run / "clip_export" / "model.safetensors").is_file()
    card = (run / "README.md").read_text()
    assert "zero-shot" in card.lower() and "{{" not in card

    _run([str(bin_dir / "alip-eval"), "--model", "run", "--preset", "demo", "--max_samples", "32",
          "--output", "results.json"], cwd=work, env=env)
    assert '"acc1"' in (work / "results.json").read_text()
    help_text = _run([str(bin_dir / "python"), "-m", "alip_hf.eval", "--help"], cwd=work, env=env).stdout
    assert "--preset" in help_text
