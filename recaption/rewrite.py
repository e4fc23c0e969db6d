"""Step 2 (VeCLIP): VeCap, one short caption fused from the AltText and the synthetic caption by an LLM.

The instruction-tuned LLM is asked to keep the AltText's named entities and the caption's visual details
and to invent nothing (`recaption.prompts`). Its answer is accepted or replaced by the caption by one rule,
`select_vecap`, and every replacement is counted by reason.

    python -m recaption.rewrite --source out/captions/data --output_dir out/vecap --model Qwen/Qwen2.5-7B-Instruct

Writes `vecap`, `rewrite_model`, `rewrite_prompt_version` and `vecap_fallback` (the reason the caption was
used instead of the LLM's answer; empty when the answer was kept). Other columns pass through.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import sys
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable

from alip_hf.lazy import lazy_import
from alip_hf.sources import is_empty_text
from alip_hf.schema import (
    ALT_TEXT,
    CAPTION,
    REWRITE_MODEL,
    REWRITE_PROMPT_VERSION,
    VECAP,
)
from recaption.arguments import GenerationArguments, RunArguments, torch_dtype
from recaption.run import run_sharded
from recaption.source import load_input
from recaption.step import StepResult, chunks
from recaption.throughput import OUTPUT_TOKENS
from recaption.prompts import RewritePrompt, load_rewrite_prompt

datasets = lazy_import("datasets")  # on first use: `--help` must not wait for it

VECAP_FALLBACK = "vecap_fallback"
DEFAULT_MAX_NEW_TOKENS = 64

# Intentional difference: VeCLIP rewrote with Vicuna-1.1, whose checkpoints ship no chat template; any
# instruction-tuned model with one works here.
DEFAULT_REWRITE_MODEL = "Qwen/Qwen2.5-7B-Instruct"


@dataclass
class RewriteArguments:
    """Which LLM rewrites, with which prompt, and when its answer is rejected."""

    model: str = field(default=DEFAULT_REWRITE_MODEL, metadata={"help": "Hub id or path of an instruction-tuned LM."})
    revision: str | None = field(default=None, metadata={"help": "Model revision (branch, tag or commit)."})
    rewrite_prompt_version: str = field(default="vecap-v1", metadata={"help": "Built-in prompt to use."})
    rewrite_prompt_file: str | None = field(
        default=None, metadata={"help": "JSON prompt (version, system, template, examples) instead of a built-in one."}
    )
    num_few_shot: int = field(default=0, metadata={"help": "Worked examples given as earlier chat turns."})
    alt_text_column: str = field(default=ALT_TEXT, metadata={"help": "Column with the web text."})
    caption_column: str = field(default=CAPTION, metadata={"help": "Column with the synthetic caption."})
    max_words: int = field(default=40, metadata={"help": "Answers longer than this fall back to the caption."})
    backend: str = field(
        default="transformers", metadata={"help": "Generation backend.", "choices": ["transformers", "vllm"]}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow models that ship their own code."})

    def __post_init__(self):
        if self.backend not in ("transformers", "vllm"):
            raise ValueError(f"--backend {self.backend!r}: choose transformers or vllm")
        if self.num_few_shot < 0 or self.max_words < 1:
            raise ValueError(
                f"--num_few_shot must be >= 0 and --max_words >= 1, got {self.num_few_shot}, {self.max_words}"
            )


# ----------------------------------------------------------------------------- the fallback rule

FALLBACK_REASONS = ("no_caption", "empty", "refusal", "echoed_prompt", "too_long")
_REFUSAL = re.compile(
    r"^(i'?m sorry|sorry|i apologi[sz]e|as an ai|i can ?not|i can'?t|i am unable|i'?m unable|i do not|i don'?t|"
    r"unfortunately)\b",
    re.IGNORECASE,
)
_LABEL = re.compile(r"^(new |merged |short |rewritten |final )?(caption|answer|sentence)\s*:\s*", re.IGNORECASE)
_ECHO = re.compile(r"\b(web text|image description)\s*:", re.IGNORECASE)


def clean_generation(text: str) -> str:
    """The first non-empty line, without a leading "Caption:" label or surrounding quotes."""
    line = next((line.strip() for line in (text or "").splitlines() if line.strip()), "")
    line = _LABEL.sub("", line).strip()
    return line.strip("\"'“”").strip()


def select_vecap(
    alt_text: str | None, caption: str | None, generated: str | None, max_words: int = 40
) -> tuple[str, str]:
    """The VeCap text for one row and why it was chosen: the one rule for accepting an LLM answer.

    In order:
      - no caption (the image could not be read): `("", "no_caption")`; nothing to fall back to;
      - the cleaned answer (`clean_generation`) is empty: the caption, `"empty"`;
      - it starts like a refusal ("I'm sorry", "As an AI", "I cannot", ...): the caption, `"refusal"`;
      - it repeats the prompt's field labels ("Web text:", "Image description:"): the caption, `"echoed_prompt"`;
      - it has more than `max_words` words: the caption, `"too_long"`;
      - otherwise: the cleaned answer, `"ok"`.

    `alt_text` is unused by the rule today and kept in the signature so a rule that checks entity
    retention can replace this one without touching callers.
    """
    if is_empty_text(caption):  # the data contract's rule: what training would skip as an empty caption
        return "", "no_caption"
    caption = caption.strip()
    text = clean_generation(generated or "")
    if not text:
        return caption, "empty"
    if _REFUSAL.match(text):
        return caption, "refusal"
    if _ECHO.search(text):
        return caption, "echoed_prompt"
    if len(text.split()) > max_words:
        return caption, "too_long"
    return text, "ok"


# ----------------------------------------------------------------------------- backends


def _load_tokenizer(model: str, revision: str | None, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load rewrite model {model!r}: {e}") from e
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"rewrite model {model!r} has no chat template: use an instruction-tuned model that has one")
    tokenizer.padding_side = "left"  # decoder-only: generated tokens must follow the prompt directly
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class TransformersRewriter:
    """Batched greedy/beam generation with `AutoModelForCausalLM`, left padding, prompts sorted by length."""

    def __init__(self, args: RewriteArguments, generation: GenerationArguments, device="cpu", dtype=None):
        from transformers import AutoModelForCausalLM

        self.generation, self.device = generation, device
        self.tokenizer = _load_tokenizer(args.model, args.revision, args.trust_remote_code)
        try:
            self.model = AutoModelForCausalLM.from_pretrained(
                args.model, revision=args.revision, dtype=dtype, trust_remote_code=args.trust_remote_code
            )
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot load rewrite model {args.model!r} as a causal LM: {e}") from e
        self.model.to(device).eval()
        self.dtype = self.model.dtype
        self.commit = getattr(self.model.config, "_commit_hash", None)

    def __call__(self, prompts: list[str], progress: Callable[[int], None] = lambda n: None) -> list[str]:
        """Answers for chat-formatted prompts, in order."""
        import torch

        lengths = [len(ids) for ids in self.tokenizer(prompts, add_special_tokens=False)["input_ids"]]
        # Longest first, so padding within a batch is small and an out-of-memory shows at once.
        order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
        answers: list[str] = [""] * len(prompts)
        for batch in chunks(order, self.generation.batch_size):
            # The chat template already holds the special tokens (BOS) the model expects.
            inputs = self.tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True,
                                    add_special_tokens=False).to(self.device)
            with torch.inference_mode():
                out = self.model.generate(
                    **inputs, max_new_tokens=self.generation.max_new_tokens, num_beams=self.generation.num_beams,
                    do_sample=False, pad_token_id=self.tokenizer.pad_token_id,
                )
            texts = self.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            for i, text in zip(batch, texts):
                answers[i] = text
            progress(len(batch))
        return answers


class VllmRewriter:
    """Greedy generation with vLLM (one engine per process; give each process its GPU)."""

    def __init__(self, args: RewriteArguments, generation: GenerationArguments, dtype_name: str = "auto"):
        if importlib.util.find_spec("vllm") is None:
            raise ImportError("--backend vllm needs the `vllm` package, which is not installed: pip install vllm")
        if generation.num_beams > 1:
            raise ValueError("--backend vllm decodes greedily here; use --backend transformers for --num_beams > 1")
        from vllm import LLM, SamplingParams

        self.generation = generation
        self.llm = LLM(model=args.model, revision=args.revision, dtype=dtype_name,
                       trust_remote_code=args.trust_remote_code)
        self.params = SamplingParams(temperature=0.0, max_tokens=generation.max_new_tokens)
        self.tokenizer = self.llm.get_tokenizer()
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"rewrite model {args.model!r} has no chat template")
        self.dtype = dtype_name
        self.commit = None

    def __call__(self, prompts: list[str], progress: Callable[[int], None] = lambda n: None) -> list[str]:
        outputs = self.llm.generate(prompts, self.params, use_tqdm=False)
        progress(len(prompts))
        return [output.outputs[0].text for output in outputs]


# ----------------------------------------------------------------------------- the step


class RewriteStep:
    """Adds `vecap`, its provenance and `vecap_fallback` to each shard."""

    name = "rewrite"
    unit = "row"

    def __init__(self, args: RewriteArguments, generation: GenerationArguments, prompt: RewritePrompt, rewriter):
        self.args, self.generation, self.prompt, self.rewriter = args, generation, prompt, rewriter
        self.version = prompt.versioned(args.num_few_shot)
        self.label = f"{args.model}@{rewriter.commit}" if rewriter.commit else args.model

    def required_columns(self) -> dict[str, str]:
        return {"alt_text": self.args.alt_text_column, "caption": self.args.caption_column}

    def provenance(self) -> dict[str, Any]:
        return {
            REWRITE_MODEL: self.label,
            "model": self.args.model,
            "revision": self.args.revision,
            "commit": self.rewriter.commit,
            "backend": self.args.backend,
            REWRITE_PROMPT_VERSION: self.version,
            "prompt": {"system": self.prompt.system, "template": self.prompt.template,
                       "examples": [list(e) for e in self.prompt.examples[: self.args.num_few_shot]]},
            "max_words": self.args.max_words,
            "generation": {"max_new_tokens": self.generation.max_new_tokens, "num_beams": self.generation.num_beams,
                           "do_sample": False, "dtype": str(self.rewriter.dtype).replace("torch.", ""),
                           "batch_size": self.generation.batch_size},
        }

    def chat_prompt(self, alt_text: str, caption: str) -> str:
        messages = self.prompt.messages(alt_text, caption, self.args.num_few_shot)
        return self.rewriter.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def process(self, shard: datasets.Dataset, ids: list[str], progress: Callable[[int], None]) -> StepResult:
        alts = [a or "" for a in shard[self.args.alt_text_column]]
        captions = [c or "" for c in shard[self.args.caption_column]]
        todo = [k for k, c in enumerate(captions) if not is_empty_text(c)]
        answers = dict(zip(todo, self.rewriter([self.chat_prompt(alts[k], captions[k]) for k in todo], progress)))
        progress(len(ids) - len(todo))
        vecap, reasons = {}, {}
        for k, row_id in enumerate(ids):
            vecap[row_id], reasons[row_id] = select_vecap(alts[k], captions[k], answers.get(k), self.args.max_words)
        counts = {"rows": len(ids), "rewritten": sum(r == "ok" for r in reasons.values()),
                  "vecap_words": sum(len(t.split()) for t in vecap.values()),
                  "vecap_nonempty": sum(bool(t) for t in vecap.values()),
                  OUTPUT_TOKENS: sum(len(self.rewriter.tokenizer(a, add_special_tokens=False)["input_ids"])
                                     for a in answers.values() if a)}
        counts.update({f"fallback/{reason}": sum(r == reason for r in reasons.values()) for reason in FALLBACK_REASONS})
        return StepResult(
            columns={
                VECAP: vecap,
                REWRITE_MODEL: {i: self.label for i in ids},
                REWRITE_PROMPT_VERSION: {i: self.version for i in ids},
                VECAP_FALLBACK: {i: "" if r == "ok" else r for i, r in reasons.items()},
            },
            counts=counts,
        )

    def summarize(self, totals: dict[str, float]) -> dict[str, Any]:
        fallbacks = {r: int(totals.get(f"fallback/{r}", 0)) for r in FALLBACK_REASONS}
        return {"fallbacks": sum(fallbacks.values()), "fallbacks_by_reason": fallbacks,
                "mean_vecap_words": round(totals.get("vecap_words", 0) / max(totals.get("vecap_nonempty", 0), 1), 3)}


def rewrite(run: RunArguments, args: RewriteArguments | None = None, generation: GenerationArguments | None = None,
            accelerator=None) -> dict[str, Any]:
    """Writes VeCap for every row of `run.source` (which needs `alt_text` and `caption`); returns the summary."""
    args = args or RewriteArguments()
    generation = generation or GenerationArguments()
    if generation.max_new_tokens is None:
        generation.max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    prompt = load_rewrite_prompt(args.rewrite_prompt_version, args.rewrite_prompt_file)
    prompt.messages("", "", args.num_few_shot)  # a bad --num_few_shot fails before the model loads
    source = load_input(run, {"alt_text": args.alt_text_column, "caption": args.caption_column})
    if run.engine == "ray":
        from recaption.ray_engine import run_ray

        plan = RewriteStep(args, generation, prompt, rewriter=SimpleNamespace(commit=None, dtype=None))
        return run_ray(run, functools.partial(build_rewrite_step, args, generation, prompt), plan, source)
    from accelerate import Accelerator  # here: a Ray driver needs neither it nor torch

    accelerator = accelerator or Accelerator()
    return run_sharded(run, build_rewrite_step(args, generation, prompt, accelerator.device), accelerator, source)


def build_rewrite_step(args: RewriteArguments, generation: GenerationArguments, prompt: RewritePrompt,
                       device) -> RewriteStep:
    """The rewrite step with its LLM loaded on `device` (in each Ray replica, or in this process)."""
    if args.backend == "vllm":
        rewriter = VllmRewriter(args, generation, generation.dtype)
    else:
        rewriter = TransformersRewriter(args, generation, device, torch_dtype(generation.dtype, device))
    return RewriteStep(args, generation, prompt, rewriter)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from transformers import HfArgumentParser

    parser = HfArgumentParser((RunArguments, RewriteArguments, GenerationArguments))
    run, args, generation = parser.parse_args_into_dataclasses(args=argv)
    return rewrite(run, args, generation)


if __name__ == "__main__":
    main(sys.argv[1:])
