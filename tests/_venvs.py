"""Virtual environments for the install tests (standard library only, so that it also runs inside a bare venv)."""

from __future__ import annotations

import os
import site
import subprocess
import sysconfig
import venv
from pathlib import Path


def site_packages_of_the_running_interpreter() -> list[str]:
    """Where the interpreter running this finds its installed packages: its own site-packages and, when it runs
    in a virtual environment made with --system-site-packages, the base interpreter's."""
    paths = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()]
    if site.ENABLE_USER_SITE:
        paths.append(site.getusersitepackages())
    return [path for path in dict.fromkeys(paths) if os.path.isdir(path)]


def venv_seeing_the_running_interpreters_packages(env_dir: Path, with_pip: bool = True) -> Path:
    """A fresh virtual environment whose dependencies (torch, transformers, ...) are those of the interpreter
    running this, wherever that one found them; returns its bin directory.

    `system_site_packages=True` would not do: it exposes the *base* interpreter's packages, so when the tests run
    inside a virtual environment (how most people install) the dependencies would be missing. A .pth file naming
    the running interpreter's site-packages appends them to the new environment's sys.path, after its own
    site-packages, so a wheel installed there wins. The .pth files inside those directories are not processed
    (a plain path line does not make a site directory), so an editable install of this project there stays
    invisible."""
    env_dir = Path(env_dir)
    venv.create(env_dir, system_site_packages=False, with_pip=with_pip)
    bin_dir = env_dir / "bin"
    own_site = subprocess.run([str(bin_dir / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
    (Path(own_site) / "_running_interpreter_site_packages.pth").write_text(
        "".join(f"{path}\n" for path in site_packages_of_the_running_interpreter()))
    return bin_dir
