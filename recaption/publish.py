"""Step 3: publish a recaptioned dataset to the Hub with a dataset card that says how it was made.

The card is built from what the runs recorded: the source, each step's model and revision, prompt and
version, generation settings, and the counts of `summary.json` (rows, failures, fallbacks, mean lengths).
The licence is inherited from the source (its card's `license`), or given with `--license`; publishing
with an unknown licence is refused.

    python -m recaption.publish --output_dir out/vecap --hub_dataset_id me/yfcc-vecap --hub_private_repo
    python -m recaption.publish --output_dir out/vecap --dry_run      # card + data under out/vecap/hub_preview
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from typing import Any

import yaml

from alip_hf import sources
from alip_hf.evaluation.cards import hub_id, is_local, portable
from alip_hf.hub import HubArguments, resolve_token
from alip_hf.io import make_staging_dir, replace_directory, write_text_atomic
from alip_hf.schema import CAPTION_MODEL, ID, REWRITE_MODEL
from alip_hf.identity import sha256_json
from recaption.identity import identity_digests
from recaption.throughput import render as render_throughput


UNKNOWN_LICENSE = "unknown"


@dataclass
class PublishArguments:
    output_dir: str = field(
        metadata={"help": "Output dir of the last recaption step (holds data/ and run_config.json)."}
    )
    hub_dataset_id: str | None = field(
        default=None, metadata={"help": "Hub dataset repository (user/name or org/name) to push to (not needed with "
                                "--dry_run). The --hub_* options say how."}
    )
    dry_run: bool = field(default=False, metadata={"help": "Write the card and data locally instead of pushing."})
    dry_run_dir: str | None = field(
        default=None, metadata={"help": "Where --dry_run writes (default <output_dir>/hub_preview)."}
    )
    license: str | None = field(default=None, metadata={"help": "Licence id; default: the source's."})
    split: str = field(default="train", metadata={"help": "Split name of the data."})
    max_shard_size: str = field(default="500MB", metadata={"help": "Parquet shard size on the Hub."})

    def __post_init__(self):
        if not self.dry_run and not self.hub_dataset_id:
            raise ValueError("--hub_dataset_id is needed to publish (or use --dry_run)")


def _run_dir(path: str) -> str | None:
    """The recaption output dir that `path` (the dir itself or its data/ subdir) belongs to, if any."""
    for candidate in (path, os.path.dirname(os.path.normpath(path))):
        if os.path.isfile(os.path.join(candidate, "run_config.json")):
            return candidate
    return None


def provenance_chain(output_dir: str) -> list[dict[str, Any]]:
    """The recorded runs from the original source to `output_dir`, first step first.

    Each item is `{"config": run_config.json, "summary": summary.json}`; a rewrite run whose source was
    a caption run's output yields both.
    """
    chain, current = [], _run_dir(output_dir)
    if current is None:
        raise FileNotFoundError(f"{output_dir}: no run_config.json; point --output_dir at a recaption step's output")
    while current is not None:
        with open(os.path.join(current, "run_config.json"), encoding="utf-8") as f:
            config = json.load(f)
        summary_path = os.path.join(current, "summary.json")
        if not os.path.isfile(summary_path):
            raise FileNotFoundError(f"{summary_path} missing: the run in {current} did not finish; run it again")
        with open(summary_path, encoding="utf-8") as f:
            summary = json.load(f)
        chain.append({"config": config, "summary": summary})
        source = config["source"]
        current = _run_dir(source) if os.path.exists(source) else None
    return chain[::-1]


def source_license(source: str) -> str:
    """The licence in the source's dataset card (local README.md or the Hub), else `unknown`."""
    readme = os.path.join(source if os.path.isdir(source) else os.path.dirname(source), "README.md")
    if os.path.isfile(readme):
        with open(readme, encoding="utf-8") as f:
            text = f.read()
        if text.startswith("---"):
            meta = yaml.safe_load(text.split("---", 2)[1]) or {}
            if meta.get("license"):
                return str(meta["license"])
        return UNKNOWN_LICENSE
    if os.path.exists(source) or "*" in source:
        return UNKNOWN_LICENSE
    try:
        from huggingface_hub import HfApi

        card = HfApi().dataset_info(source).card_data
        return str(card.license) if card is not None and card.license else UNKNOWN_LICENSE
    except Exception:  # offline, private or not a Hub id: the user must say
        return UNKNOWN_LICENSE


def _step_section(run: dict[str, Any]) -> str:
    config, summary = run["config"], run["summary"]
    model_key = "caption_model" if config["step"] == "caption" else "rewrite_model"
    version_key = "caption_prompt_version" if config["step"] == "caption" else "rewrite_prompt_version"
    prompt = config.get("prompt")
    prompt_text = json.dumps(prompt, indent=2) if isinstance(prompt, dict) else repr(prompt)
    counts = {k: v for k, v in summary.items()
              if k not in ("step", "counts", "seconds_this_run", "throughput", "complete")}
    return "\n".join([
        f"### `{config['step']}`",
        "",
        f"- model: `{portable(config.get('model'))}` (revision `{config.get('revision')}`, commit "
        f"`{config.get('commit')}`), recorded per row as `{portable(config.get(model_key))}`",
        f"- prompt version: `{config.get(version_key)}`",
        f"- generation: `{json.dumps(config.get('generation'), sort_keys=True)}`",
        f"- results: `{json.dumps(counts, sort_keys=True)}`",
        f"- throughput: {render_throughput(summary.get('throughput') or {})}",
        "",
        "Prompt:",
        "",
        "```",
        prompt_text,
        "```",
        "",
    ])


def render_card(chain: list[dict[str, Any]], license: str, split: str = "train", repo_id: str | None = None) -> str:
    """The dataset card (YAML header + Markdown) for the runs in `chain` (from `provenance_chain`); local paths
    (of the source, of models) appear by their base names only."""
    source = portable(chain[0]["config"]["source"])
    rows = chain[-1]["summary"]["rows"]
    header = {
        "license": license if license != UNKNOWN_LICENSE else "other",
        "task_categories": ["image-to-text", "zero-shot-image-classification"],
        "tags": ["synthetic-captions", "image-text-pairs"],
        "size_categories": [_size_category(rows)],
        # `configs` and `dataset_info` are written by `datasets` (push_to_hub, or `datasets_metadata` offline).
    }
    if hub_id(source):
        header["source_datasets"] = [source]
    licence_line = (
        f"`{license}`, inherited from the source `{source}`."
        if license != UNKNOWN_LICENSE
        else f"Unknown: the source `{source}` states none. Check its terms before sharing."
    )
    name = repo_id or "Recaptioned dataset"
    lines = [
        "---", yaml.safe_dump(header, sort_keys=False).strip(), "---", "",
        f"# {name}", "",
        f"Image-text pairs from `{source}` (split `{split}`) with synthetic captions added by `recaption/`.",
        "Captions are written from the image alone; `vecap` fuses the web text and the caption with an LLM.", "",
        "## Columns", "",
        "| column | meaning |", "|---|---|",
        "| `id` | stable key; new columns were joined on it |",
        "| `image`, `alt_text` | from the source |",
        "| `caption` | synthetic caption from the image alone (`caption_model`, `caption_prompt_version`) |",
        "| `vecap` | LLM fusion of `alt_text` and `caption` (`rewrite_model`, `rewrite_prompt_version`) |",
        "| `vecap_fallback` | why `vecap` is the caption instead of the LLM's answer; empty when it was kept |",
        "| `error` | why a row failed (unreadable image); empty otherwise |", "",
        f"Rows: {rows} (one per source row).", "",
        "## How it was made", "",
        *[_step_section(run) for run in chain],
        "## Licence", "", licence_line, "",
        "## Use", "", "```python", "from datasets import load_dataset", "",
        f"ds = load_dataset({(repo_id or 'REPO_ID')!r}, split={split!r})", "```", "",
    ]
    return "\n".join(lines)


def _size_category(rows: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                        (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M")):
        if rows < limit:
            return name
    return "n>1T" if rows > 10**12 else "100M<n<1B"


def datasets_metadata(dataset, split: str) -> dict[str, Any]:
    """The `dataset_info` and `configs` YAML that `datasets` writes to a card for `dataset` pushed as `split`,
    made with its own functions (`DatasetInfosDict`, `MetadataConfigs`), for the offline preview."""
    from datasets import DatasetInfo, SplitDict, SplitInfo
    from datasets.info import DatasetInfosDict
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCardData

    splits = SplitDict()
    splits.add(SplitInfo(name=split, num_bytes=dataset.data.nbytes, num_examples=len(dataset)))
    info = DatasetInfo(config_name="default", features=dataset.features, splits=splits,
                       dataset_size=dataset.data.nbytes)
    card_data = DatasetCardData()
    DatasetInfosDict({"default": info}).to_dataset_card_data(card_data)
    MetadataConfigs({"default": {"data_files": [{"split": split, "path": f"data/{split}-*"}]}}).to_dataset_card_data(
        card_data)
    return card_data.to_dict()


def merge_card(card: str, written: dict[str, Any] | None) -> str:
    """`card` (ours) with the metadata `datasets` wrote (`written`): its `dataset_info` and `configs` are kept,
    our provenance fields (licence, tags, ...) are added to them, our Markdown replaces its body."""
    from huggingface_hub import DatasetCard, DatasetCardData

    ours = DatasetCard(card)
    merged = dict(written or {})
    merged.update({k: v for k, v in ours.data.to_dict().items() if k not in DATASETS_KEYS})
    return str(DatasetCard(f"---\n{DatasetCardData(**merged).to_yaml()}\n---\n{ours.text}"))


DATASETS_KEYS = ("dataset_info", "configs")


# The provenance column each step writes in every row, and the run configuration key it must equal.
MODEL_COLUMNS = {"caption": CAPTION_MODEL, "rewrite": REWRITE_MODEL}


def check_shards(run_dir: str, run: dict[str, Any], split: str) -> None:
    """Checks every shard of the run about to be published against its completion record: each marker has its
    data file and each data file its marker; the file holds the marker's rows and exactly its ids (sha256 of the
    ids in order); the marker was written by this run's model from this run's source and settings (its identity
    digests equal those of `run_config.json`); every row names this run's model; the rows add up to the summary's.

    Raises:
        ValueError: naming the shard and what is wrong with it (missing, foreign, or not matching its record).
    """
    import pyarrow.parquet as pq

    config, summary = run["config"], run["summary"]
    identity = identity_digests(config)
    markers = {os.path.basename(p)[: -len(".json")]: p
               for p in glob.glob(os.path.join(run_dir, "shards", f"{split}-*.json"))}
    files = {os.path.basename(p)[: -len(".parquet")]: p
             for p in glob.glob(os.path.join(run_dir, "data", f"{split}-*.parquet"))}

    def refuse(name: str, problem: str) -> None:
        raise ValueError(f"shard {name} of {run_dir} {problem}; nothing was published. Delete shards/{name}.json "
                         f"and data/{name}.parquet and run the {config.get('step')} step again to remake it")

    for name in sorted(set(files) - set(markers)):
        refuse(name, "has a data file but no completion marker (a foreign or unfinished shard)")
    rows = 0
    label_column = MODEL_COLUMNS.get(config.get("step"))
    for name, path in sorted(markers.items()):
        with open(path, encoding="utf-8") as f:
            marker = json.load(f)
        rows += marker.get("rows", 0)
        if not marker.get("rows"):
            continue  # a stream's end marker: no data file
        if name not in files:
            refuse(name, f"is marked done with {marker['rows']} rows but its data file data/{name}.parquet is missing")
        if marker.get("identity") != identity:
            refuse(name, "was made by another run (its marker's source, model or settings digests differ from "
                         "run_config.json)")
        columns = [ID] + ([label_column] if label_column else [])
        try:
            table = pq.read_table(files[name], columns=columns)
        except Exception as error:  # unreadable, or without the columns: either way not this run's shard
            refuse(name, f"cannot be read as this run's output ({type(error).__name__}: {error})")
        ids = [str(i) for i in table.column(ID).to_pylist()]
        if len(ids) != marker["rows"] or sha256_json(ids) != marker.get("ids_sha256"):
            refuse(name, f"does not hold the rows its marker records ({len(ids)} rows, first id "
                         f"{ids[0] if ids else None!r}; the marker: {marker['rows']} rows, first id "
                         f"{marker.get('first_id')!r})")
        if label_column:
            labels = set(table.column(label_column).to_pylist())
            if labels != {config.get(label_column)}:
                refuse(name, f"was written by another model: its rows' {label_column} is {sorted(labels)}, this "
                             f"run's is {config.get(label_column)!r}")
    if rows != summary.get("rows"):
        raise ValueError(f"{run_dir}: the shards' markers count {rows} rows, summary.json {summary.get('rows')}; "
                         "run the step again to finish it before publishing")


def publish(args: PublishArguments, hub: HubArguments | None = None) -> str:
    """Pushes data + card to `args.hub_dataset_id`, or writes them under the dry-run dir; returns where they went.

    The data goes first with `Dataset.push_to_hub` (which writes the card's `dataset_info` and `configs`); the
    card is then read back from the same revision (or pull request), our provenance merged in, and committed with
    `provenance.json`.
    """
    hub = hub or HubArguments()
    chain = provenance_chain(args.output_dir)
    check_shards(_run_dir(args.output_dir), chain[-1], args.split)  # before anything is written or pushed
    license = args.license or source_license(chain[0]["config"]["source"])
    card = render_card(chain, license, args.split, args.hub_dataset_id)
    data_dir = os.path.join(_run_dir(args.output_dir), "data")
    provenance = json.dumps({"runs": _portable_runs(chain), "license": license}, indent=2, sort_keys=True, default=str)
    if args.dry_run:
        target = args.dry_run_dir or os.path.join(_run_dir(args.output_dir), "hub_preview")
        # A fresh preview every time: built beside the target, then swapped in whole (no file of an earlier
        # preview survives to be mistaken for part of this one).
        staging = make_staging_dir(target, tag="preview")
        os.makedirs(os.path.join(staging, "data"))
        for path in sorted(glob.glob(os.path.join(data_dir, f"{args.split}-*.parquet"))):
            shutil.copyfile(path, os.path.join(staging, "data", os.path.basename(path)))
        dataset = sources.load_source(data_dir, split=args.split)
        write_text_atomic(os.path.join(staging, "README.md"), merge_card(card, datasets_metadata(dataset, args.split)))
        write_text_atomic(os.path.join(staging, "provenance.json"), provenance)
        replace_directory(staging, target)
        return target
    if license == UNKNOWN_LICENSE:
        raise ValueError(f"the licence of {portable(chain[0]['config']['source'])!r} is unknown; pass --license")
    from huggingface_hub import CommitOperationAdd, DatasetCard, HfApi, hf_hub_download

    token = resolve_token(hub.hub_token)
    options = hub.hub_options()
    dataset = sources.load_source(data_dir, split=args.split)
    commit = dataset.push_to_hub(
        args.hub_dataset_id, split=args.split, private=options.private, token=token, revision=options.revision,
        create_pr=options.create_pr, commit_message=options.commit_message or "Upload recaptioned data",
        max_shard_size=args.max_shard_size)
    # With --hub_create_pr the data sits in a pull request: the card goes into the same one.
    revision = getattr(commit, "pr_revision", None) if options.create_pr else options.revision
    written = DatasetCard.load(hf_hub_download(args.hub_dataset_id, "README.md", repo_type="dataset",
                                               revision=revision, token=token)).data.to_dict()
    HfApi(token=token).create_commit(
        args.hub_dataset_id, repo_type="dataset", revision=revision,
        operations=[CommitOperationAdd("README.md", merge_card(card, written).encode()),
                    CommitOperationAdd("provenance.json", provenance.encode())],
        commit_message=options.commit_message or "Dataset card: how the captions were made")
    return f"https://huggingface.co/datasets/{args.hub_dataset_id}"


def _portable_runs(chain: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The recorded runs with local paths (sources, models, output dirs) reduced to base names."""
    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return portable(value) if isinstance(value, str) and is_local(value) else value

    return clean(chain)


def build_parser():
    from transformers import HfArgumentParser

    return HfArgumentParser((PublishArguments, HubArguments), prog="python -m recaption.publish")


def main(argv: list[str] | None = None) -> str:

    args, hub = build_parser().parse_args_into_dataclasses(args=argv)
    where = publish(args, hub)
    print(where)
    return where


if __name__ == "__main__":
    main(sys.argv[1:])
