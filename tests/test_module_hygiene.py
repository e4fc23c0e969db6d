"""Module-level hygiene of the project's code: every module logger is used."""

import re

import pytest

from conftest import REPO_ROOT

SOURCES = sorted(p for package in ("alip_hf", "modeling_alip", "recaption") for p in (REPO_ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_a_module_logger_is_used(path):
    text = path.read_text(encoding="utf-8")
    declared = re.search(r"^(\w+) = logging\.getLogger\(", text, re.M)
    if declared:
        name = declared.group(1)
        assert re.search(rf"\b{name}\.\w+\(", text), f"{path.name}: {name} is declared and never used"
