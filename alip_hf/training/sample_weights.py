"""`train.py --log_sample_weights`: the gate values of every sample a run trained on, as a dataset joined on id.

Each process keeps the rows of its own samples (their ids come through the collator) and writes
`<output_dir>/sample_weights/train-<rank>-of-<world>.parquet` at the end of the run: columns `id`, `step`, `epoch`
and the recipe's per-sample values (`alip_hf.schema.GATE_COLUMNS` for ALIP). `python -m recaption.audit
--sample_weights <output_dir>/sample_weights --source <train data>` filters and reports on them like on an audit.

Which steps are recorded: by default every sample seen in the last epoch (map-style data: the micro-batches of
the final epoch, so each sample once); with `--log_sample_weights_steps N`, every N-th optimizer step (also for
streaming data). These are the values the loss used: the running means were updated with the batch first, so a
sample's values depend on its batch (`recaption.audit` computes batch-independent ones in eval mode). A resumed
run records only the steps it ran itself.
"""

from __future__ import annotations

import os
from pathlib import Path

SAMPLE_WEIGHTS_DIR = "sample_weights"


class SampleWeightLog:
    """Collects per-sample values of the steps it wants; `record` is called once per optimizer step.

    Args:
        recipe: provides `sample_values(output)`.
        output_dir: the run's output directory.
        max_steps: optimizer steps of the run.
        accumulation: micro-batches per optimizer step (`k`).
        batches_per_epoch: micro-batches per epoch (map-style), `None` for a stream.
        every_steps: record every N-th step instead of the last epoch (0: the last epoch).
        rank, world_size: this process and the number of processes.
    """

    def __init__(self, recipe, output_dir: str, max_steps: int, accumulation: int, batches_per_epoch: int | None,
                 every_steps: int = 0, rank: int = 0, world_size: int = 1):
        if every_steps == 0 and batches_per_epoch is None:
            raise ValueError("--log_sample_weights on streaming data needs --log_sample_weights_steps N "
                             "(a stream has no last epoch)")
        self.recipe, self.k, self.every = recipe, accumulation, every_steps
        self.batches_per_epoch = batches_per_epoch
        self.rank, self.world_size = rank, world_size
        self.path = Path(output_dir) / SAMPLE_WEIGHTS_DIR / f"train-{rank:05d}-of-{world_size:05d}.parquet"
        self.last_epoch = None if batches_per_epoch is None else (max_steps * accumulation - 1) // batches_per_epoch
        self.rows: dict[str, list] = {}

    def _epoch(self, step: int, micro: int) -> int:
        return -1 if self.batches_per_epoch is None else ((step - 1) * self.k + micro) // self.batches_per_epoch

    def wants(self, step: int, micro: int) -> bool:
        if self.every:
            return step % self.every == 0
        return self._epoch(step, micro) == self.last_epoch

    def record(self, step: int, output, micro_batches: list[dict]) -> None:
        """Keeps this process's rows of the step's global batch (rank-ordered: the local micro-batches, in order,
        are rows `[rank * n, (rank + 1) * n)` of the gathered batch)."""
        if not any(self.wants(step, j) for j in range(len(micro_batches))):
            return
        values = self.recipe.sample_values(output)
        if values is None:
            return
        sizes = [len(mb["ids"]) for mb in micro_batches]
        start = self.rank * sum(sizes)
        local = {name: tensor[start : start + sum(sizes)].detach().double().cpu().tolist()
                 for name, tensor in values.items()}
        offset = 0
        for j, (micro_batch, size) in enumerate(zip(micro_batches, sizes)):
            if self.wants(step, j):
                self._append("id", micro_batch["ids"])
                self._append("step", [step] * size)
                self._append("epoch", [self._epoch(step, j)] * size)
                for name, column in local.items():
                    self._append(name, column[offset : offset + size])
            offset += size

    def _append(self, column: str, values: list) -> None:
        self.rows.setdefault(column, []).extend(values)

    def save(self) -> Path | None:
        """Writes this process's rows (atomically); returns the file, or None when nothing was recorded."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from alip_hf.io import write_with_atomically

        if not self.rows:
            return None
        table = pa.table(self.rows)
        write_with_atomically(self.path, lambda tmp: pq.write_table(table, tmp))
        return self.path


def clear_sample_weights(output_dir: str) -> None:
    """Removes an earlier run's files (another number of processes would leave files of other names)."""
    directory = Path(output_dir) / SAMPLE_WEIGHTS_DIR
    if directory.is_dir():
        for item in directory.glob("*.parquet"):
            os.remove(item)


__all__ = ["SAMPLE_WEIGHTS_DIR", "SampleWeightLog", "clear_sample_weights"]
