"""What identifies a run's inputs: sha256 digests of values and files, and the comparison of two identities.

Training (`training/run.py`: a checkpoint resumes only under the same identity) and `recaption/` (a finished
shard is skipped only when made from the same input by the same model) both build their identities from these
digests and name what changed with `identity_differences`. Standard library only.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterable

BLOCK = 1 << 22  # bytes read at a time when hashing a file


def sha256_json(value: Any) -> str:
    """sha256 of a JSON-able value, hex: keys sorted, anything JSON cannot hold written as `str(value)` (a list
    of ids is hashed as its JSON text, so that no id can run into the next)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def sha256_file(path: str | os.PathLike, progress: bool = False) -> str:
    """sha256 of a file's bytes, hex (the digest the Hub shows for LFS files), read in blocks; `progress` shows
    a progress bar (tqdm) for large files."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=os.path.getsize(path), unit="B", unit_scale=True,
                       desc=f"sha256 {os.path.basename(path)}")
        for block in iter(lambda: file.read(BLOCK), b""):
            digest.update(block)
            if bar is not None:
                bar.update(len(block))
        if bar is not None:
            bar.close()
    return digest.hexdigest()


def sha256_files(paths: Iterable[str | os.PathLike]) -> str:
    """One sha256 of several files, in the order given: the digest of their digests."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(bytes.fromhex(sha256_file(path)))
    return digest.hexdigest()


def identity_differences(saved: dict, current: dict) -> dict[str, tuple]:
    """`{field: (saved value, current value)}` for every field that differs (a field new to either side counts
    as different), fields in sorted order."""
    return {key: (saved.get(key), current.get(key)) for key in sorted(set(saved) | set(current))
            if saved.get(key) != current.get(key)}
