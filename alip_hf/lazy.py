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
