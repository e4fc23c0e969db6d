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

import functools
import importlib.util
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

from alip_hf.lazy import lazy_import
from alip_hf.sources import is_empty_text
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
    backend: str = field(
        default="transformers",
        metadata={"help": "transformers: `generate` in batches; vllm: vLLM's engine with image + prompt requests "
                          "(pip install vllm; one engine per process or Ray replica).",
                  "choices": ["transformers", "vllm"]})

    def __post_init__(self):
        if self.backend not in ("transformers", "vllm"):
            raise ValueError(f"--backend {self.backend!r}: choose transformers or vllm")
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
        return count_output_tokens(self.processor, captions)

    @property
    def label(self) -> str:
        """The value of `caption_model`: the model id, with the commit it was loaded from when known."""
        return f"{self.name}@{self.commit}" if self.commit else self.name

    def _prompt_text(self) -> str | None:
        return prompt_text(self.processor, self.prompt, self.is_chat)

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


def count_output_tokens(processor, captions: list[str]) -> int:
    """Tokens of the written captions as the captioner's tokenizer splits them (the throughput's output tokens;
    counted from the text so that every backend counts alike)."""
    tokenizer = getattr(processor, "tokenizer", None)
    if not captions:
        return 0
    if tokenizer is None:
        return sum(len(t.split()) for t in captions)
    return sum(len(ids) for ids in tokenizer(captions, add_special_tokens=False)["input_ids"])


def prompt_text(processor, prompt: str, is_chat: bool) -> str | None:
    """The text given with each image: for a chat model, the prompt as a user turn after the image, rendered by
    the processor's chat template (with the model's image placeholder); else the prompt itself, or None."""
    if not is_chat:
        return prompt or None
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


class VllmCaptioner:
    """Captions through vLLM's multimodal API: one request per image,
    `{"prompt": <text>, "multi_modal_data": {"image": <PIL image>}}`, decoded greedily.

    The prompt text is the one the transformers backend gives (`prompt_text`, the model's own processor and chat
    template), so the two backends caption from the same prompt and write the same `caption_prompt_version`.

    Args:
        llm / sampling_params: an engine and its parameters already built (tests pass a stand-in here); by default
            `vllm.LLM(model, ...)` and greedy `vllm.SamplingParams(temperature=0, max_tokens=max_new_tokens)`.
    """

    def __init__(self, model: str, prompt: str, generation: GenerationArguments, dtype_name: str = "auto",
                 revision: str | None = None, trust_remote_code: bool = False, llm=None, sampling_params=None):
        from transformers import AutoProcessor

        if generation.num_beams > 1:
            raise ValueError("--backend vllm decodes greedily here; use --backend transformers for --num_beams > 1")
        self.name, self.prompt, self.generation = model, prompt, generation
        try:
            self.processor = AutoProcessor.from_pretrained(model, revision=revision,
                                                           trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot load captioning model {model!r}: {e}") from e
        self.is_chat = getattr(self.processor, "chat_template", None) is not None
        if self.is_chat and not prompt:
            raise ValueError(f"{model!r} is a chat model and needs a prompt (--prompt or --preset veclip)")
        self.text = prompt_text(self.processor, prompt, self.is_chat) or ""
        if llm is None:
            if importlib.util.find_spec("vllm") is None:
                raise ImportError("--backend vllm needs the `vllm` package, which is not installed: pip install vllm")
            from vllm import LLM, SamplingParams

            llm = LLM(model=model, revision=revision, dtype=dtype_name, trust_remote_code=trust_remote_code,
                      limit_mm_per_prompt={"image": 1})
            sampling_params = SamplingParams(temperature=0.0, max_tokens=generation.max_new_tokens)
        self.llm, self.params = llm, sampling_params
        self.dtype = dtype_name
        self.commit = None  # vLLM does not report the commit it loaded; the model id and revision stand for it

    @property
    def label(self) -> str:
        return self.name

    def requests(self, images: list) -> list[dict]:
        """vLLM prompts for a batch of PIL images, in order."""
        return [{"prompt": self.text, "multi_modal_data": {"image": image}} for image in images]

    def __call__(self, images: list) -> list[str]:
        """Captions for a batch of PIL images, in order (vLLM returns its outputs in request order)."""
        outputs = self.llm.generate(self.requests(images), self.params, use_tqdm=False)
        if len(outputs) != len(images):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(images)} images")
        texts = [_clean(output.outputs[0].text) for output in outputs]
        return texts if self.is_chat else [_strip_prefix(t, self.prompt) for t in texts]

    def output_tokens(self, captions: list[str]) -> int:
        return count_output_tokens(self.processor, captions)


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
            "backend": self.args.backend,
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
                    "empty_captions": sum(1 for t in written if is_empty_text(t))},
        )

    def summarize(self, totals: dict[str, float]) -> dict[str, Any]:
        return {"failures": int(totals.get("failures", 0)),
                "mean_caption_words": round(totals.get("caption_words", 0) / max(totals.get("captioned", 0), 1), 3)}


def caption(run: RunArguments, args: CaptionArguments | None = None, generation: GenerationArguments | None = None,
            accelerator=None) -> dict[str, Any]:
    """Captions every image of `run.source` into `run.output_dir`; returns the run summary."""
    args = args or CaptionArguments()
    generation = generation or GenerationArguments()
    if generation.max_new_tokens is None:
        generation.max_new_tokens = CAPTION_PRESETS[args.preset].max_new_tokens
    source = load_input(run, {"image": run.image_column})  # a missing column fails before the model loads
    if run.engine == "ray":
        from recaption.ray_engine import run_ray

        return run_ray(run, functools.partial(build_caption_step, run, args, generation),
                       CaptionStep(run, args, generation, captioner=None), source)
    from accelerate import Accelerator  # here: a Ray driver needs neither it nor torch

    accelerator = accelerator or Accelerator()
    return run_sharded(run, build_caption_step(run, args, generation, accelerator.device), accelerator, source)


def build_caption_step(run: RunArguments, args: CaptionArguments, generation: GenerationArguments,
                       device) -> CaptionStep:
    """The caption step with its captioner loaded on `device` (in each Ray replica, or in this process)."""
    if args.backend == "vllm":
        captioner = VllmCaptioner(args.model, args.prompt, generation, generation.dtype, revision=args.revision,
                                  trust_remote_code=args.trust_remote_code)
        return CaptionStep(run, args, generation, captioner)
    captioner = Captioner(args.model, args.prompt, generation, device=device,
                          dtype=torch_dtype(generation.dtype, device), revision=args.revision,
                          trust_remote_code=args.trust_remote_code)
    return CaptionStep(run, args, generation, captioner)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from transformers import HfArgumentParser

    parser = HfArgumentParser((RunArguments, CaptionArguments, GenerationArguments))
    run, args, generation = parser.parse_args_into_dataclasses(args=argv)
    return caption(run, args, generation)


if __name__ == "__main__":
    main(sys.argv[1:])
