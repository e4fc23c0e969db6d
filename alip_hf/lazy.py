"""Modules loaded on first attribute access, so that a command's `--help` does not pay for torch or datasets.

`datasets = lazy_import("datasets")` binds a module object at once and runs the module's code only when one of
its attributes is first used (the standard library's `importlib.util.LazyLoader`). Type annotations are strings
under `from __future__ import annotations`, so annotating with `datasets.Dataset` does not load it.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType


def lazy_import(name: str) -> ModuleType:
    """The module `name`, loaded on first use (or the module itself when it is already imported)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
