"""The checkpoint converters' command line: `python -m alip_hf.convert CONVERTER [flags]` (also `alip-convert`).

    python -m alip_hf.convert from_open_clip --checkpoint ViT-B-32.pt --model_name ViT-B-32 --output alip-b32
    python -m alip_hf.convert to_clip --model alip-b32 --output clip-b32
    python -m alip_hf.convert to_open_clip --model_dir alip-b32
    python -m alip_hf.convert from_veclip --input vecapdfn_clip_b16.zip --output veclip-dfn-b16

The conversions are `modeling_alip.convert_*`. Their flags are defined here, in a module that imports neither
torch nor transformers' models, so that `--help` and a mistyped flag answer at once: importing `modeling_alip`
registers ALIP with transformers, which loads torch (several seconds). `python -m modeling_alip.convert_*` runs
the same commands, after that import.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass, field
from pathlib import Path

from alip_hf.hub import HubArguments, hub_parser

DEFAULT_VECLIP_TOKENIZER = "t5-base"  # what the official notebook loads (T5Tokenizer.from_pretrained("t5-base"))


def open_clip_parser() -> argparse.ArgumentParser:
    from transformers.hf_argparser import (
        string_to_bool,  # transformers' argument parsing only, not its models
    )

    parser = hub_parser(
        prog="python -m alip_hf.convert from_open_clip",
        description="Convert an open_clip CLIP or official ALIP checkpoint into an ALIP model directory.",
    )
    parser.add_argument("--checkpoint", required=True, help="open_clip / official ALIP checkpoint (.pt, .bin, .safetensors)")
    parser.add_argument("--output", required=True, help="directory to write the ALIP model (save_pretrained) to")
    parser.add_argument("--model_name", help="open_clip model name, e.g. ViT-B-32 or ViT-B-32-quickgelu (heads, activation)")
    parser.add_argument("--model_config", help="open_clip model config JSON file, instead of --model_name")
    parser.add_argument(
        "--quick_gelu", type=string_to_bool, nargs="?", const=True, default=None,
        help="QuickGELU (--quick_gelu or --quick_gelu true) or GELU (--quick_gelu false); default: from the model "
             "config/name, else GELU",
    )
    parser.add_argument("--no_processor", action="store_true", help="write the model only, without the processor")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists and is not empty")
    return parser


def to_clip_parser() -> argparse.ArgumentParser:
    parser = hub_parser(
        prog="python -m alip_hf.convert to_clip",
        description="Export an ALIP model directory as a plain transformers CLIPModel directory.",
    )
    parser.add_argument("--model", required=True, help="ALIP model directory (written by save_pretrained)")
    parser.add_argument("--output", required=True, help="directory to write the CLIPModel to")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists and is not empty")
    parser.add_argument("--no_processor", action="store_true", help="do not copy the processor even if present")
    return parser


def to_open_clip_parser() -> argparse.ArgumentParser:
    parser = hub_parser(
        prog="python -m alip_hf.convert to_open_clip",
        description="Write open_clip_config.json + open_clip_model.safetensors for an ALIP or CLIP model directory.",
    )
    parser.add_argument("--model_dir", required=True, help="model directory written by save_pretrained")
    parser.add_argument("--output_dir", help="where to write the two open_clip files (default: --model_dir itself)")
    return parser


@dataclass
class VeclipConvertArguments:
    input: str = field(metadata={"help": "A downloaded VeCLIP checkpoint: its .zip or the unzipped folder."})
    output: str = field(metadata={"help": "Directory to write (must not exist unless --overwrite)."})
    tokenizer: str = field(
        default=DEFAULT_VECLIP_TOKENIZER,
        metadata={"help": "T5 tokenizer the model was trained with: a Hub id (from the local cache when offline) or "
                  "a folder with spiece.model / tokenizer.json."},
    )
    resize_only: bool = field(
        default=False,
        metadata={"help": "Save the image processor in the official `resize_only` mode (squash to a square) instead "
                  "of short-side resize + centre crop."},
    )
    set_token_ids_from_tokenizer: bool = field(
        default=False,
        metadata={"help": "Rewrite text_config.eos_token_id/pad_token_id from the tokenizer instead of refusing a "
                  "config that disagrees with it (only when you know the config is what is wrong)."},
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace --output if it exists."})
    push_to_hub: bool = field(default=False, metadata={"help": "Upload --output to the Hub."})
    hub_model_id: str | None = field(default=None, metadata={
        "help": "Hub model repository (user/name or org/name) that --push_to_hub uploads --output to."})


def veclip_parser():
    from transformers import (
        HfArgumentParser,  # the argument parser only, not the models
    )

    return HfArgumentParser((VeclipConvertArguments, HubArguments), prog="python -m alip_hf.convert from_veclip")


# converter -> (its flags, the module that converts)
CONVERTERS = {
    "from_open_clip": (open_clip_parser, "modeling_alip.convert_open_clip"),
    "to_clip": (to_clip_parser, "modeling_alip.convert_to_clip"),
    "to_open_clip": (to_open_clip_parser, "modeling_alip.convert_to_open_clip"),
    "from_veclip": (veclip_parser, "modeling_alip.convert_veclip"),
}


def build_parser(name: str):
    """The flags of converter `name` (one of `CONVERTERS`)."""
    if name not in CONVERTERS:
        raise ValueError(f"unknown converter {name!r}; choose one of {sorted(CONVERTERS)}")
    return CONVERTERS[name][0]()


def main(argv: list[str] | None = None) -> Path:
    """Checks the flags of the chosen converter, then imports it and converts; returns the written directory."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in CONVERTERS:
        usage = f"usage: python -m alip_hf.convert {{{','.join(CONVERTERS)}}} [flags]   (CONVERTER --help for its flags)"
        if argv and argv[0] in ("-h", "--help"):
            print(usage)
            raise SystemExit(0)
        raise SystemExit(f"{usage}\nerror: {'no converter given' if not argv else f'unknown converter {argv[0]!r}'}")
    name, flags = argv[0], argv[1:]
    parser = build_parser(name)
    if hasattr(parser, "parse_args_into_dataclasses"):
        parser.parse_args_into_dataclasses(args=flags)  # --help and bad flags stop here, before torch loads
    else:
        parser.parse_args(flags)
    return importlib.import_module(CONVERTERS[name][1]).main(flags)


def cli() -> None:
    """The `alip-convert` command."""
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError, FileExistsError) as error:  # bad input: the message names it
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    cli()
