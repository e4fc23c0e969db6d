"""The text tower on long captions: dynamic padding (each batch padded to its longest caption) against padding
every caption to the 248 positions of a Long-CLIP-stretched model.

Captions: long captions built from the bundled demo data's VeCap captions, joined into paragraphs whose word
count is log-normal with median `--median_words` (seeded), as LLaVA-style and VeCap recaptions of web images
run to 60-250 tokens; every caption is cut at 248 tokens keeping its end token (`ALIPProcessor`). Model: a CLIP
ViT-B/32-sized text tower (width 512, 12 layers, 8 heads, random weights) whose 77 positions are stretched to 248
by `ALIPModel.stretch_text_positions`. A third row batches the same captions in length order (what a sampler
grouping similar lengths would give). Each of `--batches` batches of `--batch_size` captions runs both ways per
repeat (interleaved, so load from other processes hits both alike); the table gives medians over repeats of the
summed batch time, as CPU time of this process (one thread: the work done, not the share of a busy machine it
got) and as wall time. The script first checks that both paddings give the same features.

    OMP_NUM_THREADS=1 python benchmarks/bench_long_text.py --output benchmarks/RESULTS_long_text.md
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

from alip_hf.models import MODEL_CONFIGS  # noqa: E402
from modeling_alip import ALIPConfig, ALIPModel, ALIPProcessor  # noqa: E402

LONG = 248


def long_captions(n: int, median_words: int, seed: int = 0) -> list[str]:
    """`n` paragraphs of the demo data's VeCap captions, log-normal word counts around `median_words`."""
    import pandas as pd

    from alip_hf.resources import DEMO_DATA

    frame = pd.read_parquet(DEMO_DATA / "train-00000-of-00001.parquet", columns=["vecap"])
    sentences = [s.strip().rstrip(".") + "." for s in frame["vecap"] if s and s.strip()]
    rng = np.random.default_rng(seed)
    captions = []
    for words in rng.lognormal(np.log(median_words), 0.5, n).astype(int).clip(8, 400):
        parts, count = [], 0
        while count < words:
            sentence = sentences[rng.integers(len(sentences))]
            parts.append(sentence)
            count += len(sentence.split())
        captions.append(" ".join(parts))
    return captions


def tower(seed: int = 0) -> tuple[ALIPModel, ALIPProcessor]:
    config = ALIPConfig(**MODEL_CONFIGS["vit-b-32"])
    torch.manual_seed(seed)
    model = ALIPModel(config).eval()
    model.stretch_text_positions(LONG)
    return model, ALIPProcessor.from_config(model.config)


def encode(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model.get_text_features(input_ids=batch["input_ids"],
                                       attention_mask=batch["attention_mask"]).pooler_output


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=2, help="batches of captions per repeat")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--median_words", type=int, default=60, help="median words per caption")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=None, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    model, processor = tower()
    captions = long_captions(args.batches * args.batch_size, args.median_words)
    chunks = [captions[i : i + args.batch_size] for i in range(0, len(captions), args.batch_size)]
    dynamic = [processor(text=chunk) for chunk in chunks]
    # What a sampler grouping captions of similar length gives: the same captions, batched in length order.
    by_length = sorted(captions, key=lambda c: len(processor.tokenizer(processor.clean_text(c), verbose=False)["input_ids"]))
    grouped = [processor(text=by_length[i : i + args.batch_size]) for i in range(0, len(by_length), args.batch_size)]
    padded = [processor(text=chunk, padding="max_length", max_length=LONG) for chunk in chunks]
    tokens = torch.cat([b["attention_mask"].sum(dim=1) for b in dynamic]).float()
    worst = max((encode(model, d) - encode(model, p)).abs().max().item() for d, p in zip(dynamic[:1], padded[:1]))
    assert worst < 1e-4, f"dynamic and fixed padding disagree by {worst}"

    rows = {"padded to 248": padded, "dynamic (longest in batch)": dynamic,
            "dynamic, batches grouped by length": grouped}
    cpu, wall = ({name: [] for name in rows} for _ in range(2))
    for _ in range(args.repeats):
        for name, batches in rows.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            for batch in batches:
                encode(model, batch)
            cpu[name].append(time.process_time() - start_cpu)
            wall[name].append(time.perf_counter() - start)
    seconds = {name: statistics.median(values) for name, values in cpu.items()}
    wall_seconds = {name: statistics.median(values) for name, values in wall.items()}
    width = {name: statistics.mean(b["input_ids"].shape[1] for b in batches) for name, batches in rows.items()}
    reference = seconds["padded to 248"]
    n = len(captions)
    lines = [
        f"## Text tower on long captions: dynamic padding vs 248 (CLIP ViT-B/32 text tower stretched to 248, "
        f"random weights, {n} captions in batches of {args.batch_size})",
        "",
        f"Captions: median {statistics.median(tokens.tolist()):.0f} tokens (p10 {np.percentile(tokens, 10):.0f}, "
        f"p90 {np.percentile(tokens, 90):.0f}, max {tokens.max():.0f}); features of the two paddings equal within "
        f"{worst:.1e}.",
        "",
        "| padding | mean batch width | captions per CPU second | CPU time vs padding to 248 | wall time vs 248 |",
        "|---|---:|---:|---:|---:|",
        *(f"| {name} | {width[name]:.0f} | {n / s:,.1f} | {s / reference:.2f}x | "
          f"{wall_seconds[name] / wall_seconds['padded to 248']:.2f}x |" for name, s in seconds.items()),
        "",
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), median of {args.repeats} repeats.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output is not None:
        fd, tmp = tempfile.mkstemp(dir=args.output.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, args.output)


if __name__ == "__main__":
    main()
