"""The training data of a run: load, check columns, validate rows, and the per-process DataLoader."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from torchdata.stateful_dataloader import StatefulDataLoader

from alip_hf import data, recipes, sources
from alip_hf.training.preemption import ignore_stop_signals

if TYPE_CHECKING:
    from alip_hf.training.arguments import DataArguments, TrainArguments

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class TrainData:
    loader: torch.utils.data.DataLoader
    max_steps: int  # optimizer steps of the run
    num_rows: int | None  # usable rows (map-style), None when streaming
    skipped: dict[str, int]  # rows dropped by validation before training (map-style)

    @property
    def stateful(self) -> bool:
        """Whether the loader's position is saved with checkpoints (streaming); map-style data restarts from the
        step number alone (`GlobalBatchSampler(start=...)`)."""
        return isinstance(self.loader, StatefulDataLoader)


def build_train_data(args: DataArguments, train: TrainArguments, recipe: recipes.Recipe, processor,
                     accelerator: Accelerator, start_step: int, cache_dir: str | None = None,
                     data_state: dict | None = None) -> TrainData:
    """Loads, checks columns, validates rows, and builds the per-process DataLoader of micro-batches that
    starts at optimizer step `start_step`: map-style data from the step number, a stream from `data_state`
    (this process's `StatefulDataLoader.state_dict()` saved with the checkpoint). `cache_dir`: `--cache_dir`,
    where Hub data is cached. With `--log_sample_weights` the batches carry their rows' ids."""
    check_global_batch(train, accelerator.num_processes)
    source = f"--train_data {args.train_data} (split {args.train_split!r})"
    dataset = sources.load_source(args.train_data, split=args.train_split, streaming=args.streaming,
                               config_name=args.dataset_config_name, cache_dir=cache_dir)
    if args.max_train_samples is not None:  # the first N rows, before validation (as run_clip.py)
        dataset = (dataset.take(args.max_train_samples) if args.streaming
                   else dataset.select(range(min(args.max_train_samples, len(dataset)))))
    sources.require_columns(dataset, {data.IMAGE: args.image_column, **recipe.columns()})
    sources.require_text_columns(dataset, recipe.columns(), source)
    if not args.streaming and len(dataset) == 0:
        raise ValueError(f"{source} has no rows")
    # The id rule of every command (`sources.resolve_id_column`): --id_column, else img2dataset's `json.id`, else
    # WebDataset's `__key__`; so the log joins with recaption's and the audit's outputs of the same source.
    id_column = sources.resolve_id_column(dataset, args.id_column) if train.log_sample_weights else None
    kept_columns = [args.image_column, *recipe.columns().values()]
    if id_column is not None:
        kept_columns.append(sources.id_source_column(id_column, sources.column_names(dataset)))
    kept_columns = list(dict.fromkeys(kept_columns))
    dataset = data.undecoded_images(dataset, args.image_column)
    transform = data.ImageTransform.from_image_processor(
        processor.image_processor, train=True, crop_scale=(args.crop_scale_min, args.crop_scale_max))
    build = data.ExampleBuilder(args.image_column, recipe.text_selector(), transform, seed=train.seed,
                                id_column=id_column)
    collate = data.Collator(processor, max_length=args.max_text_length)
    batch = train.per_device_train_batch_size
    common = dict(collate_fn=collate, num_workers=args.dataloader_num_workers,
                  persistent_workers=False, pin_memory=False, worker_init_fn=ignore_stop_signals)
    if args.streaming:
        stream = streaming_examples(dataset, kept_columns, args, train, build, accelerator, source)
        with warnings.catch_warnings():  # torchdata 0.11 calls a torch API that torch 2.14 deprecates; harmless
            warnings.filterwarnings("ignore", message=".*set_vital.*")
            loader = StatefulDataLoader(stream, batch_size=batch, drop_last=True,
                                        **{**common, "num_workers": streaming_workers(stream, args)})
        if data_state is not None:
            loader.load_state_dict(data_state)
        return TrainData(loader, steps_for(train, accelerator, None), None, {"skipped_images": 0, "skipped_texts": 0})
    dataset = dataset.select_columns(kept_columns)
    with accelerator.main_process_first():  # the main process fills the datasets cache, the others read it
        dataset, skipped = data.filter_valid_rows(dataset, build, num_proc=args.preprocessing_num_proc)
    if id_column is not None:
        check_unique_ids(dataset, id_column, source)
    if len(dataset) == 0:
        raise ValueError(f"no usable row in {source}: {skipped['skipped_images']} unreadable images, "
                         f"{skipped['skipped_texts']} missing or empty texts in columns {list(recipe.columns().values())}")
    max_steps = steps_for(train, accelerator, len(dataset))
    sampler = data.GlobalBatchSampler(
        len(dataset), batch, num_batches=max_steps * train.gradient_accumulation_steps,
        rank=accelerator.process_index, world_size=accelerator.num_processes, seed=train.seed,
        start=start_step * train.gradient_accumulation_steps)
    loader = torch.utils.data.DataLoader(data.MapStyleExamples(dataset, build), batch_sampler=sampler, **common)
    return TrainData(loader, max_steps, len(dataset), skipped)


class _EmptyShuffleBufferNotice(logging.Filter):
    """Hides `datasets`' warning that a loaded state lacks the shuffle buffer's content: the buffer used here holds
    one row and is empty whenever a state is taken (rows are shuffled by `StreamingExamples` instead)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "shuffle buffer" not in record.getMessage()


_EMPTY_BUFFER_NOTICE = _EmptyShuffleBufferNotice()


def streaming_examples(dataset, columns: list[str], args: DataArguments, train: TrainArguments,
                       build: data.ExampleBuilder, accelerator: Accelerator,
                       source: str = "the stream") -> data.StreamingExamples:
    """This process's part of the stream (whole shards where there are enough), shard order shuffled per epoch
    and rows shuffled in blocks of `--shuffle_buffer`, resumable from a saved state."""
    dataset = dataset.select_columns(columns)
    if args.shuffle_buffer:
        # Only the shard order: a one-row buffer is empty whenever a state is taken, so resuming is exact.
        dataset = dataset.shuffle(seed=train.seed, buffer_size=1)
        logging.getLogger("datasets.iterable_dataset").addFilter(_EMPTY_BUFFER_NOTICE)
    return data.StreamingExamples(dataset, build, rank=accelerator.process_index, world_size=accelerator.num_processes,
                                  shuffle_block=args.shuffle_buffer, seed=train.seed, source=source,
                                  min_rows=train.per_device_train_batch_size)


def streaming_workers(stream: data.StreamingExamples, args: DataArguments) -> int:
    """DataLoader workers for a stream: each reads whole shards, so no more workers than this process's shards."""
    shards = max(stream.dataset.num_shards // stream.world_size, 1)
    if args.dataloader_num_workers > shards:
        logger.info("%d DataLoader workers for %d stream shard(s) of this process: using %d", args.dataloader_num_workers,
                    shards, shards)
    return min(args.dataloader_num_workers, shards)


def check_unique_ids(dataset, id_column: str, source: str) -> None:
    """Refuses duplicate ids under `--log_sample_weights`: the log is joined on them (`recaption.audit
    --sample_weights`), and a repeated id would give two rows the values of one."""
    repeated = sources.duplicate_ids(sources.read_ids(dataset, id_column))
    if repeated:
        raise ValueError(f"--log_sample_weights: ids {repeated} occur more than once in column {id_column!r} of "
                         f"{source}; the per-sample log is joined on ids, so they must be unique. Pass --id_column "
                         "with a column that identifies each row.")


def check_global_batch(train: TrainArguments, num_processes: int) -> None:
    """Refuses a global batch of one pair: its contrastive loss has no negative and is identically 0."""
    global_batch = train.per_device_train_batch_size * num_processes * train.gradient_accumulation_steps
    if global_batch < 2:
        raise ValueError(
            f"a global batch of {global_batch} (--per_device_train_batch_size {train.per_device_train_batch_size} "
            f"x {num_processes} process(es) x --gradient_accumulation_steps {train.gradient_accumulation_steps}) "
            "holds one image-text pair: the contrastive loss has no negative and is identically 0; use at least 2")


def check_text_context(args: DataArguments, model) -> None:
    """Refuses `--max_text_length` beyond the text tower's position embeddings, naming both numbers (a longer
    text would otherwise crash the first batch that holds one)."""
    context = model.config.text_config.max_position_embeddings
    if args.max_text_length > context:
        raise ValueError(f"--max_text_length {args.max_text_length} exceeds the model's text context of {context} "
                         "positions (text_config.max_position_embeddings); pass --max_text_length "
                         f"{context} or less")


def steps_for(train: TrainArguments, accelerator: Accelerator, num_rows: int | None) -> int:
    """Optimizer steps of the run: `--max_steps`, else epochs over the usable rows."""
    if train.max_steps > 0:
        return train.max_steps
    if num_rows is None:
        raise ValueError("--streaming needs --max_steps (the length of a stream is unknown)")
    global_micro = train.per_device_train_batch_size * accelerator.num_processes
    steps = int(train.num_train_epochs * (num_rows // global_micro) // train.gradient_accumulation_steps)
    if steps < 1:
        raise ValueError(f"{num_rows} usable rows give no optimizer step with a global batch of "
                         f"{global_micro * train.gradient_accumulation_steps}; lower the batch size")
    return steps


