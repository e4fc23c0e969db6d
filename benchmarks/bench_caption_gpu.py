"""Captioning on one GPU: transformers `generate` against vLLM, for the `alip` and `veclip` presets' models.

For each preset and backend: images/s and output tokens/s on one GPU, and peak GPU memory (torch's allocator
for transformers; for vLLM, the device's used memory as NVML reports it, since vLLM reserves its KV cache up
front: `--gpu_memory_utilization` bounds it). Same images, same prompt (the preset's, through the same
`prompt_text`), greedy decoding, same `max_new_tokens`; one warm-up batch first, then `--images` images.

    python benchmarks/bench_caption_gpu.py --images 512 --batch_size 32          # needs: a CUDA GPU, the Hub

A backend that cannot load a preset's model is reported as such (vLLM has no BLIP captioning model, the `alip`
preset's `Salesforce/blip-image-captioning-large`; BLIP-2 is in vLLM).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _images(n: int, size: int):
    import numpy as np
    from PIL import Image

    return [Image.fromarray(np.random.RandomState(i).randint(0, 255, (size, size, 3), dtype=np.uint8))
            for i in range(n)]


def _gpu_used_bytes() -> int:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used
    except Exception:  # no NVML: fall back to torch's view
        import torch

        free, total = torch.cuda.mem_get_info()
        return total - free


def _run(backend: str, preset: str, images, args) -> dict:
    import torch

    from recaption.arguments import GenerationArguments
    from recaption.caption import CaptionArguments, Captioner, VllmCaptioner

    caption_args = CaptionArguments(preset=preset)
    generation = GenerationArguments(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                     dtype=args.dtype)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    if backend == "transformers":
        captioner = Captioner(caption_args.model, caption_args.prompt, generation, device="cuda",
                              dtype=getattr(torch, args.dtype))
    else:
        captioner = VllmCaptioner(caption_args.model, caption_args.prompt, generation, args.dtype)
    batches = [images[i:i + args.batch_size] for i in range(0, len(images), args.batch_size)]
    captioner(batches[0])  # warm-up (CUDA graphs, kernels)
    torch.cuda.synchronize()
    start = time.perf_counter()
    captions = []
    for batch in batches:
        captions += captioner(batch)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = captioner.output_tokens(captions)
    peak = torch.cuda.max_memory_allocated() if backend == "transformers" else _gpu_used_bytes()
    del captioner
    gc.collect()
    return {"images/s": len(images) / seconds, "output tokens/s": tokens / seconds,
            "peak GiB": peak / 2**30, "mean words": sum(len(c.split()) for c in captions) / len(captions)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--image_size", type=int, default=384)
    parser.add_argument("--batch_size", type=int, default=32, help="images per call (vLLM schedules them itself)")
    parser.add_argument("--max_new_tokens", type=int, default=40)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--presets", nargs="+", default=["alip", "veclip"])
    parser.add_argument("--backends", nargs="+", default=["transformers", "vllm"])
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench_caption_gpu.py needs a CUDA GPU")
    images = _images(args.images, args.image_size)
    print(f"GPU: {torch.cuda.get_device_name(0)}; {args.images} images of {args.image_size}px, batch "
          f"{args.batch_size}, max_new_tokens {args.max_new_tokens}, {args.dtype}\n")
    print("| preset | backend | images/s | output tokens/s | peak GiB | mean words |")
    print("|---|---|---|---|---|---|")
    for preset in args.presets:
        for backend in args.backends:
            try:
                r = _run(backend, preset, images, args)
                print(f"| {preset} | {backend} | {r['images/s']:.1f} | {r['output tokens/s']:.0f} | "
                      f"{r['peak GiB']:.1f} | {r['mean words']:.1f} |", flush=True)
            except Exception as error:  # a backend that cannot run a model is a result, not a crash of the table
                print(f"| {preset} | {backend} | - | - | - | {type(error).__name__}: {str(error)[:80]} |", flush=True)


if __name__ == "__main__":
    main()
