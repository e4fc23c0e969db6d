"""Noise audit: score every image-text pair with a trained ALIP model's gates, filter, and report.

ALIP's Language Consistency Gate (LCG) and Description Consistency Gate (DCG) learn during training which web
pairs to trust (ALIP paper, arXiv 2308.08428, Section 3): the LCG sample weight
`W^s = min(exp(gamma (S_tc - H_tc)), 1)` compares the web text `t` with the synthetic caption `c`; the DCG pair
weights `W^t = exp(gamma (S_xt - H_xt))`, `W^c = exp(gamma (S_xc - H_xc))` compare the image `x` with each text and
apply only where `W^s < 1`. This step computes them for every row of a dataset, with the running means `H` the
model learned, plus a CLIP-score baseline (the image-web text cosine of `--clip_score_model`, by default the audited
model itself):

    python -m recaption.audit --model outputs/alip-demo --source demo --output_dir out/audit \\
        --keep_fraction 0.7 --score lcg_weight_raw --noise_column noisy
    accelerate launch -m recaption.audit ...            # shards split across processes/nodes

Difference from training, on purpose: in training the gates first update their running means with the batch's
mean similarity, so a sample's weight depends on the other samples of its batch. Here the model is in eval mode,
the running means stay fixed at their trained values (the gates never update), and each row's values depend on
that row alone: the same row gets the same scores whatever the batch size or the shard it falls in (tested).

Writes, beside `recaption.layout`'s files (shards joined on id, resumable, provenance in `run_config.json`): the
columns of `alip_hf.schema.AUDIT_SCORES` and `audit_model`; with `--keep_above`/`--keep_fraction` the filtered
dataset in `<output_dir>/filtered/` and `filter_summary.json` (dropped rows counted per reason); with
`--noise_column` `noise_detection.json` (ROC AUC and precision at the kept fraction per score); and a report for
people in `<output_dir>/report/` (`weights_histogram.png`, `contact_sheet.png`, `index.html`).

`--sample_weights DIR` instead of `--model` takes the gate values `train.py --log_sample_weights` recorded during
training (joined on id), for the same filtering and report. See docs/audit.md.
"""

from __future__ import annotations

import glob
import math
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from alip_hf.identity import sha256_files
from alip_hf.lazy import lazy_import
from alip_hf.sources import is_empty_text
from alip_hf.schema import (
    ALT_TEXT,
    AUDIT_MODEL,
    AUDIT_SCORES,
    CAPTION,
    CLIP_SCORE,
    DCG_CAPTION_WEIGHT,
    DCG_TEXT_WEIGHT,
    ERROR,
    GATE_COLUMNS,
    ID,
    LCG_WEIGHT,
    LCG_WEIGHT_RAW,
    SIMILARITY_IMAGE_CAPTION,
    SIMILARITY_IMAGE_TEXT,
    SIMILARITY_TEXT_CAPTION,
)
from recaption.arguments import RunArguments
from recaption.run import run_sharded
from recaption.source import load_image, load_input
from recaption.step import StepResult, chunks, error_column

datasets = lazy_import("datasets")  # on first use: `--help` must not wait for it

# The values a score can take: a `--keep_above` outside them is an error. The DCG weights are unclipped by
# default (as in the official code), so only the LCG weight is bounded by 1.
SCORE_RANGES: dict[str, tuple[float, float]] = {
    LCG_WEIGHT: (0.0, 1.0),
    LCG_WEIGHT_RAW: (0.0, math.inf),
    DCG_TEXT_WEIGHT: (0.0, math.inf),
    DCG_CAPTION_WEIGHT: (0.0, math.inf),
    SIMILARITY_TEXT_CAPTION: (-1.0, 1.0),
    SIMILARITY_IMAGE_TEXT: (-1.0, 1.0),
    SIMILARITY_IMAGE_CAPTION: (-1.0, 1.0),
    CLIP_SCORE: (-1.0, 1.0),
}
GATE_BUFFERS = ("gates.lcg.text_caption.running_mean", "gates.dcg.image_text.running_mean",
                "gates.dcg.image_caption.running_mean")


@dataclass
class AuditArguments:
    """Which model scores the rows, and what is done with the scores."""

    model: str | None = field(
        default=None, metadata={"help": "ALIP model (directory or Hub id) trained with --recipe alip, whose gates "
                                        "score the rows."})
    revision: str | None = field(default=None, metadata={"help": "Revision of --model on the Hub."})
    sample_weights: str | None = field(
        default=None, metadata={"help": "Instead of --model: the gate values `train.py --log_sample_weights` wrote "
                                        "(its output_dir/sample_weights), joined on id."})
    clip_score_model: str | None = field(
        default=None, metadata={"help": "CLIP or ALIP model of the clip_score column (default: --model itself)."})
    text_column: str = field(default=ALT_TEXT, metadata={"help": "Column of the web text (AltText)."})
    caption_column: str = field(default=CAPTION, metadata={"help": "Column of the synthetic caption."})
    batch_size: int = field(default=64, metadata={"help": "Rows per forward pass (the scores do not depend on it)."})
    score: str = field(
        default=LCG_WEIGHT_RAW,
        metadata={"help": "Score that --keep_above/--keep_fraction filter on and the contact sheet sorts by "
                          "(higher = cleaner).", "choices": list(AUDIT_SCORES)})
    keep_above: float | None = field(default=None, metadata={"help": "Keep rows whose --score is at least this."})
    keep_fraction: float | None = field(
        default=None, metadata={"help": "Keep this fraction (0, 1] of the scored rows, the highest --score first."})
    noise_column: str | None = field(
        default=None, metadata={"help": "Boolean (true = noisy) or categorical column marking the noisy rows: "
                                        "reports detection ROC AUC and precision for each score."})
    clean_value: str = field(
        default="clean", metadata={"help": "The value of a categorical --noise_column that marks clean rows."})
    report: bool = field(default=True, metadata={"help": "Write the histogram, contact sheet and HTML page."})
    report_rows: int = field(default=8, metadata={"help": "Lowest- and highest-scored pairs on the contact sheet."})

    def __post_init__(self):
        if (self.model is None) == (self.sample_weights is None):
            raise ValueError("give exactly one of --model (score with a trained ALIP model) and --sample_weights "
                             "(values recorded by train.py --log_sample_weights)")
        if self.score not in SCORE_RANGES:
            raise ValueError(f"--score {self.score!r}: choose one of {list(SCORE_RANGES)}")
        if self.sample_weights is not None and self.score == CLIP_SCORE:
            raise ValueError("--score clip_score needs --model: train.py --log_sample_weights records gate values only")
        if self.keep_above is not None and self.keep_fraction is not None:
            raise ValueError("give --keep_above or --keep_fraction, not both")
        if self.keep_fraction is not None and not 0 < self.keep_fraction <= 1:
            raise ValueError(f"--keep_fraction must be in (0, 1], got {self.keep_fraction}")
        if self.keep_above is not None:
            low, high = SCORE_RANGES[self.score]
            if not low <= self.keep_above <= high:
                raise ValueError(f"--keep_above {self.keep_above} is outside [{low}, {high}], the range of "
                                 f"--score {self.score}")
        if self.batch_size < 1 or self.report_rows < 1:
            raise ValueError(f"--batch_size and --report_rows must be >= 1, got {self.batch_size}, {self.report_rows}")


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


def load_gated_model(path: str, revision: str | None = None):
    """An `ALIPModel` whose gate running means were trained, in eval mode.

    Raises:
        ValueError: the checkpoint has no gate buffers (a plain CLIP checkpoint: `ALIPModel.from_pretrained` would
            silently start them at their initial value), or its running means were never updated (a model trained
            with a recipe without gates).
    """
    from alip_hf.pretrained import load_model
    from modeling_alip import ALIPModel

    try:
        model, info = load_model(path, ALIPModel, revision=revision, flag="--model", output_loading_info=True)
    except (OSError, ValueError) as error:
        raise ValueError(f"--model {path!r}: cannot load it as an ALIP model: {error}") from error
    missing = [key for key in GATE_BUFFERS if key in info.get("missing_keys", ())]
    if missing:
        raise ValueError(
            f"--model {path!r} has no gate running means ({', '.join(missing)} missing from the checkpoint): it is a "
            "plain CLIP checkpoint, whose gates were never trained. Audit an ALIP model trained with --recipe alip, "
            "or pass a CLIP model as --clip_score_model for the CLIP-score alone.")
    means = {name: float(model.get_buffer(name)) for name in GATE_BUFFERS}
    if all(value == model.config.gate_initial_mean for value in means.values()):
        raise ValueError(
            f"--model {path!r}: the gate running means are all at their initial value {model.config.gate_initial_mean}"
            ": the gates were never updated (a model trained with --recipe clip or veclip?). Audit an ALIP model "
            "trained with --recipe alip.")
    return model.eval()


def _image_embeds(model, processor, images: list):
    """PIL images -> `(B, D)` L2-normalised float32 embeddings (eval preprocessing: resize + centre crop)."""
    import torch.nn.functional as F

    parameter = next(model.parameters())
    image_processor = getattr(processor, "image_processor", None) or processor
    pixels = image_processor(images, return_tensors="pt")["pixel_values"].to(parameter.device, parameter.dtype)
    return F.normalize(model.get_image_features(pixel_values=pixels).pooler_output.float(), dim=-1)


def _text_embeds(model, processor, texts: list[str]):
    """Texts -> `(B, D)` L2-normalised float32 embeddings (the processor's cleaning and truncation, as eval.py)."""
    import torch.nn.functional as F

    from alip_hf.evaluation.features import tokenize

    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in tokenize(processor, texts).items() if v is not None}
    return F.normalize(model.get_text_features(**inputs).pooler_output.float(), dim=-1)


class GateScorer:
    """Per-row gate values of a trained ALIP model and the CLIP-score of `clip_model` (default: the same model).

    The model is in eval mode: the gates read their trained running means and never update them, so the values
    of a row do not depend on the rest of its batch.
    """

    def __init__(self, model_path: str, revision: str | None = None, clip_score_model: str | None = None,
                 device="cpu"):
        from alip_hf.evaluation.features import model_fingerprint
        from alip_hf.pretrained import load_model_and_processor, load_processor

        self.model = load_gated_model(model_path, revision).to(device)
        self.processor = load_processor(model_path, self.model.config, revision=revision, flag="--model")
        self.clip_model = self.clip_processor = None
        if clip_score_model is not None:
            try:
                self.clip_model, self.clip_processor = load_model_and_processor(clip_score_model,
                                                                                flag="--clip_score_model")
            except (OSError, ValueError) as error:
                raise ValueError(f"--clip_score_model {clip_score_model!r}: cannot load it: {error}") from error
            self.clip_model = self.clip_model.to(device).eval()
            if not hasattr(self.clip_model, "get_image_features"):
                raise ValueError(f"--clip_score_model {clip_score_model!r} is a {type(self.clip_model).__name__}, "
                                 "not a CLIP-style model with get_image_features/get_text_features")
        self.commit = getattr(self.model.config, "_commit_hash", None)
        # sha256 of every parameter and buffer (gate running means included): what scored the rows
        self.digest = model_fingerprint(self.model)
        self.clip_digest = model_fingerprint(self.clip_model) if self.clip_model is not None else None

    def __call__(self, images: list, texts: list[str], captions: list[str]) -> dict[str, np.ndarray]:
        """PIL images and their two texts -> `{column: (B,) float64}` for every column of `AUDIT_SCORES`."""
        import torch

        with torch.inference_mode():
            image = _image_embeds(self.model, self.processor, images)
            text = _text_embeds(self.model, self.processor, texts)
            caption = _text_embeds(self.model, self.processor, captions)
            gates = self.model.gates(image, text, caption)  # eval mode: fixed H, no update
            clip_score = gates.similarity_image_text
            if self.clip_model is not None:
                clip_image = _image_embeds(self.clip_model, self.clip_processor, images)
                clip_score = (clip_image * _text_embeds(self.clip_model, self.clip_processor, texts)).sum(dim=1)
        values = {
            LCG_WEIGHT: gates.sample_weight, LCG_WEIGHT_RAW: gates.sample_weight_raw,
            DCG_TEXT_WEIGHT: gates.text_pair_weight, DCG_CAPTION_WEIGHT: gates.caption_pair_weight,
            SIMILARITY_TEXT_CAPTION: gates.similarity_text_caption, SIMILARITY_IMAGE_TEXT: gates.similarity_image_text,
            SIMILARITY_IMAGE_CAPTION: gates.similarity_image_caption, CLIP_SCORE: clip_score,
        }
        return {name: value.double().cpu().numpy() for name, value in values.items()}


# ----------------------------------------------------------------------------------------------------------------
# Steps (recaption.step.Step): new columns for one shard, keyed by id
# ----------------------------------------------------------------------------------------------------------------


def _reason(error: Exception) -> str:
    # Without object addresses ("<_io.BytesIO object at 0x...>"), so reruns write the same text.
    return re.sub(r" at 0x[0-9a-fA-F]+", "", f"{type(error).__name__}: {error}")


class _AuditStepBase:
    """What both steps share: the columns read, row checks, and the summary."""

    unit = "row"

    def __init__(self, run: RunArguments, args: AuditArguments):
        self.run, self.args = run, args

    def required_columns(self) -> dict[str, str]:
        # The caption's role makes a missing caption column an error that says to run recaption.caption first.
        columns = {"image": self.run.image_column, ALT_TEXT: self.args.text_column, CAPTION: self.args.caption_column}
        if self.args.noise_column is not None:
            columns["noise"] = self.args.noise_column
        return columns

    def check_rows(self, shard: datasets.Dataset, ids: list[str]) -> tuple[list[tuple], dict[str, str]]:
        """`([(id, image, text, caption)] of the scorable rows, {id: error})`; the error's first word is its
        reason (`unreadable_image`, `empty_text`, `empty_caption`), which filtering counts. Empty is the data
        contract's rule (`alip_hf.sources.is_empty_text`), so the rows not scored are the rows training skips."""
        valid, errors = [], {}
        columns = (shard[self.run.image_column], shard[self.args.text_column], shard[self.args.caption_column])
        for row_id, cell, text, caption in zip(ids, *columns):
            if is_empty_text(text):
                errors[row_id] = f"empty_text: column {self.args.text_column!r} is empty"
            elif is_empty_text(caption):
                errors[row_id] = f"empty_caption: column {self.args.caption_column!r} is empty"
            else:
                try:
                    valid.append((row_id, load_image(cell), text, caption))
                except Exception as error:  # any decoding failure is data, not a crash
                    errors[row_id] = f"unreadable_image: column {self.run.image_column!r}: {_reason(error)}"
        return valid, errors

    @staticmethod
    def counts(ids: list[str], errors: dict[str, str], values: dict[str, dict[str, float]]) -> dict[str, float]:
        counts: dict[str, float] = {"rows": len(ids), "failures": len(errors)}
        for error in errors.values():
            key = f"failed/{error.split(':', 1)[0]}"
            counts[key] = counts.get(key, 0) + 1
        scored = [i for i in ids if i not in errors]
        counts["scored"] = len(scored)
        for column, by_id in values.items():
            counts[f"sum/{column}"] = float(sum(by_id[i] for i in scored if math.isfinite(by_id[i])))
        if LCG_WEIGHT_RAW in values:
            counts["lcg_inconsistent"] = sum(1 for i in scored if values[LCG_WEIGHT_RAW][i] < 1)
        return counts

    def summarize(self, totals: dict[str, float]) -> dict[str, Any]:
        scored = max(totals.get("scored", 0), 1)
        means = {key[len("sum/"):]: round(value / scored, 6) for key, value in totals.items() if key.startswith("sum/")}
        return {"failures": int(totals.get("failures", 0)), "means": means,
                "lcg_inconsistent_fraction": round(totals.get("lcg_inconsistent", 0) / scored, 6)}


class AuditStep(_AuditStepBase):
    """Adds the gate values, the similarities, the CLIP-score and `audit_model` to each shard."""

    name = "audit"

    def __init__(self, run: RunArguments, args: AuditArguments, scorer: GateScorer):
        super().__init__(run, args)
        self.scorer = scorer

    @property
    def label(self) -> str:
        """The value of `audit_model`: the model, with its commit (Hub) or the first digits of its weights digest."""
        return f"{self.args.model}@{self.scorer.commit or self.scorer.digest[:12]}"

    def provenance(self) -> dict[str, Any]:
        # Only what changes the scores: a rerun with another --batch_size or --keep_fraction resumes.
        config = self.scorer.model.config
        return {
            AUDIT_MODEL: self.label, "model": self.args.model, "revision": self.args.revision,
            "commit": self.scorer.commit, "weights_sha256": self.scorer.digest,
            "clip_score_model": self.args.clip_score_model or self.args.model,
            "clip_score_weights_sha256": self.scorer.clip_digest or self.scorer.digest,
            "text_column": self.args.text_column, "caption_column": self.args.caption_column,
            "gates": {"H_tc": float(self.scorer.model.get_buffer(GATE_BUFFERS[0])),
                      "H_xt": float(self.scorer.model.get_buffer(GATE_BUFFERS[1])),
                      "H_xc": float(self.scorer.model.get_buffer(GATE_BUFFERS[2])),
                      "lcg_gamma": config.lcg_gamma, "dcg_gamma": config.dcg_gamma,
                      "clip_pair_weights": config.clip_pair_weights},
        }

    def process(self, shard: datasets.Dataset, ids: list[str], progress: Callable[[int], None]) -> StepResult:
        valid, errors = self.check_rows(shard, ids)
        values: dict[str, dict[str, float]] = {column: dict.fromkeys(ids, math.nan) for column in AUDIT_SCORES}
        progress(len(errors))
        for batch in chunks(valid, self.args.batch_size):
            batch_ids, images, texts, captions = zip(*batch)
            scores = self.scorer(list(images), list(texts), list(captions))
            for column in AUDIT_SCORES:
                values[column].update(zip(batch_ids, scores[column].tolist()))
            progress(len(batch))
        return StepResult(
            columns={**values, AUDIT_MODEL: dict.fromkeys(ids, self.label), ERROR: error_column(shard, ids, errors)},
            counts=self.counts(ids, errors, values))


class LoggedWeightsStep(_AuditStepBase):
    """Adds the gate values `train.py --log_sample_weights` recorded (the last record of each id) to each shard.

    Rows the log does not hold get NaN values and the error `not_logged`.
    """

    name = "audit-logged"

    def __init__(self, run: RunArguments, args: AuditArguments):
        super().__init__(run, args)
        self.files = sorted(glob.glob(f"{args.sample_weights}/*.parquet"))
        if not self.files:
            raise FileNotFoundError(f"--sample_weights {args.sample_weights!r}: no .parquet files (written by "
                                    "train.py --log_sample_weights in <output_dir>/sample_weights)")
        self.values = self._read_log()
        self.digest = sha256_files(self.files)
        self.label = f"train-log@{self.digest[:12]}"

    def _read_log(self) -> dict[str, dict[str, float]]:
        import pyarrow.parquet as pq

        tables = [pq.read_table(f) for f in self.files]
        columns = set(tables[0].column_names)
        missing = [c for c in (ID, "step", *GATE_COLUMNS) if c not in columns]
        if missing:
            raise ValueError(f"--sample_weights {self.args.sample_weights!r}: columns {missing} missing; available: "
                             f"{sorted(columns)}")
        by_id: dict[str, dict[str, float]] = {}
        for table in tables:
            rows = table.select([ID, "step", *GATE_COLUMNS]).to_pylist()
            for row in sorted(rows, key=lambda r: r["step"]):  # the last record of an id wins
                by_id[str(row[ID])] = row
        return by_id

    def provenance(self) -> dict[str, Any]:
        return {AUDIT_MODEL: self.label, "sample_weights": self.args.sample_weights,
                "sample_weights_sha256": self.digest, "text_column": self.args.text_column,
                "caption_column": self.args.caption_column}

    def process(self, shard: datasets.Dataset, ids: list[str], progress: Callable[[int], None]) -> StepResult:
        _, errors = self.check_rows(shard, ids)
        for row_id in ids:
            if row_id not in errors and row_id not in self.values:
                errors[row_id] = "not_logged: id not in the training log (not seen in the logged steps)"
        values = {column: {i: (math.nan if i in errors else float(self.values[i][column])) for i in ids}
                  for column in GATE_COLUMNS}
        progress(len(ids))
        return StepResult(
            columns={**values, AUDIT_MODEL: dict.fromkeys(ids, self.label), ERROR: error_column(shard, ids, errors)},
            counts=self.counts(ids, errors, values))


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------


def audit(run: RunArguments, args: AuditArguments, accelerator=None) -> dict[str, Any]:
    """Scores every row of `run.source` into `run.output_dir`, then (main process) filters, measures detection
    and writes the report. Returns the run summary with the `filter` and `noise_detection` results."""
    from accelerate import Accelerator

    from recaption.audit_report import analyse, check_report_dependencies

    if run.engine == "ray":
        raise ValueError("recaption.audit does not run on --engine ray; spread it with scheduler tasks "
                         "(--num_tasks/--task_index) or `accelerate launch`")
    if args.report:
        check_report_dependencies()  # before the model loads, not after scoring
    if args.model is not None:
        source = load_input(run, _AuditStepBase(run, args).required_columns())  # a missing column fails first
        accelerator = accelerator or Accelerator()
        scorer = GateScorer(args.model, args.revision, args.clip_score_model, accelerator.device)
        step = AuditStep(run, args, scorer)
    else:
        step = LoggedWeightsStep(run, args)
        source = load_input(run, step.required_columns())
        accelerator = accelerator or Accelerator()
    summary = run_sharded(run, step, accelerator, source)
    if not summary.get("complete"):  # another process, or a scheduler task while other tasks are unfinished
        return summary
    return {**summary, **analyse(run, args)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from transformers import HfArgumentParser

    parser = HfArgumentParser((RunArguments, AuditArguments))
    run, args = parser.parse_args_into_dataclasses(args=argv)
    return audit(run, args)


if __name__ == "__main__":
    main(sys.argv[1:])


__all__ = ["AuditArguments", "AuditStep", "GateScorer", "LoggedWeightsStep", "audit", "load_gated_model"]
