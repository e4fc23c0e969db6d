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
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from alip_hf.evaluation.presets import (
    LINEAR_PROBE,
    PRESET_GROUPS,
    PRESETS,
    RECALL_CURVE_MAX_K,
    RETRIEVAL,
    TASK_ALIASES,
    TASKS,
    ZEROSHOT,
    EvalTask,
    resolve_tasks,
    unknown_preset_message,
    with_data_root,
)

DTYPES = ("fp32", "bf16", "fp16")

logger = logging.getLogger("eval")


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class EvalArguments:
    model: str | None = field(default=None, metadata={
        "help": "Model directory or Hub id (AutoModel + AutoProcessor); required unless --compare."})
    preset: list[str] = field(default_factory=list, metadata={
        "help": f"Presets or groups: {sorted(PRESETS)} / {sorted(PRESET_GROUPS)}."})
    dataset: str | None = field(default=None, metadata={
        "help": "Any source alip_hf.sources.load_source reads ('demo' included) (instead of --preset)."})
    task: list[str] = field(default_factory=list, metadata={
        "help": f"One or more of {TASKS} (aliases {sorted(TASK_ALIASES)}), all on the same images (encoded once); "
                "with --preset, replaces a classification preset's task."})
    data_root: str | None = field(default=None, metadata={
        "help": "Local mirror of the presets' datasets: <data_root>/<repository name> (e.g. DIR/wds_cifar10, "
                "DIR/Urban1k, DIR/densely_captioned_images)."})
    dtype: str = field(default="fp32", metadata={
        "help": "Autocast dtype of the towers; similarities and metrics stay float32.", "choices": list(DTYPES)})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "Allow the model's own code from its repository (AutoModel / AutoProcessor)."})
    compare: list[str] = field(default_factory=list, metadata={
        "help": "Results files to compare (no evaluation): a Markdown table of their main metrics, printed, written "
                "to --compare_output, drawn to --plot (.pdf/.svg: vector)."})
    compare_output: str | None = field(default=None, metadata={"help": "With --compare: the Markdown table file."})
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
        if self.compare:
            if self.preset or self.dataset:
                raise ValueError("--compare reads results files: pass no --preset or --dataset")
            return
        if self.model is None:
            raise ValueError("--model is required (unless --compare)")
        if bool(self.preset) == bool(self.dataset):
            raise ValueError("pass exactly one of --preset or --dataset")
        for name in self.preset:
            if name not in PRESETS and name not in PRESET_GROUPS:
                raise ValueError(unknown_preset_message(name))
        self.task = [TASK_ALIASES.get(t, t) for t in self.task]
        for task in self.task:
            if task not in TASKS:
                raise ValueError(f"--task must be one of {TASKS}, got {task!r}")
        if self.preset and len(self.task) > 1:
            raise ValueError("--preset takes at most one --task (a preset's own tasks already share its images)")
        if self.dataset and not self.task:
            raise ValueError("--dataset needs --task")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.batch_size < 1 or self.text_batch_size < 1:
            raise ValueError("--batch_size and --text_batch_size must be >= 1")
        if self.recall_curve_max_k < 0 or (self.plot and self.recall_curve_max_k < 1):
            raise ValueError("--recall_curve_max_k must be >= 0, and >= 1 with --plot")


def tasks_from_args(args: EvalArguments) -> list[EvalTask]:
    """The tasks to run: the presets' (on `--data_root` if given, with `--task` replacing a classification
    task), or one task per `--task` on `--dataset`."""
    if args.preset:
        tasks = [with_data_root(t, args.data_root) for t in resolve_tasks(list(args.preset), args.split)]
        if not args.task:
            return tasks
        (task,) = args.task
        changed = [replace(t, task=task, main_metric=None) for t in tasks if t.task in (ZEROSHOT, LINEAR_PROBE)]
        if task == LINEAR_PROBE and any(t.train_split is None for t in changed):
            names = [t.name for t in changed if t.train_split is None]
            raise ValueError(f"--task linear_probe: presets {names} have no training split")
        return changed if task != RETRIEVAL else [t for t in tasks if t.task == RETRIEVAL]
    return [EvalTask(
        name=args.name or Path(args.dataset).name or args.dataset, task=task, source=args.dataset,
        split=args.split or "test", image_column=args.image_column,
        label_column=args.label_column if task != RETRIEVAL else None,
        caption_columns=tuple(args.caption_columns) if task == RETRIEVAL else (), class_names=args.class_names,
        templates=args.templates, train_split=args.train_split, val_split=args.val_split) for task in args.task]


def load_model_and_processor(path: str, device="cpu", trust_remote_code: bool = False):
    """`AutoModel` + its processor, by the loader every command shares (`alip_hf.pretrained`): strict weights, the
    saved processor or an error naming its file, CLIP's preprocessing only for a model saved without a processor."""
    from alip_hf.pretrained import load_model_and_processor as load

    model, processor = load(path, trust_remote_code=trust_remote_code, flag="--model")
    return model.to(device).eval(), processor


def write_model_card(args: EvalArguments, records: list[dict], argv: list[str]):
    """Adds the evaluation to `--model_card`: an existing card (a trained model's README) keeps its training
    section and metadata, its evaluation section and `model-index` are updated; a new card is rendered with the
    training arguments saved beside the model (`train_args.yaml`), when there are any."""
    import yaml

    from alip_hf.evaluation.cards import ModelCardInfo, hub_id, linked_file, portable_command, update_model_card
    from alip_hf.io import write_text_atomic

    card_path = Path(args.model_card)
    card_path.parent.mkdir(parents=True, exist_ok=True)
    saved_args = Path(args.model) / "train_args.yaml"
    info = ModelCardInfo(
        model_name=hub_id(args.model) or Path(args.model).name,
        train_args=yaml.safe_load(saved_args.read_text()) if saved_args.is_file() else None,
        recall_plot=linked_file(args.plot, card_path.parent) if args.plot else None,  # copied beside the card
        eval_command="python eval.py " + portable_command(list(argv)))
    write_text_atomic(card_path, str(update_model_card(card_path, records, info)))


def compare_main(args: EvalArguments) -> str:
    """`--compare`: the Markdown table of the results files (printed, and written to `--compare_output`), and their
    plot with `--plot`."""
    from alip_hf.evaluation.reports import comparison_table, plot_comparison
    from alip_hf.io import write_text_atomic

    if args.plot:  # fail before writing anything
        _require_matplotlib()
    table = comparison_table(args.compare)
    print(table)
    if args.compare_output:
        write_text_atomic(args.compare_output, table + "\n")
    if args.plot:
        plot_comparison(args.compare, args.plot)
    return table


def _require_matplotlib() -> None:
    """`--plot` without matplotlib: one line naming the install command (no traceback), before any work."""
    from alip_hf.evaluation.reports import _matplotlib
    from alip_hf.lazy import MissingExtra

    try:
        _matplotlib()
    except MissingExtra as error:
        raise SystemExit(f"eval.py --plot: {error}") from None


def main(argv: list[str] | None = None) -> list[dict]:
    """Parses flags, evaluates task by task (the results file rewritten after each, a rerun resuming), writes the
    model card on the main process; returns the records.

    Raises:
        SystemExit: with status 1 when a task failed (its error is in the results file; the others ran).
    """
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(EvalArguments).parse_args_into_dataclasses(args=argv)
    if args.compare:
        compare_main(args)
        return []
    # The heavy imports (torch, accelerate, datasets) only after parsing, so that `--help` answers at once.
    from accelerate import Accelerator

    from alip_hf.evaluation.features import ClassifierCache
    from alip_hf.evaluation.reports import datacomp_summary, plot_recall_at_k, results_table
    from alip_hf.evaluation.runners import EvalSettings, run_and_save

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    accelerator = Accelerator()
    tasks = tasks_from_args(args)
    if args.plot:  # fail before evaluating, not after
        _require_matplotlib()
        if not any(t.task == RETRIEVAL for t in tasks):
            raise ValueError("--plot draws retrieval recall@k curves, but no retrieval task is evaluated")
    model, processor = load_model_and_processor(args.model, accelerator.device, args.trust_remote_code)
    settings = EvalSettings(args.batch_size, args.text_batch_size, max_samples=args.max_samples, seed=args.seed,
                            recall_curve_max_k=args.recall_curve_max_k, dtype=args.dtype)
    summarize = datacomp_summary if "datacomp" in args.preset else None
    payload = run_and_save(model, processor, tasks, args.output, accelerator=accelerator, settings=settings,
                           cache=ClassifierCache(args.cache_dir), model_name=args.model, summarize=summarize)
    records = payload["results"]
    failed = [r for r in records if r.get("status") == "failed"]
    if accelerator.is_main_process:
        print(results_table(records))
        for suite, summary in payload.get("suites", {}).items():
            print(f"{suite}: average {summary['average']} over {summary['num_tasks']} of "
                  f"{summary['num_suite_tasks']} tasks (missing: {summary['missing']})")
        if args.plot:
            plot_recall_at_k(records, args.plot)
        if args.model_card:
            write_model_card(args, records, sys.argv[1:] if argv is None else argv)
        for record in failed:
            logger.error("%s %s failed: %s", record["dataset"], record["task"], record["error"])
    accelerator.wait_for_everyone()
    if failed:
        raise SystemExit(f"{len(failed)} of {len(records)} evaluations failed "
                         f"({', '.join(r['dataset'] for r in failed)}); their errors are in {args.output}")
    return records


def cli() -> None:
    """The `alip-eval` command (console scripts exit with the return value, so `main`'s is not returned)."""
    main(sys.argv[1:])


if __name__ == "__main__":
    cli()
