"""Reports: the results file, the Markdown results table, recall@k plots and the model card."""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
from pathlib import Path

from alip_hf import data as data_lib
from alip_hf.evaluation.presets import (
    ASSOCIATION,
    DATACOMP_GROUPS,
    DATACOMP_NUM_TASKS,
    DATACOMP_UNSUPPORTED,
    LINEAR_PROBE,
    PRESET_GROUPS,
    PRESETS,
    RECALL_KS,
    RETRIEVAL,
    ZEROSHOT,
    preset_of_source,
    resolve_tasks,
)
from alip_hf.io import replaced_atomically

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Results file and model card
# ----------------------------------------------------------------------------------------------------------------


def records_from(results) -> list[dict]:
    """Finished records from a results file payload, a list of records, or train.py's flat
    `eval/<dataset>/<metric>` (a failed task's record, which has no metrics, is left out)."""
    if isinstance(results, dict) and "results" in results:
        return [r for r in results["results"] if r.get("status", "ok") == "ok"]
    if isinstance(results, dict):
        grouped: dict[tuple[str, str], dict] = {}
        for key, value in results.items():
            parts = key.split("/")
            if len(parts) >= 3 and parts[0] == "eval":
                metric = "/".join(parts[2:])
                grouped.setdefault((parts[1], _task_of(metric)), {})[metric] = value
        return [{"dataset": d, "task": t, "split": "", "metrics": m} for (d, t), m in grouped.items()]
    return [r for r in results if r.get("status", "ok") == "ok"]


def _task_of(metric: str) -> str:
    if metric.startswith("lp_"):
        return LINEAR_PROBE
    return RETRIEVAL if "retrieval_recall" in metric else ZEROSHOT


def _percent(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def results_table(results) -> str:
    """Markdown tables (one per task kind) of the records, values in percent."""
    records = records_from(results)
    if not records:
        return "_Not evaluated._"
    sections = []
    titles = {ZEROSHOT: "Zero-shot classification", RETRIEVAL: "Retrieval", LINEAR_PROBE: "Linear probe",
              ASSOCIATION: "Image association"}
    for task, title in titles.items():
        rows = [r for r in records if r["task"] == task]
        if not rows:
            continue
        metrics = [m for m in rows[0]["metrics"] if m != "lp_C"]
        header = "| dataset | split | " + " | ".join(metrics) + " |"
        lines = [f"**{title}** (%)", "", header, "|---|---|" + "---:|" * len(metrics)]
        for r in rows:
            lines.append(f"| {r['dataset']} | {r.get('split', '')} | " +
                         " | ".join(_percent(r["metrics"].get(m)) for m in metrics) + " |")
        sections.append("\n".join(lines))
    return "\n\n".join(sections)


def _matplotlib():
    """matplotlib's `Figure` and Agg canvas, imported only when a plot is drawn (an optional dependency). The Agg
    canvas is attached per figure: the process-wide backend (a notebook's, say) is left alone."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import NullFormatter, ScalarFormatter
    except ImportError as error:
        raise ImportError("plotting recall@k curves needs matplotlib: pip install matplotlib "
                          "(or pip install -e '.[plot]')") from error
    return Figure, FigureCanvasAgg, ScalarFormatter, NullFormatter


def _curve_labels(records: list[dict]) -> list[str]:
    """One legend entry per record: the dataset, plus the model and the split where they tell records apart."""
    models = {r.get("model") for r in records}
    labels = [r["dataset"] + (f" ({Path(str(r.get('model'))).name})" if len(models) > 1 else "") for r in records]
    if len(set(labels)) < len(labels):
        labels = [f"{label} [{r.get('split', '')}]" for label, r in zip(labels, records)]
    return labels


def plot_recall_at_k(results, path: str | os.PathLike, figsize: tuple[float, float] = (10.0, 4.0),
                     dpi: int = 100) -> Path:
    """Draws the retrieval recall@k curves of every retrieval record, image -> text and text -> image side by side
    (log-scaled k, recall in percent, R@1/5/10 marked), and writes them to a PNG of `figsize * dpi` pixels.

    Args:
        results: records (`run_evaluation`), a results file's payload, or the path of a results file: the plot is
            drawn from each record's `recall_curve`, so it can be redrawn from `results.json` alone.
        path: the PNG, written atomically (its folder created).

    Raises:
        ImportError: matplotlib is missing (`pip install matplotlib`, or the `plot` extra).
        ValueError: no record has a recall curve (no retrieval task, `recall_curve_max_k=0`, or train.py's flat
            metrics, which hold R@1/5/10 only).
    """
    if isinstance(results, (str, os.PathLike)):
        results = json.loads(Path(results).read_text(encoding="utf-8"))
    records = [r for r in records_from(results) if r.get("recall_curve")]
    if not records:
        raise ValueError("no retrieval results with a recall_curve to plot: evaluate a retrieval task "
                         "(recall_curve_max_k > 0)")
    Figure, FigureCanvasAgg, ScalarFormatter, NullFormatter = _matplotlib()
    figure = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2, sharey=True)
    max_k = max(r["recall_curve"]["k"][-1] for r in records)
    # CLIP_benchmark's names are those of the retrieved side: text_retrieval is image -> text.
    panels = (("text_retrieval_recall", "image \u2192 text"), ("image_retrieval_recall", "text \u2192 image"))
    for ax, (name, direction) in zip(axes, panels):
        for record, label in zip(records, _curve_labels(records)):
            ks = record["recall_curve"]["k"]
            marked = [i for i, k in enumerate(ks) if k in RECALL_KS]
            ax.plot(ks, [100 * v for v in record["recall_curve"][name]], marker="o", markevery=marked,
                    markersize=4, linewidth=1.5, label=label)
        ax.set_xscale("log")
        ax.set_xlim(0.9, 1.1 * max(max_k, 2))  # padded: the k = 1 markers and 100% lines stay off the frame
        ax.set_xticks([k for k in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if k <= max(max_k, 2)])
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(-2, 102)
        ax.set_yticks(range(0, 101, 20))
        ax.grid(True, which="major", alpha=0.3)
        ax.set_xlabel("k (log scale)")
        ax.set_title(f"{direction} ({name}@k)", fontsize=10)
    axes[0].set_ylabel("recall@k (%)")
    axes[1].legend(loc="lower right", fontsize=8)
    figure.suptitle("Retrieval recall@k (a query is a hit when one of its matches is in the top k)", fontsize=11)
    with replaced_atomically(path, "wb") as file:
        figure.savefig(file, format="png", dpi=dpi)
    return Path(path)


def render_model_card(results, template: str | os.PathLike | None = None, **info) -> str:
    """The model card as text: `cards.build_model_card` (huggingface_hub's `ModelCard`, with `model-index`)."""
    from alip_hf.evaluation.cards import build_model_card

    return str(build_model_card(results, template, **info))


def eval_command(records: list[dict], eval_data: str | None = None) -> str:
    """The eval.py command that evaluates the card's datasets again.

    The data is train.py's `--eval_data` when given, else the records' datasets when all are presets, else the
    demo preset; the split is added where the records share one that differs from the presets' own.
    """
    from alip_hf.evaluation.cards import portable

    if not records and eval_data is None:  # not evaluated: say how, without naming data the run never saw
        return "python eval.py --model <this directory> --preset <preset>   # or --dataset <data> --task <task>"
    splits = {r.get("split") for r in records} - {None, ""}
    split = splits.pop() if len(splits) == 1 else None
    names = {r["dataset"] for r in records}
    if eval_data is None:
        presets = sorted(names) if names and names <= set(PRESETS) else ["demo"]
    elif eval_data in PRESETS or eval_data in PRESET_GROUPS:
        presets = [eval_data]
    else:
        presets = [name for name in [preset_of_source(eval_data)] if name]
    if presets:
        flags = ["--preset", *presets]
        default_splits = {t.split for name in presets for t in resolve_tasks(name)}
        if split is not None and default_splits != {split}:
            flags += ["--split", split]
    else:  # train.py evaluated retrieval over the contract's caption columns; flat metrics do not say which it had
        columns = next((r["caption_columns"] for r in records if r.get("caption_columns")),
                       [data_lib.ALT_TEXT, data_lib.CAPTION])
        # the user's data, named without its local path (the card is public)
        flags = ["--dataset", portable(eval_data), "--task", RETRIEVAL, "--split", split or "test",
                 "--caption_columns", *columns]
    return "python eval.py --model <this directory> " + shlex.join(flags)


# ----------------------------------------------------------------------------------------------------------------
# Suites and comparisons across models
# ----------------------------------------------------------------------------------------------------------------


def datacomp_summary(results) -> dict:
    """DataComp's aggregate scores (aggregate_scores.py) from the records of `--preset datacomp`.

    `average` is the mean of the main metrics (`main_score`) of the evaluated suite tasks, as DataComp averages its
    38; `groups` are DataComp's (ImageNet, ImageNet dist. shifts, VTAB, Retrieval), each given only when all its
    members were evaluated. `missing` names the suite tasks without a result, so an average over fewer than 38
    is never mistaken for DataComp's.
    """
    suite = PRESET_GROUPS["datacomp"]
    scores = {r["dataset"]: r.get("main_score") for r in records_from(results)
              if r["dataset"] in suite and r["task"] in (ZEROSHOT, RETRIEVAL, ASSOCIATION)}
    scores = {name: value for name, value in scores.items() if value is not None}
    missing = [name for name in suite if name not in scores] + sorted(DATACOMP_UNSUPPORTED)
    groups = {group: (sum(scores[m] for m in members) / len(members) if all(m in scores for m in members) else None)
              for group, members in DATACOMP_GROUPS.items()}
    average = sum(scores.values()) / len(scores) if scores else None
    return {"datacomp": {"average": average, "num_tasks": len(scores), "num_suite_tasks": DATACOMP_NUM_TASKS,
                         "complete": len(scores) == DATACOMP_NUM_TASKS, "groups": groups, "missing": missing}}


def _load_payload(path) -> dict:
    payload = json.loads(Path(path).read_text(encoding="utf-8"))
    if "results" not in payload:
        raise ValueError(f"{path}: not an eval.py results file (no 'results')")
    return payload


def comparison(paths: list[str | os.PathLike]) -> tuple[list[str], list[str], dict]:
    """`(models, rows, scores)` of several results files: one column per file (its model, or the file name when
    two files hold the same model), one row per dataset and task, `scores[(row, model)]` the record's main metric
    (`main_score`; results files written before it existed: acc1, or the mean of both recall@1)."""
    payloads = [_load_payload(p) for p in paths]
    names = [str(pl.get("model") or Path(p).stem) for pl, p in zip(payloads, paths)]
    if len(set(names)) < len(names):
        names = [str(p) for p in paths]
    rows, scores = [], {}
    for model, payload in zip(names, payloads):
        for record in records_from(payload):
            row = record["dataset"] if record["task"] != LINEAR_PROBE else f"{record['dataset']} (linear probe)"
            if row not in rows:
                rows.append(row)
            scores[(row, model)] = _score_of(record)
        for suite, summary in (payload.get("suites") or {}).items():
            if summary.get("average") is not None:
                row = f"{suite} average ({summary['num_tasks']}/{summary['num_suite_tasks']})"
                if row not in rows:
                    rows.append(row)
                scores[(row, model)] = summary["average"]
    return names, rows, scores


def _score_of(record: dict) -> float | None:
    if record.get("main_score") is not None:
        return record["main_score"]
    metrics = record["metrics"]
    if record["task"] == RETRIEVAL and "text_retrieval_recall@1" in metrics:
        return 0.5 * (metrics["text_retrieval_recall@1"] + metrics["image_retrieval_recall@1"])
    return metrics.get("lp_acc1" if record["task"] == LINEAR_PROBE else "acc1")


def comparison_table(paths: list[str | os.PathLike]) -> str:
    """Markdown: datasets as rows, models as columns, each record's main metric in percent (the best of a row in
    bold), and the mean over the rows every model has."""
    models, rows, scores = comparison(paths)
    lines = ["| dataset | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
    for row in rows:
        values = [scores.get((row, m)) for m in models]
        best = max((v for v in values if v is not None), default=None)
        cells = [(f"**{_percent(v)}**" if v is not None and v == best and len(models) > 1 else _percent(v))
                 for v in values]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    shared = [r for r in rows if " average (" not in r and all(scores.get((r, m)) is not None for m in models)]
    if shared:
        means = [sum(scores[(r, m)] for r in shared) / len(shared) for m in models]
        lines.append(f"| mean of {len(shared)} shared rows | " + " | ".join(_percent(v) for v in means) + " |")
    return "\n".join(lines)


def plot_comparison(paths: list[str | os.PathLike], path: str | os.PathLike, dpi: int = 100) -> Path:
    """Grouped horizontal bars, one group per dataset and one bar per model (main metric, %), written to `path`:
    vector PDF or SVG when its name ends in `.pdf` / `.svg`, else PNG."""
    models, rows, scores = comparison(paths)
    if not rows:
        raise ValueError("no finished results to compare")
    Figure, FigureCanvasAgg, _, _ = _matplotlib()
    figure = Figure(figsize=(8.0, 1.2 + 0.3 * len(rows) * max(len(models), 1) ** 0.5 + 0.2 * len(rows)), dpi=dpi,
                    layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    height = 0.8 / len(models)
    for i, model in enumerate(models):
        positions = [r + (i - (len(models) - 1) / 2) * height for r in range(len(rows))]
        values = [100 * (scores.get((row, model)) or 0.0) for row in rows]
        ax.barh(positions, values, height=height, label=Path(model).name or model)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.invert_yaxis()  # first dataset on top, as in the table
    ax.set_xlim(0, 100)
    ax.set_xlabel("main metric (%)")
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    suffix = Path(path).suffix.lower().lstrip(".")
    file_format = suffix if suffix in ("pdf", "svg") else "png"
    with replaced_atomically(path, "wb") as file:
        figure.savefig(file, format=file_format, dpi=dpi)
    return Path(path)
