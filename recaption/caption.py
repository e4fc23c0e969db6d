"""Step 1: a synthetic caption for every image, written from the image alone.

ALIP trains on the AltText and a synthetic caption; VeCLIP's first stage asks a multimodal model for the
visual concepts of the image. Either way the captioner sees only the image: the AltText is never given to
it. Any transformers image-to-text or image-text-to-text model works (BLIP, GIT, Florence-2, LLaVA,
Qwen-VL, SmolVLM, ...), loaded through `AutoProcessor` and `AutoModelForImageTextToText` (or
`AutoModelForCausalLM` for models registered only there).

    python -m recaption.caption --source data/*.parquet --output_dir out/captions --preset alip
    accelerate launch -m recaption.caption --source ... --output_dir ... --preset veclip --dtype bfloat16

Writes `caption`, `caption_model` (`<model>@<commit>` when the commit is known), `caption_prompt_version`
and `error` (why an image could not be read; empty otherwise). See `recaption.run` for the run and `recaption.layout`
for the files.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

from alip_hf.lazy import lazy_import
from alip_hf.schema import CAPTION, CAPTION_MODEL, CAPTION_PROMPT_VERSION, ERROR
from recaption.arguments import GenerationArguments, RunArguments, torch_dtype
from recaption.run import run_sharded
from recaption.source import load_image, load_input
from recaption.step import StepResult, chunks, error_column
from recaption.throughput import OUTPUT_TOKENS
from recaption.prompts import CAPTION_PRESETS, CAPTION_PROMPTS

datasets = lazy_import("datasets")  # on first use: `--help` must not wait for it


@dataclass
class CaptionArguments:
    """Which captioner, with which prompt."""

    preset: str = field(
        default="alip",
        metadata={"help": "Defaults for model, prompt and max_new_tokens.", "choices": sorted(CAPTION_PRESETS)},
    )
    model: str | None = field(
        default=None, metadata={"help": "Hub id or path of the captioner (default: the preset's)."}
    )
    revision: str | None = field(default=None, metadata={"help": "Model revision (branch, tag or commit)."})
    prompt: str | None = field(default=None, metadata={"help": "Custom prompt; needs --prompt_version."})
    prompt_version: str | None = field(
        default=None, metadata={"help": f"Version of the prompt; built-in: {sorted(CAPTION_PROMPTS)}."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow models that ship their own code."})

    def __post_init__(self):
        if self.preset not in CAPTION_PRESETS:
            raise ValueError(f"--preset {self.preset!r}: choose one of {sorted(CAPTION_PRESETS)}")
        preset = CAPTION_PRESETS[self.preset]
        self.model = self.model or preset.model
        if self.prompt is None:
            self.prompt_version = self.prompt_version or preset.prompt_version
            if self.prompt_version not in CAPTION_PROMPTS:
                raise ValueError(
                    f"--prompt_version {self.prompt_version!r}: built-in versions are {sorted(CAPTION_PROMPTS)}"
                )
            self.prompt = CAPTION_PROMPTS[self.prompt_version]
        elif not self.prompt_version:
            raise ValueError("--prompt needs --prompt_version: the version is stored with every caption")
        elif CAPTION_PROMPTS.get(self.prompt_version, self.prompt) != self.prompt:
            raise ValueError(
                f"--prompt_version {self.prompt_version!r} names a built-in prompt; give yours a new version"
            )


class Captioner:
    """Batched captioning with one model and one prompt.

    Args:
        model: Hub id or path.
        prompt: text given with every image ("" = unconditional). Chat models (whose processor has a chat
            template) get it as a user turn after the image.
        device / dtype: where and in what precision the model runs.
    """

    def __init__(self, model: str, prompt: str, generation: GenerationArguments, device="cpu", dtype=None,
                 revision: str | None = None, trust_remote_code: bool = False):
        from transformers import AutoConfig, AutoProcessor

        self.name, self.prompt, self.generation, self.device = model, prompt, generation, device
        kwargs = dict(revision=revision, trust_remote_code=trust_remote_code)
        try:
            config = AutoConfig.from_pretrained(model, **kwargs)
            self.processor = AutoProcessor.from_pretrained(model, **kwargs)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot load captioning model {model!r}: {e}") from e
        if getattr(self.processor, "image_processor", None) is None:
            raise ValueError(f"captioning model {model!r} has no image processor: it is not an image-to-text model")
        auto_class = _auto_class(model, config, trust_remote_code)
        self.model = auto_class.from_pretrained(model, dtype=dtype, **kwargs).to(device).eval()
        self.dtype = self.model.dtype
        self.commit = getattr(self.model.config, "_commit_hash", None)
        self.is_chat = getattr(self.processor, "chat_template", None) is not None
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is not None and not config.is_encoder_decoder:
            tokenizer.padding_side = "left"  # decoder-only: generated tokens must follow the prompt directly
        if self.is_chat and not prompt:
            raise ValueError(f"{model!r} is a chat model and needs a prompt (--prompt or --preset veclip)")
        self.text = self._prompt_text()

    def output_tokens(self, captions: list[str]) -> int:
        """Tokens of the written captions as the captioner's tokenizer splits them (the throughput's output
        tokens; counted from the text so that every backend counts alike)."""
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is None:
            return sum(len(t.split()) for t in captions)
        return sum(len(ids) for ids in tokenizer(captions, add_special_tokens=False)["input_ids"]) if captions else 0

    @property
    def label(self) -> str:
        """The value of `caption_model`: the model id, with the commit it was loaded from when known."""
        return f"{self.name}@{self.commit}" if self.commit else self.name

    def _prompt_text(self) -> str | None:
        if not self.is_chat:
            return self.prompt or None
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.prompt}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def __call__(self, images: list) -> list[str]:
        """Captions for a batch of PIL images, in order."""
        import torch

        kwargs: dict[str, Any] = dict(images=images, return_tensors="pt")
        if self.text is not None:
            kwargs.update(text=[self.text] * len(images), padding=True)
        inputs = self.processor(**kwargs).to(self.device)
        for key, value in inputs.items():
            if torch.is_floating_point(value):
                inputs[key] = value.to(self.dtype)
        with torch.inference_mode():
            out = self.model.generate(
                **inputs,
                max_new_tokens=self.generation.max_new_tokens,
                num_beams=self.generation.num_beams,
                do_sample=False,
            )
        if self.is_chat:
            # image-text-to-text models return prompt + answer; the prompt is the left-padded input.
            new_tokens = out[:, inputs["input_ids"].shape[1] :]
            return [_clean(t) for t in self.processor.batch_decode(new_tokens, skip_special_tokens=True)]
        # BLIP/GIT return their own re-tokenised prompt before the caption, so strip it as text.
        texts = self.processor.batch_decode(out, skip_special_tokens=True)
        return [_strip_prefix(_clean(t), self.prompt) for t in texts]


def _auto_class(model: str, config, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    for auto_class in (AutoModelForImageTextToText, AutoModelForCausalLM):
        if type(config) in auto_class._model_mapping:
            return auto_class
        if trust_remote_code and auto_class.__name__ in (getattr(config, "auto_map", None) or {}):
            return auto_class
    raise ValueError(
        f"captioning model {model!r} (model type {config.model_type!r}) is not an image-to-text model: "
        "AutoModelForImageTextToText and AutoModelForCausalLM do not know it"
    )


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _strip_prefix(text: str, prompt: str) -> str:
    prompt = _clean(prompt)
    if prompt and text.lower().startswith(prompt.lower()):
        return text[len(prompt):].strip()
    return text


class CaptionStep:
    """Adds `caption` and its provenance to each shard; unreadable images become `error` values."""

    name = "caption"
    unit = "img"

    def __init__(
        self, run: RunArguments, args: CaptionArguments, generation: GenerationArguments, captioner: Captioner
    ):
        self.run, self.args, self.generation, self.captioner = run, args, generation, captioner

    def required_columns(self) -> dict[str, str]:
        return {"image": self.run.image_column}

    def provenance(self) -> dict[str, Any]:
        return {
            CAPTION_MODEL: self.captioner.label,
            "model": self.args.model,
            "revision": self.args.revision,
            "commit": self.captioner.commit,
            "prompt": self.args.prompt,
            CAPTION_PROMPT_VERSION: self.args.prompt_version,
            "generation": {"max_new_tokens": self.generation.max_new_tokens, "num_beams": self.generation.num_beams,
                           "do_sample": False, "dtype": str(self.captioner.dtype).replace("torch.", ""),
                           "batch_size": self.generation.batch_size},
        }

    def process(self, shard: datasets.Dataset, ids: list[str], progress: Callable[[int], None]) -> StepResult:
        captions: dict[str, str] = {}
        errors: dict[str, str] = {}
        cells = shard[self.run.image_column]
        for batch in chunks(list(zip(ids, cells)), self.generation.batch_size):
            images, kept = [], []
            for row_id, cell in batch:
                try:
                    images.append(load_image(cell))
                    kept.append(row_id)
                except Exception as e:  # any decoding failure is data, not a crash
                    # Without object addresses ("<_io.BytesIO object at 0x...>"), so reruns write the same text.
                    reason = re.sub(r" at 0x[0-9a-fA-F]+", "", f"{type(e).__name__}: {e}")
                    errors[row_id] = f"unreadable image in column {self.run.image_column!r}: {reason}"
                    captions[row_id] = ""
            if images:
                captions.update(zip(kept, self.captioner(images)))
            progress(len(batch))
        label, version = self.captioner.label, self.args.prompt_version
        written = [captions[i] for i in ids if i not in errors]
        return StepResult(
            columns={
                CAPTION: captions,
                CAPTION_MODEL: {i: label for i in ids},
                CAPTION_PROMPT_VERSION: {i: version for i in ids},
                ERROR: error_column(shard, ids, errors),
            },
            counts={"rows": len(ids), "failures": len(errors), "captioned": len(written),
                    "caption_words": sum(len(t.split()) for t in written),
                    OUTPUT_TOKENS: self.captioner.output_tokens(written),
                    "empty_captions": sum(1 for t in written if not t)},
        )

    def summarize(self, totals: dict[str, float]) -> dict[str, Any]:
        return {"failures": int(totals.get("failures", 0)),
                "mean_caption_words": round(totals.get("caption_words", 0) / max(totals.get("captioned", 0), 1), 3)}


def caption(run: RunArguments, args: CaptionArguments | None = None, generation: GenerationArguments | None = None,
            accelerator=None) -> dict[str, Any]:
    """Captions every image of `run.source` into `run.output_dir`; returns the run summary."""
    from accelerate import Accelerator

    args = args or CaptionArguments()
    generation = generation or GenerationArguments()
    if generation.max_new_tokens is None:
        generation.max_new_tokens = CAPTION_PRESETS[args.preset].max_new_tokens
    source = load_input(run, {"image": run.image_column})  # a missing column fails before the model loads
    accelerator = accelerator or Accelerator()
    captioner = Captioner(args.model, args.prompt, generation, device=accelerator.device,
                          dtype=torch_dtype(generation.dtype, accelerator.device), revision=args.revision,
                          trust_remote_code=args.trust_remote_code)
    return run_sharded(run, CaptionStep(run, args, generation, captioner), accelerator, source)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from transformers import HfArgumentParser

    parser = HfArgumentParser((RunArguments, CaptionArguments, GenerationArguments))
    run, args, generation = parser.parse_args_into_dataclasses(args=argv)
    return caption(run, args, generation)


if __name__ == "__main__":
    main(sys.argv[1:])
