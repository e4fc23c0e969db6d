"""Modules loaded on first attribute access, so that a command's `--help` does not pay for torch or datasets.

`datasets = lazy_import("datasets")` binds a stand-in at once and imports the module only when one of its
attributes is first used. Type annotations are strings under `from __future__ import annotations`, so annotating
with `datasets.Dataset` does not load it.

The stand-in is kept out of `sys.modules` (unlike the standard library's `importlib.util.LazyLoader`, whose module
sits there until used): importing torch walks `sys.modules` through `inspect`, which would load every pending
module half-way through torch's own import: `datasets` (a second of import time) in a process that may never use
it, and a circular import for a module that imports torch itself.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType


class _LazyModule(ModuleType):
    """Stands for the module `__name__`: each attribute is read from the module, imported on first use."""

    def __getattr__(self, attr: str):
        return getattr(importlib.import_module(self.__name__), attr)

    def __dir__(self):
        return dir(importlib.import_module(self.__name__))


def lazy_import(name: str) -> ModuleType:
    """The module `name`, imported on first use (or the module itself when it is already imported)."""
    if name in sys.modules:
        return sys.modules[name]
    if importlib.util.find_spec(name) is None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    return _LazyModule(name)


class MissingExtra(ImportError):
    """An optional dependency (an extra of the package) that a command needs is not installed. Its message is
    one line naming the `pip install` command that works however alip-hf was installed."""


def extra_requirements(extra: str) -> list[str]:
    """The requirements of the package's extra `extra` as the installed metadata declares them (setup.py's
    `extras_require`, the one place they are written), e.g. `["matplotlib"]` for `plot`; [] when alip-hf is not
    installed (a checkout on PYTHONPATH)."""
    from importlib import metadata

    try:
        declared = metadata.requires("alip-hf") or []
    except metadata.PackageNotFoundError:
        return []
    found = []
    for requirement in declared:
        name, _, marker = requirement.partition(";")
        if marker.replace(" ", "").replace("'", '"') == f'extra=="{extra}"':
            found.append(name.strip())
    return found


def install_command(extra: str, module: str) -> str:
    """`pip install <the extra's requirements>`: the packages themselves, not `alip-hf[extra]` (no package index
    serves alip-hf) nor `-e '.[extra]'` (only a checkout has a `.` to install)."""
    packages = extra_requirements(extra) or [module]
    return "pip install " + " ".join(f"'{p}'" if any(c in p for c in "<>=!~[ ") else p for p in packages)


def require_extra(module: str, extra: str, purpose: str) -> None:
    """Raises `MissingExtra` naming `purpose` and the install command when `module` cannot be imported.

    Args:
        module: the import name (`matplotlib`, `tensorboard`).
        extra: the package's extra that installs it (`plot`, `tensorboard`).
        purpose: what needs it, e.g. "eval.py --plot".
    """
    if module in sys.modules and sys.modules[module] is not None:
        return
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise MissingExtra(f"{purpose} needs {module}, which is not installed: {install_command(extra, module)}")
