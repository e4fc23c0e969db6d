"""Evaluate a CLIP-style model: `python eval.py --model DIR --preset demo [...]`.

A thin entry point: the arguments and `main(argv)` are `alip_hf.eval`, also reachable from an installed wheel
as `python -m alip_hf.eval`, `accelerate launch -m alip_hf.eval` and the `alip-eval` command.
"""

from alip_hf.eval import main

if __name__ == "__main__":
    main()
