"""Loading a pretrained model with its processor: the one loader of eval.py, train.py `--model_name_or_path`, the
converters and the audit.

Four rules, each written once here:

* **Local path or Hub id** ([`model_source`]): an existing directory is local; a name written as a path (absolute,
  `./`, `../`, `~`, a backslash, more than one `/`) that is not a directory is an error naming it, never a Hub
  lookup; anything else must be a valid Hub id (`name` or `org/name`).
* **Strict weights** ([`load_model`]): a checkpoint that lacks a tensor of the model (which would then keep its
  random initialisation) or holds one the model does not use is an error naming the tensors, unless
  `allow_new_weights` (`--allow_new_weights`) says a new head is intended. The one expected gap is ALIP's state
  that a plain CLIP checkpoint never has (`STATE_NOT_IN_CLIP_CHECKPOINTS`: the gates' running means, which start at
  `gate_initial_mean`); it is accepted only when all of it is missing (a CLIP checkpoint), never a part of it.
* **The processor saved with the model, or an error** ([`load_processor`]): a model saved with a processor (any of
  `PROCESSOR_FILES`) gets that processor; a missing or damaged part of it is an error naming the file, never CLIP's
  tokenizer in its place. Only a model saved with no processor at all gets CLIP's preprocessing and tokenizer at the
  model's sizes, and the log says that this is why.
* **Damaged files are named** ([`check_model_files`]): a `*.json` that is not JSON or a `*.safetensors` whose
  header is damaged (zero bytes, truncated, garbage) is an error naming the file, before transformers reads it.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

# The processor's files are defined with the processor (importing modeling_alip loads transformers: the entry
# points import this module where they load a model, not at start-up).
from modeling_alip.processing_alip import IMAGE_PROCESSOR_FILES, TOKENIZER_FILES

logger = logging.getLogger(__name__)

# ALIPModel state that a plain CLIP checkpoint does not have: it starts at its initial value when ALIP is
# initialised from CLIP. (A parameter added to ALIPModel that CLIP checkpoints lack belongs here, with a reason.)
STATE_NOT_IN_CLIP_CHECKPOINTS = ("gates.",)
# What a saved processor leaves in the model directory (image processor settings, tokenizer files).
PROCESSOR_FILES = IMAGE_PROCESSOR_FILES + ("tokenizer_config.json", *TOKENIZER_FILES)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


# ----------------------------------------------------------------------------------------------------------------
# Local path or Hub id
# ----------------------------------------------------------------------------------------------------------------


def looks_like_path(name: str) -> bool:
    """Whether `name` is written as a filesystem path rather than a Hub id."""
    return (os.path.isabs(name) or name.startswith(("./", "../", "~", ".\\")) or "\\" in name
            or name.count("/") > 1 or name in (".", ".."))


def model_source(name_or_path: str | os.PathLike, flag: str = "--model_name_or_path") -> tuple[str, bool]:
    """`(name_or_path, is_local)`: a local model directory, or a Hub model id.

    Raises:
        FileNotFoundError: a path that is not a directory (a file, or nothing there), naming `flag`.
        ValueError: neither a directory nor a valid Hub id.
    """
    name = os.fspath(name_or_path)
    if os.path.isdir(name):
        return name, True
    if os.path.exists(name):
        raise FileNotFoundError(f"{flag} {name} is a file; expected a model directory (written by save_pretrained) "
                                "or a Hub model id")
    if looks_like_path(name) or not _HUB_ID.match(name):
        raise FileNotFoundError(f"{flag} {name}: no such model directory (and not a Hub model id: org/name)")
    return name, False


# ----------------------------------------------------------------------------------------------------------------
# Damaged files
# ----------------------------------------------------------------------------------------------------------------


def check_model_files(directory: str | os.PathLike):
    """Raises `ValueError` naming the first `*.json` that is not JSON or `*.safetensors` whose header is damaged.

    Only the safetensors header is read (its length, its JSON, and that the tensors it lists fit in the file), so
    this costs milliseconds for any model size.
    """
    from safetensors import SafetensorError, safe_open

    directory = Path(directory)
    for path in sorted(directory.glob("*.json")):
        try:
            with open(path, encoding="utf-8") as handle:
                json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path}: damaged file, not valid JSON ({error})") from error
    for path in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{path}: damaged safetensors file (size {path.stat().st_size} bytes: {error})") from error


def _snapshot_directory(name: str, revision: str | None, cache_dir: str | None) -> Path | None:
    """The local folder holding a Hub model's downloaded files (`None` when it cannot be found)."""
    from transformers.utils import cached_file

    try:
        config = cached_file(name, "config.json", revision=revision, cache_dir=cache_dir,
                             _raise_exceptions_for_missing_entries=False)
    except OSError:
        return None
    return Path(config).parent if config else None


def _name_damaged_file(name: str, is_local: bool, revision: str | None, cache_dir: str | None):
    directory = Path(name) if is_local else _snapshot_directory(name, revision, cache_dir)
    if directory is not None:
        check_model_files(directory)


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------


def weights_report(info: dict) -> tuple[list[str], list[str]]:
    """`(missing, unexpected)` tensor names of a `from_pretrained(..., output_loading_info=True)` report, less the
    ALIP state a plain CLIP checkpoint never holds when the checkpoint holds none of it."""
    missing = list(info.get("missing_keys") or ())
    alip_only = [key for key in missing if key.startswith(STATE_NOT_IN_CLIP_CHECKPOINTS)]
    loaded_alip_state = info.get("alip_state_in_checkpoint", True)
    if alip_only and not loaded_alip_state:
        missing = [key for key in missing if key not in alip_only]
    mismatched = [f"{key} (shape {tuple(a)} in the checkpoint, {tuple(b)} in the model)"
                  for key, a, b in (info.get("mismatched_keys") or ())]
    return sorted(missing) + mismatched, sorted(info.get("unexpected_keys") or ())


def load_model(name_or_path: str | os.PathLike, model_class=None, *, allow_new_weights: bool = False,
               revision: str | None = None, cache_dir: str | None = None, trust_remote_code: bool = False,
               flag: str = "--model_name_or_path", output_loading_info: bool = False, **kwargs):
    """`model_class.from_pretrained(name_or_path)` (default `AutoModel`, with ALIP registered), strict.

    Args:
        name_or_path: a local model directory or a Hub id ([`model_source`]).
        model_class: `AutoModel`, `ALIPModel`, `CLIPModel`, ...
        allow_new_weights: accept missing and unexpected tensors (a new head is intended); each is logged.
        revision, cache_dir, trust_remote_code: as `from_pretrained`'s.
        flag: the command-line flag that named the model, for messages.
        output_loading_info: return `(model, info)` as `from_pretrained` does (`info["missing_keys"]` lists the
            ALIP state a CLIP checkpoint lacked too).
        kwargs: more `from_pretrained` keywords (`config`, `dtype`, ...).

    Raises:
        ValueError: missing or unexpected tensors (named), or a damaged file (named).
        FileNotFoundError: a path that is not a model directory.
    """
    import modeling_alip  # noqa: F401 - registers ALIP with the Auto classes

    if model_class is None:
        from transformers import AutoModel as model_class
    name, is_local = model_source(name_or_path, flag)
    if is_local:
        if not (Path(name) / "config.json").is_file():
            raise FileNotFoundError(f"{flag} {name} has no config.json; expected a directory written by "
                                    "save_pretrained")
        check_model_files(name)
    hub = {"revision": revision, "cache_dir": cache_dir}
    try:
        model, info = model_class.from_pretrained(name, output_loading_info=True, trust_remote_code=trust_remote_code,
                                                  **hub, **kwargs)
    except (OSError, ValueError, RuntimeError) as error:
        _name_damaged_file(name, is_local, revision, cache_dir)
        raise type(error)(f"{flag} {name}: {error}") from error
    alip_state = [key for key in model.state_dict() if key.startswith(STATE_NOT_IN_CLIP_CHECKPOINTS)]
    info["alip_state_in_checkpoint"] = not set(alip_state) <= set(info.get("missing_keys") or ())
    missing, unexpected = weights_report(info)
    if missing or unexpected:
        described = (f"{flag} {name}: the checkpoint does not fill {type(model).__name__}: "
                     f"missing {missing or 'none'}, unexpected {unexpected or 'none'}")
        if not allow_new_weights:
            raise ValueError(f"{described}. Missing tensors would keep their random initialisation; if a new head "
                             "is intended, pass --allow_new_weights")
        logger.warning("%s (--allow_new_weights: missing tensors are freshly initialised, unexpected ones dropped)",
                       described)
    return (model, info) if output_loading_info else model


# ----------------------------------------------------------------------------------------------------------------
# Processor
# ----------------------------------------------------------------------------------------------------------------


def saved_processor_files(name: str, is_local: bool, revision: str | None = None,
                          cache_dir: str | None = None) -> list[str]:
    """The `PROCESSOR_FILES` the model directory or Hub repository holds."""
    if is_local:
        return [f for f in PROCESSOR_FILES if (Path(name) / f).is_file()]
    from transformers.utils import cached_file

    present = []
    for filename in PROCESSOR_FILES:
        try:
            if cached_file(name, filename, revision=revision, cache_dir=cache_dir,
                           _raise_exceptions_for_missing_entries=False) is not None:
                present.append(filename)
        except OSError:
            pass
    return present


def incomplete_processor(saved: list[str]) -> list[str]:
    """What a saved processor lacks, in words naming the files (`[]`: image processor and tokenizer both there)."""
    missing = []
    if not set(saved) & set(IMAGE_PROCESSOR_FILES):
        missing.append(f"an image processor ({' or '.join(IMAGE_PROCESSOR_FILES)})")
    if not set(saved) & set(TOKENIZER_FILES):
        missing.append(f"a tokenizer ({' or '.join(TOKENIZER_FILES)})")
    return missing


def load_processor(name_or_path: str | os.PathLike, config, *, tokenizer_name_or_path: str | None = None,
                   revision: str | None = None, cache_dir: str | None = None, trust_remote_code: bool = False,
                   flag: str = "--model_name_or_path"):
    """The processor saved with the model (`AutoProcessor`), or CLIP's for a model saved without one.

    Args:
        name_or_path: the model directory or Hub id.
        config: the model's config (sizes of the default processor).
        tokenizer_name_or_path: take the tokenizer from here instead (`--tokenizer_name_or_path`); the image
            processor is still the model's (or CLIP's at the model's size when none was saved). Returns an
            `ALIPProcessor` of the two.

    Raises:
        FileNotFoundError: the model was saved with a processor that lacks its image processor or its tokenizer.
        ValueError: a processor file is damaged (named), or the saved processor cannot be loaded.
    """
    from modeling_alip import ALIPProcessor

    name, is_local = model_source(name_or_path, flag)
    hub = {"revision": revision, "cache_dir": cache_dir, "trust_remote_code": trust_remote_code}
    if is_local:
        check_model_files(name)
    saved = saved_processor_files(name, is_local, revision, cache_dir)
    if tokenizer_name_or_path is not None:
        return ALIPProcessor(image_processor=_image_processor(name, config, saved, hub, flag),
                             tokenizer=_tokenizer(tokenizer_name_or_path, hub))
    if not saved:
        logger.warning("%s %s was saved without a processor (none of %s): using CLIP's preprocessing and tokenizer at "
                       "the model's sizes (ALIPProcessor.from_config)", flag, name, ", ".join(PROCESSOR_FILES))
        return ALIPProcessor.from_config(config)
    missing = incomplete_processor(saved)
    if missing:
        raise FileNotFoundError(f"{flag} {name} was saved with a processor ({', '.join(saved)}) that lacks "
                                f"{' and '.join(missing)}")
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(name, **hub)
    except (OSError, ValueError, TypeError, KeyError, json.JSONDecodeError) as error:
        _name_damaged_file(name, is_local, revision, cache_dir)
        raise ValueError(f"{flag} {name}: its saved processor ({', '.join(saved)}) cannot be loaded: "
                         f"{error}") from error


def _image_processor(name: str, config, saved: list[str], hub: dict, flag: str):
    from transformers import AutoImageProcessor, CLIPImageProcessor

    if set(saved) & set(IMAGE_PROCESSOR_FILES):
        try:
            return AutoImageProcessor.from_pretrained(name, **hub)
        except (OSError, ValueError, TypeError, KeyError) as error:
            raise ValueError(f"{flag} {name}: its saved image processor cannot be loaded: {error}") from error
    size = config.vision_config.image_size
    logger.warning("%s %s was saved without an image processor: using CLIP's preprocessing at image size %d",
                   flag, name, size)
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def _tokenizer(name_or_path: str, hub: dict):
    from transformers import AutoTokenizer

    name, is_local = model_source(name_or_path, "--tokenizer_name_or_path")
    if is_local:
        check_model_files(name)
    try:
        return AutoTokenizer.from_pretrained(name, **hub)
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise ValueError(f"--tokenizer_name_or_path {name}: cannot be loaded: {error}") from error


def load_model_and_processor(name_or_path: str | os.PathLike, model_class=None, *, allow_new_weights: bool = False,
                             revision: str | None = None, cache_dir: str | None = None,
                             trust_remote_code: bool = False, flag: str = "--model_name_or_path", **kwargs):
    """[`load_model`] and [`load_processor`] of one model: `(model, processor)`."""
    model = load_model(name_or_path, model_class, allow_new_weights=allow_new_weights, revision=revision,
                       cache_dir=cache_dir, trust_remote_code=trust_remote_code, flag=flag, **kwargs)
    processor = load_processor(name_or_path, model.config, revision=revision, cache_dir=cache_dir,
                               trust_remote_code=trust_remote_code, flag=flag)
    return model, processor
