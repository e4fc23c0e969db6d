"""Atomic writes of files and directories, used by every writer of the project.

A reader (or a resumed run) never sees a half-written file or model directory: content goes to a temporary
sibling that is renamed into place once complete (`os.replace` is atomic on one file system). A run killed
mid-write leaves at most a `.<name>.*.tmp` sibling behind, never a partial `name`.

Files are created with the permissions an ordinary `open()` would give (0666 and directories 0777, less the
umask): `tempfile` makes them private (0600/0700), which would hide shared outputs from the rest of a group.

This module imports only the standard library, so that everything else (modeling_alip's converters included)
can depend on it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Literal


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it: set and restore
    os.umask(mask)
    return mask


def _chmod_default(path: str | os.PathLike, directory: bool = False) -> None:
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def apply_default_permissions(root: str | os.PathLike) -> None:
    """Gives `root` and everything under it the permissions of an ordinary `open()` / `mkdir` (0666 / 0777 less
    the umask). Some writers (safetensors through `save_pretrained`, `tempfile`) create private 0600 files."""
    root = Path(root)
    _chmod_default(root, directory=root.is_dir())
    if root.is_dir():
        for path in root.rglob("*"):
            if not path.is_symlink():
                _chmod_default(path, directory=path.is_dir())


@contextmanager
def replaced_atomically(path: str | os.PathLike, mode: Literal["w", "wb"] = "w") -> Iterator[Any]:
    """An open temporary file beside `path` that replaces `path` once the block ends without error (else it is
    removed). The parent directory is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as file:
            yield file
        _chmod_default(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with replaced_atomically(path) as file:
        file.write(text)


def write_bytes_atomic(path: str | os.PathLike, payload: bytes) -> None:
    with replaced_atomically(path, "wb") as file:
        file.write(payload)


def write_json_atomic(path: str | os.PathLike, payload: Any, indent: int = 1, **kwargs) -> None:
    with replaced_atomically(path) as file:
        json.dump(payload, file, indent=indent, allow_nan=True, **kwargs)


def write_with_atomically(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Calls `write(tmp_path)` (a writer that takes a file name, e.g. `Dataset.to_parquet`), then renames the
    temporary file to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        _chmod_default(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def make_staging_dir(target: str | os.PathLike, tag: str = "tmp") -> Path:
    """An empty temporary directory beside `target` (same file system), with default permissions."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.{tag}-", dir=target.parent))
    _chmod_default(staging, directory=True)
    return staging


def replace_directory(staging: str | os.PathLike, output_dir: str | os.PathLike) -> None:
    """Renames the complete directory `staging` to `output_dir` (same file system), replacing an existing one."""
    staging, output_dir = Path(staging), Path(output_dir)
    old_dir = None
    if output_dir.exists():
        # `os.replace` cannot replace a non-empty directory: move the old one aside first, remove it after.
        old_dir = make_staging_dir(output_dir, "old")
        os.replace(output_dir, old_dir / output_dir.name)
    os.replace(staging, output_dir)
    if old_dir is not None:
        shutil.rmtree(old_dir, ignore_errors=True)


def save_directory_atomically(output_dir: str | os.PathLike, write: Callable[[Path], None], overwrite: bool = False,
                              overwrite_flag: str = "--overwrite_output_dir") -> None:
    """Runs `write(tmp_dir)` in a temporary sibling of `output_dir`, then renames it into place.

    A reader never sees a half-written directory: either the old one (or nothing) or the complete new one.

    Raises:
        FileExistsError: `output_dir` exists, is not empty and `overwrite` is false.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{output_dir} exists and is not empty; pass {overwrite_flag} to replace it")
    tmp_dir = make_staging_dir(output_dir)
    try:
        write(tmp_dir)
        apply_default_permissions(tmp_dir)
        replace_directory(tmp_dir, output_dir)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)


def move_files_into(staging: str | os.PathLike, output_dir: str | os.PathLike) -> None:
    """Moves every entry of `staging` into `output_dir`, each replaced atomically, then removes `staging`.

    For a directory that also holds other things (a training run's checkpoints and logs) and so cannot be
    swapped whole."""
    staging, output_dir = Path(staging), Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for item in staging.iterdir():
        target = output_dir / item.name
        if item.is_dir() and target.exists():
            replace_directory(item, target)
        else:
            os.replace(item, target)
    staging.rmdir()
