"""What `recaption.audit` does with the scores once every shard is written (main process): filter the dataset,
measure noise detection against a known noise column, and draw the report for people.

    <output_dir>/filtered/<split>-<index>.parquet   the kept rows, every column (train.py --train_data <output_dir>/filtered)
    <output_dir>/filter_summary.json                 kept and dropped rows, the dropped ones counted per reason
    <output_dir>/noise_detection.json                ROC AUC and precision at the kept fraction, per score
    <output_dir>/report/weights_histogram.png        the distribution of every score (clean vs noisy when known)
    <output_dir>/report/contact_sheet.png            the lowest- and highest-scored pairs: image, web text, caption
    <output_dir>/report/index.html                   the same pairs as a web page (images embedded)

Everything is derived from the written shards, so a rerun with another `--keep_fraction` or `--score` reuses the
scores and only redoes this part.
"""

from __future__ import annotations

import base64
import glob
import html
import io
import math
import os
import textwrap
from collections import Counter
from typing import Any

import numpy as np

from alip_hf.evaluation.noise import detection_metrics, roc_auc, top_fraction
from alip_hf.io import (
    make_staging_dir,
    replace_directory,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)
from alip_hf.lazy import MissingExtra, install_command
from alip_hf.schema import AUDIT_SCORES, ERROR, ID

FILTERED_DIR = "filtered"
REPORT_DIR = "report"


def check_report_dependencies() -> None:
    """matplotlib draws the report; fail before any work when it is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        raise MissingExtra(f"the audit report needs matplotlib, which is not installed: "
                           f"{install_command('plot', 'matplotlib')}, or pass --report false") from error


def shard_files(output_dir: str, split: str) -> list[str]:
    return sorted(glob.glob(os.path.join(output_dir, "data", f"{split}-*.parquet")))


def read_scores(files: list[str], columns: list[str]):
    """The given columns of every shard, as one pyarrow table in shard order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa.concat_tables([pq.read_table(f, columns=columns) for f in files])


def score_columns(files: list[str]) -> list[str]:
    """The audit score columns present in the shards (a training log has no `clip_score`)."""
    import pyarrow.parquet as pq

    names = set(pq.read_schema(files[0]).names)
    return [c for c in AUDIT_SCORES if c in names]


# ----------------------------------------------------------------------------------------------------------------
# Filtering
# ----------------------------------------------------------------------------------------------------------------


def select_rows(ids: np.ndarray, scores: np.ndarray, errors: list[str], keep_above: float | None,
                keep_fraction: float | None) -> tuple[np.ndarray, Counter]:
    """`(kept mask, Counter of reason -> dropped rows)`.

    Rows that could not be scored are dropped for the reason their error names (`unreadable_image`, ...). Of the
    others, `keep_above` keeps those scoring at least it; `keep_fraction` keeps `round(fraction * scored)` of them,
    the highest first, ties broken by id.
    """
    finite = np.isfinite(scores)
    kept = np.zeros(len(scores), dtype=bool)
    if keep_above is not None:
        kept[finite] = scores[finite] >= keep_above
        passed_reason = "below_keep_above"
    else:
        kept[finite] = top_fraction(scores[finite], keep_fraction, ids[finite])
        passed_reason = "outside_keep_fraction"
    reasons: Counter = Counter()
    for i in np.flatnonzero(~kept):
        reasons[passed_reason if finite[i] else ((errors[i] or "unscored").split(":", 1)[0])] += 1
    return kept, reasons


def write_filtered(output_dir: str, files: list[str], kept_ids: set[str]) -> None:
    """Each shard's kept rows (all columns, the datasets features kept) into `<output_dir>/filtered/`, swapped in
    whole so a reader never sees a mix of two filterings."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    target = os.path.join(output_dir, FILTERED_DIR)
    staging = make_staging_dir(target)
    value_set = pa.array(sorted(kept_ids), type=pa.string())
    for path in files:
        table = pq.read_table(path)
        table = table.filter(pc.is_in(table[ID].cast(pa.string()), value_set=value_set))
        pq.write_table(table, os.path.join(staging, os.path.basename(path)))
    replace_directory(staging, target)


def filter_dataset(output_dir: str, files: list[str], args) -> dict[str, Any]:
    table = read_scores(files, [ID, args.score, ERROR])
    ids = np.asarray([str(i) for i in table[ID].to_pylist()])
    scores = np.asarray(table[args.score].to_numpy(zero_copy_only=False), dtype=np.float64)
    errors = [e or "" for e in table[ERROR].to_pylist()]
    kept, reasons = select_rows(ids, scores, errors, args.keep_above, args.keep_fraction)
    write_filtered(output_dir, files, set(ids[kept].tolist()))
    summary = {"score": args.score, "keep_above": args.keep_above, "keep_fraction": args.keep_fraction,
               "rows": int(len(ids)), "scored": int(np.isfinite(scores).sum()), "kept": int(kept.sum()),
               "dropped": int((~kept).sum()), "dropped_by_reason": dict(sorted(reasons.items())),
               "lowest_kept_score": float(scores[kept].min()) if kept.any() else None,
               "filtered_data": os.path.join(output_dir, FILTERED_DIR)}
    write_json_atomic(os.path.join(output_dir, "filter_summary.json"), summary, indent=2)
    return summary


# ----------------------------------------------------------------------------------------------------------------
# Noise detection
# ----------------------------------------------------------------------------------------------------------------


def noise_labels(values: list, column: str, clean_value: str) -> tuple[np.ndarray, np.ndarray]:
    """`(is_clean, category)` from a noise column: booleans (true = noisy), 0/1 integers (1 = noisy), or
    categories where `clean_value` marks the clean rows.

    Raises:
        ValueError: missing values, or a categorical column without `clean_value`, naming the column.
    """
    if any(v is None for v in values):
        raise ValueError(f"--noise_column {column!r} has missing values; every row must say whether it is noisy")
    distinct = set(values)
    if all(isinstance(v, (bool, np.bool_)) for v in distinct) or distinct <= {0, 1}:
        noisy = np.asarray([bool(v) for v in values])
        return ~noisy, np.where(noisy, "noisy", clean_value)
    categories = np.asarray([str(v) for v in values])
    if clean_value not in set(categories.tolist()):
        raise ValueError(f"--noise_column {column!r} is categorical but no row has --clean_value {clean_value!r}; its "
                         f"values: {sorted(set(categories.tolist()))[:10]}")
    return categories == clean_value, categories


def detect_noise(output_dir: str, files: list[str], args, kept_fraction: float | None) -> dict[str, Any]:
    """ROC AUC and precision at the kept fraction of every score against `--noise_column`; per noisy category
    too when the column is categorical. Without filtering, the kept fraction is the clean share (where
    precision equals recall)."""
    columns = score_columns(files)
    table = read_scores(files, [ID, args.noise_column, *columns])
    is_clean, category = noise_labels(table[args.noise_column].to_pylist(), args.noise_column, args.clean_value)
    fraction = kept_fraction if kept_fraction is not None else float(is_clean.mean())
    ids = np.asarray([str(i) for i in table[ID].to_pylist()])
    scores = {c: np.asarray(table[c].to_numpy(zero_copy_only=False), dtype=np.float64) for c in columns}
    result = {"noise_column": args.noise_column, "rows": int(len(ids)), "noisy": int((~is_clean).sum()),
              "kept_fraction": fraction, "scores": detection_metrics(is_clean, scores, fraction, ids)}
    noisy_categories = sorted(set(category[~is_clean].tolist()))
    if len(noisy_categories) > 1:
        result["auc_by_category"] = {
            name: {c: roc_auc(is_clean[rows], v[rows]) for c, v in scores.items()
                   for rows in [(is_clean | (category == name)) & np.isfinite(v)]}
            for name in noisy_categories}
    write_json_atomic(os.path.join(output_dir, "noise_detection.json"), result, indent=2)
    return result


def detection_table(result: dict[str, Any]) -> str:
    """The detection results as a Markdown table."""
    lines = [f"noise column {result['noise_column']!r}: {result['noisy']} noisy of {result['rows']} rows; "
             f"precision at kept fraction {result['kept_fraction']:.3f}", "",
             "| score | ROC AUC | kept rows clean | dropped rows noisy |", "|---|---:|---:|---:|"]
    for name, m in result["scores"].items():
        lines.append(f"| {name} | {m['auc']:.3f} | {m['kept_clean_precision']:.3f} | "
                     f"{m['dropped_noisy_precision']:.3f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Report for people
# ----------------------------------------------------------------------------------------------------------------


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)  # per-figure canvas: the process-wide backend is left alone
    return figure


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def plot_histograms(scores: dict[str, np.ndarray], is_clean: np.ndarray | None, path: str) -> None:
    """One histogram per score (finite values), clean and noisy rows overlaid when the noise is known."""
    names = list(scores)
    cols = 4
    rows = math.ceil(len(names) / cols)
    figure = _figure(4 * cols, 3 * rows)
    for k, name in enumerate(names):
        axis = figure.add_subplot(rows, cols, k + 1)
        values = scores[name]
        finite = np.isfinite(values)
        bins = np.histogram_bin_edges(values[finite], bins=40) if finite.any() else 10
        if is_clean is None:
            axis.hist(values[finite], bins=bins, color="tab:blue")
        else:
            axis.hist(values[finite & is_clean], bins=bins, alpha=0.6, color="tab:blue", label="clean")
            axis.hist(values[finite & ~is_clean], bins=bins, alpha=0.6, color="tab:red", label="noisy")
            axis.legend(fontsize=8)
        axis.set_title(name, fontsize=10)
        axis.set_ylabel("rows", fontsize=8)
        axis.tick_params(labelsize=7)
    figure.tight_layout()
    write_bytes_atomic(path, _png(figure))


def _rows_by_id(files: list[str], wanted: list[str], columns: list[str]) -> dict[str, dict]:
    """The rows with the given ids (only those are read from each shard)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    value_set = pa.array(wanted, type=pa.string())
    found = {}
    for path in files:
        table = pq.read_table(path, columns=columns)
        table = table.filter(pc.is_in(table[ID].cast(pa.string()), value_set=value_set))
        for row in table.to_pylist():
            found[str(row[ID])] = row
    return found


def _thumbnail_png(cell, size: int = 128) -> bytes | None:
    from alip_hf.data import decode_image

    try:
        image = decode_image(cell).convert("RGB")
    except Exception:  # an unreadable image is shown as missing, never a crash
        return None
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _short(text: str | None, limit: int = 120) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def contact_sheet_rows(files: list[str], args, image_column: str, scores: np.ndarray, ids: np.ndarray,
                       is_clean: np.ndarray | None) -> dict[str, list[dict]]:
    """`{"lowest": [...], "highest": [...]}`: the `report_rows` lowest- and highest-scored rows by `--score`, each
    with its id, score, image thumbnail (PNG bytes), web text, caption and noise label."""
    finite = np.flatnonzero(np.isfinite(scores))
    order = finite[np.lexsort((ids[finite], scores[finite]))]
    k = min(args.report_rows, len(order))
    picks = {"lowest": order[:k].tolist(), "highest": order[::-1][:k].tolist()}
    wanted = sorted({str(ids[i]) for rows in picks.values() for i in rows})
    found = _rows_by_id(files, wanted, [ID, image_column, args.text_column, args.caption_column])
    sheet = {}
    for section, rows in picks.items():
        sheet[section] = [{
            "id": str(ids[i]), "score": float(scores[i]),
            "image": _thumbnail_png(found[str(ids[i])][image_column]),
            "text": found[str(ids[i])][args.text_column], "caption": found[str(ids[i])][args.caption_column],
            "noisy": None if is_clean is None else bool(not is_clean[i]),
        } for i in rows]
    return sheet


def plot_contact_sheet(sheet: dict[str, list[dict]], score: str, path: str) -> None:
    """Two blocks of cells (lowest, highest), each cell the image over its web text and caption."""
    from PIL import Image

    cols = 4
    blocks = [(name, rows) for name, rows in sheet.items() if rows]
    grid_rows = sum(math.ceil(len(rows) / cols) for _, rows in blocks)
    figure = _figure(4.2 * cols, 3.6 * grid_rows + 0.6 * len(blocks))
    grid = figure.add_gridspec(grid_rows, cols)
    row = 0
    for name, rows in blocks:
        for k, item in enumerate(rows):
            axis = figure.add_subplot(grid[row + k // cols, k % cols])
            if item["image"] is not None:
                axis.imshow(np.asarray(Image.open(io.BytesIO(item["image"]))), interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            flag = "" if item["noisy"] is None else (" [noisy]" if item["noisy"] else " [clean]")
            axis.set_title(f"{name} {k + 1}: {score}={item['score']:.3f}{flag}", fontsize=8,
                           color="tab:red" if item["noisy"] else "black")
            caption = "\n".join(textwrap.wrap("web: " + _short(item["text"], 90), 44)[:2]
                                + textwrap.wrap("caption: " + _short(item["caption"], 90), 44)[:2])
            axis.set_xlabel(caption, fontsize=7)
        row += math.ceil(len(rows) / cols)
    figure.tight_layout()
    write_bytes_atomic(path, _png(figure))


def render_html(sheet: dict[str, list[dict]], score: str, summary: dict[str, Any]) -> str:
    """A self-contained page (images embedded as data URIs, every text HTML-escaped): the histogram and the
    lowest- and highest-scored pairs."""
    def cell(item: dict) -> str:
        image = (f'<img alt="{html.escape(item["id"])}" src="data:image/png;base64,'
                 f'{base64.b64encode(item["image"]).decode()}">' if item["image"] else "<em>unreadable image</em>")
        flag = "" if item["noisy"] is None else ('<span class="noisy">noisy</span>' if item["noisy"]
                                                 else '<span class="clean">clean</span>')
        return (f'<tr><td>{image}</td><td class="num">{item["score"]:.4f} {flag}</td>'
                f'<td><code>{html.escape(item["id"])}</code></td><td>{html.escape(item["text"] or "")}</td>'
                f'<td>{html.escape(item["caption"] or "")}</td></tr>')

    sections = []
    for name, rows in sheet.items():
        body = "\n".join(cell(item) for item in rows)
        sections.append(f"<h2>{html.escape(name)}-scored pairs by {html.escape(score)}</h2>\n<table>\n"
                        "<tr><th>image</th><th>score</th><th>id</th><th>web text</th><th>caption</th></tr>\n"
                        f"{body}\n</table>")
    facts = "".join(f"<li>{html.escape(k)}: {html.escape(str(v))}</li>" for k, v in summary.items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Noise audit: {html.escape(score)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; margin-bottom: 2em; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; text-align: left; max-width: 28em; }}
td img {{ width: 128px; height: 128px; object-fit: contain; image-rendering: pixelated; }}
.num {{ font-variant-numeric: tabular-nums; white-space: nowrap; }}
.noisy {{ color: #b00; font-weight: bold; }} .clean {{ color: #070; }}
</style></head><body>
<h1>Noise audit</h1>
<ul>{facts}</ul>
<p><img src="weights_histogram.png" alt="histograms of the scores" style="max-width: 100%"></p>
{chr(10).join(sections)}
</body></html>
"""


def write_report(output_dir: str, files: list[str], args, image_column: str) -> dict[str, str]:
    """The histogram, the contact sheet (PNG) and the HTML page in `<output_dir>/report/`; returns their paths."""
    columns = score_columns(files)
    extra = [args.noise_column] if args.noise_column else []
    table = read_scores(files, [ID, *columns, *extra])
    ids = np.asarray([str(i) for i in table[ID].to_pylist()])
    scores = {c: np.asarray(table[c].to_numpy(zero_copy_only=False), dtype=np.float64) for c in columns}
    is_clean = None
    if args.noise_column:
        is_clean, _ = noise_labels(table[args.noise_column].to_pylist(), args.noise_column, args.clean_value)
    report = os.path.join(output_dir, REPORT_DIR)
    paths = {name: os.path.join(report, name) for name in ("weights_histogram.png", "contact_sheet.png", "index.html")}
    plot_histograms(scores, is_clean, paths["weights_histogram.png"])
    sheet = contact_sheet_rows(files, args, image_column, scores[args.score], ids, is_clean)
    plot_contact_sheet(sheet, args.score, paths["contact_sheet.png"])
    summary = {"rows": len(ids), "scored": int(np.isfinite(scores[args.score]).sum()), "score": args.score,
               "model": args.model or args.sample_weights}
    write_text_atomic(paths["index.html"], render_html(sheet, args.score, summary))
    return paths


def analyse(run, args) -> dict[str, Any]:
    """Filtering, noise detection and the report, from the written shards (main process)."""
    files = shard_files(run.output_dir, run.split)
    result: dict[str, Any] = {}
    kept_fraction = None
    if args.keep_above is not None or args.keep_fraction is not None:
        result["filter"] = filter_dataset(run.output_dir, files, args)
        kept_fraction = result["filter"]["kept"] / max(result["filter"]["scored"], 1)
    if args.noise_column is not None:
        result["noise_detection"] = detect_noise(run.output_dir, files, args, kept_fraction)
        print(detection_table(result["noise_detection"]))
    if args.report:
        result["report"] = write_report(run.output_dir, files, args, run.image_column)
    return result


__all__ = ["analyse", "detect_noise", "detection_table", "filter_dataset", "noise_labels", "select_rows",
           "write_report"]
