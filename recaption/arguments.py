"""The command-line arguments every recaption step shares: where rows come from and go, and how text is generated."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from alip_hf import sources  # the data contract; imports only the standard library up front
from alip_hf.schema import ID, IMAGE
from recaption.workers import scheduler_task



@dataclass
class RunArguments:
    """Where the rows come from, where they go, and how the work is split."""

    source: str = field(
        metadata={"help": "Hub id, save_to_disk dir, Parquet/JSON/CSV file or glob, WebDataset shards, or 'demo' "
                          "(the bundled demo data)."}
    )
    output_dir: str = field(metadata={"help": "Where the Parquet shards, markers and summary are written."})
    split: str = field(default="train", metadata={"help": "Split of the source to read."})
    streaming: bool = field(default=False, metadata={"help": "Read the source lazily (large Hub datasets)."})
    id_column: str = field(default=ID, metadata={
        "help": "Stable key column; if absent, img2dataset's `json.id`, else WebDataset's `__key__`."})
    image_column: str = field(default=IMAGE, metadata={"help": "Image column of the source."})
    shard_size: int = field(
        default=1000, metadata={"help": "Rows per output shard (the unit of resume and of work split)."}
    )
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Delete earlier results instead of resuming."})
    num_tasks: int | None = field(
        default=None, metadata={"help": "Independent scheduler tasks sharing the work (no process group); default: "
                                        "SLURM_ARRAY_TASK_COUNT in a Slurm job array, else 1."})
    task_index: int | None = field(
        default=None, metadata={"help": "This task's index in [0, --num_tasks); default: SLURM_ARRAY_TASK_ID minus "
                                        "SLURM_ARRAY_TASK_MIN in a Slurm job array, else 0."})
    engine: str = field(
        default="accelerate",
        metadata={"help": "accelerate: this process (or `accelerate launch`'s processes, or scheduler tasks) runs the "
                          "model; ray: a Ray actor pool does, one replica per GPU or per --cpus_per_replica CPUs "
                          "(pip install alip-hf[ray]).", "choices": ["accelerate", "ray"]})
    ray_address: str | None = field(
        default=None, metadata={"help": "--engine ray: the cluster to join (`auto`, `ray://host:10001`); default: "
                                        "a local one started by ray.init()."})
    num_replicas: int | None = field(
        default=None, metadata={"help": "--engine ray: model replicas (default: one per GPU of the cluster, else one "
                                        "per --cpus_per_replica CPUs)."})
    cpus_per_replica: float = field(default=1.0, metadata={"help": "--engine ray: CPUs each replica reserves."})
    gpus_per_replica: float | None = field(
        default=None, metadata={"help": "--engine ray: GPUs each replica reserves (default: 1 when the cluster has "
                                        "GPUs, else 0)."})

    def __post_init__(self):
        if self.engine not in ("accelerate", "ray"):
            raise ValueError(f"--engine {self.engine!r}: choose accelerate or ray")
        if self.engine != "ray" and (self.ray_address or self.num_replicas is not None
                                     or self.gpus_per_replica is not None):
            raise ValueError("--ray_address, --num_replicas and --gpus_per_replica need --engine ray")
        if self.num_replicas is not None and self.num_replicas < 1 or self.cpus_per_replica <= 0:
            raise ValueError(f"--num_replicas must be >= 1 and --cpus_per_replica > 0, got {self.num_replicas}, "
                             f"{self.cpus_per_replica}")
        if self.shard_size < 1:
            raise ValueError(f"--shard_size must be >= 1, got {self.shard_size}")
        self.task_index, self.num_tasks = scheduler_task(self.num_tasks, self.task_index)
        if self.num_tasks > 1 and self.engine == "ray":
            raise ValueError(f"--engine ray runs as one driver, not as {self.num_tasks} scheduler tasks: its actor "
                             "pool spreads the shards; drop --num_tasks (or SLURM_ARRAY_TASK_*), or the Ray engine")
        if self.num_tasks > 1 and self.overwrite_output_dir:
            raise ValueError(f"--overwrite_output_dir with {self.num_tasks} scheduler tasks would let each task "
                             "delete the shards the others wrote; empty --output_dir once before launching them")
        overlap = output_overlaps_source(self.output_dir, self.source)
        if overlap:
            # Checked before anything is written: --overwrite_output_dir would delete the source.
            raise ValueError(f"--output_dir {self.output_dir} {overlap} --source {self.source}; "
                             "write the results to a directory apart from the source")


def _inside(path: str, directory: str) -> bool:
    """Whether `path` is `directory` or lies under it (both already real paths)."""
    return os.path.commonpath([path, directory]) == directory


def output_overlaps_source(output_dir: str, source: str) -> str | None:
    """How `output_dir` overlaps the local source (`"is"`, `"contains"`, `"lies inside"`), or None."""
    files = sources.local_files(source)
    if files is None:
        return None  # a Hub id
    out = os.path.realpath(output_dir)
    if os.path.isdir(source):
        root = os.path.realpath(source)
        if out == root:
            return "is"
        if _inside(root, out):
            return "contains"
        if _inside(out, root):
            return "lies inside"
    for path in files:
        path = os.path.realpath(path)
        if path == out:
            return "is"
        if _inside(path, out):
            return "contains"
    return None


@dataclass
class GenerationArguments:
    """How text is generated; stored with the run as provenance."""

    batch_size: int = field(default=16, metadata={"help": "Rows per generate() call."})
    max_new_tokens: int | None = field(default=None, metadata={"help": "Cap on generated tokens (default: per step)."})
    num_beams: int = field(default=1, metadata={"help": "1 = greedy decoding, >1 = beam search."})
    dtype: str = field(
        default="auto",
        metadata={"help": "auto (bf16 on a GPU that has it, else fp32), float32, bfloat16 or float16.",
                  "choices": ["auto", "float32", "bfloat16", "float16"]},
    )

    def __post_init__(self):
        if self.batch_size < 1 or self.num_beams < 1:
            raise ValueError(f"--batch_size and --num_beams must be >= 1, got {self.batch_size}, {self.num_beams}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"--max_new_tokens must be >= 1, got {self.max_new_tokens}")


def torch_dtype(name: str, device):
    """`--dtype` -> torch dtype; `auto` is bf16 on a GPU that supports it (fp16 on older ones), else fp32."""
    import torch

    if name != "auto":
        return getattr(torch, name)
    if getattr(device, "type", str(device)) == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32
