"""Train a CLIP, ALIP or VeCLIP model with Accelerate: `python train.py [config.yaml] [--flag value ...]`.

With no arguments it trains a small ALIP model on the bundled demo data on CPU in a few minutes and evaluates
it. `main(argv)` reads as the list of steps: parse -> model + processor -> data -> optimizer + schedule ->
`accelerator.prepare` -> resume -> loop -> save. Method-specific behaviour lives in `recipes.py`.

Differences from the official ALIP training script (github.com/deepglint/ALIP, train.py), each named where it
happens: gradient accumulation caches embeddings and recomputes them (the official script sums per-micro-batch
losses, each with its own negatives and its own gate update); gathering keeps gradients (see
`modeling_alip.loss.gather_features`); the schedule is linear warm-up + cosine (the official one is
`OneCycleLR(pct_start=0.1)`); gate running means are saved and restored with the checkpoint.
"""

import logging
import sys

from alip_hf.training.arguments import parse_args


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Parses the flags (or a run YAML), trains, evaluates and saves; returns the metrics of the last step."""
    groups = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # torch, accelerate and transformers' models are imported only after parsing: `--help` answers at once.
    from alip_hf.training.trainer import run_training

    return run_training(*groups)



def cli() -> None:
    """The `alip-train` command (console scripts exit with the return value, so `main`'s is not returned)."""
    main(sys.argv[1:])


if __name__ == "__main__":
    cli()
