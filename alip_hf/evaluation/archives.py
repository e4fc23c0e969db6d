"""Unpacking the members an evaluation reads from a publisher's archive (a zip or a tar), once, beside it.

Publishers ship evaluation images in one archive (WinoGAViL's `winogavil_images.zip`, Long-CLIP's `Urban1k.zip`,
DOCCI's `docci_images.tar.gz`). The members a task needs are written next to the archive under their member names,
so that a rerun, or a user who unpacked the archive by hand, reads the same files without opening it again.
"""

from __future__ import annotations

import logging
import tarfile
import zipfile
from pathlib import Path

from alip_hf.io import write_bytes_atomic

logger = logging.getLogger(__name__)


def unpack_members(archive: Path, members: list[str], root: Path, what: str = "members") -> None:
    """Writes the members of `archive` named in `members` to `root/<member>` (each atomically), unless already there.

    A zip is read by name, and a member whose unpacked file has another size than the zip records is written again
    (a zip downloaded anew after a fix, as Urban1k's was, replaces what the old one left). A tar (`.tar`,
    `.tar.gz`, ...) is streamed once from its start, the only way through a gzip stream, and only when a member is
    not unpacked yet. Without the archive, the members must all be there already.

    Args:
        archive: the zip or tar file.
        members: member names, `/`-separated as the archive stores them.
        root: the folder they are written under (usually the archive's own folder).
        what: what the members are, for messages ("Urban1k files").

    Raises:
        FileNotFoundError: `archive` is missing while members are not unpacked, or it lacks members (naming the
            first few and the count).
        ValueError: a member name that would land outside `root` (absolute, or with `..`).
    """
    unsafe = [m for m in members if Path(m).is_absolute() or ".." in Path(m).parts]
    if unsafe:
        raise ValueError(f"{archive}: member name(s) {unsafe[:3]} would be written outside {root}")
    if archive.is_file() and zipfile.is_zipfile(archive):
        _unpack_zip(archive, members, root, what)
        return
    wanted = {m for m in members if not (root / m).is_file()}
    if not wanted:
        return
    if not archive.is_file():
        raise FileNotFoundError(f"{archive} not found, and {len(wanted)} of the {len(members)} {what} are not unpacked "
                                f"under {root} (e.g. {sorted(wanted)[0]})")
    logger.info("unpacking %d %s from %s into %s", len(wanted), what, archive, root)
    _require_members(archive, sorted(wanted - _unpack_tar(archive, wanted, root)), len(members), what)


def _require_members(archive: Path, absent: list[str], count: int, what: str) -> None:
    if absent:
        raise FileNotFoundError(f"{archive}: no member(s) {absent[:3]}{' ...' if len(absent) > 3 else ''} "
                                f"({len(absent)} of the {count} {what})")


def _unpack_zip(archive: Path, members: list[str], root: Path, what: str) -> None:
    with zipfile.ZipFile(archive) as zf:
        sizes = {info.filename: info.file_size for info in zf.infolist()}
        _require_members(archive, [m for m in members if m not in sizes], len(members), what)
        stale = [m for m in members if not (root / m).is_file() or (root / m).stat().st_size != sizes[m]]
        if stale:
            logger.info("unpacking %d %s from %s into %s", len(stale), what, archive, root)
        for member in stale:
            write_bytes_atomic(root / member, zf.read(member))


def _unpack_tar(archive: Path, wanted: set[str], root: Path) -> set[str]:
    found = set()
    with tarfile.open(archive, "r|*") as tar:
        for info in tar:
            name = info.name.removeprefix("./")
            if name in wanted and info.isfile():
                write_bytes_atomic(root / name, tar.extractfile(info).read())
                found.add(name)
    return found


def archive_names(archive: Path) -> list[str]:
    """The file members of a zip, in archive order (reading only its directory)."""
    with zipfile.ZipFile(archive) as zf:
        return [info.filename for info in zf.infolist() if not info.is_dir()]
