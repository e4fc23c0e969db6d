"""Zero-shot classification, image-text retrieval and linear-probe evaluation of CLIP-style models.

Works with any model that has transformers CLIP's feature methods, `get_image_features(pixel_values)` and
`get_text_features(input_ids, attention_mask)` (whose `pooler_output` is the projected feature): `ALIPModel`,
exported `CLIPModel` directories, VeCLIP checkpoints, any transformers CLIP. It never looks at the model type.

Metric names and definitions are CLIP_benchmark's, and the numbers equal its to the last digit on the same
model and data (tests/test_eval_parity.py):
- zero-shot classification: `acc1`, `acc5`, `mean_per_class_recall`, with prompt-ensembled class embeddings
  (mean of the L2-normalised template embeddings, renormalised) and logits `100 * image @ classes`;
- retrieval: `image_retrieval_recall@k` (text -> image) and `text_retrieval_recall@k` (image -> text), a query
  counting as a hit when at least one of its matches is among the top k; every image may have several captions;
- linear probe: `lp_acc1`, `lp_acc5`, `lp_mean_per_class_recall` of a logistic regression on frozen image
  features, its regularisation chosen on a validation split and refit on train + validation (CLIP paper, A.3).

Retrieval records also hold the recall for every k up to 50 (`recall_curve`); `--plot` draws it (matplotlib).

    python eval.py --model runs/alip-tiny --preset demo --output results.json
    python eval.py --model DIR --preset flickr30k --plot recall.png           # recall@k curves, k = 1..50
    python eval.py --model DIR --dataset data/val.parquet --task zeroshot_classification \
        --image_column jpg --label_column cls --class_names classes.txt
    accelerate launch --num_processes 2 eval.py --model DIR --preset imagenet1k   # sharded, no duplicates

From training: `evaluate_model(model, processor, "demo", accelerator=accelerator)` -> `{"eval/demo/acc1": ...}`.
"""


from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from alip_hf.evaluation.presets import (
    LINEAR_PROBE,
    PRESET_GROUPS,
    PRESETS,
    RECALL_CURVE_MAX_K,
    RETRIEVAL,
    TASK_ALIASES,
    TASKS,
    EvalTask,
    resolve_tasks,
)

logger = logging.getLogger("eval")


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class EvalArguments:
    model: str = field(metadata={"help": "Model directory or Hub id (AutoModel + AutoProcessor)."})
    preset: list[str] = field(default_factory=list, metadata={
        "help": f"Presets or groups: {sorted(PRESETS)} / {sorted(PRESET_GROUPS)}."})
    dataset: str | None = field(default=None, metadata={
        "help": "Any source data.load_source reads (instead of --preset)."})
    task: str | None = field(default=None, metadata={
        "help": f"{TASKS} (aliases {sorted(TASK_ALIASES)}); with --preset, replaces a classification preset's task."})
    split: str | None = field(default=None, metadata={"help": "Evaluated split (default: the preset's, else 'test')."})
    train_split: str = field(default="train", metadata={"help": "Linear probe training split (--dataset)."})
    val_split: str | None = field(default=None, metadata={
        "help": "Linear probe validation split; default: 20%% of train."})
    image_column: str | None = field(default=None, metadata={"help": "Image column; default: the only Image column."})
    label_column: str | None = field(default=None, metadata={"help": "Class column (ints or class-name strings)."})
    caption_columns: list[str] = field(default_factory=list, metadata={"help": "Retrieval: caption column(s)."})
    class_names: str | None = field(default=None, metadata={
        "help": "File with one class name per line, 'imagenet', or 'clip_benchmark:<dataset>'."})
    templates: str = field(default="openai_imagenet", metadata={
        "help": "File with one template per line ('{}' = class name), 'openai_imagenet', 'simple_imagenet', or "
                "'clip_benchmark:<dataset>'."})
    name: str | None = field(default=None, metadata={"help": "Dataset name in the results (--dataset)."})
    output: str = field(default="results.json", metadata={"help": "Results JSON path."})
    model_card: str | None = field(default=None, metadata={"help": "Also render model_card.md to this path."})
    plot: str | None = field(default=None, metadata={
        "help": "Also draw the retrieval recall@k curves to this PNG (needs matplotlib; embedded in --model_card)."})
    recall_curve_max_k: int = field(default=RECALL_CURVE_MAX_K, metadata={
        "help": "Retrieval: store recall@k for k = 1..N in the results (the curves --plot draws); 0: none."})
    batch_size: int = field(default=64, metadata={"help": "Images per batch and process."})
    text_batch_size: int = field(default=256, metadata={"help": "Texts per batch and process."})
    max_samples: int | None = field(default=None, metadata={"help": "Evaluate the first N rows of each split only."})
    cache_dir: str | None = field(default=None, metadata={"help": "On-disk cache of zero-shot class embeddings."})
    seed: int = field(default=0, metadata={"help": "Seed of the linear probe's validation split and solver."})

    def __post_init__(self):
        if bool(self.preset) == bool(self.dataset):
            raise ValueError("pass exactly one of --preset or --dataset")
        if self.task is not None:
            self.task = TASK_ALIASES.get(self.task, self.task)
            if self.task not in TASKS:
                raise ValueError(f"--task must be one of {TASKS}, got {self.task!r}")
        if self.dataset and self.task is None:
            raise ValueError("--dataset needs --task")
        if self.batch_size < 1 or self.text_batch_size < 1:
            raise ValueError("--batch_size and --text_batch_size must be >= 1")
        if self.recall_curve_max_k < 0 or (self.plot and self.recall_curve_max_k < 1):
            raise ValueError("--recall_curve_max_k must be >= 0, and >= 1 with --plot")


def tasks_from_args(args: EvalArguments) -> list[EvalTask]:
    if args.preset:
        tasks = resolve_tasks(list(args.preset), args.split)
        if args.task is None:
            return tasks
        changed = [replace(t, task=args.task) for t in tasks if t.task != RETRIEVAL]
        if args.task == LINEAR_PROBE and any(t.train_split is None for t in changed):
            raise ValueError("--task linear_probe: a preset has no training split")
        return changed if args.task != RETRIEVAL else [t for t in tasks if t.task == RETRIEVAL]
    return [EvalTask(
        name=args.name or Path(args.dataset).name or args.dataset, task=args.task, source=args.dataset,
        split=args.split or "test", image_column=args.image_column, label_column=args.label_column,
        caption_columns=tuple(args.caption_columns), class_names=args.class_names, templates=args.templates,
        train_split=args.train_split, val_split=args.val_split)]


def load_model_and_processor(path: str, device="cpu"):
    """`AutoModel` + `AutoProcessor` (after registering ALIP); a directory saved without a processor gets CLIP's
    preprocessing at the model's size (`ALIPProcessor.from_config`)."""
    from transformers import AutoModel, AutoProcessor

    import modeling_alip  # noqa: F401 - registers ALIP with the Auto classes

    model = AutoModel.from_pretrained(path).to(device).eval()
    try:
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError, TypeError) as error:
        logger.warning("--model %s: no processor saved (%s); using CLIP's preprocessing", path, error)
        processor = modeling_alip.ALIPProcessor.from_config(model.config)
    return model, processor


def write_model_card(args: EvalArguments, records: list[dict], argv: list[str]):
    """Adds the evaluation to `--model_card`: an existing card (a trained model's README) keeps its training
    section and metadata, its evaluation section and `model-index` are updated; a new card is rendered with the
    training arguments saved beside the model (`train_args.yaml`), when there are any."""
    import yaml

    from alip_hf.evaluation.cards import hub_id, portable_command, update_model_card
    from alip_hf.io import write_text_atomic

    card_path = Path(args.model_card)
    plot_link = os.path.relpath(args.plot, card_path.resolve().parent) if args.plot else None
    saved_args = Path(args.model) / "train_args.yaml"
    train_args = yaml.safe_load(saved_args.read_text()) if saved_args.is_file() else None
    card = update_model_card(
        card_path, records, model_name=hub_id(args.model) or Path(args.model).name, train_args=train_args,
        recall_plot=plot_link, eval_command="python eval.py " + portable_command(list(argv)))
    write_text_atomic(card_path, str(card))


def main(argv: list[str] | None = None) -> list[dict]:
    """Parses flags, evaluates, writes the results JSON (and model card) on the main process; returns records."""
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(EvalArguments).parse_args_into_dataclasses(args=argv)
    # The heavy imports (torch, accelerate, datasets) only after parsing, so that `--help` answers at once.
    from accelerate import Accelerator

    from alip_hf.evaluation.features import ClassifierCache
    from alip_hf.evaluation.reports import (
        _matplotlib,
        plot_recall_at_k,
        results_table,
    )
    from alip_hf.evaluation.runners import EvalSettings, run_evaluation
    from alip_hf.io import write_json_atomic

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    accelerator = Accelerator()
    tasks = tasks_from_args(args)
    if args.plot:  # fail before evaluating, not after
        _matplotlib()
        if not any(t.task == RETRIEVAL for t in tasks):
            raise ValueError("--plot draws retrieval recall@k curves, but no retrieval task is evaluated")
    model, processor = load_model_and_processor(args.model, accelerator.device)
    settings = EvalSettings(args.batch_size, args.text_batch_size, max_samples=args.max_samples, seed=args.seed,
                            recall_curve_max_k=args.recall_curve_max_k)
    records = run_evaluation(model, processor, tasks, accelerator=accelerator, settings=settings,
                             cache=ClassifierCache(args.cache_dir), model_name=args.model)
    if accelerator.is_main_process:
        payload = {"model": args.model, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   "num_processes": accelerator.num_processes, "results": records}
        write_json_atomic(args.output, payload)
        print(results_table(records))
        if args.plot:
            plot_recall_at_k(records, args.plot)
        if args.model_card:
            write_model_card(args, records, sys.argv[1:] if argv is None else argv)
    accelerator.wait_for_everyone()
    return records


if __name__ == "__main__":
    main()
