"""Shared fixtures and helpers of the test suite, offline: tiny models built from configs, tiny training data
with a word-level tokenizer, and the prelude that hides this package from a subprocess.

Which file covers what: test_<module>.py covers that module (test_recipes.py: alip_hf/recipes.py;
test_model_sizes.py: alip_hf/models.py, named sizes, overrides and seed; test_model.py: modeling_alip.ALIPModel;
test_train.py: end-to-end `train.main`; test_golden.py: the official ALIP step; ...); see each file's docstring.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import io
import json
import random
from pathlib import Path

import datasets
import pytest
import torch
from PIL import Image

from alip_hf import schema
from alip_hf.model_sizes import MODEL_CONFIGS, TINY_TOWER
from modeling_alip import ALIPConfig, ALIPModel, ALIPProcessor

REPO_ROOT = Path(__file__).resolve().parents[1]

__all__ = ["HIDE_PACKAGE", "REPO_ROOT", "TINY_TOWER", "make_rows", "read_metrics", "tiny_alip_config",
           "write_parquet", "write_tokenizer"]


# ---- tiny models -------------------------------------------------------------------------------------------------


def tiny_alip_config(**overrides) -> ALIPConfig:
    """Hidden 32, 2 layers, 4 heads, odd intermediate size, image 30, patch 2; the CLIP BPE vocabulary size."""
    return ALIPConfig(**MODEL_CONFIGS["tiny"], **overrides)


@pytest.fixture
def tiny_config() -> ALIPConfig:
    return tiny_alip_config()


@pytest.fixture
def tiny_model(tiny_config) -> ALIPModel:
    torch.manual_seed(0)
    return ALIPModel(tiny_config)


@pytest.fixture(scope="module")
def model_and_processor():
    """A tiny ALIP model in eval mode and its processor (the CLIP BPE tokenizer)."""
    config = tiny_alip_config()
    torch.manual_seed(0)
    return ALIPModel(config).eval(), ALIPProcessor.from_config(config)


# ---- tiny training data -------------------------------------------------------------------------------------------
# The tokenizer uses CLIP's special token ids (start 49406, end 49407), so the tiny ALIP model pools at the right
# position; words map to ids below 200.

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
    """`make_rows(n, **kwargs)` as a parquet file with the data contract's image feature."""
    features = datasets.Features({
        "id": datasets.Value("string"), schema.IMAGE: schema.FEATURES[schema.IMAGE],
        "alt_text": datasets.Value("string"), "caption": datasets.Value("string"),
        "vecap": datasets.Value("string"), "category": datasets.Value("string")})
    datasets.Dataset.from_dict(make_rows(n, **kwargs), features=features).to_parquet(str(path))
    return path


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
    """The rows of a run's `metrics.jsonl`."""
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


# ---- subprocesses that must run as on a user's machine ---------------------------------------------------------------
# `pip install -e .` (as in CI) makes `modeling_alip` importable from anywhere, so a clean working directory and
# PYTHONPATH are not enough: this prelude hides the package from the import system and checks that it is hidden.

HIDE_PACKAGE = '''
import sys

class HidePackage:  # modeling_alip unimportable even where it is pip-installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "modeling_alip":
            raise ModuleNotFoundError(f"No module named {name!r}")

sys.meta_path.insert(0, HidePackage())
try:
    import modeling_alip
    raise AssertionError(f"modeling_alip is importable from {modeling_alip.__file__}")
except ModuleNotFoundError:
    pass
'''
