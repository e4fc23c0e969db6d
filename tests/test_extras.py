"""Optional dependencies (the package's extras): a missing one is one line naming the install command that works
for any install (the packages themselves: no index serves alip-hf, and only a checkout has a `.` to install)."""

import importlib.util
import logging
import re
import sys

import pytest

from alip_hf import lazy
from alip_hf.training.arguments import TrainArguments
from conftest import REPO_ROOT

EXTRAS = re.findall(r'^\s+"(\w+)": \[', (REPO_ROOT / "setup.py").read_text(), re.M)


@pytest.mark.parametrize("extra", [e for e in EXTRAS if e != "dev"])
def test_install_command_names_the_packages_not_the_project(extra, monkeypatch):
    command = lazy.install_command(extra, "fallback")
    assert command.startswith("pip install ") and "alip-hf" not in command and "-e" not in command.split()
    if lazy.extra_requirements(extra):  # from the installed metadata, the extra's own requirements
        assert "fallback" not in command
    monkeypatch.setattr(lazy, "extra_requirements", lambda extra: [])  # a checkout on PYTHONPATH
    assert lazy.install_command(extra, "fallback") == "pip install fallback"


def test_require_extra_is_one_line_naming_what_needs_it_and_the_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    monkeypatch.delitem(sys.modules, "matplotlib", raising=False)
    with pytest.raises(lazy.MissingExtra) as error:
        lazy.require_extra("matplotlib", "plot", "eval.py --plot")
    assert str(error.value) == "eval.py --plot needs matplotlib, which is not installed: pip install matplotlib"


def test_without_tensorboard_the_run_says_no_tensorboard_logs_are_written_and_how_to_get_them(monkeypatch, caplog):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    monkeypatch.delitem(sys.modules, "tensorboard", raising=False)
    with caplog.at_level(logging.WARNING):
        args = TrainArguments(output_dir="unused")
    assert args.report_to == []
    (message,) = [r.getMessage() for r in caplog.records if "tensorboard" in r.getMessage()]
    assert "no TensorBoard logs are written" in message and "pip install tensorboard" in message
