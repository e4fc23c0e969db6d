"""Writes small copies of the long-caption retrieval sets in their publishers' layouts, as docs/evaluation.md
("Long-caption retrieval") records them:

    Urban1k     <root>/Urban1k.zip                  Urban1k/image/<n>.jpg and Urban1k/caption/<n>.txt, n = 1, 2, ...
                                                    (Hub dataset BeichenZhang/Urban1k; Long-CLIP's Urban1k.py)
    ShareGPT4V  <root>/share-captioner_coco_lcs_sam_1246k_1107.json
                                                    a JSON list of {"id": "sa_<k>", "image": "sam/images/sa_<k>.jpg",
                                                    "conversations": [{"from": "human", ...}, {"from": "gpt", "value"}]}
                <root>/sam/images/sa_<k>.jpg        (Lin-Chen/ShareGPT4V; SA-1B images as ShareGPT4V's Data.md lays out)
    DOCCI       <root>/docci_descriptions.jsonlines {"example_id", "split", "image_file", "description"} per line
                <root>/docci_images.tar.gz          images/<image_file>   (storage.googleapis.com/docci/data/)
    DCI         <root>/densely_captioned_images/splits.json      {"train": [...], "valid": [...], "test": [...]}
                <root>/densely_captioned_images/annotations/<k>-data.json   {"image", "short_caption",
                                                    "extra_caption", "mask_data", "mask_keys", ...}
                <root>/densely_captioned_images/photos/sa_<k>.jpg          (facebookresearch/DCI; SA-1B sa_000138.tar)
"""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

from PIL import Image


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="jpeg", quality=95)
    return buffer.getvalue()


def write_urban1k_copy(root, images: list[Image.Image], captions: list[str]) -> Path:
    """`Urban1k.zip` with image `<n>.jpg` and caption `<n>.txt` (one line) for n = 1..len(images)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(root / "Urban1k.zip", "w") as zf:
        for n, (image, caption) in enumerate(zip(images, captions), start=1):
            zf.writestr(f"Urban1k/image/{n}.jpg", jpeg(image))
            zf.writestr(f"Urban1k/caption/{n}.txt", caption)
    return root


SHAREGPT4V_JSON = "share-captioner_coco_lcs_sam_1246k_1107.json"
SHAREGPT4V_QUESTION = "<image>\nWhat is this photo about'?"  # the first entry's question in the published json


def sharegpt4v_entry(k: int, caption: str) -> dict:
    return {"id": f"sa_{k}", "image": f"sam/images/sa_{k}.jpg",
            "conversations": [{"from": "human", "value": SHAREGPT4V_QUESTION}, {"from": "gpt", "value": caption}]}


def write_sharegpt4v_copy(root, images: list[Image.Image], captions: list[str], more_entries: int = 0,
                          first_id: int = 545504) -> Path:
    """The captioner json: one entry per image (with its file under `sam/images/`), then `more_entries` entries
    whose images are not there (the rest of the 1.2M list)."""
    root = Path(root)
    (root / "sam" / "images").mkdir(parents=True, exist_ok=True)
    entries = []
    for i, caption in enumerate(captions + [f"entry {j} beyond the images" for j in range(more_entries)]):
        entries.append(sharegpt4v_entry(first_id + i, caption))
        if i < len(images):
            (root / entries[-1]["image"]).write_bytes(jpeg(images[i]))
    (root / SHAREGPT4V_JSON).write_text(json.dumps(entries), encoding="utf-8")
    return root


def write_docci_copy(root, records: list[tuple[str, str, Image.Image, str]]) -> Path:
    """`records`: (example_id, split, image, description); the tar holds every image as `images/<example_id>.jpg`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "docci_descriptions.jsonlines", "w", encoding="utf-8") as f:
        for example_id, split, _, description in records:
            f.write(json.dumps({"example_id": example_id, "split": split, "image_file": f"{example_id}.jpg",
                                "description": description}) + "\n")
    with tarfile.open(root / "docci_images.tar.gz", "w:gz") as tar:
        for example_id, _, image, _ in records:
            payload = jpeg(image)
            info = tarfile.TarInfo(f"images/{example_id}.jpg")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return root


def write_dci_copy(root, splits: dict[str, list[tuple[int, Image.Image, str, str]]]) -> Path:
    """`splits`: split -> (k, image, short_caption, extra_caption); writes `densely_captioned_images/` under `root`
    with `splits.json` naming `<k>-data.json`, the annotation files and `photos/sa_<k>.jpg`."""
    folder = Path(root) / "densely_captioned_images"
    (folder / "annotations").mkdir(parents=True, exist_ok=True)
    (folder / "photos").mkdir(parents=True, exist_ok=True)
    listing = {}
    for split, entries in splits.items():
        listing[split] = []
        for k, image, short_caption, extra_caption in entries:
            name = f"{k}-data.json"
            annotation = {"image": f"sa_{k}.jpg", "short_caption": short_caption, "extra_caption": extra_caption,
                          "mask_data": {}, "mask_keys": []}
            (folder / "annotations" / name).write_text(json.dumps(annotation), encoding="utf-8")
            (folder / "photos" / f"sa_{k}.jpg").write_bytes(jpeg(image))
            listing[split].append(name)
    (folder / "splits.json").write_text(json.dumps(listing), encoding="utf-8")
    return folder
