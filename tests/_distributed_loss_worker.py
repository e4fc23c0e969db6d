"""One process of a 2-process gloo run of ALIPModel under DDP, for tests/test_distributed_loss.py, which also
imports the fixed model and global batch from here for its single-process reference.

Run by `torch.distributed.run` with the tests folder on PYTHONPATH; writes this rank's loss, parameter gradients
(after DDP's all-reduce) and gate running means to `<out_dir>/rank<R>.pt`.
"""

import sys

import torch
import torch.distributed as dist
from conftest import tiny_alip_config
from torch.nn.parallel import DistributedDataParallel

from modeling_alip import ALIPModel

GLOBAL_BATCH = 8
EOS = 49407


def tiny_model() -> ALIPModel:
    torch.manual_seed(0)
    return ALIPModel(tiny_alip_config()).train()


def global_batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 49000, (GLOBAL_BATCH, 9), generator=generator)
    caption_input_ids = torch.randint(0, 49000, (GLOBAL_BATCH, 6), generator=generator)
    input_ids[:, -1] = caption_input_ids[:, -1] = EOS
    return {
        "input_ids": input_ids,
        "caption_input_ids": caption_input_ids,
        "pixel_values": torch.randn(GLOBAL_BATCH, 3, 30, 30, generator=generator),
    }


def main(out_dir: str, local_loss: bool):
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    model = tiny_model()
    ddp = DistributedDataParallel(model)
    batch = global_batch()
    per_rank = batch["input_ids"].shape[0] // world_size
    local = {k: v[rank * per_rank : (rank + 1) * per_rank] for k, v in batch.items()}
    output = ddp(**local, return_loss=True, local_loss=local_loss)
    output.loss.backward()
    torch.save(
        {
            "loss": output.loss.detach(),
            "grads": {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
            "buffers": {n: b for n, b in model.named_buffers() if "running_mean" in n},
        },
        f"{out_dir}/rank{rank}.pt",
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] == "local")
