"""One process of a 2-process gloo run of a sigmoid-loss ALIPModel under DDP, for
tests/test_distributed_sigmoid_loss.py, which also imports the models and global batch from here for its
single-process reference.

Run by `torch.distributed.run` with the tests folder on PYTHONPATH; for each case of `CASES` (single-path SigLIP
and ALIP's gated sigmoid loss, global and local), writes this rank's loss and parameter gradients (after DDP's
all-reduce) to `<out_dir>/rank<R>.pt`.
"""

import math
import sys

import torch
import torch.distributed as dist
from conftest import tiny_alip_config
from torch.nn.parallel import DistributedDataParallel

from modeling_alip import ALIPModel

GLOBAL_BATCH = 8
EOS = 49407
# name -> (config fields, local_loss)
CASES = {
    "siglip": (dict(adaptive_loss=False), False),
    "siglip-local": (dict(adaptive_loss=False), True),
    "alip-siglip": (dict(adaptive_loss=True), False),
}


def tiny_model(case: str) -> ALIPModel:
    torch.manual_seed(0)
    config = tiny_alip_config(loss="siglip", logit_scale_init_value=math.log(10), **CASES[case][0])
    return ALIPModel(config).train()


def global_batch(case: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 49000, (GLOBAL_BATCH, 9), generator=generator)
    caption_input_ids = torch.randint(0, 49000, (GLOBAL_BATCH, 6), generator=generator)
    input_ids[:, -1] = caption_input_ids[:, -1] = EOS
    batch = {"input_ids": input_ids, "pixel_values": torch.randn(GLOBAL_BATCH, 3, 30, 30, generator=generator)}
    if CASES[case][0]["adaptive_loss"]:
        batch["caption_input_ids"] = caption_input_ids
    return batch


def main(out_dir: str):
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    results = {}
    for case, (_, local_loss) in CASES.items():
        model = tiny_model(case)
        ddp = DistributedDataParallel(model)
        batch = global_batch(case)
        per_rank = GLOBAL_BATCH // world_size
        local = {k: v[rank * per_rank : (rank + 1) * per_rank] for k, v in batch.items()}
        output = ddp(**local, return_loss=True, local_loss=local_loss)
        output.loss.backward()
        results[case] = {"loss": output.loss.detach(),
                         "grads": {n: p.grad for n, p in model.named_parameters() if p.grad is not None}}
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
