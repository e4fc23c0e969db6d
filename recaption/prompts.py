"""Versioned prompts for captioning and VeCap rewriting, and the per-recipe caption presets.

A prompt's version string is written into every row it produced (`caption_prompt_version`,
`rewrite_prompt_version`), so a changed prompt must get a new version. Custom prompts are allowed and
must be given a version by the user.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

# Caption prompts, by version. An empty prompt means unconditional captioning (BLIP, GIT).
CAPTION_PROMPTS = {
    "none-v1": "",
    # OFA's captioning instruction, the captioner ALIP used (paper; official README).
    "ofa-v1": " what does the image describe?",
    # VeCLIP (visual concept exploitation): LLaVA is asked for a concise description of the image alone, under 20 words.
    "veclip-v1": "Describe the image concisely, less than 20 words.",
}


@dataclass(frozen=True)
class CaptionPreset:
    model: str
    prompt_version: str
    max_new_tokens: int


CAPTION_PRESETS = {
    # ALIP captioned YFCC15M with OFA-base and OFA's caption instruction. Intentional difference: OFA is not
    # in transformers, so the preset uses BLIP-large, trained for the same short content caption,
    # unconditionally (BLIP was not trained to follow OFA's instruction).
    "alip": CaptionPreset("Salesforce/blip-image-captioning-large", "none-v1", 30),
    # VeCLIP used LLaVA with the prompt above; llava-1.5-7b-hf is a LLaVA checkpoint native to transformers.
    "veclip": CaptionPreset("llava-hf/llava-1.5-7b-hf", "veclip-v1", 40),
}


@dataclass(frozen=True)
class RewritePrompt:
    """One VeCap rewriting prompt: a system message, a user template with `{alt_text}` and `{caption}`,
    and worked examples `(alt_text, caption, answer)` usable as few-shot turns."""

    version: str
    system: str
    template: str
    examples: tuple[tuple[str, str, str], ...] = field(default_factory=tuple)

    def messages(self, alt_text: str, caption: str, num_few_shot: int = 0) -> list[dict[str, str]]:
        """Chat messages for `tokenizer.apply_chat_template`, few-shot examples as earlier turns."""
        if num_few_shot > len(self.examples):
            raise ValueError(
                f"--num_few_shot {num_few_shot}: prompt {self.version!r} has {len(self.examples)} examples"
            )
        messages = [{"role": "system", "content": self.system}] if self.system else []
        for example_alt, example_caption, answer in self.examples[:num_few_shot]:
            example = self.template.format(alt_text=example_alt, caption=example_caption)
            messages.append({"role": "user", "content": example})
            messages.append({"role": "assistant", "content": answer})
        messages.append({"role": "user", "content": self.template.format(alt_text=alt_text, caption=caption)})
        return messages

    def versioned(self, num_few_shot: int) -> str:
        """The version stored with each row: few-shot turns change the prompt, so they are part of it."""
        return f"{self.version}+{num_few_shot}shot" if num_few_shot else self.version


# VeCLIP (scalable LLM rewriting) fuses the AltText and the LLaVA caption with Vicuna-1.1, asking for one
# short sentence that keeps the AltText's knowledge (names, places) and the caption's visual concepts and
# adds nothing. The wording below is this project's, written to those rules.
VECAP_V1 = RewritePrompt(
    version="vecap-v1",
    system="You write short, factual image captions.",
    template=(
        "Two texts describe the same image.\n"
        "Web text: {alt_text}\n"
        "Image description: {caption}\n"
        "Merge them into one short caption of at most 30 words. Keep every name, place, brand, date and "
        "other proper noun from the web text. Keep the visual details (objects, colours, counts, actions) "
        "from the image description. Put attribute words such as colours and shapes before their noun. "
        "Add nothing that is in neither text. If the web text says nothing about the image, use only the "
        "image description. Answer with the caption alone."
    ),
    examples=(
        (
            "IMG_2041.JPG Golden Gate Bridge trip 2019",
            "a red suspension bridge over the water on a foggy day",
            "The red Golden Gate Bridge over the water on a foggy day.",
        ),
        (
            "Buy now! Free shipping on all orders",
            "a white ceramic mug with a black handle on a wooden table",
            "A white ceramic mug with a black handle on a wooden table.",
        ),
        (
            "Serena Williams wins at Wimbledon",
            "a woman in white holding a tennis racket on a grass court",
            "Serena Williams in white holding a tennis racket on the grass court at Wimbledon.",
        ),
    ),
)

REWRITE_PROMPTS = {VECAP_V1.version: VECAP_V1}


def load_rewrite_prompt(version: str | None = None, path: str | None = None) -> RewritePrompt:
    """A built-in prompt by version, or a custom one from a JSON file with `version`, `system`, `template`
    and optional `examples` (a list of `[alt_text, caption, answer]`)."""
    if path is None:
        if version not in REWRITE_PROMPTS:
            raise ValueError(f"--rewrite_prompt_version {version!r}: built-in versions are {sorted(REWRITE_PROMPTS)}")
        return REWRITE_PROMPTS[version]
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    missing = [key for key in ("version", "template") if key not in spec]
    if missing:
        raise ValueError(f"--rewrite_prompt_file {path}: missing keys {missing}")
    for placeholder in ("{alt_text}", "{caption}"):
        if placeholder not in spec["template"]:
            raise ValueError(f"--rewrite_prompt_file {path}: the template has no {placeholder}")
    examples = tuple(tuple(example) for example in spec.get("examples", []))
    return RewritePrompt(spec["version"], spec.get("system", ""), spec["template"], examples)
