"""Train a CLIP, ALIP or VeCLIP model with Accelerate: `python train.py [config.yaml] [--flag value ...]`.

With no arguments it trains a small ALIP model on the bundled demo data on CPU in a few minutes and evaluates
it. `main(argv)` reads as the list of steps: parse -> model + processor -> data -> optimizer + schedule ->
`accelerator.prepare` -> resume -> loop -> save. Method-specific behaviour lives in `recipes.py`.

Differences from the official ALIP training script (github.com/deepglint/ALIP, train.py), each named where it
happens: gradient accumulation caches embeddings and recomputes them (the official script sums per-micro-batch
losses, each with its own negatives and its own gate update); gathering keeps gradients (see
`modeling_alip.loss.gather_features`); the schedule is linear warm-up + cosine (the official one is
`OneCycleLR(pct_start=0.1)`); gate running means are saved and restored with the checkpoint.
"""

import contextlib
import dataclasses
import importlib.util
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.tracking import GeneralTracker
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    CLIPImageProcessor,
    HfArgumentParser,
    get_cosine_schedule_with_warmup,
)

import data
import recipes
from eval import evaluate_model, render_model_card, write_text_atomic
from modeling_alip import ALIPConfig, ALIPModel, ALIPOutput, ALIPProcessor, clean_clip_text, clip_tokenizer
from modeling_alip.convert_to_clip import export_to_clip
from modeling_alip.loss import gather_features

logger = logging.getLogger("train")
ROOT = Path(__file__).resolve().parent
DEMO_DATA = str(ROOT / "demo_data")
LOGIT_SCALE_MAX = math.log(100)  # CLIP's clamp of the learnable temperature, kept by the official ALIP code
CHECKPOINT_PREFIX = "step_"
ARGS_FILE = "train_args.yaml"
STATE_FILE = "trainer_state.json"
METRICS_FILE = "metrics.jsonl"


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
    model_config: Literal["tiny", "small", "vit-b-32", "vit-b-16"] = field(
        default="small", metadata={"help": "Architecture trained from scratch when --model_name_or_path is not set "
                                   "(tiny: smoke tests; small: the demo run; vit-b-32/16: the published towers)."}
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Tokenizer directory; default: the model directory's, else the CLIP BPE tokenizer."},
    )
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


@dataclass
class DataArguments:
    """Where the training data comes from and how it is read."""

    _argument_group_name = "data"

    train_data: str = field(
        default=DEMO_DATA,
        metadata={"help": "Training data: save_to_disk dir, parquet/json/csv files or glob, WebDataset tars, Hub id."},
    )
    train_split: str = field(default="train", metadata={"help": "Split of --train_data to train on."})
    streaming: bool = field(default=False, metadata={"help": "Read lazily (needs --max_steps); for large data."})
    image_column: str = field(default=data.IMAGE, metadata={"help": "Column holding the image."})
    max_text_length: int = field(default=77, metadata={"help": "Tokens per text; longer texts keep their end token."})
    crop_scale_min: float = field(default=0.9, metadata={"help": "RandomResizedCrop lower area bound (ALIP: 0.9)."})
    crop_scale_max: float = field(default=1.0, metadata={"help": "RandomResizedCrop upper area bound."})
    shuffle_buffer: int = field(default=1000, metadata={"help": "Streaming: shuffle buffer size (0: no shuffle)."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes per process."})
    preprocessing_num_proc: int | None = field(
        default=None, metadata={"help": "Processes for the one-off image/text validation of map-style data."}
    )
    eval_data: str | None = field(
        default=DEMO_DATA, metadata={"help": "Evaluation data (zero-shot + retrieval); 'none' disables evaluation."}
    )
    eval_split: str = field(default="test", metadata={"help": "Split of --eval_data."})

    def __post_init__(self):
        if not 0 < self.crop_scale_min <= self.crop_scale_max <= 1:
            raise ValueError(f"need 0 < --crop_scale_min <= --crop_scale_max <= 1, got {self.crop_scale_min}, "
                             f"{self.crop_scale_max}")
        if self.max_text_length < 2:
            raise ValueError("--max_text_length must leave room for the start and end tokens")
        if self.eval_data is not None and self.eval_data.lower() == "none":
            self.eval_data = None


@dataclass
class TrainArguments:
    """Optimisation, precision, checkpoints and logging."""

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
        default="stop", metadata={"help": "On a non-finite loss: stop naming the step, or skip the step and count."}
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Upload output_dir to the Hub at the end."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repository id for --push_to_hub."})

    def __post_init__(self):
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
        self.report_to = [r for r in self.report_to if r != "none"]
        if "tensorboard" in self.report_to and importlib.util.find_spec("tensorboard") is None:
            logger.warning("tensorboard is not installed; not reporting to it")
            self.report_to.remove("tensorboard")


ARGUMENT_GROUPS = (ModelArguments, DataArguments, TrainArguments, recipes.RecipeArguments)


def _yaml_to_argv(path: str) -> list[str]:
    """A YAML mapping of flag -> value as command-line tokens (lists become several tokens)."""
    with open(path, encoding="utf-8") as file:
        values = yaml.safe_load(file) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of argument names to values")
    argv = []
    for key, value in values.items():
        if value is None:
            continue
        items = value if isinstance(value, list) else [value]
        argv += [f"--{key}", *(str(v).lower() if isinstance(v, bool) else str(v) for v in items)]
    return argv


def parse_args(argv: list[str] | None = None):
    """Parses flags, or a YAML file (`train.py run.yaml` or `--config run.yaml`) followed by flag overrides.

    Returns `(model_args, data_args, train_args, recipe_args)`; unknown flags and invalid combinations raise.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    config = None
    if argv and argv[0].endswith((".yaml", ".yml")):
        config = argv.pop(0)
    elif "--config" in argv:
        i = argv.index("--config")
        config = argv[i + 1]
        del argv[i : i + 2]
    if config is not None:
        argv = _yaml_to_argv(config) + argv  # flags after the file override it: argparse keeps the last value
    parser = HfArgumentParser(ARGUMENT_GROUPS, description=(
        "Train CLIP/ALIP/VeCLIP. Usage: train.py [RUN.yaml | --config RUN.yaml] [--flag value ...]; flags after "
        "the YAML file override it. With no arguments: a small ALIP model on the bundled demo data."))
    return parser.parse_args_into_dataclasses(args=argv)


def save_args(groups, path: Path):
    """Writes the resolved arguments of every group as one YAML file (atomically)."""
    resolved = {}
    for group in groups:
        resolved.update(dataclasses.asdict(group))
    write_text_atomic(path, yaml.safe_dump(resolved, sort_keys=False))


# ----------------------------------------------------------------------------------------------------------------
# Model and processor
# ----------------------------------------------------------------------------------------------------------------

_TINY_TOWER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
_SMALL_TOWER = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512)
MODEL_CONFIGS = {
    # A smoke-test size: trains on CPU in minutes.
    "tiny": dict(text_config=dict(_TINY_TOWER, vocab_size=49408, max_position_embeddings=77),
                 vision_config=dict(_TINY_TOWER, image_size=30, patch_size=2), projection_dim=16),
    # The demo size: learns the bundled 64 px clip art in a few CPU minutes (image 32, patch 4: 64 patches).
    "small": dict(text_config=dict(_SMALL_TOWER, vocab_size=49408, max_position_embeddings=77),
                  vision_config=dict(_SMALL_TOWER, image_size=32, patch_size=4), projection_dim=128),
    # OpenAI CLIP ViT-B/32 and ViT-B/16 (Radford et al. 2021, Table 19), the towers ALIP and VeCLIP train.
    **{
        name: dict(
            text_config=dict(hidden_size=512, num_hidden_layers=12, num_attention_heads=8, intermediate_size=2048,
                             vocab_size=49408, max_position_embeddings=77),
            vision_config=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                               image_size=224, patch_size=patch),
            projection_dim=512,
        )
        for name, patch in (("vit-b-32", 32), ("vit-b-16", 16))
    },
}


def build_model(args: ModelArguments) -> ALIPModel:
    """A pretrained ALIP/CLIP model, or a freshly initialised one of a named size."""
    if args.model_name_or_path:
        model = ALIPModel.from_pretrained(args.model_name_or_path)
    else:
        model = ALIPModel(ALIPConfig(**MODEL_CONFIGS[args.model_config]))
    if args.freeze_vision:
        _freeze(model.vision_model, model.visual_projection)
    if args.freeze_text:
        _freeze(model.text_model, model.text_projection)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if args.lora_rank:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                          target_modules=args.lora_target_modules)
        model = get_peft_model(model, lora)
    return model


def _freeze(*modules):
    for module in modules:
        module.requires_grad_(False)


def build_processor(args: ModelArguments, model: ALIPModel) -> ALIPProcessor:
    """The image processor saved with `--model_name_or_path` (VeCLIP's, CLIP's, ...) or CLIP's preprocessing at
    the model's image size, with `--tokenizer_name_or_path`, the saved tokenizer, or the CLIP BPE tokenizer."""
    source = Path(args.model_name_or_path) if args.model_name_or_path else None
    if source is not None and (source / "preprocessor_config.json").exists():
        image_processor = AutoImageProcessor.from_pretrained(source)
    else:
        size = model.config.vision_config.image_size
        image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    tokenizer_path = args.tokenizer_name_or_path
    if tokenizer_path is None and source is not None and (source / "tokenizer_config.json").exists():
        tokenizer_path = source
    if tokenizer_path is not None:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    else:
        tokenizer = clip_tokenizer(model_max_length=model.config.text_config.max_position_embeddings)
    return ALIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def core_model(accelerator: Accelerator, model) -> ALIPModel:
    """The `ALIPModel` under the DDP/compile wrapper and the LoRA wrapper."""
    model = accelerator.unwrap_model(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class TrainData:
    loader: torch.utils.data.DataLoader
    max_steps: int  # optimizer steps of the run
    num_rows: int | None  # usable rows (map-style), None when streaming
    skipped: dict[str, int]  # rows dropped by validation before training (map-style)
    resume_skips_batches: bool  # streaming: resuming replays and discards consumed batches


def build_train_data(args: DataArguments, train: TrainArguments, recipe: recipes.Recipe, processor,
                     accelerator: Accelerator, start_step: int) -> TrainData:
    """Loads, checks columns, validates rows, and builds the per-process DataLoader of micro-batches that
    starts at optimizer step `start_step`."""
    dataset = data.load_source(args.train_data, split=args.train_split, streaming=args.streaming)
    data.require_columns(dataset, {data.IMAGE: args.image_column, **recipe.columns()})
    dataset = data.undecoded_images(dataset, args.image_column)
    transform = data.ImageTransform.from_image_processor(
        processor.image_processor, train=True, crop_scale=(args.crop_scale_min, args.crop_scale_max))
    build = data.ExampleBuilder(args.image_column, recipe.text_selector(), transform, seed=train.seed)
    # The processor's text cleaning (CLIP's ftfy + whitespace + lower-case for the CLIP tokenizer) applies too.
    clean = clean_clip_text if processor.text_cleaning != "none" else None
    collate = data.Collator(processor.tokenizer, max_length=args.max_text_length, clean=clean)
    batch = train.per_device_train_batch_size
    common = dict(collate_fn=collate, num_workers=args.dataloader_num_workers,
                  persistent_workers=False, pin_memory=False)
    if args.streaming:
        from datasets.distributed import split_dataset_by_node

        dataset = dataset.select_columns([args.image_column, *recipe.columns().values()])
        if args.shuffle_buffer:
            dataset = dataset.shuffle(seed=train.seed, buffer_size=args.shuffle_buffer)
        dataset = split_dataset_by_node(dataset, rank=accelerator.process_index, world_size=accelerator.num_processes)
        stream = data.StreamingExamples(dataset, build, rank=accelerator.process_index)
        loader = torch.utils.data.DataLoader(stream, batch_size=batch, drop_last=True, **common)
        return TrainData(loader, steps_for(train, accelerator, None), None,
                         {"skipped_images": 0, "skipped_texts": 0}, resume_skips_batches=True)
    dataset = dataset.select_columns([args.image_column, *recipe.columns().values()])
    with accelerator.main_process_first():  # the main process fills the datasets cache, the others read it
        dataset, skipped = data.filter_valid_rows(dataset, build, num_proc=args.preprocessing_num_proc)
    max_steps = steps_for(train, accelerator, len(dataset))
    sampler = data.GlobalBatchSampler(
        len(dataset), batch, num_batches=max_steps * train.gradient_accumulation_steps,
        rank=accelerator.process_index, world_size=accelerator.num_processes, seed=train.seed,
        start=start_step * train.gradient_accumulation_steps)
    loader = torch.utils.data.DataLoader(data.MapStyleExamples(dataset, build), batch_sampler=sampler, **common)
    return TrainData(loader, max_steps, len(dataset), skipped, resume_skips_batches=False)


def steps_for(train: TrainArguments, accelerator: Accelerator, num_rows: int | None) -> int:
    """Optimizer steps of the run: `--max_steps`, else epochs over the usable rows."""
    if train.max_steps > 0:
        return train.max_steps
    if num_rows is None:
        raise ValueError("--streaming needs --max_steps (the length of a stream is unknown)")
    global_micro = train.per_device_train_batch_size * accelerator.num_processes
    steps = int(train.num_train_epochs * (num_rows // global_micro) // train.gradient_accumulation_steps)
    if steps < 1:
        raise ValueError(f"{num_rows} usable rows give no optimizer step with a global batch of "
                         f"{global_micro * train.gradient_accumulation_steps}; lower the batch size")
    return steps


# ----------------------------------------------------------------------------------------------------------------
# Optimizer
# ----------------------------------------------------------------------------------------------------------------


def _no_decay(name: str, param: torch.nn.Parameter) -> bool:
    # CLIP's convention: no weight decay on gains/biases (1-D), embeddings and the temperature.
    return param.ndim < 2 or "embedding" in name or "logit_scale" in name or "norm" in name


def build_optimizer(model, train: TrainArguments, max_steps: int):
    """AdamW with two parameter groups, and linear warm-up followed by cosine decay to 0."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if _no_decay(name, param) else decay).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=train.learning_rate, betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_epsilon)
    warmup = train.warmup_steps if train.warmup_steps >= 0 else int(train.warmup_ratio * max_steps)
    # Deviation: the official code uses OneCycleLR(pct_start=0.1), whose cosine warm-up starts at lr/25.
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, max_steps)
    return optimizer, scheduler


# ----------------------------------------------------------------------------------------------------------------
# One optimizer step
# ----------------------------------------------------------------------------------------------------------------

_EMBEDS = ("image_embeds", "text_embeds", "caption_embeds")


def _model_inputs(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "stats"}


def forward_backward(model, core: ALIPModel, recipe: recipes.Recipe, micro_batches: list[dict],
                     accelerator: Accelerator, local_loss: bool) -> ALIPOutput:
    """Loss of the whole (accumulated) batch and its gradient; returns the output with the loss and gates.

    With `k > 1` micro-batches this is open_clip's exact accumulation for contrastive losses: embed all `k`
    micro-batches without gradient, compute the gates ONCE on the cached global batch, then re-embed each
    micro-batch with gradient, splice it into the cached batch, and back-propagate the loss of the whole batch.
    The `k` backward passes sum to the gradient of one k-times larger batch. Deviation: the official ALIP code
    accumulates per-micro-batch losses (fewer negatives) and updates the gate running means every micro-step;
    here they update once per optimizer step.
    """
    device = accelerator.device
    if len(micro_batches) == 1:
        with accelerator.autocast():
            output = model(**_model_inputs(micro_batches[0], device), return_loss=False)
        recipe.loss(core, output, local_loss)
        accelerator.backward(output.loss)
        return output
    with torch.no_grad(), accelerator.autocast():
        cached = [model(**_model_inputs(mb, device), return_loss=False) for mb in micro_batches]
    gates = None
    if recipe.uses_caption:  # once, on the global cached batch: one running-mean update per optimizer step
        with torch.no_grad():
            gathered, _ = gather_features(*(_cat([getattr(c, name) for c in cached]).float() for name in _EMBEDS))
            gates = recipe.compute_gates(core, *gathered)
    for j, micro_batch in enumerate(micro_batches):
        sync = contextlib.nullcontext() if j == len(micro_batches) - 1 else accelerator.no_sync(model)
        with sync:
            with accelerator.autocast():
                fresh = model(**_model_inputs(micro_batch, device), return_loss=False)
            spliced = ALIPOutput(**{
                name: _cat([getattr(fresh if i == j else c, name) for i, c in enumerate(cached)]) for name in _EMBEDS})
            recipe.loss(core, spliced, local_loss, gates=gates)
            accelerator.backward(spliced.loss)
    # logit_scale enters every recomputed loss directly (not through the spliced rows), so each of the k
    # backward passes added the full d(loss)/d(logit_scale): keep one.
    if core.logit_scale.grad is not None:
        core.logit_scale.grad.div_(len(micro_batches))
    return spliced


def _cat(tensors: list):
    return None if tensors[0] is None else torch.cat(tensors)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------


def checkpoint_dir(output_dir: str) -> Path:
    return Path(output_dir) / "checkpoints"


def save_checkpoint(accelerator: Accelerator, output_dir: str, step: int, state: dict, keep: int) -> Path:
    """`accelerator.save_state` into a temporary directory renamed to `step_XXXXXX` once complete.

    A run killed while saving leaves only a `.tmp-*` directory, which `latest` never picks.
    """
    root = checkpoint_dir(output_dir)
    final = root / f"{CHECKPOINT_PREFIX}{step:06d}"
    tmp = root / f".tmp-{CHECKPOINT_PREFIX}{step:06d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        write_text_atomic(tmp / STATE_FILE, json.dumps({**state, "global_step": step}, indent=1))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in _checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _checkpoints(output_dir: str) -> list[Path]:
    root = checkpoint_dir(output_dir)
    found = [p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if (p / STATE_FILE).exists()] if root.exists() else []
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def resolve_checkpoint(value: str | None, output_dir: str) -> Path | None:
    """`latest` -> newest complete checkpoint in `output_dir/checkpoints` (None if there is none); a path as is."""
    if value is None:
        return None
    if value == "latest":
        found = _checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(value)
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(f"--resume_from_checkpoint {value}: not a complete checkpoint (no {STATE_FILE})")
    return path


def load_checkpoint(accelerator: Accelerator, path: Path) -> dict:
    """Restores model (gate running means included), optimizer, scheduler, scaler and RNG; returns the counters."""
    accelerator.load_state(str(path))
    return json.loads((path / STATE_FILE).read_text())


# ----------------------------------------------------------------------------------------------------------------
# Logging and evaluation
# ----------------------------------------------------------------------------------------------------------------


class JSONLinesTracker(GeneralTracker):
    """Appends each `accelerator.log` call as one JSON line to `metrics.jsonl` (main process)."""

    name = "jsonl"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, path: Path):
        super().__init__()
        self.path = Path(path)

    @property
    def tracker(self):
        return self.path

    def store_init_configuration(self, values: dict):
        pass

    def log(self, values: dict, step: int | None = None, **kwargs):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(json.dumps({"step": step, **{k: _plain(v) for k, v in values.items()}}) + "\n")


def _plain(value):
    return value.item() if isinstance(value, torch.Tensor) else value


def _tracker_config(groups) -> dict:
    flat = {}
    for group in groups:
        for key, value in dataclasses.asdict(group).items():
            flat[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


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
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".tmp-final-"))
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    for item in tmp.iterdir():  # each file replaced atomically
        os.replace(item, out / item.name)
    tmp.rmdir()
    export_to_clip(model, str(out / "clip_export"), processor=processor, overwrite=True)
    write_text_atomic(out / "README.md", model_card(out, results))


def model_card(output_dir: Path, results: dict[str, float]) -> str:
    """The model card: `model_card.md` rendered by eval.py from the results and the training arguments."""
    args = yaml.safe_load((output_dir / ARGS_FILE).read_text()) if (output_dir / ARGS_FILE).exists() else {}
    return render_model_card(results, train_args=args, model_name=args.get("hub_model_id") or output_dir.name)


def push_to_hub(output_dir: str, repo_id: str):
    """Uploads `output_dir` (without resumable checkpoints) to the Hub model repository `repo_id`."""
    import huggingface_hub

    huggingface_hub.create_repo(repo_id, exist_ok=True)
    huggingface_hub.upload_folder(repo_id=repo_id, folder_path=output_dir,
                                  ignore_patterns=["checkpoints/*", ".tmp-*", "*.tmp"])


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Trains, evaluates and saves; returns the metrics of the last step (with the evaluation results)."""
    model_args, data_args, train_args, recipe_args = parse_args(argv)
    groups = (model_args, data_args, train_args, recipe_args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # main() may run several times in one interpreter (notebooks, tests); the precision of an earlier run must
    # not stick. The process group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        mixed_precision=train_args.mixed_precision, project_dir=train_args.output_dir,
        log_with=[*train_args.report_to, JSONLinesTracker(Path(train_args.output_dir) / METRICS_FILE)])
    set_seed(train_args.seed)
    recipe = recipes.get_recipe(recipe_args)
    if accelerator.is_main_process:
        save_args(groups, Path(train_args.output_dir) / ARGS_FILE)

    model = build_model(model_args)
    processor = build_processor(model_args, core_model(accelerator, model))

    resume_path = resolve_checkpoint(train_args.resume_from_checkpoint, train_args.output_dir)
    start_step = json.loads((resume_path / STATE_FILE).read_text())["global_step"] if resume_path else 0
    if start_step == 0 and accelerator.is_main_process:  # a fresh run does not append to an old run's log
        (Path(train_args.output_dir) / METRICS_FILE).unlink(missing_ok=True)
    train_data = build_train_data(data_args, train_args, recipe, processor, accelerator, start_step)
    max_steps = train_data.max_steps

    optimizer, scheduler = build_optimizer(model, train_args, max_steps)
    # The scheduler is not prepared: Accelerate would step it once per process, changing the schedule with
    # the number of processes. It is registered so that checkpoints hold it.
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    counters = {"skipped_images": train_data.skipped["skipped_images"],
                "skipped_texts": train_data.skipped["skipped_texts"], "truncated_texts": 0, "nonfinite_steps": 0}
    if resume_path is not None:
        counters.update({k: v for k, v in load_checkpoint(accelerator, resume_path).items() if k in counters})
        logger.info("resumed from %s at step %d", resume_path, start_step)
    global_batch = (train_args.per_device_train_batch_size * accelerator.num_processes
                    * train_args.gradient_accumulation_steps)
    logger.info("%s with %d process(es), global batch %d, %d steps", accelerator.distributed_type,
                accelerator.num_processes, global_batch, max_steps)
    accelerator.init_trackers("train", config=_tracker_config(groups))

    metrics, finished = train_loop(
        model, optimizer, scheduler, recipe, train_data, accelerator, train_args, start_step, counters,
        run_eval=lambda: evaluate(core_model(accelerator, model), processor, data_args, accelerator))
    if not finished:  # --stop_after_steps: leave the run as a kill would, resumable from its checkpoints
        accelerator.end_training()
        return metrics

    model = final_model(accelerator, model)
    results = {k: v for k, v in metrics.items() if k.startswith("eval/")}
    if results and accelerator.is_main_process:
        print(json.dumps(results, indent=1))
    if accelerator.is_main_process:
        save_outputs(model, processor, train_args.output_dir, results)
        if train_args.push_to_hub:
            push_to_hub(train_args.output_dir, train_args.hub_model_id)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


def train_loop(model, optimizer, scheduler, recipe, train_data: TrainData, accelerator: Accelerator,
               args: TrainArguments, start_step: int, counters: dict, run_eval) -> tuple[dict, bool]:
    """Optimizer steps `start_step + 1 .. max_steps`; returns the metrics of the last logged step and whether
    the run reached `max_steps` (False when stopped by `--stop_after_steps`)."""
    max_steps = train_data.max_steps
    core = core_model(accelerator, model)
    k = args.gradient_accumulation_steps
    batches = iter(train_data.loader)
    if train_data.resume_skips_batches:  # streaming: replay the stream up to the resume point
        for _ in tqdm(range(start_step * k), desc="skipping consumed batches", disable=not accelerator.is_main_process):
            next(batches)
    samples_per_step = args.per_device_train_batch_size * accelerator.num_processes * k
    progress = tqdm(total=max_steps, initial=start_step, unit="step", disable=not accelerator.is_main_process)
    model.train()
    metrics, started = {}, time.perf_counter()
    for step in range(start_step + 1, max_steps + 1):
        micro_batches = [next(batches) for _ in range(k)]
        output = forward_backward(model, core, recipe, micro_batches, accelerator, args.local_loss)
        stats = _sum_stats(accelerator, micro_batches)
        if _all_finite(accelerator, output.loss):
            apply_update(model, core, optimizer, accelerator, args.max_grad_norm)
        elif args.nonfinite == "stop":
            raise FloatingPointError(f"non-finite loss {output.loss.item()} at step {step}; "
                                     "lower the learning rate or pass --nonfinite skip")
        else:
            counters["nonfinite_steps"] += 1
            optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        for key in ("skipped_images", "skipped_texts", "truncated_texts"):
            counters[key] += stats.get(key, 0)
        progress.update(1)
        elapsed = time.perf_counter() - started
        rate = (step - start_step) * samples_per_step / max(elapsed, 1e-9)
        progress.set_postfix(loss=f"{output.loss.item():.4f}", samples_per_s=f"{rate:.1f}")
        evaluate_now = step == max_steps or (args.eval_steps > 0 and step % args.eval_steps == 0)
        if evaluate_now or step % args.logging_steps == 0:
            metrics = _step_metrics(accelerator, recipe, output, stats, samples_per_step, scheduler, core, counters)
            metrics["train/samples_per_second"] = rate
            if evaluate_now:
                metrics.update(run_eval())
            accelerator.log(metrics, step=step)
        if args.save_steps and step % args.save_steps == 0:
            save_checkpoint(accelerator, args.output_dir, step, counters, args.save_total_limit)
        if step == args.stop_after_steps:
            progress.close()
            return metrics, False
    progress.close()
    return metrics, True


def apply_update(model, core: ALIPModel, optimizer, accelerator: Accelerator, max_grad_norm: float):
    """Clip, AdamW step, zero the gradients, clamp the temperature."""
    if max_grad_norm > 0:
        accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():  # CLIP and the official ALIP code: logit_scale in [0, ln 100]
        core.logit_scale.clamp_(0, LOGIT_SCALE_MAX)


def _sum_stats(accelerator: Accelerator, micro_batches: list[dict]) -> dict[str, int]:
    """Per-batch counts summed over micro-batches and processes."""
    keys = sorted({key for mb in micro_batches for key in mb["stats"]})
    local = torch.tensor([sum(mb["stats"].get(key, 0) for mb in micro_batches) for key in keys],
                         dtype=torch.float64, device=accelerator.device)
    total = accelerator.reduce(local, reduction="sum") if accelerator.num_processes > 1 else local
    return {key: int(value) for key, value in zip(keys, total.tolist())}


def _all_finite(accelerator: Accelerator, loss: torch.Tensor) -> bool:
    # Every process must take the same decision; with --local_loss their losses differ.
    finite = torch.isfinite(loss.detach().float()).float().reshape(1)
    if accelerator.num_processes > 1:
        finite = accelerator.reduce(finite, reduction="sum") / accelerator.num_processes
    return bool(finite.item() == 1.0)


def _step_metrics(accelerator, recipe, output, stats, samples_per_step, scheduler, core, counters) -> dict:
    metrics = recipe.metrics(output, stats, samples_per_step)
    if accelerator.num_processes > 1:  # with --local_loss each process holds a part of the loss
        keys = sorted(metrics)
        values = accelerator.reduce(torch.tensor([metrics[k] for k in keys], device=accelerator.device), "mean")
        metrics = dict(zip(keys, values.tolist()))
    metrics.update({
        "train/lr": scheduler.get_last_lr()[0],
        "train/logit_scale": core.logit_scale.detach().exp().item(),
        "data/skipped_images": counters["skipped_images"],
        "data/skipped_texts": counters["skipped_texts"],
        "data/truncated_texts": counters["truncated_texts"],
        "train/nonfinite_steps": counters["nonfinite_steps"],
    })
    return metrics


if __name__ == "__main__":
    main()
