"""The data contract between `recaption/` and training: column names and their `datasets.Features`.

Defined once here; `recaption/` writes these columns and `train.py` reads them by default, so a recaptioned
dataset trains without flags. Users whose data uses other names map them by argument.

Only the standard library is imported at module level: argument parsers (and `--help`) use the names without
paying for `datasets`; `FEATURES` is built on first use.
"""

from __future__ import annotations

ID = "id"  # stable key: new columns are joined on it, never on row order
IMAGE = "image"
ALT_TEXT = "alt_text"  # the web text (AltText, title, ...)
CAPTION = "caption"  # synthetic caption written from the image alone
VECAP = "vecap"  # LLM fusion of alt_text and caption (VeCLIP)
CAPTION_MODEL = "caption_model"
CAPTION_PROMPT_VERSION = "caption_prompt_version"
REWRITE_MODEL = "rewrite_model"
REWRITE_PROMPT_VERSION = "rewrite_prompt_version"
ERROR = "error"  # why a row failed (empty when it did not)


# Columns that only exist after a recaption step, with the step that writes them.
PRODUCED_BY = {CAPTION: "python -m recaption.caption", VECAP: "python -m recaption.rewrite"}


def _features():
    import datasets

    string = datasets.Value("string")
    return datasets.Features({
        ID: string, IMAGE: datasets.Image(), ALT_TEXT: string, CAPTION: string, VECAP: string,
        CAPTION_MODEL: string, CAPTION_PROMPT_VERSION: string, REWRITE_MODEL: string, REWRITE_PROMPT_VERSION: string,
        ERROR: string,
    })


def __getattr__(name: str):
    if name == "FEATURES":
        value = globals()["FEATURES"] = _features()
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
