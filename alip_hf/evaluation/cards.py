"""Model cards, built with huggingface_hub's card classes (`ModelCard`, `ModelCardData`, `EvalResult`).

The card's YAML header carries what the Hub reads: `license`, `datasets` (Hub datasets trained on),
`base_model` (when fine-tuned from a Hub model), `library_name: transformers`,
`pipeline_tag: zero-shot-image-classification`, tags, and `model-index` (one `EvalResult` per dataset, split and
metric, values in percent as in the tables). The body is `model_card.md` with its `{{placeholders}}` filled.

The evaluation section sits between two HTML comments (`EVALUATION_START` / `EVALUATION_END`), so that
`eval.py --model_card` on a trained model's README replaces that section and merges `model-index`, leaving the
training section and everything else as they were.

Cards never hold local paths: a local file or directory is named by its base name (`portable`).
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard

from alip_hf.evaluation.presets import ASSOCIATION, LINEAR_PROBE, RETRIEVAL, ZEROSHOT
from alip_hf.resources import MODEL_CARD_TEMPLATE

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
    """Python that classifies an image with the zero-shot pipeline and computes CLIP features, as written (remote
    code: it works where this package is not installed)."""
    repo = json.dumps(repo_id)
    return f'''```python
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor, pipeline

# trust_remote_code=True runs the model code stored in the repository. With alip-hf installed
# (pip install alip-hf), `import modeling_alip` registers ALIP with transformers instead.
image = Image.new("RGB", (224, 224), "white")  # your image: Image.open("photo.jpg")
labels = ["a photo of a cat", "a photo of a dog"]

classifier = pipeline("zero-shot-image-classification", model={repo}, trust_remote_code=True)
print({{s["label"]: round(s["score"], 3) for s in classifier(image, candidate_labels=labels)}})

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


def describe_start(train_args: dict, base_model: str | None) -> str:
    source = base_model or train_args.get("model_name_or_path")
    if not source:
        size = train_args.get("model_config")
        return f"trained from scratch ({size} size)" if size else "trained from scratch"
    return f"[{source}](https://huggingface.co/{source})" if hub_id(source) else f"a local checkpoint `{portable(source)}`"


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
            raise KeyError(f"model card placeholder {{{{{name}}}}} has no value; pass it as {name}=")
        return str(values[name])

    return PLACEHOLDER.sub(fill, text)


def _evaluation_section(text: str) -> tuple[int, int] | None:
    start, end = text.find(EVALUATION_START), text.find(EVALUATION_END)
    if start < 0 or end < start:
        return None
    return start, end + len(EVALUATION_END)


def card_values(records: list[dict], info: dict) -> dict:
    """The placeholder values of a card (see `build_model_card`)."""
    train_args = info.pop("train_args", None) or {}
    model_name = portable(info.pop("model_name", None) or train_args.get("hub_model_id")
                          or Path(str(train_args.get("output_dir") or "model")).name)
    base_model = info.pop("base_model", None) or hub_id(train_args.get("model_name_or_path"))
    recall_plot = info.pop("recall_plot", None)
    recipe = train_args.get("recipe")
    values = {
        "model_name": model_name,
        "repo_id": info.pop("repo_id", None) or model_name,
        "description": info.pop("description", None) or (
            f"A CLIP-style dual encoder trained with the `{recipe}` recipe of alip-hf." if recipe
            else "A CLIP-style dual encoder."),
        "base_model": describe_start(train_args, base_model),
        "license": info.pop("license", None) or train_args.get("license") or "other",
        "train_datasets": ", ".join(f"`{portable(d)}`" for d in _train_datasets(train_args, raw=True)) or "not recorded",
        "training": training_summary(train_args),
        "results_table": info.pop("results_table", None) or _results_table(records),
        "eval_command": info.pop("eval_command", None) or _eval_command(records, train_args.get("eval_data")),
        "evaluated_datasets": ", ".join(sorted({portable(r["dataset"]) for r in records})) or "none",
        "recall_plot": f"![Retrieval recall@k]({Path(recall_plot).as_posix()})" if recall_plot else "",
    }
    values["usage"] = usage_snippet(values["repo_id"])
    values.update({k: str(v) for k, v in info.items()})
    values["_meta"] = {"base_model": base_model, "datasets": _train_datasets(train_args), "recipe": recipe}
    return values


def _train_datasets(train_args: dict, raw: bool = False) -> list[str]:
    data = train_args.get("train_data")
    if not data:
        return []
    return [data] if raw else [d for d in [hub_id(data)] if d]


def _results_table(records):
    from alip_hf.evaluation.reports import results_table

    return results_table(records)


def _eval_command(records, eval_data):
    from alip_hf.evaluation.reports import eval_command

    return eval_command(records, eval_data)


def build_model_card(results, template: str | os.PathLike | None = None, **info) -> ModelCard:
    """The model card of `results` (records, a results payload, or train.py's flat `eval/...` metrics).

    Args:
        template: a template path (default: the package's `model_card.md`).
        info: `model_name`, `repo_id` (the id the usage snippet loads; default the model name), `base_model`,
            `license`, `description`, `train_args` (train.py's resolved arguments), `eval_command`, `recall_plot`,
            or a value for any other placeholder of the template.

    Raises:
        ValueError: the template lacks a required placeholder (named).
        KeyError: the template has a placeholder nothing fills (named).
    """
    from alip_hf.evaluation.reports import records_from

    records = records_from(results)
    train_args = info.get("train_args") or {}
    if train_args.get("eval_split"):  # train.py's flat metrics hold no split; its arguments name the one it used
        records = [{**r, "split": r.get("split") or train_args["eval_split"]} for r in records]
    template_card = read_template(template)
    values = card_values(records, dict(info))
    meta = values.pop("_meta")
    data = template_card.data
    data.license = values["license"]
    data.library_name = data.library_name or "transformers"
    data.pipeline_tag = data.pipeline_tag or PIPELINE_TAG
    data.tags = list(dict.fromkeys([*(data.tags or []), *([meta["recipe"]] if meta["recipe"] else [])]))
    data.base_model = meta["base_model"]
    data.datasets = meta["datasets"] or None
    data.model_name = values["model_name"]
    data.eval_results = eval_results(records) or None
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{_fill(template_card.text, values)}")


def update_model_card(path: str | os.PathLike, results, template: str | os.PathLike | None = None,
                      **info) -> ModelCard:
    """The card at `path` with its evaluation section rendered again from `results` and `model-index` merged
    (metrics measured again replaced, others kept); every other section and metadata field stays. A card without
    the evaluation markers gets the section appended. When `path` does not exist: `build_model_card`.
    """
    path = Path(path)
    if not path.exists():
        return build_model_card(results, template, **info)
    from alip_hf.evaluation.reports import records_from

    card = ModelCard.load(path)
    merged = merge_eval_results(card.data.eval_results, eval_results(records_from(results)))
    records = records_from_eval_results(merged)
    values = card_values(records, dict(info, model_name=card.data.model_name or info.get("model_name")))
    values.pop("_meta")
    template_text = read_template(template).text
    start, end = _evaluation_section(template_text)
    section = _fill(template_text[start:end], values)
    where = _evaluation_section(card.text)
    text = (card.text[:where[0]] + section + card.text[where[1]:]) if where else card.text.rstrip() + "\n\n" + section + "\n"
    card.data.model_name = card.data.model_name or values["model_name"]
    card.data.eval_results = merged or None
    return ModelCard(f"---\n{card.data.to_yaml()}\n---\n{text}")
