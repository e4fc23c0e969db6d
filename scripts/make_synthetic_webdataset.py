"""Writes synthetic image-text samples as WebDataset shards in img2dataset's layout, for benchmarks and tests.

Each sample is three or more tar members sharing a 9-digit key:

    000000000.jpg            a random drawing (coloured rectangles and ellipses on a random background)
    000000000.txt            a random short text, the stand-in for the web alt-text
    000000000.json           img2dataset's metadata: key, url, caption, status, width, height, sha256, ...
    000000000.<name>.txt     one per `--extra_text_keys` name (e.g. `caption`, `vecap`): more random text

Shards are `00000.tar`, `00001.tar`, ...; read them back with
`data.load_source("<dir>/{00000..00001}.tar")` (columns `jpg`, `txt`, `json`, `<name>.txt`).
The same arguments give byte-identical shards (seeded generator, fixed tar headers).

    python scripts/make_synthetic_webdataset.py --output_dir /tmp/shards --num_samples 2000 \\
        --samples_per_shard 1000 --extra_text_keys caption vecap
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import sys
import tarfile
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout: `alip_hf` is at the root

from alip_hf.io import replaced_atomically  # noqa: E402

COLOURS = ("red", "green", "blue", "yellow", "black", "white", "orange", "purple", "pink", "brown", "grey")
NOUNS = ("cat", "dog", "car", "house", "tree", "flower", "boat", "chair", "bird", "cup", "lamp", "bicycle", "apple")
PLACES = ("on a table", "in a field", "at night", "on the beach", "in the snow", "near a window", "in a city")
STYLES = ("a photo of", "a drawing of", "clip art of", "a close-up of", "a painting of", "stock image:")


def random_text(rng: random.Random) -> str:
    """A short caption-like text: "a photo of a red cat in a field", sometimes with a noisy suffix like web text."""
    text = f"{rng.choice(STYLES)} a {rng.choice(COLOURS)} {rng.choice(NOUNS)} {rng.choice(PLACES)}"
    if rng.random() < 0.3:
        text += f" IMG_{rng.randrange(10000):04d}"
    return text


def random_image(rng: random.Random, image_size: int) -> Image.Image:
    """An `image_size` x `image_size` RGB image of a few random filled shapes: compressible like real images."""
    def colour():
        return tuple(rng.randrange(256) for _ in range(3))

    image = Image.new("RGB", (image_size, image_size), colour())
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(1, 4)):
        x0, x1 = sorted(rng.randrange(image_size) for _ in range(2))
        y0, y1 = sorted(rng.randrange(image_size) for _ in range(2))
        shape = draw.rectangle if rng.random() < 0.5 else draw.ellipse
        shape((x0, y0, x1 + 1, y1 + 1), fill=colour())
    return image


def make_sample(index: int, rng: random.Random, image_size: int, extra_text_keys: tuple[str, ...]) -> dict[str, bytes]:
    """Tar member suffix -> bytes for one sample, in img2dataset's layout."""
    key = f"{index:09d}"
    buffer = io.BytesIO()
    random_image(rng, image_size).save(buffer, format="JPEG", quality=90)
    jpg = buffer.getvalue()
    text = random_text(rng)
    metadata = {
        "key": key,
        "url": f"https://example.com/images/{key}.jpg",
        "caption": text,
        "status": "success",
        "width": image_size,
        "height": image_size,
        "original_width": image_size,
        "original_height": image_size,
        "sha256": hashlib.sha256(jpg).hexdigest(),
    }
    members = {"jpg": jpg, "txt": text.encode("utf-8"), "json": json.dumps(metadata, sort_keys=True).encode("utf-8")}
    for name in extra_text_keys:
        members[f"{name}.txt"] = random_text(rng).encode("utf-8")
    return members


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """One tar with fixed headers (mtime 0, root owner), written to a temp file and renamed into place."""
    with replaced_atomically(path, "wb") as file, tarfile.open(fileobj=file, mode="w") as tar:
        for key, members in samples:
            for suffix, payload in members.items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size, info.mode, info.mtime = len(payload), 0o644, 0
                tar.addfile(info, io.BytesIO(payload))


def write_shards(
    output_dir: str | Path,
    num_samples: int,
    samples_per_shard: int = 1000,
    image_size: int = 64,
    extra_text_keys: tuple[str, ...] | list[str] = (),
    seed: int = 0,
) -> list[Path]:
    """Writes `num_samples` samples into `ceil(num_samples / samples_per_shard)` shards; returns their paths.

    Raises:
        ValueError: a non-positive count or size, or an extra key that is not a plain name (`txt`, `jpg` and
            `json` are taken; a dot would change how readers split the member name).
    """
    if num_samples < 1 or samples_per_shard < 1 or image_size < 1:
        raise ValueError(f"--num_samples, --samples_per_shard and --image_size must be positive, got "
                         f"{num_samples}, {samples_per_shard}, {image_size}")
    for name in extra_text_keys:
        if not name.isidentifier() or name in ("txt", "jpg", "json"):
            raise ValueError(f"--extra_text_keys: {name!r} must be a plain name other than txt/jpg/json")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    with tqdm(total=num_samples, desc="writing shards", unit="sample") as progress:
        for start in range(0, num_samples, samples_per_shard):
            indices = range(start, min(start + samples_per_shard, num_samples))
            samples = [(f"{i:09d}", make_sample(i, rng, image_size, tuple(extra_text_keys))) for i in indices]
            path = output_dir / f"{start // samples_per_shard:05d}.tar"
            write_shard(path, samples)
            paths.append(path)
            progress.update(len(samples))
    return paths


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True, help="directory for 00000.tar, 00001.tar, ...")
    parser.add_argument("--num_samples", type=int, default=2000, help="samples in all shards together")
    parser.add_argument("--samples_per_shard", type=int, default=1000, help="samples per tar file")
    parser.add_argument("--image_size", type=int, default=64, help="side of the square JPEG images, pixels")
    parser.add_argument("--extra_text_keys", nargs="*", default=[], help="extra text members, e.g. caption vecap")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random images and texts")
    args = parser.parse_args(argv)
    try:
        paths = write_shards(args.output_dir, args.num_samples, args.samples_per_shard, args.image_size,
                             args.extra_text_keys, args.seed)
    except ValueError as error:
        parser.error(str(error))
    last = len(paths) - 1
    print(f"wrote {args.num_samples} samples in {len(paths)} shards: {args.output_dir}/{{00000..{last:05d}}}.tar")
    return paths


if __name__ == "__main__":
    main()
