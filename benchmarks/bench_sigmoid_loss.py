"""The sigmoid-loss (SigLIP) training step against open_clip's `SigLipLoss`, same architecture, weights and batch, fp32.

Two tables:

* loss only: forward + backward of the loss on `(B, D)` L2-normalised embeddings (temperature 10, bias -10),
  open_clip's `SigLipLoss` against `modeling_alip.loss.single_path_loss(loss="siglip")` (the function both
  `ALIPModel.forward` and the recipes call), and ALIP's gated sigmoid loss of one path for scale;
* training step: forward + loss + backward + AdamW step of open_clip's `CLIP(init_logit_bias=-10)` with
  `SigLipLoss`, against the same network converted to `ALIPModel` (`config.loss="siglip"`) with
  `forward(return_loss=True)`, texts padded to 77.

The two losses are checked to agree (value) before timing. Rows are interleaved within each repeat, so load
from other processes hits every row alike; medians of CPU time, and each row's ratio to open_clip's.

    OMP_NUM_THREADS=1 python benchmarks/bench_sigmoid_loss.py --threads 1

Results: BENCHMARKS.md ("Sigmoid loss vs open_clip").
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import open_clip  # noqa: E402
from bench_model import CONFIGS, check_same_network, make_batch, table, time_rows  # noqa: E402
from open_clip.loss import SigLipLoss  # noqa: E402

from alip_hf.convert.from_open_clip import convert_open_clip  # noqa: E402
from modeling_alip.gates import ALIPGates  # noqa: E402
from modeling_alip.loss import adaptive_loss, single_path_loss  # noqa: E402


def loss_rows(batch_size: int, dim: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    image, text, caption = (F.normalize(torch.randn(batch_size, dim, generator=generator), dim=-1) for _ in range(3))
    scale, bias = torch.tensor(10.0).log().requires_grad_(), torch.tensor(-10.0).requires_grad_()
    reference = SigLipLoss()
    gates = ALIPGates().train()

    def run(compute):
        def step():
            leaves = [image.clone().requires_grad_(), text.clone().requires_grad_(), caption.clone().requires_grad_()]
            compute(*leaves).backward()
        return step

    ours = single_path_loss(image, text, scale, bias, "siglip").loss
    theirs = reference(image, text, scale.exp(), bias)
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-5), (ours, theirs)
    return {
        "open_clip SigLipLoss": run(lambda i, t, c: reference(i, t, scale.exp(), bias)),
        "single_path_loss(loss='siglip')": run(lambda i, t, c: single_path_loss(i, t, scale, bias, "siglip").loss),
        "adaptive_loss(loss='siglip'), 2 paths": run(
            lambda i, t, c: adaptive_loss(i, t, c, scale, gates, bias, "siglip").loss),
    }


def step_rows(spec: dict, batch_size: int):
    torch.manual_seed(0)
    reference = open_clip.CLIP(**spec["config"], init_logit_scale=torch.tensor(10.0).log().item(), init_logit_bias=-10)
    alip = convert_open_clip(reference.state_dict(), model_config=spec["config"])
    alip.config.adaptive_loss = False  # SigLIP: one (image, text) path
    assert alip.config.loss == "siglip" and alip.logit_bias.item() == -10.0
    batch = make_batch(batch_size, alip.config.vision_config.image_size, 20)
    diff = check_same_network(reference, alip, batch)
    ref_opt, alip_opt = (torch.optim.AdamW(m.parameters(), lr=1e-5) for m in (reference, alip))
    loss_fn = SigLipLoss()

    def open_clip_step():
        image, text, scale, bias = reference(batch.pixels, batch.ids_77)
        loss_fn(image, text, scale, bias).backward()
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)

    def alip_step():
        alip(input_ids=batch.ids_77, attention_mask=batch.mask_77, pixel_values=batch.pixels,
             return_loss=True).loss.backward()
        alip_opt.step()
        alip_opt.zero_grad(set_to_none=True)

    return {"open_clip CLIP + SigLipLoss, text 77": open_clip_step,
            "ALIPModel loss=siglip, text 77": alip_step}, diff


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loss_batch_sizes", type=int, nargs="+", default=[256, 1024], help="loss-only batch sizes")
    parser.add_argument("--dim", type=int, default=512, help="embedding size of the loss-only rows (ViT-B's 512)")
    parser.add_argument("--loss_repeats", type=int, default=30, help="timed loss steps per row")
    parser.add_argument("--step_config", choices=["small"], default="small", help="architecture of the step rows")
    parser.add_argument("--step_batch_size", type=int, default=32, help="batch of the training-step rows")
    parser.add_argument("--step_repeats", type=int, default=7, help="timed training steps per row")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, open_clip {open_clip.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, {args.threads} torch threads, fp32")
    for batch_size in args.loss_batch_sizes:
        print(f"\n### loss only (forward + backward): batch {batch_size}, dim {args.dim}, "
              f"repeats {args.loss_repeats}\n")
        print(table(time_rows(loss_rows(batch_size, args.dim), args.loss_repeats, 3, f"loss {batch_size}")))
    steps, diff = step_rows(CONFIGS[args.step_config], args.step_batch_size)
    print(f"\n### training step: {args.step_config}, batch {args.step_batch_size}, repeats {args.step_repeats}, "
          f"feature max abs diff open_clip vs ALIP {diff:.1e}\n")
    print(table(time_rows(steps, args.step_repeats, 1, "step")))


if __name__ == "__main__":
    main()
