"""Train a CLIP, ALIP or VeCLIP model: `accelerate launch train.py [RUN.yaml] [--flag value ...]`.

A thin entry point: the arguments and `main(argv)` are `alip_hf.train`, also reachable from an installed wheel
as `python -m alip_hf.train`, `accelerate launch -m alip_hf.train` and the `alip-train` command.
"""

from alip_hf.train import main

if __name__ == "__main__":
    main()
