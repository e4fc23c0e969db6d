"""Training-step cost of ALIPModel against open_clip's CLIP, same architecture and weights, fp32.

One step = forward + loss + backward + AdamW step. Rows (all on the same batch of images):

* `open_clip CLIP, text 77`: the reference, open_clip's `CLIP` + `ClipLoss`, texts padded to 77 tokens;
* `ALIP single path, text 77`: `ALIPModel` without captions (plain CLIP loss), texts padded to 77;
* the same with `attn_implementation="eager"` and without `attention_mask` (to find where time goes);
* `ALIP bi-path, 2 x 77`: raw text + caption, both padded to 77 (the official code's fixed layout);
* `ALIP bi-path, dynamic`: both texts padded to the batch's longest text (`--dynamic_length`);
* `ALIP single path, dynamic`.

The ALIP model is converted from the open_clip model (`convert_open_clip`), so both compute the same
network; the script checks that their features agree before timing. Rows are interleaved inside each
repeat so that load from other processes on a shared machine hits every row alike; the table reports
medians over repeats of CPU time and wall time, and each row's ratio to the open_clip median.

    OMP_NUM_THREADS=1 python benchmarks/bench_model.py --configs vit-b-32 small --repeats 3 --threads 1

Results: benchmarks/RESULTS_model.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import open_clip  # noqa: E402
from open_clip.loss import ClipLoss  # noqa: E402
from tqdm import tqdm  # noqa: E402

from alip_hf.convert.from_open_clip import convert_open_clip  # noqa: E402

CONFIGS = {
    # open_clip's ViT-B-32 (GELU), the ALIP paper's model.
    "vit-b-32": dict(name="ViT-B-32", batch_size=16),
    # A narrow model where per-call overheads weigh more than matrix products.
    "small": dict(
        config=dict(
            embed_dim=256,
            vision_cfg=dict(image_size=112, patch_size=16, width=256, layers=6, head_width=64),
            text_cfg=dict(context_length=77, vocab_size=49408, width=256, heads=4, layers=6),
        ),
        batch_size=32,
    ),
}
CONTEXT = 77
SOT, EOT = 49406, 49407


@dataclass
class Batch:
    pixels: torch.Tensor  # (B, 3, H, W)
    ids_77: torch.Tensor  # (B, 77) raw text, zero-padded like open_clip's tokenizer
    mask_77: torch.Tensor  # (B, 77)
    caption_77: torch.Tensor
    caption_mask_77: torch.Tensor
    ids_dyn: torch.Tensor  # (B, L) raw text padded to the batch's longest text only
    mask_dyn: torch.Tensor
    caption_dyn: torch.Tensor
    caption_mask_dyn: torch.Tensor


def texts(batch_size: int, max_length: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`(B, 77)` ids and mask: start token, words, end token; lengths uniform in [6, max_length], longest = max_length."""
    lengths = torch.randint(6, max_length + 1, (batch_size,), generator=generator)
    lengths[0] = max_length
    ids = torch.zeros(batch_size, CONTEXT, dtype=torch.long)
    mask = torch.zeros(batch_size, CONTEXT, dtype=torch.long)
    for row, length in enumerate(lengths.tolist()):
        ids[row, :length] = torch.randint(1, SOT, (length,), generator=generator)
        ids[row, 0], ids[row, length - 1] = SOT, EOT
        mask[row, :length] = 1
    return ids, mask


def make_batch(batch_size: int, image_size: int, dynamic_length: int) -> Batch:
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    ids, mask = texts(batch_size, dynamic_length, generator)
    caption, caption_mask = texts(batch_size, dynamic_length, generator)
    cut = int(max(mask.sum(1).max(), caption_mask.sum(1).max()))
    return Batch(pixels, ids, mask, caption, caption_mask, ids[:, :cut], mask[:, :cut], caption[:, :cut], caption_mask[:, :cut])


def build_models(spec: dict):
    torch.manual_seed(0)
    if "name" in spec:
        reference = open_clip.create_model(spec["name"])
        alip = convert_open_clip(reference.state_dict(), model_name=spec["name"])
    else:
        reference = open_clip.CLIP(**spec["config"])
        alip = convert_open_clip(reference.state_dict(), model_config=spec["config"])
    return reference, alip


def check_same_network(reference, alip, batch: Batch) -> float:
    """Max abs difference of image and text features (eval mode, no grad)."""
    reference.eval(), alip.eval()
    with torch.no_grad():
        image = (reference.encode_image(batch.pixels[:4]) - alip.get_image_features(pixel_values=batch.pixels[:4]).pooler_output)
        text = reference.encode_text(batch.ids_77[:4]) - alip.get_text_features(input_ids=batch.ids_77[:4]).pooler_output
    reference.train(), alip.train()
    return max(image.abs().max().item(), text.abs().max().item())


def open_clip_step(model, optimizer, loss_fn, batch: Batch):
    image, text, scale = model(batch.pixels, batch.ids_77)
    loss = loss_fn(image, text, scale)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def alip_step(model, optimizer, batch: Batch, ids, mask, caption=None, caption_mask=None, attn="sdpa"):
    if model.config._attn_implementation != attn:
        model.set_attn_implementation(attn)
    out = model(
        input_ids=ids, attention_mask=mask, pixel_values=batch.pixels,
        caption_input_ids=caption, caption_attention_mask=caption_mask, return_loss=True,
    )
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def rows(reference, alip, batch: Batch, diagnostics: bool = True) -> dict:
    """Row name -> zero-argument callable running one training step (diagnostic rows optional)."""
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-5)
    alip_opt = torch.optim.AdamW(alip.parameters(), lr=1e-5)
    loss_fn = ClipLoss()
    b = batch
    dyn = b.ids_dyn.shape[1]
    steps = {
        "open_clip CLIP, text 77": lambda: open_clip_step(reference, ref_opt, loss_fn, b),
        "ALIP single path, text 77": lambda: alip_step(alip, alip_opt, b, b.ids_77, b.mask_77),
    }
    if diagnostics:
        steps["ALIP single path, text 77, no attention_mask"] = lambda: alip_step(alip, alip_opt, b, b.ids_77, None)
        steps["ALIP single path, text 77, eager attention"] = lambda: alip_step(
            alip, alip_opt, b, b.ids_77, b.mask_77, attn="eager"
        )
    return steps | {
        "ALIP bi-path, 2 x 77": lambda: alip_step(alip, alip_opt, b, b.ids_77, b.mask_77, b.caption_77, b.caption_mask_77),
        f"ALIP bi-path, dynamic 2 x {dyn}": lambda: alip_step(alip, alip_opt, b, b.ids_dyn, b.mask_dyn, b.caption_dyn, b.caption_mask_dyn),
        f"ALIP single path, dynamic {dyn}": lambda: alip_step(alip, alip_opt, b, b.ids_dyn, b.mask_dyn),
    }


def time_rows(steps: dict, repeats: int, warmup: int, desc: str) -> dict[str, dict[str, list[float]]]:
    """Row -> {"cpu": [...], "wall": [...]} seconds per step.

    CPU time (`time.process_time`, all threads of this process) barely moves when other processes compete
    for the cores, so on a shared machine it is the steadier measure; wall time is reported next to it.
    """
    for _ in range(warmup):
        for step in steps.values():
            step()
    times = {name: {"cpu": [], "wall": []} for name in steps}
    for _ in tqdm(range(repeats), desc=desc, file=sys.stderr):
        for name, step in steps.items():  # interleaved: background load affects all rows alike
            wall, cpu = time.perf_counter(), time.process_time()
            step()
            times[name]["cpu"].append(time.process_time() - cpu)
            times[name]["wall"].append(time.perf_counter() - wall)
    return times


def table(times: dict[str, dict[str, list[float]]]) -> str:
    """Markdown table: medians (and min wall) per row, ratios of the medians to the first row's."""
    names = list(times)
    ref_cpu = statistics.median(times[names[0]]["cpu"])
    ref_wall = statistics.median(times[names[0]]["wall"])
    lines = [
        "| step | CPU s (median) | ratio (CPU) | wall s (median) | wall s (min) | ratio (wall) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        cpu, wall = statistics.median(times[name]["cpu"]), statistics.median(times[name]["wall"])
        lines.append(
            f"| {name} | {cpu:.3f} | {cpu / ref_cpu:.2f}x | {wall:.3f} | {min(times[name]['wall']):.3f} | "
            f"{wall / ref_wall:.2f}x |"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS), help="architectures to time")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per row (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per row first")
    parser.add_argument("--batch_size", type=int, help="override each config's batch size")
    parser.add_argument("--dynamic_length", type=int, default=20, help="longest text in the dynamically padded rows")
    parser.add_argument("--no_diagnostics", action="store_true", help="skip the eager / no-mask single-path rows")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    args = parser.parse_args(argv)
    if args.repeats < 1 or not 6 <= args.dynamic_length <= CONTEXT:
        parser.error("--repeats must be >= 1 and --dynamic_length in [6, 77]")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, open_clip {open_clip.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, {args.threads} torch threads, fp32, repeats {args.repeats}, warmup {args.warmup}"
    )
    for key in args.configs:
        spec = CONFIGS[key]
        batch_size = args.batch_size or spec["batch_size"]
        reference, alip = build_models(spec)
        image_size = alip.config.vision_config.image_size
        batch = make_batch(batch_size, image_size, args.dynamic_length)
        diff = check_same_network(reference, alip, batch)
        print(f"\n### {key}: batch {batch_size}, image {image_size}, activation {alip.config.text_config.hidden_act}, "
              f"feature max abs diff open_clip vs ALIP {diff:.1e}\n")
        times = time_rows(rows(reference, alip, batch, not args.no_diagnostics), args.repeats, args.warmup, key)
        print(table(times))
        del reference, alip


if __name__ == "__main__":
    main()
