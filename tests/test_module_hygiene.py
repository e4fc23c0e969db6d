"""Module-level hygiene of the project's code: one version number, and every module logger is used."""

import re
import subprocess
import sys

import pytest

import alip_hf
from conftest import REPO_ROOT

SOURCES = sorted(path for package in ("alip_hf", "modeling_alip", "recaption")
                 for path in (REPO_ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_a_module_logger_is_used(path):
    text = path.read_text(encoding="utf-8")
    declared = re.search(r"^(\w+) = logging\.getLogger\(", text, re.M)
    if declared:
        name = declared.group(1)
        assert re.search(rf"\b{name}\.\w+\(", text), f"{path.name}: {name} is declared and never used"


def test_setup_py_and_the_package_state_one_version():
    built = subprocess.run([sys.executable, "setup.py", "--version"], cwd=REPO_ROOT, capture_output=True, text=True,
                           timeout=120, check=True).stdout.strip().splitlines()[-1]
    assert built == alip_hf.__version__


def test_every_installed_module_serves_the_package_itself():
    """A module of the installed packages that only the tests import is a test helper: it belongs in tests/ (the
    tiny captioners, say), not in every user's install. Commands (`python -m ...`), modules loaded by their
    name from a table (the converters) and the `evaluate` modules (loaded by path) are used without an import.
    `modeling_alip` is left out: it is the model's public API, shipped whole as remote code."""
    import ast

    from test_import_cycles import import_graph, project_modules

    graph, modules = import_graph(), project_modules()
    used = {name for edges in graph.values() for name in edges}
    for path in modules.values():  # names in strings: importlib.import_module(table[name])
        used |= {node.value for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                 if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in modules}
    unused = [name for name, path in modules.items()
              if name not in used and path.name not in ("__init__.py", "__main__.py") and "evaluate_modules" not in name
              and not name.startswith("modeling_alip")
              and 'if __name__ == "__main__":' not in path.read_text(encoding="utf-8")]
    assert not unused, f"modules no other module or command uses: {unused}"
