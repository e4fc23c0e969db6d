"""Training recipes: CLIP, ALIP and VeCLIP as strategy objects, looked up once by name.

A recipe owns everything that differs between the three methods:
- its arguments (`RecipeArguments` subclasses; a flag of another recipe is an error, see `resolve_arguments`),
- the text columns it reads and how it draws the text(s) of a sample (`columns`, `text_selector`),
- the embeddings one step needs (`embed`): exact gradient accumulation caches them for all micro-batches and
  replays one micro-batch at a time with gradient (`alip_hf.training.loop.forward_backward`),
- what is computed once per optimizer step on the whole cached batch (`step_state`: ALIP's gates),
- how the loss is formed from the embeddings (`loss`, with `modeling_alip`'s gates and `contrastive_loss`),
- the metrics it logs (`metrics`).
Training looks the recipe up once (`get_recipe`); no other module tests a recipe name. Combinations come from
arguments: ALIP with VeCap as its second text is `--recipe alip --caption_column vecap`; CLIP on synthetic
captions only is `--recipe clip --text_column caption`. Each text path can read several columns, one drawn per
sample with its probability (`--text_column 'alt_text;vecap' --text_column_probs '0.7;0.3'`, `--caption_column
'blip;llava;vecap'`), long ones optionally cut to sub-captions (`alip_hf.text_sources`).

- `clip`: image + one web text (`alt_text`), symmetric InfoNCE (Radford et al. 2021).
- `alip`: image + web text + synthetic caption, bi-path adaptive contrastive loss weighted by the LCG and DCG
  gates (Yang et al., ICCV 2023, arXiv 2308.08428).
- `veclip`: image + one text drawn per sample: the VeCap rewrite with probability `vecap_probability`, else the
  AltText (Lai et al., arXiv 2310.07699, "mixed" training; the paper's best mix is 50/50).

Only numpy is imported at module level (argument parsing and `--help` read this module); torch and
`modeling_alip` are imported where a step runs.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal

import numpy as np

from alip_hf import schema
from alip_hf.sources import is_empty_text
from alip_hf.text_sources import TextPath, TextSource, parse_sources, source_key, split_list

if TYPE_CHECKING:
    import torch

    from modeling_alip import ALIPModel
    from modeling_alip.gates import GateOutput


# ----------------------------------------------------------------------------------------------------------------
# Arguments: the ones every recipe reads, then each recipe's own
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class RecipeArguments:
    """Which method trains the model, and the text column every recipe reads."""

    _argument_group_name = "recipe"

    recipe: Literal["clip", "alip", "veclip"] = field(default="alip", metadata={"help": "Training method."})
    text_column: str = field(default=schema.ALT_TEXT, metadata={
        "help": "Column of the web text (AltText); several separated by ';' (e.g. 'alt_text;vecap'): one drawn per "
                "sample with --text_column_probs (docs/training.md#caption-sources)."})
    text_column_probs: str | None = field(default=None, metadata={
        "help": "Probabilities of the --text_column sources, separated by ';' (default: equal)."})
    text_column_subcaption: str | None = field(default=None, metadata={
        "help": "Sub-caption sampling of the --text_column sources: none, sentence (one random sentence) or sentences "
                "(a random run of sentences); one for all or one per source, separated by ';'."})

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise ValueError(f"--recipe {self.recipe!r} is not one of {sorted(RECIPES)}")
        owner = RECIPES[self.recipe].Arguments
        if type(self) is not RecipeArguments and type(self) is not owner:
            raise ValueError(f"{type(self).__name__} holds arguments of another recipe than --recipe {self.recipe}")
        self.text_path()  # flags checked here, naming them

    def text_path(self) -> TextPath:
        """The web-text path's sources (`--text_column`, `--text_column_probs`, `--text_column_subcaption`)."""
        return TextPath(parse_sources(self.text_column, self.text_column_probs, self.text_column_subcaption,
                                      "--text_column"), name="text")


@dataclass
class AlipArguments(RecipeArguments):
    """Arguments of `--recipe alip`."""

    caption_column: str = field(
        default=schema.CAPTION,
        metadata={"help": "Column of the second text of the bi-path loss (synthetic caption, or vecap); several "
                          "separated by ';' (e.g. 'blip;llava;vecap'): one drawn per sample with "
                          "--caption_column_probs."},
    )
    caption_column_probs: str | None = field(default=None, metadata={
        "help": "Probabilities of the --caption_column sources, separated by ';' (default: equal)."})
    caption_column_subcaption: str | None = field(default=None, metadata={
        "help": "Sub-caption sampling of the --caption_column sources (none, sentence, sentences), one for all or "
                "one per source."})

    def __post_init__(self):
        super().__post_init__()
        self.caption_path()

    def caption_path(self) -> TextPath:
        """ALIP's caption path's sources (`--caption_column`, `--caption_column_probs`, `..._subcaption`)."""
        return TextPath(parse_sources(self.caption_column, self.caption_column_probs, self.caption_column_subcaption,
                                      "--caption_column"), name="caption")


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
        if self.vecap_column in split_list(self.text_column):
            raise ValueError(f"--vecap_column {self.vecap_column!r} is also a --text_column source; give the mix "
                             "with --text_column/--text_column_probs or with --vecap_probability, not both")

    def text_path(self) -> TextPath:
        """VeCLIP's mix as the general case: VeCap with `--vecap_probability`, the `--text_column` sources with
        the rest. VeCap comes first, so that one uniform draw `u < p` picks it, as VeCLIP's rule always has."""
        web = parse_sources(self.text_column, self.text_column_probs, self.text_column_subcaption, "--text_column")
        vecap = TextSource(self.vecap_column, self.vecap_probability)
        return TextPath([vecap, *(replace(s, probability=s.probability * (1 - self.vecap_probability))
                                  for s in web)], name="text")


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
    paths: tuple[TextPath, ...] = ()  # the text paths drawn from; a row is usable when each has a non-empty source

    def usable(self, row: dict) -> bool:
        """Whether the row has a text on every path (else it is skipped and counted as an empty text)."""
        if self.paths:
            return all(path.usable(row) for path in self.paths)
        return not any(is_empty_text(row.get(column)) for column in self.columns.values())


def _path_columns(path: TextPath, role: str) -> dict[str, str]:
    """Role -> column of every source of a path: the first under `role`, the others under `role (column)`."""
    return {(role if k == 0 else f"{role} ({source.column})"): source.column for k, source in enumerate(path.sources)}


@dataclass
class StepLoss:
    """The loss of one optimizer step (the whole global batch) and what its metrics read.

    Attributes:
        loss: `()` the scalar that is back-propagated.
        parts: `()` scalars by name, e.g. `{"text": ..., "caption": ...}` for the two paths of ALIP.
        gates: ALIP's gate values of the global batch (`(N,)` tensors), `None` for recipes without gates.
    """

    loss: torch.Tensor
    parts: dict[str, torch.Tensor]
    gates: GateOutput | None = None


def _mean(x) -> float:
    return float(x.float().mean())


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
        return _path_columns(self.args.text_path(), schema.ALT_TEXT)

    def text_selector(self) -> TextSelector:
        """One text per sample, drawn from the web-text path's sources (`alip_hf.text_sources`)."""
        path = self.args.text_path()

        def select(row: dict, rng: np.random.Generator):
            text, stats = path.draw(row, rng)
            return {"text": text, "caption": None}, stats

        return TextSelector(self.columns(), select, (path,))

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

    def loss(self, core: ALIPModel, embeds: dict[str, torch.Tensor], local_loss: bool, state: Any = None) -> StepLoss:
        """CLIP's symmetric InfoNCE on the global batch (embeddings gathered across processes with gradient).

        Args:
            core: the unwrapped `ALIPModel` (its `logit_scale`).
            embeds: `{"image": (B, D), "text": (B, D)}` local embeddings of the whole step's batch.
            local_loss: loss of this process's rows against the global batch (see `contrastive_loss`).
            state: `step_state`'s result under accumulation, else `None`.
        """
        from modeling_alip.loss import contrastive_loss, gather_features

        # Loss in float32 whatever the autocast dtype, as the official code does (`.float()`).
        (image, text), local_rows = gather_features(embeds["image"].float(), embeds["text"].float())
        logit_scale = core.logit_scale.exp().float()
        loss_text, _ = contrastive_loss(image, text, logit_scale, local_rows=local_rows if local_loss else None)
        return StepLoss(loss_text, {"text": loss_text})

    def metrics(self, output: StepLoss, stats: dict[str, int], num_samples: int) -> dict[str, float]:
        """Scalars to log for one optimizer step (slash-namespaced keys), with the share of each text source."""
        return {"loss/total": output.loss.item(), **{f"loss/{k}": v.item() for k, v in output.parts.items()},
                **self.args.text_path().metrics(stats, num_samples)}

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
    EMBEDDINGS = {"image": "image_embeds", "text": "text_embeds", "caption": "caption_embeds"}

    def columns(self) -> dict[str, str]:
        # The caption's role decides the hint given when it is missing (run recaption.caption or .rewrite).
        caption = self.args.caption_path()
        role = schema.VECAP if caption.columns[0] == schema.VECAP else schema.CAPTION
        columns = {**_path_columns(self.args.text_path(), schema.ALT_TEXT), **_path_columns(caption, role)}
        return columns

    def text_selector(self) -> TextSelector:
        """The web text and the caption of a sample, each drawn from its path's sources (a single source per path,
        the default, draws nothing)."""
        text_path, caption_path = self.args.text_path(), self.args.caption_path()

        def select(row: dict, rng: np.random.Generator):
            text, text_stats = text_path.draw(row, rng)
            caption, caption_stats = caption_path.draw(row, rng)
            return {"text": text, "caption": caption}, {**text_stats, **caption_stats}

        return TextSelector(self.columns(), select, (text_path, caption_path))

    def step_state(self, core, embeds):
        """The gates of the whole accumulated global batch: one running-mean update per optimizer step.

        Deviation: the official code accumulates per micro-batch and so updates the running means every
        micro-step, on fewer samples.
        """
        from modeling_alip.loss import gather_features

        gathered, _ = gather_features(*(embeds[name].float() for name in ("image", "text", "caption")))
        return core.gates(*gathered)

    def loss(self, core, embeds, local_loss, state=None) -> StepLoss:
        """`loss_text + loss_caption`, each `contrastive_loss` weighted by `W^s * W^t` and `W^s * W^c`.

        Without a `state` the gates run here, on the gathered embeddings (updating their running means in
        training mode), as in the official code.
        """
        from modeling_alip.loss import contrastive_loss, gather_features

        # Loss and gates in float32 whatever the autocast dtype, as the official code does (`.float()`).
        gathered, local_rows = gather_features(*(embeds[name].float() for name in ("image", "text", "caption")))
        image, text, caption = gathered
        rows = local_rows if local_loss else None
        logit_scale = core.logit_scale.exp().float()
        gates = state if state is not None else core.gates(image, text, caption)
        loss_text, _ = contrastive_loss(image, text, logit_scale, gates.text_weights(), rows)
        loss_caption, _ = contrastive_loss(image, caption, logit_scale, gates.caption_weights(), rows)
        return StepLoss(loss_text + loss_caption, {"text": loss_text, "caption": loss_caption}, gates)

    def metrics(self, output, stats, num_samples):
        g = output.gates
        return {
            **super().metrics(output, stats, num_samples),
            **self.args.caption_path().metrics(stats, num_samples),
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
        web = TextPath(parse_sources(self.args.text_column, self.args.text_column_probs,
                                     self.args.text_column_subcaption, "--text_column"))
        return {**_path_columns(web, schema.ALT_TEXT), schema.VECAP: self.args.vecap_column}

    def text_selector(self) -> TextSelector:
        path, vecap_key = self.args.text_path(), f"text_source/{source_key(self.args.vecap_column)}"

        def select(row: dict, rng: np.random.Generator):
            # Drawn from the sample's own generator: the same choice after a resume or on another process. An
            # empty VeCap (or AltText) falls back to the other text, counted (`data/text_source/fallback_fraction`).
            text, stats = path.draw(row, rng)
            return {"text": text, "caption": None}, {**stats, "vecap_drawn": stats.get(vecap_key, 0)}

        return TextSelector(self.columns(), select, (path,))

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
