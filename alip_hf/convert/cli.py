"""The checkpoint converters' command line: `python -m alip_hf.convert CONVERTER [flags]` (also `alip-convert`).

    python -m alip_hf.convert from_open_clip --checkpoint_path ViT-B-32.pt --open_clip_model_name ViT-B-32 \\
        --output_dir alip-b32
    python -m alip_hf.convert to_clip --model_name_or_path alip-b32 --output_dir clip-b32
    python -m alip_hf.convert to_open_clip --model_name_or_path alip-b32
    python -m alip_hf.convert from_veclip --checkpoint_path vecapdfn_clip_b16.zip --output_dir veclip-dfn-b16

Every converter takes the same flags for the same things, in transformers' words: a transformers model to read is
`--model_name_or_path` (a local directory or a Hub id, loaded by `alip_hf.pretrained`), a checkpoint in another
format is `--checkpoint_path` (transformers' conversion scripts' name), the directory written is `--output_dir`,
`--overwrite_output_dir` replaces it, and `--push_to_hub --hub_model_id` with the `alip_hf.hub` options upload it.

The flags are typed dataclasses read by `HfArgumentParser`, defined in this module, which imports neither torch nor
transformers' models, so that `--help` and a mistyped flag answer at once: the conversions (`alip_hf.convert.*`)
import torch and register ALIP with transformers (several seconds) only after the flags are checked.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field
from pathlib import Path

from alip_hf.hub import HubArguments

DEFAULT_VECLIP_TOKENIZER = "t5-base"  # what the official notebook loads (T5Tokenizer.from_pretrained("t5-base"))


# ----------------------------------------------------------------------------------------------------------------
# Flags every converter shares
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class OutputArguments:
    """Where a converter writes, and whether it uploads what it wrote."""

    _argument_group_name = "output"

    output_dir: str | None = field(default=None, metadata={
        "help": "Directory to write (created atomically: a temporary sibling renamed into place)."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Replace --output_dir if it exists and is not empty."})
    push_to_hub: bool = field(default=False, metadata={"help": "Upload --output_dir to the Hub (--hub_model_id)."})
    hub_model_id: str | None = field(default=None, metadata={
        "help": "Hub model repository (user/name or org/name) that --push_to_hub uploads --output_dir to."})

    def __post_init__(self):
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id")


@dataclass
class LoadArguments:
    """How a converter reads a transformers model (`alip_hf.pretrained`, the loader eval.py and train.py use)."""

    _argument_group_name = "model"

    model_name_or_path: str = field(metadata={
        "help": "The model to convert: a directory written by save_pretrained, or a Hub model id."})
    model_revision: str | None = field(default=None, metadata={
        "help": "Branch, tag or commit of a Hub model (default: main)."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where Hub downloads are cached."})
    allow_new_weights: bool = field(default=False, metadata={
        "help": "Accept a checkpoint that lacks some of the model's tensors or holds tensors the model does not "
                "use (a new head is intended); each is named in the log. Without it, either is an error naming "
                "the tensors."})


# ----------------------------------------------------------------------------------------------------------------
# Each converter's own flags
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class FromOpenClipArguments:
    """open_clip CLIP or official ALIP checkpoint -> ALIP model directory."""

    _argument_group_name = "from_open_clip"

    checkpoint_path: str = field(metadata={
        "help": "open_clip / official ALIP checkpoint (.pt, .pth, .bin, .safetensors)."})
    open_clip_model_name: str | None = field(default=None, metadata={
        "help": "open_clip model name, e.g. ViT-B-32 or ViT-B-32-quickgelu (attention heads, activation)."})
    open_clip_config: str | None = field(default=None, metadata={
        "help": "open_clip model config JSON, instead of --open_clip_model_name: an open_clip `model_configs` file "
                "or the open_clip_config.json that `to_open_clip` writes (its `model_cfg` is read)."})
    quick_gelu: bool | None = field(default=None, metadata={
        "help": "QuickGELU (true) or GELU (false); default: from the model config or name, else GELU."})
    save_processor: bool = field(default=True, metadata={
        "help": "Write CLIP's processor sized for the model beside it (--save_processor false: the model only)."})

    def __post_init__(self):
        if self.open_clip_model_name and self.open_clip_config:
            raise ValueError("pass --open_clip_model_name or --open_clip_config, not both")


@dataclass
class ToClipArguments:
    """ALIP model -> plain transformers CLIPModel directory."""

    _argument_group_name = "to_clip"

    save_processor: bool = field(default=True, metadata={
        "help": "Save the model's processor as a CLIPProcessor beside the export (when the model has one)."})


@dataclass
class ToOpenClipArguments:
    """ALIP or CLIP model -> open_clip_config.json + open_clip_model.safetensors."""

    _argument_group_name = "to_open_clip"


@dataclass
class FromVeclipArguments:
    """A released VeCLIP checkpoint -> self-contained model directory."""

    _argument_group_name = "from_veclip"

    checkpoint_path: str = field(metadata={"help": "A downloaded VeCLIP checkpoint: its .zip or the unzipped folder."})
    tokenizer_name_or_path: str = field(default=DEFAULT_VECLIP_TOKENIZER, metadata={
        "help": "T5 tokenizer the model was trained with: a Hub id (from the local cache when offline) or a folder "
                "with spiece.model / tokenizer.json."})
    resize_only: bool = field(default=False, metadata={
        "help": "Save the image processor in the official `resize_only` mode (squash to a square) instead of "
                "short-side resize + centre crop."})
    set_token_ids_from_tokenizer: bool = field(default=False, metadata={
        "help": "Rewrite text_config.eos_token_id/pad_token_id from the tokenizer instead of refusing a config that "
                "disagrees with it (only when you know the config is what is wrong)."})


@dataclass(frozen=True)
class Converter:
    """One converter: its flag groups, the module that converts, and whether `--output_dir` may be left out."""

    groups: tuple
    module: str
    description: str
    output_dir_required: bool = True


CONVERTERS = {
    "from_open_clip": Converter((FromOpenClipArguments, OutputArguments, HubArguments),
                                "alip_hf.convert.from_open_clip", FromOpenClipArguments.__doc__),
    "to_clip": Converter((LoadArguments, ToClipArguments, OutputArguments, HubArguments), "alip_hf.convert.to_clip",
                         ToClipArguments.__doc__),
    "to_open_clip": Converter((LoadArguments, ToOpenClipArguments, OutputArguments, HubArguments),
                              "alip_hf.convert.to_open_clip",
                              ToOpenClipArguments.__doc__ + " --output_dir defaults to the local model directory.",
                              output_dir_required=False),
    "from_veclip": Converter((FromVeclipArguments, OutputArguments, HubArguments), "alip_hf.convert.from_veclip",
                             FromVeclipArguments.__doc__),
}


def build_parser(name: str):
    """The `HfArgumentParser` of converter `name` (one of `CONVERTERS`)."""
    from transformers import HfArgumentParser  # the argument parser only, not the models

    if name not in CONVERTERS:
        raise ValueError(f"unknown converter {name!r}; choose one of {sorted(CONVERTERS)}")
    converter = CONVERTERS[name]
    return HfArgumentParser(converter.groups, prog=f"python -m alip_hf.convert {name}",
                            description=converter.description)


def parse_args(name: str, flags: list[str]) -> tuple:
    """The parsed flag groups of converter `name`, in the order of its `Converter.groups`."""
    groups = build_parser(name).parse_args_into_dataclasses(args=flags)
    output = next(group for group in groups if isinstance(group, OutputArguments))
    if CONVERTERS[name].output_dir_required and not output.output_dir:
        raise ValueError(f"{name}: --output_dir is required")
    return tuple(groups)


USAGE = f"usage: python -m alip_hf.convert {{{','.join(CONVERTERS)}}} [flags]   (CONVERTER --help for its flags)"


def main(argv: list[str] | None = None) -> Path:
    """Checks the flags of the chosen converter, then imports it and converts; returns the written directory."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in CONVERTERS:
        if argv and argv[0] in ("-h", "--help"):
            print(USAGE)
            raise SystemExit(0)
        raise SystemExit(f"{USAGE}\nerror: {'no converter given' if not argv else f'unknown converter {argv[0]!r}'}")
    name, flags = argv[0], argv[1:]
    groups = parse_args(name, flags)  # --help and bad flags stop here, before torch loads
    return importlib.import_module(CONVERTERS[name].module).run(*groups)


def cli() -> None:
    """The `alip-convert` command (and `python -m alip_hf.convert`)."""
    try:
        main(sys.argv[1:])
    except (ValueError, OSError) as error:  # bad input: the message names it
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    cli()
