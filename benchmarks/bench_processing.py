"""Cost of ALIPProcessor's text path against open_clip's tokenizer, and what dynamic padding saves.

Two tables, both on synthetic web-like texts (log-normal word count with median 10, nine words in ten from
a fixed word list and one in ten random letters, mixed case, punctuation, digits; seeded):

* Tokenisation: `open_clip` ViT-B-32 tokenizer (pure-Python BPE with ftfy cleaning, always 77 wide) against
  `ALIPProcessor(text=...)` (the same cleaning + the `tokenizers` BPE, padded to the longest row) and
  `clip_tokenizer()` alone (no ftfy cleaning), called once per batch of `--batch_size` texts as a data loader
  does. The script first checks that the processor's ids equal open_clip's on every text.
* Text tower: the text features of a CLIP ViT-B/32-sized text tower (width 512, 12 layers, 8 heads, random
  weights) on one batch of `--tower_batch_size` texts, padded to the batch's longest text vs to 77, with the
  attention mask. The script checks that both give the same features first.

Rows are interleaved inside each repeat so that load from other processes hits every row alike; tables
report medians over repeats and each row's ratio to the first row.

    OMP_NUM_THREADS=1 python benchmarks/bench_processing.py --output benchmarks/RESULTS_sharing.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import open_clip  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModelWithProjection  # noqa: E402

from modeling_alip import ALIPProcessor, clip_tokenizer  # noqa: E402

WORDS = (
    "photo image of a the and with on in at dog cat man woman child car street city beach sunset tree house "
    "red blue green white black old new small large happy running sitting standing wedding party food pizza "
    "coffee table chair window garden mountain river lake snow winter summer vintage modern design logo "
    "stock illustration vector background isolated closeup portrait view from above 2019 4k hd free best"
).split()
PUNCTUATION = ["", "", "", ",", ".", "!", " -", ":", "'s"]


def web_texts(n: int, seed: int = 0) -> list[str]:
    """`n` alt-text-like strings of 2 to 60 words."""
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(n):
        words = []
        # Log-normal word count (median 10, 90% under ~22, rare long ones), like alt text.
        for _ in range(int(np.clip(round(rng.lognormal(np.log(10), 0.6)), 2, 60))):
            # One word in ten is a random "rare" word (names, brands, typos): web text has a long tail, which
            # keeps open_clip's per-word BPE cache from covering everything after one pass.
            if rng.random() < 0.1:
                word = "".join(chr(ord("a") + c) for c in rng.integers(0, 26, int(rng.integers(3, 10))))
            else:
                word = WORDS[rng.integers(len(WORDS))]
            word = word.capitalize() if rng.random() < 0.2 else word
            words.append(word + PUNCTUATION[rng.integers(len(PUNCTUATION))])
        texts.append(" ".join(words))
    return texts


def median_seconds(fns: dict[str, callable], repeats: int, desc: str) -> dict[str, float]:
    """Median wall time of each function; rows interleaved inside each repeat."""
    times = {name: [] for name in fns}
    for _ in tqdm(range(repeats), desc=desc):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def tokenisation_table(texts: list[str], batch_size: int, repeats: int) -> list[str]:
    processor = ALIPProcessor.default()
    tokenizer = clip_tokenizer()
    reference = open_clip.get_tokenizer("ViT-B-32")
    batches = [texts[i : i + batch_size] for i in range(0, len(texts), batch_size)]
    for batch in batches:  # parity first: a faster path that gives other ids is worth nothing
        ours = processor(text=batch, padding="max_length")
        if not torch.equal(ours["input_ids"].masked_fill(ours["attention_mask"] == 0, 0), reference(batch)):
            raise AssertionError("ALIPProcessor ids differ from open_clip's")
    rows = {
        "open_clip tokenizer (77 wide)": lambda: [reference(b) for b in batches],
        "ALIPProcessor (clean + fast BPE, longest)": lambda: [processor(text=b) for b in batches],
        "clip_tokenizer alone (no ftfy, longest)": lambda: [tokenizer(b, padding="longest", truncation=True,
                                                                      return_tensors="pt") for b in batches],
    }
    seconds = median_seconds(rows, repeats, "tokenisation")
    base = seconds["open_clip tokenizer (77 wide)"]
    lengths = np.array([len(ids) for ids in tokenizer(texts, verbose=False)["input_ids"]])
    lines = [f"Tokens per text (with start/end, before truncation): median {np.median(lengths):.0f}, "
             f"90th percentile {np.percentile(lengths, 90):.0f}, max {lengths.max()}; "
             f"{(lengths > 77).mean():.1%} over 77.", "",
             "| tokeniser | median s | texts/s | time vs open_clip |", "|---|---:|---:|---:|"]
    for name, s in seconds.items():
        lines.append(f"| {name} | {s:.3f} | {len(texts) / s:,.0f} | {s / base:.2f}x |")
    return lines


def text_tower_table(texts: list[str], repeats: int) -> list[str]:
    torch.manual_seed(0)
    config = CLIPTextConfig(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                            projection_dim=512, vocab_size=49408, max_position_embeddings=77)
    model = CLIPTextModelWithProjection(config).eval()
    processor = ALIPProcessor.default()
    longest, to_77 = processor(text=texts), processor(text=texts, padding="max_length")

    def run(batch):
        with torch.no_grad():
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).text_embeds

    diff = (run(longest) - run(to_77)).abs().max().item()
    if diff > 1e-4:
        raise AssertionError(f"features differ between paddings by {diff}")
    rows = {
        "padded to 77": lambda: run(to_77),
        f"padded to longest ({longest['input_ids'].shape[1]})": lambda: run(longest),
    }
    seconds = median_seconds(rows, repeats, "text tower")
    base = seconds["padded to 77"]
    lines = [f"max abs feature difference between the two paddings: {diff:.2e}", "",
             "| batch of %d texts | median s | time vs 77 |" % len(texts), "|---|---:|---:|"]
    for name, s in seconds.items():
        lines.append(f"| {name} | {s:.3f} | {s / base:.2f}x |")
    return lines


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_texts", type=int, default=2048, help="texts tokenised per repeat")
    parser.add_argument("--batch_size", type=int, default=64, help="texts per tokeniser call")
    parser.add_argument("--tower_batch_size", type=int, default=16, help="texts in the timed text-tower batch")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (the median is reported)")
    parser.add_argument("--output", type=Path, default=None, help="also write the tables to this markdown file")
    args = parser.parse_args(argv)

    texts = web_texts(args.num_texts)
    lines = [
        "## ALIPProcessor text path",
        "",
        f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; {args.num_texts} synthetic web texts, "
        f"batches of {args.batch_size}, median of {args.repeats} repeats.",
        "",
        *tokenisation_table(texts, args.batch_size, args.repeats),
        "",
        "## Text tower: dynamic padding vs 77 (CLIP ViT-B/32 text tower, random weights)",
        "",
        *text_tower_table(texts[: args.tower_batch_size], args.repeats),
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.output is not None:
        command = "OMP_NUM_THREADS=%s python benchmarks/bench_processing.py %s" % (
            os.environ.get("OMP_NUM_THREADS", "unset"), " ".join(argv if argv is not None else sys.argv[1:]))
        text = f"# Benchmarks: processor and sharing\n\nProduced by:\n\n    {command}\n\n{report}"
        fd, tmp = tempfile.mkstemp(dir=args.output.parent, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, args.output)


if __name__ == "__main__":
    main()
