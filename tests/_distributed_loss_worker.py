"""Worker for tests/test_distributed_loss.py: one process of a 2-process gloo run of ALIPModel under DDP.

Run by `torch.distributed.run`; writes this rank's loss, parameter gradients (after DDP's all-reduce) and gate
running means to `<out_dir>/rank<R>.pt`.
"""

import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, sys.argv[3])  # the tests folder, for the shared batch and tiny config
from _distributed_batch import global_batch, tiny_model  # noqa: E402


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
