"""alip-hf: train CLIP models on noisy web data with synthetic captions (ALIP, VeCLIP, CLIP).

The library behind the entry points `train.py` / `python -m alip_hf.train` and `eval.py` / `python -m
alip_hf.eval`. Modules, bottom up (each imports only those above it):

- `io`: atomic writes of files and directories;
- `schema`: the data contract shared with `recaption/`; `resources`: the packaged files;
- `data`: loading sources, validation, transforms, collation; `recipes`: clip / alip / veclip;
- `models`: named model sizes and the model and processor builders;
- `evaluation/`: presets, loading, features, metrics, runners, reports;
- `training/`: arguments, data, optimizer, loop, checkpoints, tracking, outputs, and the run (`trainer`).

The model itself is `modeling_alip` (Hub remote code) and the caption producers are `recaption`.
"""

__version__ = "0.2.0"
