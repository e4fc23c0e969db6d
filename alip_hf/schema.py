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

# The noise audit (`python -m recaption.audit`, `train.py --log_sample_weights`): ALIP's gate values per row, joined
# on `id`. Symbols of the ALIP paper: S a cosine similarity, H its running mean, gamma the gate's sharpness.
LCG_WEIGHT = "lcg_weight"  # Language Consistency Gate sample weight W^s = min(exp(gamma (S_tc - H_tc)), 1)
LCG_WEIGHT_RAW = "lcg_weight_raw"  # W^s before clipping at 1: ranks the rows that W^s ties at 1
DCG_TEXT_WEIGHT = "dcg_text_weight"  # Description Consistency Gate weight of (image, web text); 1 where W^s is 1
DCG_CAPTION_WEIGHT = "dcg_caption_weight"  # the same for (image, caption)
SIMILARITY_TEXT_CAPTION = "similarity_text_caption"  # S_tc
SIMILARITY_IMAGE_TEXT = "similarity_image_text"  # S_xt
SIMILARITY_IMAGE_CAPTION = "similarity_image_caption"  # S_xc
CLIP_SCORE = "clip_score"  # image-web text cosine of a CLIP model: the usual filtering baseline (LAION, DataComp)
AUDIT_MODEL = "audit_model"  # provenance: the scoring model (`<model>@<revision or weights digest>`)
GATE_COLUMNS = (LCG_WEIGHT, LCG_WEIGHT_RAW, DCG_TEXT_WEIGHT, DCG_CAPTION_WEIGHT,
                SIMILARITY_TEXT_CAPTION, SIMILARITY_IMAGE_TEXT, SIMILARITY_IMAGE_CAPTION)
AUDIT_SCORES = (*GATE_COLUMNS, CLIP_SCORE)


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
