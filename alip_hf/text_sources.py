"""Several text sources per text path, each drawn with its own probability, and sub-caption sampling.

A text path (the web-text path every recipe reads, ALIP's caption path) can read several columns, e.g. AltText and
VeCap, or a BLIP caption, a LLaVA caption and VeCap. Per sample one column is drawn with its probability (open_clip's
`--json-text-key 'a;b' --json-text-key-probs`, here `--text_column 'a;b' --text_column_probs '0.7;0.3'`); VeCLIP's
AltText/VeCap mix is the two-source case. A drawn value that is empty (`alip_hf.sources.is_empty_text`) or missing
falls back to the other sources, drawn again with their probabilities renormalised, and is counted; a row whose
sources are all empty is skipped as a row with an empty text.

Long captions (LLaVA-style, VeCap) can be cut to a sub-caption per draw, as DreamLIP and CLIPS train on them: one
random sentence (`sentence`) or a random run of consecutive sentences (`sentences`), chosen per source.

Every draw comes from the sample's own generator (`alip_hf.data.sample_rng(seed, epoch, index)`), never from a
process's state, so draws are seeded, the same after a kill and resume, and the same on any number of processes.
A single source without sub-captions draws nothing, so its crops stay those of a run without this module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import numpy as np

from alip_hf.sources import is_empty_text

SUBCAPTION_MODES = ("none", "sentence", "sentences")
SubcaptionMode = Literal["none", "sentence", "sentences"]
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class TextSource:
    """One column of a text path: drawn with `probability`, optionally cut to a sub-caption."""

    column: str
    probability: float = 1.0
    subcaption: SubcaptionMode = "none"


def split_list(value: str) -> list[str]:
    """`"a;b"` -> `["a", "b"]` (open_clip's separator), blanks around items removed."""
    return [item.strip() for item in value.split(";")]


def parse_sources(columns: str, probs: str | None = None, subcaptions: str | None = None,
                  flag: str = "--text_column") -> list[TextSource]:
    """The sources of one path from its flags: `columns` `"a;b"`, `probs` `"0.7;0.3"` (default: equal), and
    `subcaptions` `"none;sentence"` (one mode for all, or one per column).

    Raises:
        ValueError: naming the flag, when the lists differ in length, a probability is negative or they do not
            sum to a positive number, a column repeats, or a sub-caption mode is unknown.
    """
    names = split_list(columns)
    if any(not name for name in names) or len(set(names)) != len(names):
        raise ValueError(f"{flag} {columns!r}: give distinct, non-empty column names separated by ';'")
    if probs is None:
        weights = [1.0] * len(names)
    else:
        try:
            weights = [float(p) for p in split_list(probs)]
        except ValueError:
            raise ValueError(f"{flag}_probs {probs!r}: not numbers separated by ';'") from None
        if len(weights) != len(names):
            raise ValueError(f"{flag}_probs {probs!r} gives {len(weights)} probabilities for the {len(names)} "
                             f"columns of {flag} {columns!r}")
        if any(w < 0 or not np.isfinite(w) for w in weights) or sum(weights) <= 0:
            raise ValueError(f"{flag}_probs {probs!r}: probabilities must be >= 0 with a positive sum")
    modes = split_list(subcaptions) if subcaptions else ["none"]
    if len(modes) == 1:
        modes = modes * len(names)
    if len(modes) != len(names) or any(m not in SUBCAPTION_MODES for m in modes):
        raise ValueError(f"{flag}_subcaption {subcaptions!r}: one of {SUBCAPTION_MODES} for all columns or one per "
                         f"column of {flag} {columns!r}")
    total = sum(weights)
    return [TextSource(n, w / total, m) for n, w, m in zip(names, weights, modes)]


def source_key(column: str) -> str:
    """A column name as a metric key part (`caption.txt` -> `caption_txt`)."""
    return re.sub(r"[^0-9A-Za-z_]+", "_", column)


def subcaption(text: str, mode: SubcaptionMode, rng: np.random.Generator) -> str:
    """`text` itself (`none`), one random sentence of it (`sentence`), or a random run of its consecutive sentences
    (`sentences`: start and length uniform). Sentences end at `.`, `!` or `?` followed by white space; a text of
    one sentence is returned whole without a draw."""
    if mode == "none":
        return text
    sentences = [s for s in _SENTENCE_END.split(text.strip()) if s]
    if len(sentences) < 2:
        return text
    if mode == "sentence":
        return sentences[int(rng.integers(len(sentences)))]
    start = int(rng.integers(len(sentences)))
    length = int(rng.integers(1, len(sentences) - start + 1))
    return " ".join(sentences[start : start + length])


@dataclass
class TextPath:
    """The sources of one text path and the draw of one sample's text from them.

    `draw(row, rng)` returns `(text, stats)`: the text, or `None` when every source is empty, and integer counts
    to sum over a batch: `source/<column>` for the source used, `source/fallback` when the drawn one was empty.
    """

    sources: list[TextSource]
    name: str = "text"  # the path, in metric keys: `data/<name>_source/<column>_fraction`

    @property
    def columns(self) -> list[str]:
        return [s.column for s in self.sources]

    def usable(self, row: dict) -> bool:
        """Whether some source of the row has a text (else the row is skipped as an empty text)."""
        return any(not is_empty_text(row.get(s.column)) for s in self.sources)

    def draw(self, row: dict, rng: np.random.Generator) -> tuple[str | None, dict[str, int]]:
        if len(self.sources) == 1:  # no draw: the stream of random numbers stays that of a single-column path
            chosen, fell_back = self.sources[0], False
            if is_empty_text(row.get(chosen.column)):
                return None, {}
        else:
            chosen = self._pick(self.sources, rng.random())
            fell_back = is_empty_text(row.get(chosen.column))
            if fell_back:
                others = [s for s in self.sources if s is not chosen and not is_empty_text(row.get(s.column))]
                if not others:
                    return None, {}
                chosen = self._pick(others, rng.random())
        text = subcaption(row[chosen.column], chosen.subcaption, rng)
        stats = {f"{self.name}_source/{source_key(chosen.column)}": 1} if len(self.sources) > 1 else {}
        if fell_back:
            stats[f"{self.name}_source/fallback"] = 1
        return text, stats

    @staticmethod
    def _pick(sources: list[TextSource], u: float) -> TextSource:
        """The source whose cumulative probability interval holds `u` in [0, 1) (probabilities renormalised)."""
        total = sum(s.probability for s in sources)
        cumulative = 0.0
        for source in sources:
            cumulative += source.probability / total
            if u < cumulative:
                return source
        return sources[-1]

    def metrics(self, stats: dict[str, int], num_samples: int) -> dict[str, float]:
        """`data/<path>_source/<column>_fraction` per source and `.../fallback_fraction`, over a step's samples."""
        if len(self.sources) < 2:
            return {}
        keys = [*(source_key(s.column) for s in self.sources), "fallback"]
        return {f"data/{self.name}_source/{key}_fraction": stats.get(f"{self.name}_source/{key}", 0)
                / max(num_samples, 1) for key in keys}


__all__ = ["SUBCAPTION_MODES", "TextPath", "TextSource", "parse_sources", "source_key", "subcaption"]
