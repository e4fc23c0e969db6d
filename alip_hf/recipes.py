"""Training recipes: CLIP, ALIP and VeCLIP as strategy objects, looked up once by name.

A recipe owns everything that differs between the three methods:
- its arguments (`RecipeArguments` subclasses; a flag of another recipe is an error, see `resolve_arguments`),
- the text columns it reads and how it draws the text(s) of a sample (`columns`, `text_selector`),
- the embeddings one step needs (`embed`): exact gradient accumulation caches them for all micro-batches and
  replays one micro-batch at a time with gradient (`alip_hf.training.loop.forward_backward`),
- what is computed once per optimizer step on the whole cached batch (`step_state`: ALIP's gates),
- which of `modeling_alip.loss`'s step losses it trains with (`loss`: `single_path_loss` or ALIP's
  `adaptive_loss`, each with the pair loss `--loss` names), and the model configuration that records it
  (`model_config`), so `ALIPModel.forward(return_loss=True)` computes the same loss through the same function,
- the metrics it logs (`metrics`).
Training looks the recipe up once (`get_recipe`); no other module tests a recipe name. Combinations come from
arguments: ALIP with VeCap as its second text is `--recipe alip --caption_column vecap`; CLIP on synthetic
captions only is `--recipe clip --text_column caption`.

- `clip`: image + one web text (`alt_text`), symmetric InfoNCE (Radford et al. 2021).
- `alip`: image + web text + synthetic caption, bi-path adaptive contrastive loss weighted by the LCG and DCG
  gates (Yang et al., ICCV 2023, arXiv 2308.08428).
- `veclip`: image + one text drawn per sample: the VeCap rewrite with probability `vecap_probability`, else the
  AltText (Lai et al., arXiv 2310.07699, "mixed" training; the paper's best mix is 50/50).
Every recipe trains with `--loss clip` (softmax InfoNCE) or `--loss siglip` (SigLIP's sigmoid loss, Zhai et al.
2023; under `alip` weighted by the gates, an extension of this package).

Only numpy is imported at module level (argument parsing and `--help` read this module); torch and
`modeling_alip` are imported where a step runs.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal

import numpy as np

from alip_hf import schema

if TYPE_CHECKING:
    import torch

    from modeling_alip import ALIPModel
    from modeling_alip.loss import StepLoss


# ----------------------------------------------------------------------------------------------------------------
# Arguments: the ones every recipe reads, then each recipe's own
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class RecipeArguments:
    """Which method trains the model, and the text column every recipe reads."""

    _argument_group_name = "recipe"

    recipe: Literal["clip", "alip", "veclip"] = field(default="alip", metadata={"help": "Training method."})
    text_column: str = field(default=schema.ALT_TEXT, metadata={"help": "Column of the web text (AltText)."})
    loss: Literal["clip", "siglip"] = field(
        default="clip",
        metadata={"help": "Image-text loss of every text path: clip (softmax InfoNCE over the global batch) or "
                          "siglip (SigLIP's pairwise sigmoid loss, learnable temperature from 10 and bias from -10 "
                          "for a new model; under --recipe alip weighted by the gates). See docs/losses.md."},
    )

    def __post_init__(self):
        if self.loss not in ("clip", "siglip"):
            raise ValueError(f"--loss {self.loss!r} is not one of ['clip', 'siglip']")
        if self.recipe not in RECIPES:
            raise ValueError(f"--recipe {self.recipe!r} is not one of {sorted(RECIPES)}")
        owner = RECIPES[self.recipe].Arguments
        if type(self) is not RecipeArguments and type(self) is not owner:
            raise ValueError(f"{type(self).__name__} holds arguments of another recipe than --recipe {self.recipe}")


@dataclass
class AlipArguments(RecipeArguments):
    """Arguments of `--recipe alip`."""

    caption_column: str = field(
        default=schema.CAPTION,
        metadata={"help": "Column of the second text of the bi-path loss (synthetic caption, or vecap)."},
    )


@dataclass
class VeclipArguments(RecipeArguments):
    """Arguments of `--recipe veclip`."""

    recipe: Literal["clip", "alip", "veclip"] = field(default="veclip", metadata={"help": "Training method."})
    vecap_column: str = field(default=schema.VECAP, metadata={"help": "Column of the VeCap rewrite."})
    vecap_probability: float = field(
        default=0.5, metadata={"help": "Probability of drawing the VeCap text instead of the AltText per sample."}
    )

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.vecap_probability <= 1.0:
            raise ValueError(f"--vecap_probability must be in [0, 1], got {self.vecap_probability}")


# ----------------------------------------------------------------------------------------------------------------
# What a recipe hands the training loop
# ----------------------------------------------------------------------------------------------------------------


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


def _bias(core: ALIPModel, loss: str):
    return core.logit_bias if loss == "siglip" else None


# ----------------------------------------------------------------------------------------------------------------
# The recipes
# ----------------------------------------------------------------------------------------------------------------


class Recipe:
    """Base strategy: one text per image and the symmetric InfoNCE loss (CLIP). Subclasses override what differs."""

    name: ClassVar[str] = "clip"
    Arguments: ClassVar[type[RecipeArguments]] = RecipeArguments
    # Output fields of `ALIPModel.forward` one step reads: `embed` returns them as `{short name: (B, D)}`.
    EMBEDDINGS: ClassVar[dict[str, str]] = {"image": "image_embeds", "text": "text_embeds"}

    def __init__(self, args: RecipeArguments):
        self.args = args

    def columns(self) -> dict[str, str]:
        """Role -> column name of every text column read (roles are `schema`'s contract names)."""
        return {schema.ALT_TEXT: self.args.text_column}

    def text_selector(self) -> TextSelector:
        column = self.args.text_column
        return TextSelector(self.columns(), lambda row, rng: ({"text": row[column], "caption": None}, {}))

    def embed(self, model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`(B, D)` L2-normalised embeddings of one micro-batch, by name.

        `model` is the prepared (DDP-wrapped) model: calling it, not the unwrapped one, lets DDP synchronise
        the gradients of the replayed micro-batch.
        """
        output = model(**batch, return_loss=False)
        return {name: getattr(output, field_name) for name, field_name in self.EMBEDDINGS.items()}

    def step_state(self, core: ALIPModel, embeds: dict[str, torch.Tensor]) -> Any:
        """What is computed once per optimizer step from the cached, detached embeddings of all `k`
        micro-batches (each `(k*B, D)`), and shared by the `k` replayed losses; `None` here."""
        return None

    # ALIPConfig.adaptive_loss of the recipe's loss (the model's own forward then computes the same loss).
    ADAPTIVE: ClassVar[bool] = False

    def model_config(self) -> dict[str, Any]:
        """`ALIPConfig` fields that record this recipe's loss in the model (set before the model is built).

        A new model trained with the sigmoid loss starts at SigLIP's temperature 10 and bias -10 (Zhai et al.
        2023); a loaded checkpoint keeps its trained temperature, and a bias it lacks starts at -10.
        """
        from modeling_alip.configuration_alip import SIGLIP_LOGIT_BIAS_INIT, SIGLIP_LOGIT_SCALE_INIT

        config = {"loss": self.args.loss, "adaptive_loss": self.ADAPTIVE}
        if self.args.loss == "siglip":
            config.update(logit_scale_init_value=SIGLIP_LOGIT_SCALE_INIT, logit_bias_init_value=SIGLIP_LOGIT_BIAS_INIT)
        return config

    def loss(self, core: ALIPModel, embeds: dict[str, torch.Tensor], local_loss: bool, state: Any = None) -> StepLoss:
        """One unweighted (image, text) path with `--loss`'s pair loss (`modeling_alip.loss.single_path_loss`),
        embeddings gathered across processes with gradient.

        Args:
            core: the unwrapped `ALIPModel` (its `logit_scale`, and `logit_bias` for the sigmoid loss).
            embeds: `{"image": (B, D), "text": (B, D)}` local embeddings of the whole step's batch.
            local_loss: loss of this process's rows against the global batch (see `contrastive_loss`).
            state: `step_state`'s result under accumulation, else `None`.
        """
        from modeling_alip.loss import single_path_loss

        return single_path_loss(embeds["image"], embeds["text"], core.logit_scale, _bias(core, self.args.loss),
                                self.args.loss, local_loss)

    def metrics(self, output: StepLoss, stats: dict[str, int], num_samples: int) -> dict[str, float]:
        """Scalars to log for one optimizer step (slash-namespaced keys)."""
        return {"loss/total": output.loss.item(), **{f"loss/{k}": v.item() for k, v in output.parts.items()}}

    def sample_values(self, output) -> dict | None:
        """Per-sample values of one step's global batch, `{column: (N,) tensor}` with `schema` column names
        (`train.py --log_sample_weights`), or `None` when the recipe has none."""
        return None


class ClipRecipe(Recipe):
    name = "clip"


class AlipRecipe(Recipe):
    """Bi-path adaptive contrastive loss: (image, web text) and (image, caption), weighted by the gates."""

    name = "alip"
    Arguments = AlipArguments
    ADAPTIVE = True
    EMBEDDINGS = {"image": "image_embeds", "text": "text_embeds", "caption": "caption_embeds"}

    def columns(self) -> dict[str, str]:
        # The caption's role decides the hint given when it is missing (run recaption.caption or .rewrite).
        role = schema.VECAP if self.args.caption_column == schema.VECAP else schema.CAPTION
        return {schema.ALT_TEXT: self.args.text_column, role: self.args.caption_column}

    def text_selector(self) -> TextSelector:
        text, caption = self.args.text_column, self.args.caption_column
        return TextSelector(self.columns(), lambda row, rng: ({"text": row[text], "caption": row[caption]}, {}))

    def step_state(self, core, embeds):
        """The gates of the whole accumulated global batch: one running-mean update per optimizer step.

        Deviation: the official code accumulates per micro-batch and so updates the running means every
        micro-step, on fewer samples.
        """
        from modeling_alip.loss import gather_features

        gathered, _ = gather_features(*(embeds[name].float() for name in ("image", "text", "caption")))
        return core.gates(*gathered)

    def loss(self, core, embeds, local_loss, state=None) -> StepLoss:
        """ALIP's adaptive loss (`modeling_alip.loss.adaptive_loss`): `loss_text + loss_caption`, each weighted
        by `W^s * W^t` and `W^s * W^c`, with `--loss`'s pair loss.

        Without a `state` the gates run there, on the gathered embeddings (updating their running means in
        training mode), as in the official code.
        """
        from modeling_alip.loss import adaptive_loss

        return adaptive_loss(embeds["image"], embeds["text"], embeds["caption"], core.logit_scale,
                             state if state is not None else core.gates, _bias(core, self.args.loss),
                             self.args.loss, local_loss)

    def metrics(self, output, stats, num_samples):
        g = output.gates
        # The gates' weights grow as their running means settle, so the weighted loss rises early in a run
        # while the model improves; the unweighted loss (CLIP's on the same embeddings) shows the progress.
        unweighted = {f"loss/unweighted/{path}": float(value) for path, value in output.unweighted.items()}
        return {
            **super().metrics(output, stats, num_samples),
            "loss/unweighted/total": float(sum(output.unweighted.values())),
            **unweighted,
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
    """CLIP's loss on one text per sample, drawn between the VeCap rewrite and the AltText."""

    name = "veclip"
    Arguments = VeclipArguments

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


# ----------------------------------------------------------------------------------------------------------------
# Command line: one parser group per recipe with arguments of its own
# ----------------------------------------------------------------------------------------------------------------


def _own_fields(arguments: type[RecipeArguments]) -> list[dataclasses.Field]:
    common = {f.name for f in dataclasses.fields(RecipeArguments)}
    return [f for f in dataclasses.fields(arguments) if f.name not in common]


def _flag_group(recipe: type[Recipe]) -> type:
    """A dataclass of the recipe's own fields only, for `HfArgumentParser` (which needs unique flag names)."""
    hints = typing.get_type_hints(recipe.Arguments)
    specs = [(f.name, hints[f.name], field(default=f.default, metadata=f.metadata)) for f in _own_fields(recipe.Arguments)]
    return dataclasses.make_dataclass(
        f"{recipe.Arguments.__name__}Flags", specs,
        namespace={"_argument_group_name": f"recipe {recipe.name} (only with --recipe {recipe.name})",
                   "owner": recipe.name})


# Parser groups: the common arguments, then one group per recipe that has arguments of its own.
ARGUMENT_GROUPS: tuple[type, ...] = (
    RecipeArguments, *(_flag_group(r) for r in RECIPES.values() if _own_fields(r.Arguments)))


def resolve_arguments(groups: Sequence, given: Collection[str] = ()) -> RecipeArguments:
    """The chosen recipe's arguments from the parsed `ARGUMENT_GROUPS` instances.

    Args:
        groups: one instance of each of `ARGUMENT_GROUPS`, in order.
        given: names of the flags the user set (command line or run YAML).
    Raises:
        ValueError: naming the flag and the recipe, for a flag of another recipe that was given or differs
            from its default.
    """
    common, *own_groups = groups
    values = {f.name: getattr(common, f.name) for f in dataclasses.fields(common)}
    for group in own_groups:
        for f in dataclasses.fields(group):
            value = getattr(group, f.name)
            if group.owner == common.recipe:
                values[f.name] = value
            elif f.name in given or value != f.default:
                raise ValueError(f"--{f.name} does not apply to --recipe {common.recipe}: it is an argument of "
                                 f"--recipe {group.owner}")
    return RECIPES[common.recipe].Arguments(**values)


def get_recipe(args: RecipeArguments) -> Recipe:
    """The recipe named by `args.recipe`; plain `RecipeArguments` get the recipe's defaults for its own fields."""
    cls = RECIPES[args.recipe]
    if type(args) is RecipeArguments and cls.Arguments is not RecipeArguments:
        args = cls.Arguments(**dataclasses.asdict(args))
    return cls(args)


__all__ = ["ARGUMENT_GROUPS", "RECIPES", "AlipArguments", "Recipe", "RecipeArguments", "StepLoss", "TextSelector",
           "VeclipArguments", "get_recipe", "resolve_arguments"]


def __getattr__(name: str):
    # `StepLoss` lives with the losses (modeling_alip.loss); imported on use to keep torch out of `--help`.
    if name == "StepLoss":
        from modeling_alip.loss import StepLoss

        return StepLoss
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
