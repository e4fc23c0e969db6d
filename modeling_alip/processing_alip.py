"""ALIP's processor: a CLIP image processor and a tokenizer that serve both text paths.

`ALIPProcessor` turns a batch of images, raw web texts (`text`) and synthetic captions (`captions`) into the
inputs of [`ALIPModel`]: `pixel_values`, `input_ids`/`attention_mask` and `caption_input_ids`/
`caption_attention_mask`. Each text path is padded to its own longest row, never to the context length.

`clip_tokenizer()` builds the real CLIP BPE tokenizer (OpenAI CLIP's 49408-token vocabulary) offline from the
merge list that the `open_clip` package ships, so nothing is downloaded. open_clip's `SimpleTokenizer` cleans
every text before tokenizing it (ftfy, HTML unescaping, whitespace, lower case); `clean_clip_text` does the
same, and the processor applies it when `text_cleaning="clip"`, so its token ids equal `open_clip.tokenize`.

This file ships to the Hub as remote code: it imports only the standard library and transformers at module
level; `ftfy` is optional and `open_clip` is only located on disk, never imported.
"""

import gzip
import html
import importlib.util
import os
import unicodedata
from functools import lru_cache

from transformers import BatchFeature, CLIPImageProcessor, CLIPTokenizer
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImageInput
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin, Unpack
from transformers.utils import logging

logger = logging.get_logger(__name__)

CLIP_CONTEXT_LENGTH = 77
CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
# CLIP's vocabulary: 256 byte symbols, the same with `</w>`, 48894 merges, then the two special tokens.
CLIP_NUM_MERGES = 49152 - 256 - 2
CLIP_START_TOKEN = "<|startoftext|>"
CLIP_END_TOKEN = "<|endoftext|>"
# CLIP's normalisation of the input images (OpenAI CLIP, also used by open_clip): transformers' constants.
CLIP_IMAGE_MEAN, CLIP_IMAGE_STD = list(OPENAI_CLIP_MEAN), list(OPENAI_CLIP_STD)
TEXT_CLEANINGS = ("clip", "none")
# What a processor directory holds: the image processor's settings (its own file, or inside the processor's) and a
# tokenizer (`tokenizer.json`, or a slow tokenizer's vocabulary: CLIP's `vocab.json`, T5's `spiece.model`).
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "spiece.model")
# transformers' text keywords that `ALIPProcessor.tokenize` hands to `tokenizer.pad` (padding, truncation,
# max_length and return_tensors it applies itself).
PAD_OPTIONS = frozenset({"pad_to_multiple_of", "padding_side", "return_attention_mask"})
PADDINGS = {True: "longest", "longest": "longest", "max_length": "max_length", False: "do_not_pad",
            "do_not_pad": "do_not_pad"}
TRUNCATIONS = {True: True, "longest_first": True, "only_first": True, False: False, "do_not_truncate": False}


class ALIPProcessorKwargs(ProcessingKwargs, total=False):
    """transformers' processor keywords (text, images, common); `ALIPProcessor` adds no keyword of its own."""


def _padding_strategy(padding) -> str:
    """`padding` as transformers spells it (`bool`, `str` or `PaddingStrategy`) -> "longest" | "max_length" | "do_not_pad"."""
    key = getattr(padding, "value", padding)
    if key not in PADDINGS:
        raise ValueError(f"padding must be 'longest' (or True), 'max_length' or 'do_not_pad' (or False), got {padding!r}")
    return PADDINGS[key]


def _truncates(truncation) -> bool:
    """`truncation` as transformers spells it -> whether over-long texts are cut (always keeping the end token)."""
    key = getattr(truncation, "value", truncation)
    if key not in TRUNCATIONS:
        raise ValueError(f"truncation must be True/'longest_first' or False/'do_not_truncate', got {truncation!r}")
    return TRUNCATIONS[key]


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible map from the 256 byte values to printable unicode characters.

    Printable Latin-1 bytes map to themselves; the others (control characters, space, ...) to code points from
    256 on, in byte order. The BPE vocabulary is written in these characters.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    byte_values = printable + others
    code_points = printable + [256 + n for n in range(len(others))]
    return {b: chr(c) for b, c in zip(byte_values, code_points)}


def _open_clip_bpe_path() -> str:
    """Path of open_clip's BPE merge file, found without importing open_clip (heavy, and absent on the Hub)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "clip_tokenizer() reads CLIP's BPE merges from the open_clip package: `pip install open_clip_torch`, "
            f"or pass bpe_path= to a copy of {CLIP_BPE_FILE}"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], CLIP_BPE_FILE)


@lru_cache(maxsize=4)
def clip_vocab_and_merges(bpe_path: str | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's `vocab.json` and `merges.txt` contents, derived from the gzipped merge list as CLIP defines them.

    Returns:
        `(vocab, merges)`: 49408 tokens -> ids (`<|startoftext|>` = 49406, `<|endoftext|>` = 49407) and the
        48894 merges in priority order.
    """
    bpe_path = bpe_path or _open_clip_bpe_path()
    if not os.path.isfile(bpe_path):
        raise FileNotFoundError(f"bpe_path: no CLIP BPE merge file at {bpe_path}")
    with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # Line 0 is a version header; CLIP keeps the first 48894 merges after it.
    merges = [tuple(line.split()) for line in lines[1 : 1 + CLIP_NUM_MERGES]]
    if len(merges) != CLIP_NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"bpe_path: {bpe_path} does not hold CLIP's {CLIP_NUM_MERGES} merges")
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [CLIP_START_TOKEN, CLIP_END_TOKEN]
    return {token: i for i, token in enumerate(tokens)}, merges


def clip_tokenizer(model_max_length: int = CLIP_CONTEXT_LENGTH, bpe_path: str | None = None) -> CLIPTokenizer:
    """The OpenAI CLIP BPE tokenizer (fast, `tokenizers`-backed), built offline.

    Gives the token ids of `open_clip.tokenize` for text that `clean_clip_text` leaves unchanged apart from
    whitespace and case, and that holds no special-token string such as `"<|endoftext|>"` (this tokenizer
    reads it as the special token unless called with `split_special_tokens=True`; open_clip reads it as text).
    `ALIPProcessor` does both, so it matches open_clip on any text. Texts longer
    than `model_max_length` are truncated to it with the end token kept last, as open_clip does. Padding uses
    `<|endoftext|>` (transformers' CLIP checkpoints); open_clip pads with id 0, which the causal text tower
    never attends to before the end token, so the features are the same.

    Args:
        model_max_length: context length (CLIP: 77).
        bpe_path: a `bpe_simple_vocab_16e6.txt.gz`; by default the copy inside the installed open_clip package.
    """
    vocab, merges = clip_vocab_and_merges(bpe_path)
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length)


def missing_processor_files(model_dir) -> list[str]:
    """What a local model directory lacks of a processor, in words naming the files (`[]`: complete, a Hub id, or
    `None`, as `from_pretrained(None, config=..., state_dict=...)` passes)."""
    if model_dir is None or not os.path.isdir(model_dir):
        return []
    present = set(os.listdir(model_dir))
    missing = []
    if not present & set(IMAGE_PROCESSOR_FILES):
        missing.append(f"an image processor ({' or '.join(IMAGE_PROCESSOR_FILES)})")
    if not present & set(TOKENIZER_FILES):
        missing.append(f"a tokenizer ({' or '.join(TOKENIZER_FILES)})")
    return missing


def _fix_text(text: str) -> str:
    try:
        import ftfy
    except ImportError:
        # Without ftfy only its Unicode normalisation is reproduced; mojibake, curly quotes and full-width
        # characters then tokenize differently from open_clip.
        logger.warning_once("ftfy is not installed: CLIP text cleaning skips ftfy.fix_text (`pip install ftfy`)")
        return unicodedata.normalize("NFC", text)
    return ftfy.fix_text(text)


def clean_clip_text(text: str) -> str:
    r"""open_clip's text cleaning for CLIP ("lower"): ftfy, HTML unescaping twice, whitespace runs -> one space,
    stripped, lower case. CLIP and the official ALIP code tokenize every text after it.

    The official ALIP code collapses whitespace with `regex.sub(r"\s+", " ", ...)`, open_clip with
    `str.split()`; after ftfy (which drops the control characters on which they disagree) both give the same.
    """
    text = html.unescape(html.unescape(_fix_text(text)))
    return " ".join(text.split()).lower()


class ALIPProcessor(ProcessorMixin):
    r"""
    Image processor + tokenizer for [`ALIPModel`]; the one tokenizer serves the raw text and the caption.

    Args:
        image_processor ([`CLIPImageProcessor`] or any image processor):
            Turns images into `pixel_values` of shape `(B, 3, H, W)`.
        tokenizer ([`PreTrainedTokenizerBase`]):
            [`clip_tokenizer`] for CLIP-style checkpoints; any other tokenizer works (VeCLIP uses T5's).
        text_cleaning (`"clip"` or `"none"`, *optional*):
            `"clip"` runs [`clean_clip_text`] on every text first, as CLIP, open_clip and the official ALIP code
            do; `"none"` passes texts unchanged. By default `"clip"` for a CLIP tokenizer and `"none"` otherwise
            (CLIP's lower-casing would discard information a cased tokenizer such as T5's uses).
    """

    valid_processor_kwargs = ALIPProcessorKwargs
    # Defaults of the call, below what the tokenizer was saved with (transformers' order of processor keywords).
    text_kwargs = {"padding": "longest", "truncation": True, "return_tensors": "pt"}
    images_kwargs = {"return_tensors": "pt"}

    def __init__(self, image_processor=None, tokenizer=None, text_cleaning: str | None = None):
        if text_cleaning is None:
            text_cleaning = "clip" if isinstance(tokenizer, CLIPTokenizer) else "none"
        if text_cleaning not in TEXT_CLEANINGS:
            raise ValueError(f"text_cleaning must be one of {TEXT_CLEANINGS}, got {text_cleaning!r}")
        self.text_cleaning = text_cleaning
        super().__init__(image_processor, tokenizer)

    @classmethod
    def default(cls, image_size: int = 224, model_max_length: int = CLIP_CONTEXT_LENGTH) -> "ALIPProcessor":
        """CLIP's preprocessing at `image_size`: bicubic resize of the short side, centre crop, CLIP mean/std,
        and the CLIP BPE tokenizer with text cleaning. What training and evaluation use for a model saved
        without a processor."""
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
            image_mean=CLIP_IMAGE_MEAN,
            image_std=CLIP_IMAGE_STD,
        )
        return cls(image_processor, clip_tokenizer(model_max_length), text_cleaning="clip")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs) -> "ALIPProcessor":
        """`ProcessorMixin.from_pretrained`; a local directory without a processor is a `FileNotFoundError` naming
        the missing files (rather than the tokenizer's error about backends)."""
        missing = missing_processor_files(pretrained_model_name_or_path)
        if missing:
            raise FileNotFoundError(
                f"{pretrained_model_name_or_path} has no processor: missing {' and '.join(missing)}. Save one beside "
                "the model with processor.save_pretrained(model_dir), or build CLIP's with ALIPProcessor.from_config"
            )
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`ProcessorMixin.save_pretrained`, leaving this processor as it was.

        For a class registered for remote code, transformers writes `auto_map` into the saved files and also sets
        it on the processor being saved, so a saved processor would no longer equal its reloaded copy.
        """
        had_auto_map = "auto_map" in self.__dict__
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            if not had_auto_map:
                self.__dict__.pop("auto_map", None)

    @classmethod
    def from_config(cls, config) -> "ALIPProcessor":
        """[`ALIPProcessor.default`] sized for an [`ALIPConfig`] (or `CLIPConfig`): its image size and context
        length. Raises if the text tower's vocabulary is not CLIP's, since the CLIP tokenizer would not fit."""
        text_config, vision_config = config.text_config, config.vision_config
        vocab_size = len(clip_vocab_and_merges()[0])
        if text_config.vocab_size != vocab_size:
            raise ValueError(
                f"config.text_config.vocab_size is {text_config.vocab_size}, not CLIP's {vocab_size}: build "
                "ALIPProcessor(image_processor, tokenizer) with the tokenizer this model was trained with"
            )
        return cls.default(vision_config.image_size, text_config.max_position_embeddings)

    def __call__(
        self,
        images: ImageInput | None = None,
        text: str | list[str] | None = None,
        captions: str | list[str] | None = None,
        **kwargs: Unpack[ALIPProcessorKwargs],
    ) -> BatchFeature:
        """Processes images and texts: CLIP's call, plus the captions of a training batch.

        `processor(text=[M prompts], images=[N images])` gives `N` images and `M` texts, as `CLIPProcessor` does
        (the zero-shot call); with `captions`, the batch is a training batch whose row `i` pairs image `i`, text
        `i` and caption `i`, so all three must have the same length `B`.

        Options are transformers' processor keywords, merged as `ProcessorMixin` merges them (highest first): flat
        keywords (`padding="max_length"`, `do_rescale=False`), then per modality (`text_kwargs={...}`,
        `images_kwargs={...}`), then `common_kwargs={...}`, then what the tokenizer was saved with (e.g.
        `padding`, `max_length`), then this class's defaults: `padding="longest"`, `truncation=True`,
        `return_tensors="pt"`. Both text paths take the same text options.

        Args:
            images: images for `self.image_processor` (one image, or a list: PIL images, arrays or tensors).
            text: raw web texts or prompts -> `input_ids`, `attention_mask` of shape `(M, L)`.
            captions: the synthetic caption of each sample -> `caption_input_ids`, `caption_attention_mask` of
                shape `(B, L')`.
            kwargs: text options (`padding`: `"longest"`/`True` or `"max_length"`; `truncation`; `max_length`, by
                default the tokenizer's `model_max_length`; `pad_to_multiple_of`; `padding_side`;
                `return_attention_mask`), any option of the image processor, and `return_tensors` (`"pt"`, `"np"`
                or `None` for lists).

        Returns:
            [`BatchFeature`] with `pixel_values` `(N, 3, H, W)` and the ids/masks of the texts given.
        """
        if images is None and text is None and captions is None:
            raise ValueError("ALIPProcessor needs at least one of `images`, `text` or `captions`")
        options = self._merge_kwargs(ALIPProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs)
        text_options = options["text_kwargs"]
        return_tensors = text_options.get("return_tensors")
        data, sizes = {}, {}
        if images is not None:
            data["pixel_values"] = self.image_processor(images, **options["images_kwargs"])["pixel_values"]
            sizes["images"] = len(data["pixel_values"])
        for name, texts, prefix in (("text", text, ""), ("captions", captions, "caption_")):
            if texts is None:
                continue
            encoded, _ = self.tokenize(self._as_text_list(texts, name), **text_options)
            sizes[name] = len(encoded["input_ids"])
            data.update({f"{prefix}{key}": value for key, value in encoded.items()})
        if captions is not None and len(set(sizes.values())) > 1:
            raise ValueError(
                f"with `captions` (a training batch) `images`, `text` and `captions` must describe the same samples; "
                f"got sizes {sizes}"
            )
        return BatchFeature(data=data, tensor_type=return_tensors)

    def _as_text_list(self, texts: str | list[str], name: str) -> list[str]:
        """Validates one text argument and applies the text cleaning."""
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)):
            raise TypeError(f"`{name}` must be a string or a list of strings, got {type(texts).__name__}")
        if not texts:
            raise ValueError(f"`{name}` is an empty list: pass at least one text (e.g. the candidate labels)")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"`{name}`[{i}] must be a string, got {type(t).__name__}")
        return list(texts)

    def clean_text(self, text: str) -> str:
        """The text cleaning of this processor's tokenizer: CLIP's (`clean_clip_text`) or none."""
        return clean_clip_text(text) if self.text_cleaning == "clip" else text

    def tokenize(self, texts: list[str], max_length: int | None = None, padding: bool | str = "longest",
                 truncation: bool | str = True, return_tensors: str | None = "pt", **options) -> tuple[BatchFeature, int]:
        """The project's one tokenisation of texts: this processor's call, the training collator and evaluation
        prompts all go through it.

        The texts are cleaned (`clean_text`); a literal special-token string in web text ("<|endoftext|>") is
        text, not a token, because CLIP pools at the first end token and reading it as one would cut the text
        there (open_clip tokenizes such strings as text too); an over-long text keeps its first
        `max_length - 1` tokens and its end token, for the same pooling reason.

        Args:
            texts: `B` strings.
            max_length: the token limit; by default the tokenizer's `model_max_length` (77 for CLIP).
            padding: `"longest"` (or `True`) pads to the batch's longest row, `"max_length"` to `max_length` (or to
                the longest row, if longer and not truncated); `False` / `"do_not_pad"` leaves rows as they are
                (then only `return_tensors=None` can hold them).
            truncation: cut over-long texts (`True` / `"longest_first"`; `False` / `"do_not_truncate"` keeps them).
            return_tensors: `"pt"`, `"np"` or `None` for lists.
            options: transformers' text keywords the tokenizer's `pad` takes (`pad_to_multiple_of`, `padding_side`,
                `return_attention_mask`); any other keyword is a `ValueError` naming it.

        Returns:
            (`BatchFeature` with `input_ids` and `attention_mask` of shape `(B, L)`, the number of texts cut).
        """
        padding = _padding_strategy(padding)
        truncation = _truncates(truncation)
        pad_options = self._pad_options(options)
        limit = max_length or self.tokenizer.model_max_length
        cleaned = [self.clean_text(t) for t in texts]
        ids = self.tokenizer(cleaned, add_special_tokens=True, truncation=False, split_special_tokens=True,
                             verbose=False)["input_ids"]
        truncated = sum(len(row) > limit for row in ids) if truncation else 0
        if truncated:
            eos = self.tokenizer.eos_token_id
            if eos is not None:
                ids = [row if len(row) <= limit else row[: limit - 1] + [eos] for row in ids]
            else:  # no end token to keep: the tokenizer's own truncation keeps its special tokens
                ids = self.tokenizer(cleaned, add_special_tokens=True, truncation=True, max_length=limit,
                                     split_special_tokens=True)["input_ids"]
        if padding == "do_not_pad":
            attention = [[1] * len(row) for row in ids]
            encoded = {"input_ids": ids, "attention_mask": attention}
            if pad_options.get("return_attention_mask") is False:
                del encoded["attention_mask"]
            return BatchFeature(encoded, tensor_type=return_tensors), truncated
        length = max(len(row) for row in ids)
        if padding == "max_length":
            length = max(length, limit)
        if self.tokenizer.pad_token_id is None:  # a tokenizer without a pad token pads with its end token
            ids = [row + [self.tokenizer.eos_token_id] * (length - len(row)) for row in ids]
        encoded = self.tokenizer.pad({"input_ids": ids}, padding="max_length", max_length=length,
                                     return_tensors=None, **pad_options)
        if "attention_mask" not in encoded and pad_options.get("return_attention_mask") is not False:
            encoded["attention_mask"] = [[1] * len(row) for row in ids]
        return BatchFeature(dict(encoded), tensor_type=return_tensors), truncated

    @staticmethod
    def _pad_options(options: dict) -> dict:
        """The text keywords passed on to `tokenizer.pad`; anything else this processor cannot honour is an error."""
        unsupported = {key: value for key, value in options.items() if key not in PAD_OPTIONS and value is not None}
        if unsupported:
            raise ValueError(
                f"ALIPProcessor does not support the text option(s) {sorted(unsupported)}; it takes padding, "
                f"truncation, max_length, return_tensors and {sorted(PAD_OPTIONS)}"
            )
        return {key: value for key, value in options.items() if value is not None}


__all__ = ["ALIPProcessor", "ALIPProcessorKwargs", "clean_clip_text", "clip_tokenizer", "clip_vocab_and_merges", "missing_processor_files"]
