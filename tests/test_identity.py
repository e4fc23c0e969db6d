"""alip_hf.identity: the digests that training's run identity and recaption's shard markers are built from, equal
to those already recorded (a finished shard or checkpoint of an earlier version keeps matching)."""

import hashlib
import json

from alip_hf.identity import identity_differences, sha256_file, sha256_files, sha256_json
from conftest import REPO_ROOT


def test_digests_equal_the_ones_markers_and_logs_already_record(tmp_path):
    ids = ["a", "b\u00e9", "c,d"]
    assert sha256_json(ids) == hashlib.sha256(json.dumps(ids).encode("utf-8")).hexdigest()  # shard markers' ids
    config = {"b": 1, "a": {"y": 2, "x": None}}
    assert sha256_json(config) == hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    files = []
    for i, payload in enumerate((b"first", b"", b"x" * (5 << 20))):  # one file longer than a read block
        files.append(tmp_path / f"{i}.parquet")
        files[-1].write_bytes(payload)
        assert sha256_file(files[-1]) == hashlib.sha256(payload).hexdigest()
    expected = hashlib.sha256()
    for path in files:
        expected.update(hashlib.sha256(path.read_bytes()).digest())
    assert sha256_files(files) == expected.hexdigest()  # the audit's digest of a sample-weights log


def test_identity_differences_name_changed_added_and_removed_fields():
    assert identity_differences({"a": 1, "b": 2, "c": 3}, {"a": 1, "b": 5, "d": 4}) == {
        "b": (2, 5), "c": (3, None), "d": (None, 4)}
    assert identity_differences({"a": [1]}, {"a": [1]}) == {}


def test_files_and_values_are_hashed_in_one_place():
    """Only alip_hf/identity.py hashes files and JSON values; features.py hashes tensors (the weights' bytes)."""
    hashing = sorted(str(p.relative_to(REPO_ROOT)) for package in ("alip_hf", "recaption")
                     for p in (REPO_ROOT / package).rglob("*.py") if "hashlib.sha256(" in p.read_text())
    assert hashing == ["alip_hf/evaluation/features.py", "alip_hf/identity.py"]
