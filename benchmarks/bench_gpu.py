"""Training-step throughput and peak memory of ALIP, CLIP (this package) and open_clip, on a GPU or the CPU.

One optimizer step = forward, loss, backward, fused AdamW (train.py's `forward_backward` + `build_optimizer` for
ours; open_clip's model + `ClipLoss` + the same AdamW for open_clip), on synthetic inputs: images of the model's
size, web-length texts (`--text_tokens`, padded to the longest as train.py's collator does) for ours, texts
padded to 77 for open_clip (its tokenizer's fixed length). Same architecture (`--config`; open_clip gets the
equivalent model config, quick GELU as transformers' CLIP), same batch, same precision (autocast).

Reported: samples/s = batch / median step time over `--steps` after `--warmup` steps, and peak memory
(`torch.cuda.max_memory_allocated` on CUDA; growth of the process's peak RSS on CPU, which only grows, so the
models run in the order given and each row is the growth during its own steps). Rows are interleaved per step
round, so a GPU's clocks or a shared CPU's load affect all three alike.

    python benchmarks/bench_gpu.py --device cuda --precision bf16 --config vit-b-32 --batch 256
    OMP_NUM_THREADS=1 python benchmarks/bench_gpu.py --device cpu --precision fp32 --config tiny --batch 8 --steps 3
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def open_clip_config(config: dict) -> dict:
    """open_clip's model config for one of `alip_hf.model_sizes.MODEL_CONFIGS` (same widths, depths, heads, MLP)."""
    vision, text = config["vision_config"], config["text_config"]
    return {
        "embed_dim": config["projection_dim"],
        "quick_gelu": True,
        "vision_cfg": {"image_size": vision["image_size"], "layers": vision["num_hidden_layers"],
                       "width": vision["hidden_size"], "patch_size": vision["patch_size"],
                       "head_width": vision["hidden_size"] // vision["num_attention_heads"],
                       "mlp_ratio": vision["intermediate_size"] / vision["hidden_size"]},
        "text_cfg": {"context_length": text["max_position_embeddings"], "vocab_size": text["vocab_size"],
                     "width": text["hidden_size"], "heads": text["num_attention_heads"],
                     "layers": text["num_hidden_layers"], "mlp_ratio": text["intermediate_size"] / text["hidden_size"]},
    }


def _texts(batch: int, length: int, generator, device):
    import torch

    ids = torch.randint(1, 49000, (batch, length), generator=generator)
    ids[:, 0], ids[:, -1] = 49406, 49407  # start and end tokens: CLIP pools at the end token
    return ids.to(device), torch.ones_like(ids).to(device)


class OursStep:
    """One train.py step of recipe `recipe` (clip: one text path; alip: text + caption paths, gates)."""

    def __init__(self, recipe: str, config_name: str, args, accelerator):
        import torch

        from alip_hf import recipes
        from alip_hf.models import build_model, core_model
        from alip_hf.training.arguments import ModelArguments, TrainArguments
        from alip_hf.training.optim import build_optimizer

        torch.manual_seed(0)
        self.recipe = recipes.get_recipe(recipes.RecipeArguments(recipe=recipe))
        model = build_model(ModelArguments(model_config=config_name), seed=0)
        optimizer, _ = build_optimizer(model, TrainArguments(output_dir="/tmp/unused", max_steps=10), 10)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.core, self.accelerator = core_model(self.model, accelerator), accelerator
        size = self.core.config.vision_config.image_size
        g = torch.Generator().manual_seed(0)
        self.batch = {"pixel_values": torch.randn(args.batch, 3, size, size, generator=g).to(accelerator.device)}
        self.batch["input_ids"], self.batch["attention_mask"] = _texts(args.batch, args.text_tokens, g, accelerator.device)
        if "caption" in self.recipe.EMBEDDINGS:
            ids, mask = _texts(args.batch, args.caption_tokens, g, accelerator.device)
            self.batch["caption_input_ids"], self.batch["caption_attention_mask"] = ids, mask
        self.batch["stats"] = {}

    def __call__(self):
        from alip_hf.training.loop import apply_update, forward_backward

        output = forward_backward(self.model, self.core, self.recipe, [self.batch], self.accelerator, False)
        apply_update(self.model, self.core, self.optimizer, self.accelerator, 1.0)
        return output.loss


class OpenClipStep:
    """One open_clip step: its model, `ClipLoss`, the same fused AdamW, texts padded to 77."""

    def __init__(self, config_name: str, args, accelerator):
        import tempfile

        import open_clip
        import torch
        from open_clip.loss import ClipLoss

        from alip_hf.model_sizes import MODEL_CONFIGS
        from alip_hf.training.optim import adamw_implementation

        directory = Path(tempfile.mkdtemp(prefix="open-clip-config-"))
        (directory / f"bench-{config_name}.json").write_text(json.dumps(open_clip_config(MODEL_CONFIGS[config_name])))
        open_clip.add_model_config(directory)
        torch.manual_seed(0)
        model = open_clip.create_model(f"bench-{config_name}")
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.2, **adamw_implementation(params))
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.accelerator, self.loss = accelerator, ClipLoss()
        size = MODEL_CONFIGS[config_name]["vision_config"]["image_size"]
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(args.batch, 3, size, size, generator=g).to(accelerator.device)
        ids, _ = _texts(args.batch, args.text_tokens, g, accelerator.device)
        self.texts = torch.zeros(args.batch, 77, dtype=torch.long, device=accelerator.device)
        self.texts[:, : ids.shape[1]] = ids

    def __call__(self):
        with self.accelerator.autocast():
            image, text, scale = self.model(self.images, self.texts)[:3]
            loss = self.loss(image, text, scale)
        self.accelerator.backward(loss)
        self.accelerator.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--config", default="vit-b-32", help="A name of alip_hf.model_sizes.MODEL_CONFIGS.")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--text_tokens", type=int, default=20, help="Web alt-text length in tokens.")
    parser.add_argument("--caption_tokens", type=int, default=30, help="Synthetic caption length in tokens (ALIP).")
    parser.add_argument("--models", nargs="+", default=["alip", "clip", "open_clip"])
    args = parser.parse_args(argv)

    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here; use --device cpu")
    AcceleratorState._reset_state(reset_partial_state=False)
    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[args.precision]
    accelerator = Accelerator(mixed_precision=mixed, cpu=args.device == "cpu")
    device = accelerator.device

    steps, times, peaks = {}, {m: [] for m in args.models}, {}
    for name in args.models:  # built one after the other so that each peak is its own
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        before = _peak_bytes(device) if device.type == "cpu" else 0
        steps[name] = OpenClipStep(args.config, args, accelerator) if name == "open_clip" else OursStep(
            name, args.config, args, accelerator)
        for _ in range(args.warmup):
            steps[name]()
        _sync(device)
        peaks[name] = _peak_bytes(device) - before
        if device.type == "cuda":  # the model's own steady-state peak, without the others resident
            del steps[name]
            torch.cuda.empty_cache()
            steps[name] = None
    for name in args.models:  # rebuilt for the timed rounds (on CPU they stayed resident)
        if steps[name] is None:
            steps[name] = OpenClipStep(args.config, args, accelerator) if name == "open_clip" else OursStep(
                name, args.config, args, accelerator)
            steps[name]()
    for _ in range(args.steps):
        for name in args.models:
            _sync(device)
            started = time.perf_counter()
            loss = steps[name]()
            _sync(device)
            times[name].append(time.perf_counter() - started)
            if not torch.isfinite(loss.detach()).item():
                raise FloatingPointError(f"{name}: non-finite loss")

    reference = statistics.median(times["open_clip"]) if "open_clip" in times else None
    label = {"alip": "ALIP (text + caption paths)", "clip": "CLIP (this package)", "open_clip": "open_clip CLIP"}
    print(f"{args.config}, batch {args.batch}, {args.precision}, {device}, text {args.text_tokens} tokens "
          f"(open_clip: 77), caption {args.caption_tokens}; median of {args.steps} steps after {args.warmup}")
    print("| model | samples/s | time per sample vs open_clip | peak memory MiB |")
    print("|---|---:|---:|---:|")
    rows = []
    for name in args.models:
        step = statistics.median(times[name])
        ratio = step / reference if reference else float("nan")
        rows.append({"model": name, "samples_per_second": args.batch / step, "time_ratio": ratio,
                     "peak_mib": peaks[name] / 2**20})
        print(f"| {label.get(name, name)} | {args.batch / step:.1f} | {ratio:.2f}x | {peaks[name] / 2**20:.0f} |")
    return rows


if __name__ == "__main__":
    main()
