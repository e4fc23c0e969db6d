"""Every command answers `--help` without loading torch, transformers' models or datasets: heavy imports happen
where they are used (benchmarks/bench_help.py times it)."""

import subprocess
import sys

import pytest

from conftest import REPO_ROOT

ENTRY_POINTS = ["alip_hf.train", "alip_hf.eval", "alip_hf.convert", "recaption.caption", "recaption.rewrite", "recaption.publish",
                "recaption.audit", "alip_hf.web"]
HEAVY = ("torch", "datasets", "torchvision", "accelerate")

PROBE = """
import runpy, sys
module, args = sys.argv[1], sys.argv[2:]
sys.argv = [module, *args, "--help"]
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
except SystemExit as stop:
    assert stop.code in (0, None), stop.code
loaded = [name for name in {heavy} if name in sys.modules]
print("LOADED", loaded)
"""


CONVERTERS = ["from_open_clip", "to_clip", "to_open_clip", "from_veclip"]


@pytest.mark.parametrize("module", ENTRY_POINTS + [f"alip_hf.convert {name}" for name in CONVERTERS])
def test_help_answers_without_loading_torch_or_datasets(module):
    result = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *module.split()], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage" in result.stdout.lower()
    assert "LOADED []" in result.stdout, f"{module} --help loads {result.stdout.split('LOADED')[-1].strip()}"


def test_importing_torch_leaves_modules_bound_lazily_unloaded():
    """Importing torch walks `sys.modules` (through `inspect`); a lazily bound module waiting there would be loaded
    half-way through torch's import. `datasets` is bound lazily by the recaption modules, which Ray replicas import
    before torch."""
    probe = ("import sys, recaption.run, recaption.caption, recaption.ray_engine, alip_hf.sources\n"
             "import torch\n"
             "print('LOADED', 'datasets' in sys.modules)\n"
             "recaption.run.datasets.Dataset  # first use\n"
             "print('USED', 'datasets' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "LOADED False" in result.stdout and "USED True" in result.stdout, result.stdout
