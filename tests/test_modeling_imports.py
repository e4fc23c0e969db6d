"""`modeling_alip/` is what a user of a saved model loads (as remote code from the Hub, where this project is not
installed): it may import only torch, transformers, the standard library and its own files. An optional import
(inside `try: ... except ImportError`, with a fallback) is allowed: `ftfy` for CLIP's text cleaning."""

import ast
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT

# numpy and huggingface_hub are requirements of transformers itself (every install has them), and transformers'
# own CLIP files import them too (`CLIPConfig` is a `huggingface_hub.dataclasses.strict` dataclass).
ALLOWED = {"torch", "transformers", "modeling_alip", "numpy", "huggingface_hub"}
MODEL_FILES = sorted((REPO_ROOT / "modeling_alip").glob("*.py"))


def _optional(tree: ast.AST) -> set[ast.AST]:
    """Import nodes inside a `try` whose handlers catch `ImportError` / `ModuleNotFoundError`."""
    optional = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                for h in node.handlers):
            optional |= {n for statement in node.body for n in ast.walk(statement)
                         if isinstance(n, (ast.Import, ast.ImportFrom))}
    return optional


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """`(line, top-level module)` of every required import in `path`, function-level ones included."""
    found = []
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    optional = _optional(tree)
    for node in ast.walk(tree):
        if node in optional:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, "modeling_alip" if node.level else node.module.split(".")[0]))
    return found


def foreign_imports(path: Path) -> list[str]:
    return [f"{path.name}:{line} imports {module}" for line, module in imported_modules(path)
            if module not in ALLOWED and module not in sys.stdlib_module_names and module != "__future__"]


@pytest.mark.parametrize("path", MODEL_FILES, ids=lambda p: p.name)
def test_model_folder_imports_only_torch_transformers_and_the_standard_library(path):
    assert not foreign_imports(path)


def test_the_scan_sees_imports_inside_functions(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import os\nfrom . import gates\n\ndef f():\n    from alip_hf.io import write_json_atomic\n"
                     "    try:\n        import ftfy\n    except ImportError:\n        ftfy = None\n")
    assert foreign_imports(probe) == ["probe.py:5 imports alip_hf"]
