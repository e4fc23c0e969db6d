"""Training arguments: typed dataclasses grouped by concern, parsed from flags or a run YAML.

Only light modules are imported here, so that `train.py --help` answers at once.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from transformers import HfArgumentParser

from alip_hf import recipes, schema, sources
from alip_hf.hub import SECRET_ARGUMENTS, HubArguments
from alip_hf.io import write_text_atomic
from alip_hf.models import MODEL_CONFIGS, parse_config_overrides
from alip_hf.resources import DEMO_DATA, run_config

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ModelArguments:
    """Which model to train and which parts of it."""

    _argument_group_name = "model"

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A saved ALIP/CLIP model directory (or Hub id) to start from."}
    )
    model_config: Literal[tuple(MODEL_CONFIGS)] = field(
        default="small", metadata={"help": "Named size trained from scratch when --model_name_or_path is not set "
                                   "(tiny: smoke tests; small: the demo run; vit-b-32/16: the ALIP towers, GELU; "
                                   "vit-b-32-quickgelu: OpenAI CLIP's); see alip_hf.models.MODEL_SOURCES."}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "Comma-separated dotted ALIPConfig keys on top of --model_config (or the loaded model's "
                  "config), e.g. 'text_config.hidden_size=128,vision_config.patch_size=8,lcg_gamma=1.5'; "
                  "values are read as int, float, true/false or text. A run YAML may give a mapping."},
    )
    allow_new_weights: bool = field(default=False, metadata={
        "help": "Start from a checkpoint that lacks some of the model's tensors (freshly initialised: a new head is "
                "intended) or holds tensors the model does not use; each is named in the log. Without it, either is "
                "an error naming the tensors (a plain CLIP checkpoint's missing gate running means are expected)."})
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Tokenizer directory; default: the model directory's, else the CLIP BPE tokenizer."},
    )
    model_revision: str = field(default="main", metadata={
        "help": "Branch, tag or commit of --model_name_or_path / --tokenizer_name_or_path on the Hub."})
    cache_dir: str | None = field(default=None, metadata={
        "help": "Where models and datasets downloaded from the Hub are stored (default: the Hugging Face cache)."})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "Allow a Hub tokenizer or image processor to run the code its repository ships (read it first)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in backward."})
    freeze_vision: bool = field(default=False, metadata={"help": "Freeze the image tower and its projection."})
    freeze_text: bool = field(default=False, metadata={"help": "Freeze the text tower and its projection."})
    lora_rank: int = field(default=0, metadata={"help": "LoRA rank; 0 trains all (unfrozen) weights."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Module names LoRA wraps (required with --lora_rank), e.g. q_proj v_proj."}
    )

    def __post_init__(self):
        if self.lora_rank < 0:
            raise ValueError(f"--lora_rank must be >= 0, got {self.lora_rank}")
        if self.lora_rank > 0 and not self.lora_target_modules:
            raise ValueError("--lora_rank needs --lora_target_modules (e.g. q_proj v_proj)")
        if self.lora_target_modules and self.lora_rank == 0:
            raise ValueError("--lora_target_modules is set but --lora_rank is 0")
        if self.freeze_vision and self.freeze_text:
            raise ValueError("--freeze_vision and --freeze_text together leave only logit_scale to train")
        if self.config_overrides is not None:
            parse_config_overrides(self.config_overrides)  # a malformed item fails here, before any work


@dataclass
class DataArguments:
    """Where the training data comes from and how it is read."""

    _argument_group_name = "data"

    train_data: str = field(
        default=str(DEMO_DATA),
        metadata={"help": "Training data: save_to_disk dir, parquet/json/csv files or glob, WebDataset tars, Hub id; "
                          "'demo': the bundled demo data."},
    )
    dataset_config_name: str | None = field(default=None, metadata={
        "help": "Configuration (subset) of a Hub dataset or dataset directory given as --train_data."})
    train_split: str = field(default="train", metadata={"help": "Split of --train_data to train on."})
    max_train_samples: int | None = field(default=None, metadata={
        "help": "Train on the first N rows of the split only (debugging, quick runs)."})
    streaming: bool = field(default=False, metadata={"help": "Read lazily (needs --max_steps); for large data."})
    image_column: str = field(default=schema.IMAGE, metadata={"help": "Column holding the image."})
    id_column: str = field(
        default=schema.ID, metadata={"help": "Stable key column (WebDataset `__key__` if absent); read only by "
                                             "--log_sample_weights, whose rows are joined on it."})
    max_text_length: int = field(default=77, metadata={"help": "Tokens per text; longer texts keep their end token."})
    crop_scale_min: float = field(default=0.9, metadata={"help": "RandomResizedCrop lower area bound (ALIP: 0.9)."})
    crop_scale_max: float = field(default=1.0, metadata={"help": "RandomResizedCrop upper area bound."})
    shuffle_buffer: int = field(
        default=1000, metadata={"help": "Streaming: rows shuffled together, in blocks restored exactly on resume "
                                        "(0: stream order)."})
    dataloader_num_workers: int = field(
        default=2, metadata={"help": "DataLoader worker processes per process (2 keeps the demo run's data wait under "
                                     "10%%; 0 loads in the training process)."})
    preprocessing_num_proc: int | None = field(
        default=None, metadata={"help": "Processes for the one-off image/text validation of map-style data."}
    )
    eval_data: str | None = field(default=None, metadata={
        "help": "Evaluation data (zero-shot + retrieval), a path or an eval.py preset; 'none' disables evaluation. "
                "Default: the demo data's test split when training on the demo data, else no evaluation."})
    eval_split: str = field(default="test", metadata={"help": "Split of --eval_data."})

    def __post_init__(self):
        if not 0 < self.crop_scale_min <= self.crop_scale_max <= 1:
            raise ValueError(f"need 0 < --crop_scale_min <= --crop_scale_max <= 1, got {self.crop_scale_min}, "
                             f"{self.crop_scale_max}")
        if self.max_text_length < 2:
            raise ValueError("--max_text_length must leave room for the start and end tokens")
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise ValueError(f"--max_train_samples must be >= 1, got {self.max_train_samples}")
        # `demo` names the bundled demo data wherever the package is installed, as in every command.
        self.train_data = sources.resolve_source(self.train_data)
        if self.eval_data is None:
            # Evaluating a model trained on the user's data on clip art says nothing about it, and would end
            # up in its model card: the demo evaluation is only the default of the demo run.
            self.eval_data = str(DEMO_DATA) if sources.is_demo_data(self.train_data) else None
        elif self.eval_data.lower() == "none":
            self.eval_data = None
        self.eval_data = sources.resolve_source(self.eval_data) if self.eval_data else None


@dataclass
class TrainArguments(HubArguments):
    """Optimisation, precision, checkpoints, logging and the Hub upload."""

    _argument_group_name = "training"

    output_dir: str = field(default="outputs/alip-demo", metadata={"help": "Where everything is written."})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Samples per process per micro-batch."})
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Micro-batches per optimizer step; the loss sees all k*B negatives at once."}
    )
    num_train_epochs: float = field(default=3.0, metadata={"help": "Epochs over the data (map-style data)."})
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps; overrides --num_train_epochs if > 0."})
    learning_rate: float = field(default=5e-4, metadata={"help": "Peak learning rate of AdamW."})
    weight_decay: float = field(
        default=0.2, metadata={"help": "AdamW weight decay (not on biases, norms, embeddings, logit_scale)."}
    )
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.98, metadata={"help": "AdamW beta2 (CLIP/ALIP use 0.98)."})
    adam_epsilon: float = field(default=1e-6, metadata={"help": "AdamW epsilon."})
    lr_scheduler_type: Literal["cosine", "linear", "constant", "constant_with_warmup"] = field(
        default="cosine", metadata={"help": "Learning-rate schedule after the linear warm-up "
                                    "(transformers.get_scheduler): cosine or linear decay to 0, or constant."})
    warmup_steps: int = field(default=-1, metadata={"help": "Linear warm-up steps; -1 uses --warmup_ratio."})
    warmup_ratio: float = field(default=0.1, metadata={"help": "Warm-up as a fraction of all steps."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (official ALIP: 1); 0 off."})
    mixed_precision: Literal["no", "fp16", "bf16"] = field(default="no", metadata={"help": "Autocast precision."})
    local_loss: bool = field(
        default=False, metadata={"help": "Each process computes the loss of its rows against the global batch."}
    )
    seed: int = field(default=42, metadata={"help": "Seed of initialisation, data order, crops and text draws."})
    logging_steps: int = field(default=10, metadata={"help": "Log metrics every N optimizer steps."})
    save_steps: int = field(default=0, metadata={"help": "Save a resumable checkpoint every N steps (0: never)."})
    save_total_limit: int = field(default=3, metadata={"help": "Keep the last K checkpoints."})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "'latest' (in output_dir/checkpoints) or a checkpoint directory."}
    )
    stop_after_steps: int = field(
        default=-1,
        metadata={"help": "Stop after this step as if interrupted: no final save, eval or export (resume tests)."},
    )
    eval_steps: int = field(default=0, metadata={"help": "Evaluate every N steps (0: only at the end)."})
    report_to: list[str] = field(
        default_factory=lambda: ["tensorboard"],
        metadata={"help": "Trackers (tensorboard, wandb, ...; 'none'); metrics.jsonl is always written."},
    )
    nonfinite: Literal["stop", "skip"] = field(
        default="stop", metadata={"help": "On a non-finite loss or gradient: stop naming the step, or skip the step "
                                  "(weights, optimizer and gate running means left as before it) and count."}
    )
    max_consecutive_nonfinite: int = field(
        default=10, metadata={"help": "--nonfinite skip: stop with an error after this many skipped steps in a row."}
    )
    resume_allow_changes: list[str] | None = field(
        default=None, metadata={"help": "Settings that may differ from the resumed checkpoint's run (e.g. "
                                "learning_rate max_steps, or comma-separated); they are applied and recorded. "
                                "Any other difference is refused."}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "A fresh run in an output_dir holding another run's checkpoints deletes "
                                 "them (without it, such a run is refused)."}
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Upload output_dir to the Hub at the end."})
    hub_model_id: str | None = field(default=None, metadata={
        "help": "Hub model repository (user/name or org/name) that --push_to_hub uploads output_dir to."})
    license: str | None = field(default=None, metadata={
        "help": "Licence id written to the model card (e.g. apache-2.0, mit); default: 'other'."})
    log_sample_weights: bool = field(
        default=False, metadata={"help": "Write the gate values of every sample seen in the last epoch to "
                                         "output_dir/sample_weights (Parquet, joined on --id_column)."})
    log_sample_weights_steps: int = field(
        default=0, metadata={"help": "Record the samples of every N-th step instead of the last epoch "
                                     "(implies --log_sample_weights; needed for streaming data)."})

    def __post_init__(self):
        super().__post_init__()
        if self.log_sample_weights_steps < 0:
            raise ValueError(f"--log_sample_weights_steps must be >= 0, got {self.log_sample_weights_steps}")
        if self.log_sample_weights_steps:
            self.log_sample_weights = True
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ValueError("set --max_steps > 0 or --num_train_epochs > 0")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id")
        if self.save_total_limit < 1:
            raise ValueError("--save_total_limit must be >= 1")
        if self.max_consecutive_nonfinite < 1:
            raise ValueError(f"--max_consecutive_nonfinite must be >= 1, got {self.max_consecutive_nonfinite}")
        self.resume_allow_changes = [name for item in self.resume_allow_changes or [] for name in item.split(",")
                                     if name]
        if self.resume_allow_changes and not self.resume_from_checkpoint:
            raise ValueError("--resume_allow_changes needs --resume_from_checkpoint")
        self.report_to = [r for r in self.report_to if r != "none"]
        if "tensorboard" in self.report_to and importlib.util.find_spec("tensorboard") is None:
            logger.warning("tensorboard is not installed; not reporting to it")
            self.report_to.remove("tensorboard")


ARGUMENT_GROUPS = (ModelArguments, DataArguments, TrainArguments, *recipes.ARGUMENT_GROUPS)


def _yaml_to_argv(path: str) -> list[str]:
    """A YAML mapping of flag -> value as command-line tokens (lists become several tokens; a mapping, as
    `config_overrides` takes, becomes one `key=value,...` token with nested keys dotted)."""
    with open(path, encoding="utf-8") as file:
        values = yaml.safe_load(file) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of argument names to values")
    argv = []
    for key, value in values.items():
        if value is None or value == [] or key in RECORD_KEYS:  # an empty list is the flag's default: no values
            continue
        if isinstance(value, dict):
            items = [",".join(f"{k}={_yaml_scalar(v)}" for k, v in _dotted(value, path, key).items())]
        else:
            items = [_yaml_scalar(v) for v in (value if isinstance(value, list) else [value])]
        argv += [f"--{key}", *items]
    return argv


def _yaml_scalar(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _dotted(mapping: dict, path: str, flag: str, prefix: str = "") -> dict:
    flat = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            flat.update(_dotted(value, path, flag, f"{prefix}{key}."))
        elif isinstance(value, list):
            raise ValueError(f"{path}: {flag}.{prefix}{key}: expected a single value, got a list")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _given_flags(argv: list[str]) -> set[str]:
    """Names of the flags present in `argv` (`--name value` or `--name=value`; dashes read as underscores)."""
    return {token[2:].split("=", 1)[0].replace("-", "_") for token in argv if token.startswith("--")}


def parse_args(argv: list[str] | None = None):
    """Parses flags, or a YAML file (`train.py run.yaml` or `--config run.yaml`) followed by flag overrides.

    Returns `(model_args, data_args, train_args, recipe_args)`, the last being the chosen recipe's arguments
    (`recipes.RecipeArguments` or its recipe's subclass). Unknown flags, a flag of another recipe than the
    chosen one and invalid combinations raise.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    config = None
    if argv and not argv[0].startswith("-"):  # a run YAML: a path, or a packaged config's name
        config = argv.pop(0)
    elif "--config" in argv:
        i = argv.index("--config")
        config = argv[i + 1]
        del argv[i : i + 2]
    if config is not None:
        argv = _yaml_to_argv(str(run_config(config))) + argv  # flags after the file override it: argparse keeps the last value
    # No abbreviated flags: every flag given is known by its full name (a recipe's flags are checked by name).
    parser = HfArgumentParser(ARGUMENT_GROUPS, allow_abbrev=False, description=(
        "Train CLIP/ALIP/VeCLIP. Usage: train.py [RUN.yaml | --config RUN.yaml] [--flag value ...]; flags after "
        "the YAML file override it. RUN is a path or a packaged config's name (alip-vit-b-32, clip-vit-b-32, "
        "veclip-vit-b-16, demo, tiny). With no arguments: a small ALIP model on the bundled demo data."))
    model_args, data_args, train_args, *recipe_groups = parser.parse_args_into_dataclasses(args=argv)
    return model_args, data_args, train_args, recipes.resolve_arguments(recipe_groups, given=_given_flags(argv))


# train_args.yaml's records beside the flags: the model configuration actually built, the run's identity and the
# changes allowed on resume. Skipped when the file is read back as a run YAML (the flags rebuild the same run).
RECORD_KEY = "resolved_model_config"
RECORD_KEYS = (RECORD_KEY, "run_id", "resume_changes")


def used_arguments(groups) -> dict:
    """The flags of every group as one flat mapping of what the run uses, readable back as a run YAML:
    `--model_config` is dropped when `--model_name_or_path` replaces it, `--config_overrides` is a typed mapping."""
    resolved = {}
    for group in groups:
        resolved.update(dataclasses.asdict(group))
    for secret in SECRET_ARGUMENTS:  # the file goes to the Hub with the model
        resolved.pop(secret, None)
    if resolved.get("model_name_or_path"):
        resolved["model_config"] = None
    if resolved.get("config_overrides"):
        resolved["config_overrides"] = parse_config_overrides(resolved["config_overrides"])
    if resolved.get("report_to") == []:
        resolved["report_to"] = ["none"]  # the flag's spelling of no tracker (an empty list is no value)
    return resolved


def save_args(groups, path: Path, model_config: dict | None = None, extra: dict | None = None):
    """Writes the used arguments (the resolved model configuration, and `extra`: the run id and resume changes)
    as one YAML file, atomically; the file is a run YAML: `train.py path/train_args.yaml` repeats the run."""
    resolved = used_arguments(groups)
    if model_config is not None:
        resolved[RECORD_KEY] = model_config
    resolved.update(extra or {})
    write_text_atomic(path, yaml.safe_dump(resolved, sort_keys=False))
