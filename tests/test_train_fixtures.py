"""Small data and a word-level tokenizer shared by the training tests (no downloads, no bundled files).

The tokenizer uses CLIP's special token ids (start 49406, end 49407), so the tiny ALIP model pools at the
right position; words map to ids below 200.
"""

import io
import random
from pathlib import Path

import datasets
from PIL import Image

from alip_hf import data

WORDS = ("a photo of the red green blue cat dog car tree house small big on in with one two sky grass road "
         "boat bird").split()
COLORS = {"red": (200, 30, 30), "green": (30, 180, 40), "blue": (30, 40, 200)}
CATEGORIES = ("cat", "dog", "car")


def write_tokenizer(path: Path) -> Path:
    """A `PreTrainedTokenizerFast` over `WORDS` with CLIP's start/end ids, saved to `path`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i + 1 for i, word in enumerate(WORDS)}
    vocab.update({"<unk>": 0, "<|startoftext|>": 49406, "<|endoftext|>": 49407})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", 49406), ("<|endoftext|>", 49407)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|startoftext|>",
                                        eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<unk>",
                                        model_max_length=77)
    tokenizer.save_pretrained(path)
    return path


def _png(color: tuple[int, int, int], rng: random.Random) -> bytes:
    image = Image.new("RGB", (40 + rng.randrange(8), 36), color)
    for _ in range(20):  # some texture so crops differ
        image.putpixel((rng.randrange(image.width), rng.randrange(36)), (rng.randrange(256),) * 3)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def make_rows(n: int, seed: int = 0, corrupt: tuple[int, ...] = (), empty_text: tuple[int, ...] = ()) -> dict:
    """`n` rows of the data contract; rows in `corrupt` get undecodable image bytes, `empty_text` an empty alt_text."""
    rng = random.Random(seed)
    rows = {key: [] for key in ("id", "image", "alt_text", "caption", "vecap", "category")}
    for i in range(n):
        color, category = rng.choice(list(COLORS)), rng.choice(CATEGORIES)
        image = b"not an image" if i in corrupt else _png(COLORS[color], rng)
        rows["id"].append(f"row-{i:04d}")
        rows["image"].append({"bytes": image, "path": None})
        rows["alt_text"].append("" if i in empty_text else f"{rng.choice(WORDS)} {category} {rng.choice(WORDS)}")
        rows["caption"].append(f"a photo of a {color} {category}")
        rows["vecap"].append(f"a {color} {category} on the {rng.choice(['grass', 'road', 'sky'])}")
        rows["category"].append(category)
    return rows


def write_parquet(path: Path, n: int, **kwargs) -> Path:
    features = datasets.Features({
        "id": datasets.Value("string"), "image": datasets.Image(), "alt_text": datasets.Value("string"),
        "caption": datasets.Value("string"), "vecap": datasets.Value("string"),
        "category": datasets.Value("string")})
    datasets.Dataset.from_dict(make_rows(n, **kwargs), features=features).to_parquet(str(path))
    assert features[data.IMAGE] == data.FEATURES[data.IMAGE]
    return path


import pytest  # noqa: E402


class TinyData:
    """Paths of the shared tokenizer and parquet data (48 clean rows; a second file with bad rows)."""

    def __init__(self, root: Path):
        self.root = root
        self.tokenizer = write_tokenizer(root / "tokenizer")
        self.train = write_parquet(root / "train.parquet", 48)
        self.dirty = write_parquet(root / "dirty.parquet", 24, seed=1, corrupt=(2, 7), empty_text=(4,))

    def argv(self, output_dir: Path, *extra: str, data_file: Path | None = None) -> list[str]:
        """`train.main` flags for a tiny run: tiny model, batch 8, 2 steps, no eval, no trackers but metrics.jsonl."""
        return ["--train_data", str(data_file or self.train), "--tokenizer_name_or_path", str(self.tokenizer),
                "--output_dir", str(output_dir), "--model_config", "tiny", "--per_device_train_batch_size", "8",
                "--max_steps", "2", "--logging_steps", "1", "--eval_data", "none", "--report_to", "none",
                "--warmup_steps", "0", "--dataloader_num_workers", "0", *extra]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> TinyData:
    return TinyData(tmp_path_factory.mktemp("tiny_data"))


def read_metrics(output_dir: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
