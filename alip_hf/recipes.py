"""Training recipes: CLIP, ALIP and VeCLIP as small strategy objects, looked up once by name.

A recipe owns everything that differs between the three methods: which text columns it reads, how it draws
the text(s) of a sample, how the loss is called and which metrics it reports. `train.py` calls
`get_recipe(name, args)` once; no other module tests a recipe name. Combinations come from arguments: ALIP with
VeCap as its second text is `--recipe alip --caption_column vecap`; CLIP on synthetic captions only is
`--recipe clip --text_column caption`.

- `clip`: image + one web text (`alt_text`), symmetric InfoNCE (Radford et al. 2021).
- `alip`: image + web text + synthetic caption, bi-path adaptive contrastive loss weighted by the LCG and DCG
  gates (Yang et al., ICCV 2023, arXiv 2308.08428).
- `veclip`: image + one text drawn per sample: the VeCap rewrite with probability `vecap_probability`, else the
  AltText (Lai et al., arXiv 2310.07699, "mixed" training; the paper's best mix is 50/50).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np

from alip_hf import schema


@dataclass
class RecipeArguments:
    """Which method trains the model, and the columns it reads."""

    _argument_group_name = "recipe"

    recipe: Literal["clip", "alip", "veclip"] = field(default="alip", metadata={"help": "Training method."})
    text_column: str = field(default=schema.ALT_TEXT, metadata={"help": "Column of the web text (AltText)."})
    caption_column: str = field(
        default=schema.CAPTION,
        metadata={"help": "Column of the second text of the bi-path recipe (synthetic caption, or 'vecap')."},
    )
    vecap_column: str = field(default=schema.VECAP, metadata={"help": "Column of the VeCap rewrite (mixed recipe)."})
    vecap_probability: float = field(
        default=0.5, metadata={"help": "Mixed recipe: probability of drawing the VeCap text instead of the AltText."}
    )

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise ValueError(f"--recipe {self.recipe!r} is not one of {sorted(RECIPES)}")
        if not 0.0 <= self.vecap_probability <= 1.0:
            raise ValueError(f"--vecap_probability must be in [0, 1], got {self.vecap_probability}")


@dataclass
class TextSelector:
    """How a recipe picks the text(s) of one sample.

    `select(example, rng)` returns `({"text": str, "caption": str | None}, stats)` where `stats` holds integer
    counts to sum over a batch (e.g. how many samples drew the VeCap text). 
    """

    columns: dict[str, str]
    select: Callable[[dict, np.random.Generator], tuple[dict[str, str | None], dict[str, int]]]



def _mean(x) -> float:
    return float(x.float().mean())


class Recipe:
    """Base strategy: one text per image (CLIP). Subclasses override what differs."""

    name = "clip"
    uses_caption = False  # whether batches carry a second text path

    def __init__(self, args: RecipeArguments):
        self.args = args

    def columns(self) -> dict[str, str]:
        """Role -> column name of every text column read (roles are `schema`'s contract names)."""
        return {schema.ALT_TEXT: self.args.text_column}

    def text_selector(self) -> TextSelector:
        column = self.args.text_column
        return TextSelector(self.columns(), lambda row, rng: ({"text": row[column], "caption": None}, {}))

    def loss(self, model, output, local_loss: bool, gates=None):
        """Fills `output.loss` (and its parts) from the output's embeddings; see `ALIPModel.compute_loss`."""
        return model.compute_loss(output, local_loss=local_loss, gates=gates)

    def compute_gates(self, model, image_embeds, text_embeds, caption_embeds):
        """Gate values for a whole (cached) global batch, or `None` when the recipe has no gates."""
        return None

    def metrics(self, output, stats: dict[str, int], num_samples: int) -> dict[str, float]:
        """Scalars to log for one optimizer step (slash-namespaced keys)."""
        return {"loss/total": output.loss.item(), "loss/text": output.loss_text.item()}

    def sample_values(self, output) -> dict | None:
        """Per-sample values of one step's global batch, `{column: (N,) tensor}` with `schema` column names
        (`train.py --log_sample_weights`), or `None` when the recipe has none."""
        return None


class ClipRecipe(Recipe):
    name = "clip"


class AlipRecipe(Recipe):
    name = "alip"
    uses_caption = True

    def columns(self) -> dict[str, str]:
        # The caption's role decides the hint given when it is missing (run recaption.caption or .rewrite).
        role = schema.VECAP if self.args.caption_column == schema.VECAP else schema.CAPTION
        return {schema.ALT_TEXT: self.args.text_column, role: self.args.caption_column}

    def text_selector(self) -> TextSelector:
        text, caption = self.args.text_column, self.args.caption_column
        return TextSelector(self.columns(), lambda row, rng: ({"text": row[text], "caption": row[caption]}, {}))

    def compute_gates(self, model, image_embeds, text_embeds, caption_embeds):
        return model.gates(image_embeds, text_embeds, caption_embeds)

    def metrics(self, output, stats, num_samples):
        g = output.gates
        return {
            "loss/total": output.loss.item(),
            "loss/text": output.loss_text.item(),
            "loss/caption": output.loss_caption.item(),
            "gate/lcg/weight_mean": _mean(g.sample_weight),
            "gate/lcg/similarity_mean": _mean(g.similarity_text_caption),
            "gate/lcg/running_mean": float(g.running_mean_text_caption),
            "gate/lcg/inconsistent_fraction": _mean(g.dcg_applied),
            "gate/dcg/text_weight_mean": _mean(g.text_pair_weight),
            "gate/dcg/caption_weight_mean": _mean(g.caption_pair_weight),
            "gate/dcg/text_similarity_mean": _mean(g.similarity_image_text),
            "gate/dcg/caption_similarity_mean": _mean(g.similarity_image_caption),
            "gate/dcg/text_running_mean": float(g.running_mean_image_text),
            "gate/dcg/caption_running_mean": float(g.running_mean_image_caption),
        }

    def sample_values(self, output):
        # The values the loss used: the running means were updated with this batch first (train mode), so
        # they depend on the batch, unlike recaption.audit's eval-mode values.
        g = output.gates
        return {
            schema.LCG_WEIGHT: g.sample_weight, schema.LCG_WEIGHT_RAW: g.sample_weight_raw,
            schema.DCG_TEXT_WEIGHT: g.text_pair_weight, schema.DCG_CAPTION_WEIGHT: g.caption_pair_weight,
            schema.SIMILARITY_TEXT_CAPTION: g.similarity_text_caption,
            schema.SIMILARITY_IMAGE_TEXT: g.similarity_image_text,
            schema.SIMILARITY_IMAGE_CAPTION: g.similarity_image_caption,
        }


class VeclipRecipe(Recipe):
    name = "veclip"

    def columns(self) -> dict[str, str]:
        return {schema.ALT_TEXT: self.args.text_column, schema.VECAP: self.args.vecap_column}

    def text_selector(self) -> TextSelector:
        text, vecap, p = self.args.text_column, self.args.vecap_column, self.args.vecap_probability

        def select(row: dict, rng: np.random.Generator):
            # Drawn from the sample's own generator: the same choice after a resume or on another process.
            drew_vecap = bool(rng.random() < p)
            return {"text": row[vecap] if drew_vecap else row[text], "caption": None}, {"vecap_drawn": int(drew_vecap)}

        return TextSelector(self.columns(), select)

    def metrics(self, output, stats, num_samples):
        return {**super().metrics(output, stats, num_samples),
                "data/vecap_fraction": stats.get("vecap_drawn", 0) / max(num_samples, 1)}


RECIPES: dict[str, type[Recipe]] = {r.name: r for r in (ClipRecipe, AlipRecipe, VeclipRecipe)}


def get_recipe(args: RecipeArguments) -> Recipe:
    """The recipe named by `args.recipe`."""
    if args.recipe not in RECIPES:
        raise ValueError(f"--recipe {args.recipe!r} is not one of {sorted(RECIPES)}")
    return RECIPES[args.recipe](args)


__all__ = ["RECIPES", "Recipe", "RecipeArguments", "get_recipe"]
