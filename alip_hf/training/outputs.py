"""What a finished run leaves: evaluation during training, the saved model and processor, the CLIPModel
export, open_clip's files, the model card and the Hub upload."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from accelerate import Accelerator

from alip_hf.convert.to_clip import export_to_clip
from alip_hf.convert.to_open_clip import export_to_open_clip
from alip_hf.evaluation.cards import build_model_card
from alip_hf.evaluation.runners import evaluate_model
from alip_hf.hub import HubOptions, push_folder
from alip_hf.io import (
    apply_default_permissions,
    make_staging_dir,
    move_files_into,
    write_text_atomic,
)
from modeling_alip import ALIPModel

if TYPE_CHECKING:
    from alip_hf.training.arguments import DataArguments

logger = logging.getLogger(__name__)

ARGS_FILE = "train_args.yaml"


def evaluate(model: ALIPModel, processor, args: DataArguments, accelerator: Accelerator) -> dict[str, float]:
    """eval.py's zero-shot + retrieval evaluation on `--eval_data`, as `{"eval/<dataset>/<metric>": value}`.

    Runs on every process (eval.py shards the samples and gathers the features); `{}` when evaluation is off.
    """
    if args.eval_data is None:
        return {}
    was_training = model.training
    model.eval()
    try:
        return evaluate_model(model, processor, args.eval_data, split=args.eval_split, accelerator=accelerator)
    finally:
        model.train(was_training)


def check_eval_data(args: DataArguments) -> int:
    """Checks `--eval_data` before training, as the evaluation will read it: the source loads, each task's
    columns, labels and captions are there, and every image of every evaluated split decodes. Returns the number
    of images checked.

    Raises:
        ValueError: naming the source, split, column, or the row (index and id) of an image that does not decode.
    """
    from alip_hf.data import decode_image
    from alip_hf.evaluation.loading import (
        captions_per_image,
        class_names_and_labels,
        load_split,
    )
    from alip_hf.evaluation.presets import LINEAR_PROBE, RETRIEVAL, resolve_tasks

    if args.eval_data is None:
        return 0
    try:
        tasks = resolve_tasks(args.eval_data, args.eval_split)
    except Exception as error:
        raise ValueError(f"--eval_data {args.eval_data} (split {args.eval_split!r}) cannot be loaded: "
                         f"{type(error).__name__}: {error}") from error
    checked, seen = 0, set()
    for task in tasks:
        for split in dict.fromkeys(s for s in (task.split, task.train_split if task.task == LINEAR_PROBE else None,
                                               task.val_split) if s):
            try:
                dataset, image_column = load_split(task, split)
                if task.task == RETRIEVAL:
                    captions_per_image(task, dataset)
                else:
                    class_names_and_labels(task, dataset)
            except Exception as error:
                raise ValueError(f"--eval_data {task.source} split {split!r}: {error}") from error
            key = (task.source, split, task.row_filter, image_column)
            if key in seen:  # the demo preset's two tasks read the same images
                continue
            seen.add(key)
            columns = [image_column, *(["id"] if "id" in dataset.column_names else [])]
            rows = (row for batch in dataset.select_columns(columns).iter(batch_size=256)
                    for row in zip(*(batch[c] for c in columns)))
            for row, (cell, *row_id) in enumerate(rows):
                try:
                    decode_image(cell)
                except Exception as error:
                    name = f"row {row}" + (f" (id {row_id[0]!r})" if row_id else "")
                    raise ValueError(f"--eval_data {task.source} split {split!r}, column {image_column!r}, {name}: "
                                     f"the image does not decode ({type(error).__name__}: {error})") from error
                checked += 1
    logger.info("--eval_data %s: %d images of %d task(s) checked", args.eval_data, checked, len(tasks))
    return checked


# ----------------------------------------------------------------------------------------------------------------
# Saving the result
# ----------------------------------------------------------------------------------------------------------------


def final_model(accelerator: Accelerator, model) -> ALIPModel:
    """The trained `ALIPModel`, with LoRA weights merged in."""
    model = accelerator.unwrap_model(model)
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def save_outputs(model: ALIPModel, processor, output_dir: str, results: dict[str, float]):
    """`save_pretrained` of model and processor, the CLIPModel export and a model card (main process only)."""
    out = Path(output_dir)
    tmp = make_staging_dir(out / "final")
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    apply_default_permissions(tmp)  # safetensors writes 0600
    move_files_into(tmp, out)  # each file replaced atomically; checkpoints and logs stay
    export_to_clip(model, str(out / "clip_export"), processor=processor, overwrite=True)
    try:  # open_clip's files beside the transformers ones: CLIP_benchmark and DataComp's evaluation load them
        export_to_open_clip(model, out, processor=processor)
    except ValueError as error:  # a model open_clip's CLIP cannot express (e.g. VeCLIP's T5 tokenizer)
        logger.info("not written in open_clip's format: %s", error)
    write_model_card(out, results)


def write_model_card(output_dir: str | Path, results: dict[str, float]):
    """`README.md`: the model card with the results (rewritten once the final evaluation has run)."""
    write_text_atomic(Path(output_dir) / "README.md", model_card(Path(output_dir), results))


def model_card(output_dir: Path, results: dict[str, float]) -> str:
    """The model card (`cards.build_model_card`) from the results and the run's saved arguments."""
    args = yaml.safe_load((output_dir / ARGS_FILE).read_text()) if (output_dir / ARGS_FILE).exists() else {}
    return str(build_model_card(results, train_args=args, model_name=args.get("hub_model_id") or output_dir.name))


def push_to_hub(output_dir: str, repo_id: str, options: HubOptions | None = None):
    """Uploads `output_dir` to the Hub model repository `repo_id`, without resumable checkpoints or temporary
    files (`hub.RUN_IGNORE_PATTERNS`); `options`: private, branch, commit message, pull request, token."""
    return push_folder(output_dir, repo_id, options or HubOptions(), repo_type="model",
                       default_message=f"Upload {Path(output_dir).name} trained with alip-hf")
