"""Model cards, built with huggingface_hub's card classes (`ModelCard`, `ModelCardData`, `EvalResult`).

The card's YAML header carries what the Hub reads: `license`, `datasets` (Hub datasets trained on),
`base_model` (when fine-tuned from a Hub model), `library_name: transformers`,
`pipeline_tag: zero-shot-image-classification`, tags, and `model-index` (one `EvalResult` per dataset, split and
metric, values in percent as in the tables). The body is `model_card.md` with its `{{placeholders}}` filled.

The evaluation section sits between two HTML comments (`EVALUATION_START` / `EVALUATION_END`), so that
`eval.py --model_card` on a trained model's README replaces that section and merges `model-index`, leaving the
training section and everything else as they were.

What a card says beyond the results is a `ModelCardInfo` (a dataclass: a misspelled field is an error, not a
silently missing value). What is not given is filled from what is known: the licence and its name and link from
`--license`, else from the training data's own card (the bundled demo data's README says `cc0-1.0`); `base_model`
from a Hub `--model_name_or_path`, else from the card of the local checkpoint the run started from; `datasets`
from a Hub `--train_data`.

Cards never hold local paths: a local file or directory is named by its base name (`portable`), and a file the
card links (the recall@k plot) is copied into the card's folder, so that the link survives a push to the Hub.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard

from alip_hf.evaluation.presets import (
    ASSOCIATION,
    LINEAR_PROBE,
    PRESET_GROUPS,
    PRESETS,
    RETRIEVAL,
    ZEROSHOT,
    preset_of_source,
    resolve_tasks,
)
from alip_hf.evaluation.reports import records_from, results_table
from alip_hf.resources import MODEL_CARD_TEMPLATE
from alip_hf.schema import ALT_TEXT, CAPTION
from alip_hf.sources import resolve_source

EVALUATION_START = "<!-- evaluation:start -->"
EVALUATION_END = "<!-- evaluation:end -->"
# What a template must contain for the card to say how to use the model, how it was trained and how it scores.
REQUIRED_PLACEHOLDERS = ("usage", "training", "results_table")
PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")
PIPELINE_TAG = "zero-shot-image-classification"
# model-index task of each evaluation kind. Retrieval has no Hub pipeline tag of its own.
TASK_TYPES = {
    ZEROSHOT: ("zero-shot-image-classification", "Zero-shot image classification"),
    RETRIEVAL: ("image-text-retrieval", "Image-text retrieval"),
    LINEAR_PROBE: ("image-classification", "Linear probe"),
    ASSOCIATION: ("image-association", "Image association (WinoGAViL)"),
}
_TASK_OF_TYPE = {task_type: task for task, (task_type, _) in TASK_TYPES.items()}
METRIC_NAMES = {
    "acc1": "top-1 accuracy", "acc5": "top-5 accuracy", "mean_per_class_recall": "mean per-class recall",
    "lp_acc1": "linear probe top-1 accuracy", "lp_acc5": "linear probe top-5 accuracy",
    "lp_mean_per_class_recall": "linear probe mean per-class recall",
}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass
class ModelCardInfo:
    """What a model card says beyond the results. Every field may be left out; what is not given is filled from
    the training arguments and the cards of the data and the checkpoint the run started from.

    A misspelled field is an error (`ModelCardInfo.from_fields(licence="mit")` raises, naming `license`), never a
    silently missing value.
    """

    model_name: str | None = None  # the card's title; default the Hub model id, else the output directory's name
    repo_id: str | None = None  # the id the usage snippet loads; default the model name
    description: str | None = None
    base_model: str | list[str] | None = None  # Hub id(s) of the model this one was fine-tuned from
    license: str | None = None  # a Hub licence id (`mit`, `cc0-1.0`, `other`, ...)
    license_name: str | None = None  # with license `other`: its name
    license_link: str | None = None  # with license `other`: where its text is
    datasets: list[str] | None = None  # Hub ids of the training data
    train_args: dict | None = None  # train.py's resolved arguments (`train_args.yaml`)
    eval_command: str | None = None  # how to evaluate again; default: derived from the records
    recall_plot: str | None = None  # the recall@k plot, as linked from the card (`linked_file`)
    results_table: str | None = None  # default: `reports.results_table` of the records
    placeholders: dict[str, str] = field(default_factory=dict)  # values of a custom template's own placeholders

    @classmethod
    def from_fields(cls, **fields) -> ModelCardInfo:
        """`ModelCardInfo(**fields)`, with an error that names each unknown field and the closest known one.

        Raises:
            TypeError: a field that `ModelCardInfo` does not have.
        """
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = [name for name in fields if name not in known]
        if unknown:
            hints = []
            for name in unknown:
                close = difflib.get_close_matches(name, known, n=1)
                hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise TypeError(f"unknown model card field {', '.join(hints)}; the fields are {', '.join(known)} (a "
                            "value for another placeholder of a custom template goes in placeholders={...})")
        return cls(**fields)


# ----------------------------------------------------------------------------------------------------------------
# Names without local paths
# ----------------------------------------------------------------------------------------------------------------


def is_local(value: str) -> bool:
    return os.path.isabs(value) or value.startswith(("./", "../", "~")) or os.path.exists(value)


def hub_id(value: str | None) -> str | None:
    """`value` when it reads as a Hub repository id (`org/name`) and is not a local path, else None."""
    if not value or is_local(value) or not HUB_ID.fullmatch(value):
        return None
    return value


def portable(value) -> str:
    """A value fit for a public card: a local path becomes its base name, anything else stays as it is."""
    text = str(value)
    if is_local(text):
        return Path(text.rstrip("/")).name or text
    return text


def portable_command(argv: list[str], model_flag: str = "--model") -> str:
    """A command line for the card: the model argument becomes `<this directory>`, local paths base names."""
    tokens, replace_next = [], False
    for token in argv:
        if replace_next:
            token, replace_next = (token if hub_id(token) else "<this directory>"), False
        elif token == model_flag:
            replace_next = True
        tokens.append(portable(token) if token != "<this directory>" else token)
    return " ".join(t if t == "<this directory>" else shlex.quote(t) for t in tokens)


# ----------------------------------------------------------------------------------------------------------------
# model-index
# ----------------------------------------------------------------------------------------------------------------


def eval_results(records: list[dict]) -> list[EvalResult]:
    """One `EvalResult` per record and metric (values in percent, 2 decimals; NaN and `lp_C` left out)."""
    results = []
    for record in records:
        if record.get("status", "ok") != "ok" or not record.get("metrics"):  # a failed task has no metrics
            continue
        task_type, task_name = TASK_TYPES[record["task"]]
        source = record.get("source")
        dataset_type = hub_id(source) or portable(record["dataset"])
        for metric, value in record["metrics"].items():
            if metric == "lp_C" or value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            results.append(EvalResult(
                task_type=task_type, task_name=task_name, dataset_type=dataset_type,
                dataset_name=portable(record["dataset"]), dataset_split=record.get("split") or None,
                metric_type=metric, metric_name=f"{_metric_name(metric)} (%)",
                metric_value=round(100 * float(value), 2)))
    return results


def _metric_name(metric: str) -> str:
    if metric in METRIC_NAMES:
        return METRIC_NAMES[metric]
    side, _, k = metric.partition("_recall@")  # CLIP_benchmark: image_retrieval = text -> image
    direction = {"image_retrieval": "text-to-image", "text_retrieval": "image-to-text"}.get(side, side)
    return f"{direction} recall@{k}" if k else metric


def records_from_eval_results(results: list[EvalResult]) -> list[dict]:
    """The records (`dataset`, `task`, `split`, `metrics` as fractions) that `eval_results` made, in order."""
    records: dict[tuple, dict] = {}
    for result in results:
        task = _TASK_OF_TYPE.get(result.task_type, ZEROSHOT)
        key = (result.dataset_name, task, result.dataset_split or "")
        record = records.setdefault(key, {"dataset": result.dataset_name, "task": task,
                                          "split": result.dataset_split or "", "metrics": {}})
        record["metrics"][result.metric_type] = float(result.metric_value) / 100
    return list(records.values())


def merge_eval_results(old: list[EvalResult] | None, new: list[EvalResult]) -> list[EvalResult]:
    """`old` with each metric that `new` measures again replaced (same task, dataset, split, metric), then the
    metrics `new` adds."""
    def key(result: EvalResult):
        return (*result.unique_identifier, result.metric_type)

    fresh = {key(r): r for r in new}
    merged = [fresh.pop(key(r), r) for r in (old or [])]
    return merged + list(fresh.values())


# ----------------------------------------------------------------------------------------------------------------
# Usage snippet and training summary
# ----------------------------------------------------------------------------------------------------------------


def usage_snippet(repo_id: str) -> str:
    """Python that classifies an image with the zero-shot pipeline and computes CLIP features, as written. It
    needs only torch, transformers and pillow: `trust_remote_code=True` runs the model code stored with the model.
    Both halves score the same texts (the pipeline is given `hypothesis_template="{}"`), so they print the same
    probabilities."""
    repo = json.dumps(repo_id)
    return f'''```python
# pip install torch transformers pillow
# (trust_remote_code=True runs the model code stored in the repository: nothing else needs installing)
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor, pipeline

image = Image.new("RGB", (224, 224), "white")  # your image: Image.open("photo.jpg")
labels = ["a photo of a cat", "a photo of a dog"]

# hypothesis_template="{{}}" scores the labels as written, as the features below do; the pipeline's default
# template, "This is a photo of {{}}.", would wrap each label in a sentence and so give other scores.
classifier = pipeline("zero-shot-image-classification", model={repo}, trust_remote_code=True)
scores = classifier(image, candidate_labels=labels, hypothesis_template="{{}}")
print({{s["label"]: round(s["score"], 3) for s in scores}})

# image and text features (L2-normalised) for retrieval
model = AutoModel.from_pretrained({repo}, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained({repo}, trust_remote_code=True)
with torch.no_grad():
    image_features = model.get_image_features(**processor(images=[image])).pooler_output
    text_features = model.get_text_features(**processor(text=labels)).pooler_output
image_features = image_features / image_features.norm(dim=-1, keepdim=True)
text_features = text_features / text_features.norm(dim=-1, keepdim=True)
probs = (model.logit_scale.exp() * image_features @ text_features.T).softmax(dim=-1)
print({{label: round(p, 3) for label, p in zip(labels, probs[0].tolist())}})
```'''


TRAINING_KEYS = ("recipe", "model_config", "config_overrides", "model_name_or_path", "train_data", "dataset_config_name", "train_split",
                 "max_train_samples", "max_steps", "num_train_epochs", "per_device_train_batch_size",
                 "gradient_accumulation_steps", "learning_rate", "lr_scheduler_type", "weight_decay", "seed")


def training_summary(train_args: dict) -> str:
    if not train_args:
        return "Not recorded."
    keys = [k for k in TRAINING_KEYS if train_args.get(k) is not None]
    lines = [f"- `{k}`: `{portable(train_args[k])}`" for k in keys]
    return "\n".join(lines) or "See the saved arguments (`train_args.yaml`)."


def describe_start(train_args: dict, base_model: str | list[str] | None) -> str:
    source = train_args.get("model_name_or_path")
    first = base_model[0] if isinstance(base_model, list) and base_model else base_model
    if not source and not first:
        size = train_args.get("model_config")
        return f"trained from scratch ({size} size)" if size else "trained from scratch"
    if source and not hub_id(source):
        local = f"a local checkpoint `{portable(source)}`"
        return f"{local}, itself from [{first}](https://huggingface.co/{first})" if first else local
    source = first or source
    return f"[{source}](https://huggingface.co/{source})"


def eval_command(records: list[dict], eval_data: str | None = None) -> str:
    """The eval.py command that evaluates the card's datasets again.

    The data is train.py's `--eval_data` when given, else the records' datasets when all are presets, else the
    demo preset; the split is added where the records share one that differs from the presets' own.
    """
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
        columns = next((r["caption_columns"] for r in records if r.get("caption_columns")), [ALT_TEXT, CAPTION])
        # the user's data, named without its local path (the card is public)
        flags = ["--dataset", portable(eval_data), "--task", RETRIEVAL, "--split", split or "test",
                 "--caption_columns", *columns]
    return "python eval.py --model <this directory> " + shlex.join(flags)


# ----------------------------------------------------------------------------------------------------------------
# What the data's and the checkpoint's own cards say
# ----------------------------------------------------------------------------------------------------------------


def local_card_metadata(source: str | None) -> dict:
    """The YAML header of the card (`README.md`) of a local dataset or model: in the directory `source`, or in
    the folder of the file or glob `source` (`demo`: the bundled data). {} for a Hub id (cards are written
    offline) or where there is none."""
    from huggingface_hub.repocard import metadata_load

    source = resolve_source(str(source)) if source else None
    if not source or not is_local(source):
        return {}
    path = Path(str(source))
    folder = path if path.is_dir() else path.parent
    if not (folder / "README.md").is_file():
        return {}
    try:
        return metadata_load(folder / "README.md") or {}
    except (OSError, ValueError):  # an unreadable card says nothing
        return {}


@dataclass
class CardLicense:
    license: str | None
    name: str | None = None
    link: str | None = None
    origin: str = ""  # where it was read, for the card's text

    def describe(self) -> str:
        if not self.license:
            return "not stated (train.py's `--license` sets it)"
        shown = f"`{self.license}`" + (f" ({self.name})" if self.name else "")
        return shown + (f", {self.origin}" if self.origin else "")


def resolve_license(info: ModelCardInfo, train_args: dict) -> CardLicense:
    """The card's licence: `info.license`, else train.py's `--license`, else the training data's card's (the
    bundled demo data: `cc0-1.0`); none when nothing states one (never a made-up `other`)."""
    if info.license:
        return CardLicense(info.license, info.license_name, info.license_link)
    if train_args.get("license"):
        return CardLicense(train_args["license"])
    data = train_args.get("train_data")
    card = local_card_metadata(data)
    if card.get("license"):
        return CardLicense(card["license"], card.get("license_name"), card.get("license_link"),
                       origin=f"as the card of the training data `{portable(data)}` states")
    return CardLicense(None)


def resolve_base_model(info: ModelCardInfo, train_args: dict) -> str | list[str] | None:
    """`info.base_model`, else the Hub id the run started from, else the `base_model` the card of the local
    checkpoint it started from names."""
    source = train_args.get("model_name_or_path")
    return info.base_model or hub_id(source) or local_card_metadata(source).get("base_model")


def linked_file(path: str | os.PathLike, card_dir: str | os.PathLike) -> str:
    """The link a card in `card_dir` gives the file `path`: its relative path when it lies in that folder, else
    its name, after copying it there (atomically): a link out of the model folder breaks once the folder is
    pushed to the Hub."""
    from alip_hf.io import replaced_atomically

    path, card_dir = Path(path).resolve(), Path(card_dir).resolve()
    if path.is_relative_to(card_dir):
        return path.relative_to(card_dir).as_posix()
    with open(path, "rb") as source, replaced_atomically(card_dir / path.name, "wb") as target:
        shutil.copyfileobj(source, target)
    return path.name


# ----------------------------------------------------------------------------------------------------------------
# The card
# ----------------------------------------------------------------------------------------------------------------


def read_template(template: str | os.PathLike | None = None) -> ModelCard:
    """The template as a `ModelCard` (its YAML header: the default metadata).

    Raises:
        ValueError: the template lacks one of `REQUIRED_PLACEHOLDERS` or the evaluation markers (named).
    """
    path = Path(template or MODEL_CARD_TEMPLATE)
    card = ModelCard(path.read_text(encoding="utf-8"))
    present = set(PLACEHOLDER.findall(card.text))
    missing = [f"{{{{{name}}}}}" for name in REQUIRED_PLACEHOLDERS if name not in present]
    missing += [marker for marker in (EVALUATION_START, EVALUATION_END) if marker not in card.text]
    if missing:
        raise ValueError(f"model card template {path.name} is missing {', '.join(missing)}; the card needs each "
                         f"(see the package's model_card.md)")
    return card


def _fill(text: str, values: dict) -> str:
    def fill(match):
        name = match.group(1)
        if name not in values:
            raise KeyError(f"model card placeholder {{{{{name}}}}} has no value; pass it as "
                           f"placeholders={{{name!r}: ...}}")
        return str(values[name])

    return PLACEHOLDER.sub(fill, text)


def _evaluation_section(text: str) -> tuple[int, int] | None:
    start, end = text.find(EVALUATION_START), text.find(EVALUATION_END)
    if start < 0 or end < start:
        return None
    return start, end + len(EVALUATION_END)


@dataclass
class _Card:
    values: dict[str, str]  # placeholder -> text
    licence: CardLicense
    base_model: str | list[str] | None
    datasets: list[str] | None
    recipe: str | None


def card_values(records: list[dict], info: ModelCardInfo) -> _Card:
    """The placeholder values and metadata of a card (see `build_model_card`)."""
    train_args = info.train_args or {}
    model_name = portable(info.model_name or train_args.get("hub_model_id")
                          or Path(str(train_args.get("output_dir") or "model")).name)
    base_model = resolve_base_model(info, train_args)
    licence = resolve_license(info, train_args)
    recipe = train_args.get("recipe")
    values = {
        "model_name": model_name,
        "repo_id": info.repo_id or model_name,
        "description": info.description or (
            f"A CLIP-style dual encoder trained with the `{recipe}` recipe of alip-hf." if recipe
            else "A CLIP-style dual encoder."),
        "base_model": describe_start(train_args, base_model),
        "license": licence.describe(),
        "train_datasets": ", ".join(f"`{portable(d)}`" for d in _train_datasets(train_args, raw=True)) or "not recorded",
        "training": training_summary(train_args),
        "results_table": info.results_table or results_table(records),
        "eval_command": info.eval_command or eval_command(records, train_args.get("eval_data")),
        "evaluated_datasets": ", ".join(sorted({portable(r["dataset"]) for r in records})) or "none",
        "recall_plot": f"![Retrieval recall@k]({Path(info.recall_plot).as_posix()})" if info.recall_plot else "",
    }
    values["usage"] = usage_snippet(values["repo_id"])
    values.update({k: str(v) for k, v in info.placeholders.items()})
    return _Card(values, licence, base_model, info.datasets or _train_datasets(train_args) or None, recipe)


def _train_datasets(train_args: dict, raw: bool = False) -> list[str]:
    data = train_args.get("train_data")
    if not data:
        return []
    return [data] if raw else [d for d in [hub_id(data)] if d]


def _card_info(info: ModelCardInfo | None, fields: dict) -> ModelCardInfo:
    checked = ModelCardInfo.from_fields(**fields)  # raises on a misspelled field
    return dataclasses.replace(info, **fields) if info is not None else checked


def build_model_card(results, info: ModelCardInfo | None = None, *, template: str | os.PathLike | None = None,
                     **fields) -> ModelCard:
    """The model card of `results` (records, a results payload, or train.py's flat `eval/...` metrics).

    Args:
        info: what the card says beyond the results (`ModelCardInfo`); `fields` are set on it, by name.
        template: a template path (default: the package's `model_card.md`).

    Raises:
        TypeError: a field `ModelCardInfo` does not have (named, with the closest one).
        ValueError: the template lacks a required placeholder (named).
        KeyError: the template has a placeholder nothing fills (named).
    """
    info = _card_info(info, fields)
    records = records_from(results)
    train_args = info.train_args or {}
    if train_args.get("eval_split"):  # train.py's flat metrics hold no split; its arguments name the one it used
        records = [{**r, "split": r.get("split") or train_args["eval_split"]} for r in records]
    template_card = read_template(template)
    card = card_values(records, info)
    data = template_card.data
    data.license = card.licence.license
    data.license_name, data.license_link = card.licence.name, card.licence.link
    data.library_name = data.library_name or "transformers"
    data.pipeline_tag = data.pipeline_tag or PIPELINE_TAG
    data.tags = list(dict.fromkeys([*(data.tags or []), *([card.recipe] if card.recipe else [])]))
    data.base_model = card.base_model
    data.datasets = card.datasets
    data.model_name = card.values["model_name"]
    data.eval_results = eval_results(records) or None
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{_fill(template_card.text, card.values)}")


def render_model_card(results, info: ModelCardInfo | None = None, *, template: str | os.PathLike | None = None,
                      **fields) -> str:
    """The model card as text (`build_model_card`)."""
    return str(build_model_card(results, info, template=template, **fields))


def update_model_card(path: str | os.PathLike, results, info: ModelCardInfo | None = None, *,
                      template: str | os.PathLike | None = None, **fields) -> ModelCard:
    """The card at `path` with its evaluation section rendered again from `results` and `model-index` merged
    (metrics measured again replaced, others kept); every other section and metadata field stays. A card without
    the evaluation markers gets the section appended. When `path` does not exist: `build_model_card`.
    """
    info = _card_info(info, fields)
    path = Path(path)
    if not path.exists():
        return build_model_card(results, info, template=template)
    card = ModelCard.load(path)
    merged = merge_eval_results(card.data.eval_results, eval_results(records_from(results)))
    records = records_from_eval_results(merged)
    values = card_values(records, dataclasses.replace(info, model_name=card.data.model_name or info.model_name)).values
    template_text = read_template(template).text
    start, end = _evaluation_section(template_text)
    section = _fill(template_text[start:end], values)
    where = _evaluation_section(card.text)
    text = (card.text[:where[0]] + section + card.text[where[1]:]) if where else card.text.rstrip() + "\n\n" + section + "\n"
    card.data.model_name = card.data.model_name or values["model_name"]
    card.data.eval_results = merged or None
    return ModelCard(f"---\n{card.data.to_yaml()}\n---\n{text}")
