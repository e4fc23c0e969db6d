"""Converts a released VeCLIP checkpoint into a self-contained model directory, without TensorFlow.

The VeCLIP releases (github.com/apple/ml-veclip) are zipped `transformers.CLIPModel` folders (`config.json` +
`model.safetensors`) that ship neither a tokenizer (the notebook loads "t5-base" separately) nor an image
processor (a TensorFlow function instead). The output of

    python -m alip_hf.convert from_veclip --checkpoint_path vecapdfn_clip_b16.zip --output_dir veclip-b16

is a plain CLIP checkpoint (`model_type: clip`, weights unchanged) plus everything needed to use it: the T5
tokenizer with `model_max_length` set to the text tower's context, the TensorFlow-exact
[`VeCLIPImageProcessor`] inside an [`ALIPProcessor`] (with their module files and `auto_map`, so
`trust_remote_code=True` works without this package), and a model card. It loads with `CLIPModel`,
`AutoModel`, and `ALIPModel` (gates start at their initial means), and `train.py --model_name_or_path DIR`
fine-tunes it.

Keeping `model_type: clip` (not `alip`) is deliberate: the directory stays usable by any CLIP tooling, and
`ALIPModel.from_pretrained` reads a CLIP config as an `ALIPConfig` with default gate settings.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from tqdm.auto import tqdm
from transformers import AutoTokenizer, CLIPConfig, CLIPModel
from transformers.utils import logging

from alip_hf.convert.cli import DEFAULT_VECLIP_TOKENIZER
from alip_hf.io import apply_default_permissions, replace_directory
from modeling_alip import align_text_config, veclip_processor

logger = logging.get_logger(__name__)

WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"
)
DEFAULT_TOKENIZER = DEFAULT_VECLIP_TOKENIZER  # the command line's default (alip_hf.convert.cli)


def find_model_folder(root: str | os.PathLike) -> Path:
    """The one folder under `root` (itself included) holding a `config.json` next to weights.

    Raises:
        FileNotFoundError: no `config.json`, or a `config.json` without any of `WEIGHT_FILES` beside it.
        ValueError: several checkpoints under `root`.
    """
    root = Path(root)
    configs = sorted(p.parent for p in root.rglob("config.json") if not _is_hidden(p.relative_to(root)))
    if not configs:
        found = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())[:20]
        raise FileNotFoundError(
            f"{root}: no config.json found (files: {found or 'none'}); is this a VeCLIP checkpoint?"
        )
    with_weights = [folder for folder in configs if any((folder / name).is_file() for name in WEIGHT_FILES)]
    if not with_weights:
        raise FileNotFoundError(
            f"{configs[0]}: config.json but no weights; expected one of {', '.join(WEIGHT_FILES)} beside it"
        )
    if len(with_weights) > 1:
        raise ValueError(f"{root}: several checkpoints found ({[str(f) for f in with_weights]}); pass one folder")
    return with_weights[0]


def _is_hidden(relative: Path) -> bool:
    # macOS zips carry __MACOSX/ and ._ resource forks next to the real files.
    return any(part.startswith(".") or part == "__MACOSX" for part in relative.parts)


def extract_zip(zip_path: str | os.PathLike, destination: str | os.PathLike) -> Path:
    """Extracts `zip_path` into `destination`, refusing members that would land outside it."""
    destination = Path(destination)
    try:
        archive = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile as error:
        raise ValueError(f"{zip_path}: not a valid zip file ({error})") from error
    with archive:
        members = archive.infolist()
        for member in members:
            path = PurePosixPath(member.filename)
            if path.is_absolute() or ".." in path.parts or ":" in member.filename:
                raise ValueError(f"{zip_path}: refusing member {member.filename!r} (absolute or outside the archive)")
        total = sum(member.file_size for member in members)
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"extracting {Path(zip_path).name}") as bar:
            for member in members:
                archive.extract(member, destination)
                bar.update(member.file_size)
    return destination


def load_tokenizer(name_or_path: str):
    """The T5 tokenizer from the Hub cache or a local folder, with a clear error when offline."""
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        raise OSError(
            f"--tokenizer_name_or_path {name_or_path!r} could not be loaded ({error}). Offline, pass a folder holding the T5 "
            "tokenizer (e.g. one written by T5Tokenizer.from_pretrained('t5-base').save_pretrained(DIR))."
        ) from error


def read_config(folder: Path) -> CLIPConfig:
    """The checkpoint's `CLIPConfig`; anything but `model_type: clip` is not a VeCLIP release."""
    path = folder / "config.json"
    try:
        with open(path, encoding="utf-8") as handle:
            model_type = json.load(handle).get("model_type")
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    if model_type != "clip":
        raise ValueError(f"{path}: model_type is {model_type!r}; a VeCLIP release is a 'clip' model")
    return CLIPConfig.from_pretrained(folder)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle, tqdm(
        total=path.stat().st_size, unit="B", unit_scale=True, desc=f"sha256 {path.name}"
    ) as bar:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def load_veclip_model(folder: Path, config: CLIPConfig) -> CLIPModel:
    """Loads the released `CLIPModel` with `config`; every weight must be present and of the right shape."""
    model, info = CLIPModel.from_pretrained(folder, config=config, dtype="auto", output_loading_info=True)
    problems = {key: info.get(key) for key in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(key)}
    if problems:
        raise ValueError(f"{folder}: weights do not match a CLIPModel of its config.json: {problems}")
    return model


def convert_veclip(
    input_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    tokenizer: str = DEFAULT_TOKENIZER,
    resize_only: bool = False,
    set_token_ids_from_tokenizer: bool = False,
    overwrite: bool = False,
) -> Path:
    """Writes a self-contained model directory from a VeCLIP folder or zip; returns its path.

    The directory is assembled in a temporary sibling and renamed into place, so an interrupted run never
    leaves a half-written `output_dir`.
    """
    input_path, output_dir = Path(input_path), Path(output_dir)
    if not input_path.exists():
        raise FileNotFoundError(f"--checkpoint_path {input_path} does not exist")
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"--output_dir {output_dir} exists; pass --overwrite_output_dir to replace it")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".veclip-", dir=output_dir.parent) as work:
        if input_path.is_dir():
            folder = find_model_folder(input_path)
        elif zipfile.is_zipfile(input_path):
            folder = find_model_folder(extract_zip(input_path, Path(work) / "extracted"))
        else:
            raise ValueError(f"--checkpoint_path {input_path}: expected a folder or a .zip file")
        config = read_config(folder)
        loaded_tokenizer = load_tokenizer(tokenizer)
        if set_token_ids_from_tokenizer:
            before = (config.text_config.eos_token_id, config.text_config.pad_token_id)
            align_text_config(config.text_config, loaded_tokenizer)
            logger.warning(
                f"text_config (eos_token_id, pad_token_id) rewritten from {before} to "
                f"{(config.text_config.eos_token_id, config.text_config.pad_token_id)} "
                "(--set_token_ids_from_tokenizer)"
            )
        # Checked before the (large) weights are read.
        processor = veclip_processor(config, loaded_tokenizer, resize_only)
        logger.info(f"Loading {folder} ...")
        model = load_veclip_model(folder, config)
        staging = Path(work) / "output"
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        # preprocessor_config.json beside processor_config.json, for AutoImageProcessor and older loaders.
        processor.image_processor.save_pretrained(staging)
        source_weights = next(folder / name for name in WEIGHT_FILES if (folder / name).is_file())
        write_model_card(staging, model.config, input_path, source_weights, tokenizer, loaded_tokenizer, resize_only)
        apply_default_permissions(staging)  # safetensors writes private files
        replace_directory(staging, output_dir)
    logger.info(f"Wrote {output_dir}")
    return output_dir


def write_model_card(directory: Path, config: CLIPConfig, source: Path, weights: Path, tokenizer_name: str,
                     tokenizer, resize_only: bool):
    """README.md saying what the directory holds and where it came from (no numbers typed by hand)."""
    vision, text = config.vision_config, config.text_config
    crop = "resize to a square (resize_only)" if resize_only else "short side resize + centre crop"
    card = f"""---
library_name: transformers
pipeline_tag: zero-shot-image-classification
license: other
tags:
- clip
- veclip
---

# {source.stem} (VeCLIP, converted)

A released [VeCLIP](https://github.com/apple/ml-veclip) checkpoint (Lai et al., "VeCLIP: Improving CLIP
Training via Visual-enriched Captions", arXiv 2310.07699) as a self-contained `transformers.CLIPModel`
directory: weights unchanged, plus its T5 tokenizer and a PyTorch image processor that reproduces the
official TensorFlow preprocessing. Reported results and the license are those of the original release.

- Source: `{source.name}` (weights `{weights.name}`, sha256 `{file_sha256(weights)}`)
- Vision tower: ViT, image {vision.image_size}, patch {vision.patch_size}, width {vision.hidden_size},
  {vision.num_hidden_layers} layers
- Text tower: width {text.hidden_size}, {text.num_hidden_layers} layers, context {text.max_position_embeddings},
  vocabulary {text.vocab_size}
- Tokenizer: `{tokenizer_name}` ({type(tokenizer).__name__}); end token {tokenizer.eos_token!r} = id
  {tokenizer.eos_token_id} (the text tower pools there), padding id {tokenizer.pad_token_id}
- Images: `VeCLIPImageProcessor`: bilinear resize without antialiasing ({crop}) to {vision.image_size},
  whitening with CLIP's mean and std on the 0-255 scale

## Use

```python
import modeling_alip  # registers ALIPProcessor and VeCLIPImageProcessor (or pass trust_remote_code=True)
from transformers import AutoProcessor, CLIPModel

model = CLIPModel.from_pretrained("{directory.name}")
processor = AutoProcessor.from_pretrained("{directory.name}")
inputs = processor(images=[image], text=["a photo of a cat", "a photo of a dog"])
probs = model(**inputs).logits_per_image.softmax(dim=-1)
```

Fine-tune with `python train.py --model_name_or_path {directory.name} --recipe veclip ...`;
evaluate with `python eval.py --model {directory.name} ...`.
"""
    with open(directory / "README.md", "w", encoding="utf-8") as handle:
        handle.write(card)


def run(args, output, hub) -> Path:
    """`python -m alip_hf.convert from_veclip` (`FromVeclipArguments`, `OutputArguments`, `HubArguments`)."""
    from alip_hf.hub import push_model_directory

    verbosity = logging.get_verbosity()
    logging.set_verbosity_info()  # says what is loaded and written; restored for callers of run()
    try:
        written = convert_veclip(
            args.checkpoint_path,
            output.output_dir,
            tokenizer=args.tokenizer_name_or_path,
            resize_only=args.resize_only,
            set_token_ids_from_tokenizer=args.set_token_ids_from_tokenizer,
            overwrite=output.overwrite_output_dir,
        )
        push_model_directory(written, output.hub_model_id if output.push_to_hub else None, hub,
                             what="VeCLIP checkpoint")
        return written
    finally:
        logging.set_verbosity(verbosity)
