"""Writes small datasets in CLIP_benchmark's WebDataset layout, as its `webdataset_builder` publishes them on the
Hub (`clip-benchmark/wds_<name>`, DataComp's `djghosh/wds_<name>_test`):

    <root>/<split>/0.tar, 1.tar, ...     members s0000000.webp + s0000000.cls (classification; labels as decimal
                                         text), or s0000000.webp + s0000000.txt (retrieval: captions, one per
                                         line); WILDS / fairness sets add s0000000.npy (metadata, group first)
    <root>/<split>/nshards.txt           the shard count and a newline
    <root>/classnames.txt                one class name per line, indexed by the .cls ids
    <root>/zeroshot_classification_templates.txt   one template per line, `{c}` for the class name
    <root>/dataset_type.txt              "retrieval" for retrieval sets (absent for classification)

Keys count across shards (`s%07d` of the sample index), as `webdataset.ShardWriter` writes them for the converter;
within a sample the members are in sorted order of their extension, as `webdataset.TarWriter` writes them.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def _image_bytes(image: Image.Image, ext: str) -> bytes:
    buffer = io.BytesIO()
    options = {"webp": dict(format="webp", lossless=True), "png": dict(format="png"), "jpg": dict(format="jpeg")}
    image.save(buffer, **options[ext])
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, payload: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def write_wds_copy(root, images, split="test", labels=None, captions=None, class_names=None, templates=None,
                   metadata=None, shard_size=4, image_ext="webp") -> Path:
    """Writes `images` (PIL) with `labels` (ints) or `captions` (a list of strings per image) into `root`."""
    root = Path(root)
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    shards = [range(i, min(i + shard_size, len(images))) for i in range(0, len(images), shard_size)]
    for number, indices in enumerate(shards):
        with tarfile.open(folder / f"{number}.tar", "w") as tar:
            for i in indices:
                members = {image_ext: _image_bytes(images[i], image_ext)}
                if labels is not None:
                    members["cls"] = str(int(labels[i])).encode()
                if captions is not None:
                    members["txt"] = "\n".join(c.replace("\n", r"\n") for c in captions[i]).encode()
                if metadata is not None:
                    buffer = io.BytesIO()
                    np.save(buffer, np.asarray(metadata[i]))
                    members["npy"] = buffer.getvalue()
                for ext in sorted(members):
                    _add(tar, f"s{i:07d}.{ext}", members[ext])
    (folder / "nshards.txt").write_text(f"{len(shards)}\n")
    if class_names is not None:
        (root / "classnames.txt").write_text("".join(f"{n}\n" for n in class_names), encoding="utf-8")
    if templates is not None:
        (root / "zeroshot_classification_templates.txt").write_text("".join(f"{t}\n" for t in templates),
                                                                     encoding="utf-8")
    if captions is not None:
        (root / "dataset_type.txt").write_text("retrieval\n")
    return root


def random_images(n: int, seed: int = 0, size: int = 12) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


# The files of the Hub dataset nlphuji/winogavil (what its loading script downloads, and DataComp reads through it):
#     <root>/winogavil_dataset.csv   one game per row: ID, cue, candidates and associations as JSON lists, ...
#     <root>/winogavil_images.zip    winogavil_images/<candidate>.jpg
WINOGAVIL_CSV_COLUMNS = ("candidates", "cue", "associations", "score_fool_the_ai", "num_associations",
                         "num_candidates", "solvers_jaccard_mean", "ID")


def write_winogavil_copy(root, games: list[tuple[str, list[str], list[str]]], seed: int = 0, size: int = 12) -> Path:
    """`games`: (cue, candidates, associations); every distinct candidate gets a random image in the zip."""
    import csv
    import json
    import zipfile

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "winogavil_dataset.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=WINOGAVIL_CSV_COLUMNS)
        writer.writeheader()
        for i, (cue, candidates, associations) in enumerate(games):
            writer.writerow({"candidates": json.dumps(candidates), "cue": cue, "associations": json.dumps(associations),
                             "score_fool_the_ai": 0.0, "num_associations": len(associations),
                             "num_candidates": len(candidates), "solvers_jaccard_mean": 100.0, "ID": 1000 + i})
    names = sorted({name for _, candidates, _ in games for name in candidates})
    with zipfile.ZipFile(root / "winogavil_images.zip", "w") as zf:
        for name, image in zip(names, random_images(len(names), seed=seed, size=size)):
            zf.writestr(f"winogavil_images/{name}.jpg", _image_bytes(image, "jpg"))
    return root
