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
# A module bound lazily (alip_hf.lazy) is in sys.modules before its first use, as a `_LazyModule` until then.
loaded = [name for name in {heavy} if name in sys.modules and type(sys.modules[name]).__name__ != "_LazyModule"]
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
