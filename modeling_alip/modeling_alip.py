"""ALIP: a CLIP model whose one text tower reads both the raw web text and a synthetic caption.

`ALIPModel` is transformers' `CLIPModel` (same modules, same weight names, same `get_text_features` and
`get_image_features`) plus the two consistency gates, whose running means are buffers. Its loss is the one
its configuration names (`config.loss`, `config.adaptive_loss`): ALIP's bi-path adaptive loss by default, CLIP's
or SigLIP's single-path loss otherwise, assembled by `modeling_alip.loss` as training assembles it.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import CLIPModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.processing_utils import Unpack
from transformers.utils import (
    ModelOutput,
    TransformersKwargs,
    can_return_tuple,
    logging,
)

from .configuration_alip import ALIPConfig
from .gates import ALIPGates, GateOutput, RunningMeanSimilarity
from .long_text import LONG_CLIP_KEPT_POSITIONS, LONG_CLIP_RULE, stretch_position_embeddings
from .loss import StepLoss, adaptive_loss, single_path_loss
from .processing_alip import missing_processor_files

logger = logging.get_logger(__name__)

# The keywords transformers passes to every model (attention outputs, hidden states, ...), as CLIPModel takes them.
_MODEL_KEYWORDS = frozenset(TransformersKwargs.__annotations__)


@dataclass
class ALIPOutput(ModelOutput):
    r"""
    Output of [`ALIPModel.forward`]. `N` is the global batch (all processes), `B` the local one.

    Args:
        loss (`torch.FloatTensor` of shape `()`): `loss_text + loss_caption` (ALIP's adaptive loss), or `loss_text`
            (`config.adaptive_loss=False`).
        loss_text (`torch.FloatTensor` of shape `()`): loss of the (image, raw text) path (gate-weighted for ALIP).
        loss_caption (`torch.FloatTensor` of shape `()`): gate-weighted loss of the (image, caption) path.
        logits_per_image (`torch.FloatTensor` of shape `(B, M)`): scaled image-text cosine similarities (`M = B`
            in training; `M` candidate texts at inference), plus `logit_bias` for a sigmoid-loss model (as
            `SiglipModel`: `sigmoid(logits_per_image)` is then the probability that a text matches).
        logits_per_text (`torch.FloatTensor` of shape `(M, B)`): the transpose of `logits_per_image`.
        image_embeds (`torch.FloatTensor` of shape `(B, projection_dim)`), text_embeds (`(M, projection_dim)`),
        caption_embeds (`(B, projection_dim)`): L2-normalised embeddings of the image, the raw text and the caption.
        gates ([`GateOutput`]): gate weights, similarities and running means of the global batch (`(N,)`).
        text_model_output, vision_model_output ([`BaseModelOutputWithPooling`]): the towers' outputs, as in
            `CLIPOutput`, only when `output_hidden_states` or `output_attentions` is asked for.
    """

    loss: torch.FloatTensor | None = None
    loss_text: torch.FloatTensor | None = None
    loss_caption: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    caption_embeds: torch.FloatTensor | None = None
    gates: GateOutput | None = None
    text_model_output: BaseModelOutputWithPooling | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None

    def to_tuple(self) -> tuple:
        return tuple(v.to_tuple() if isinstance(v, ModelOutput) else v for v in self.values())


# Modules that hold training state outside any weight matrix: the gates' running means (buffers). An adapter
# library that saves only adapter weights (peft's LoRA) must also save these, e.g. as `modules_to_save`.
GATE_MODULES = ("gates",)

# Auto classes under which a saved ALIP model loads with `trust_remote_code=True` (written to `auto_map`).
REMOTE_CODE_AUTO_CLASSES = ("AutoModel", "AutoModelForZeroShotImageClassification")
class ALIPModel(CLIPModel):
    """CLIP towers + ALIP gates. Weight names are `CLIPModel`'s, so CLIP checkpoints load directly."""

    config_class = ALIPConfig
    config: ALIPConfig

    def __init__(self, config: ALIPConfig):
        super().__init__(config)
        self.gates = ALIPGates(
            momentum=config.gate_momentum,
            lcg_gamma=config.lcg_gamma,
            dcg_gamma=config.dcg_gamma,
            initial_mean=config.gate_initial_mean,
            clip_pair_weights=config.clip_pair_weights,
        )
        # The sigmoid loss's learnable bias (transformers' SiglipModel and open_clip name it so). Only a model
        # trained with that loss has it: an unused parameter would get no gradient, which DDP rejects.
        if config.loss == "siglip":
            self.logit_bias = nn.Parameter(torch.tensor(float(config.logit_bias_init_value)))

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, with every Auto class ALIP serves in the saved `auto_map`.

        `register_for_auto_class` records one Auto class per model class (`AutoModel`); the zero-shot pipeline
        loads `AutoModelForZeroShotImageClassification`, which needs its own entry to work with
        `trust_remote_code=True` where this package is not installed.
        """
        module = type(self).__module__.rsplit(".", 1)[-1]  # the file name, also under remote code
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        for auto_class in REMOTE_CODE_AUTO_CLASSES:
            auto_map.setdefault(auto_class, f"{module}.{type(self).__name__}")
        self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, warning when a local directory holds no processor.

        transformers' `pipeline` and `AutoProcessor` load the image processor and tokenizer from the model's
        directory; without them the pipeline fails inside the tokenizer, far from the cause.
        """
        missing = missing_processor_files(pretrained_model_name_or_path)
        if missing:
            logger.warning("%s has no processor (missing %s): pipeline() and AutoProcessor need one; save it with "
                           "processor.save_pretrained(model_dir)", pretrained_model_name_or_path, " and ".join(missing))
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def _init_weights(self, module):
        super()._init_weights(module)
        # Keyed on the module that owns the buffer: transformers initialises a module only if it owns tensors,
        # so running means missing from a loaded CLIP checkpoint start at their initial value.
        if isinstance(module, RunningMeanSimilarity):
            init.constant_(module.running_mean, self.config.gate_initial_mean)
        # A bias missing from the loaded checkpoint (a CLIP model trained on with the sigmoid loss) starts at
        # SigLIP's initial value.
        if isinstance(module, ALIPModel) and getattr(module, "logit_bias", None) is not None:
            init.constant_(module.logit_bias, self.config.logit_bias_init_value)

    @torch.no_grad()
    def stretch_text_positions(self, new_length: int, kept_positions: int = LONG_CLIP_KEPT_POSITIONS) -> None:
        """Gives the text tower `new_length` positions by Long-CLIP's knowledge-preserved stretching
        ([`stretch_position_embeddings`]: the first `kept_positions` kept, the rest interpolated), and records the
        rule in `config.text_position_stretch`. Texts of at most `kept_positions` tokens keep their features.

        For a model loaded from a shorter checkpoint; a model built from a config simply has
        `text_config.max_position_embeddings` positions, and a stretched model saved and reloaded keeps its length.
        """
        if self.config.text_position_stretch is not None:
            raise ValueError(f"the text positions were already stretched ({self.config.text_position_stretch}); "
                             "stretch the original checkpoint once, to the final length")
        embeddings = self.text_model.embeddings
        old = embeddings.position_embedding
        length = old.num_embeddings
        stretched = nn.Embedding(new_length, old.embedding_dim, device=old.weight.device, dtype=old.weight.dtype)
        stretched.weight.copy_(stretch_position_embeddings(old.weight, new_length, kept_positions))
        stretched.weight.requires_grad_(old.weight.requires_grad)
        embeddings.position_embedding = stretched
        embeddings.position_ids = nn.Buffer(torch.arange(new_length, device=old.weight.device).expand((1, -1)),
                                            persistent=False)
        self.config.text_config.max_position_embeddings = new_length
        self.config.text_position_stretch = {"rule": LONG_CLIP_RULE, "original_length": length,
                                             "kept_positions": kept_positions}

    def encode_text(self, input_ids, attention_mask=None, name="input_ids", position_ids=None) -> torch.Tensor:
        """`(B, L)` token ids -> `(B, projection_dim)` L2-normalised text embeddings."""
        return self._text_embeds(input_ids, attention_mask, position_ids, name)[0]

    def encode_image(self, pixel_values, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """`(B, 3, H, W)` pixels -> `(B, projection_dim)` L2-normalised image embeddings."""
        return self._image_embeds(pixel_values, interpolate_pos_encoding)[0]

    def _text_embeds(self, input_ids, attention_mask, position_ids, name, **kwargs):
        """Normalised text embeddings and the text tower's output (`get_text_features`, projected pooler)."""
        if input_ids.shape[0] == 0:
            raise ValueError(f"{name} has no rows: there is no text to embed (a zero-shot call needs candidate labels)")
        self._check_end_token(input_ids, name)
        outputs = self.get_text_features(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                         **kwargs)
        features = outputs.pooler_output
        return features / features.norm(dim=-1, keepdim=True), outputs

    def _image_embeds(self, pixel_values, interpolate_pos_encoding, **kwargs):
        """Normalised image embeddings and the vision tower's output (`get_image_features`, projected pooler)."""
        outputs = self.get_image_features(pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding,
                                          **kwargs)
        features = outputs.pooler_output
        return features / features.norm(dim=-1, keepdim=True), outputs

    def _check_end_token(self, input_ids: torch.Tensor, name: str):
        # CLIP pools the hidden state at the first end token; a row without one would silently pool token 0.
        eos = self.config.text_config.eos_token_id
        if eos == 2:  # legacy configs pool at argmax(input_ids), see transformers' CLIPTextModel
            return
        missing = ~(input_ids == eos).any(dim=1)
        if missing.any():
            rows = missing.nonzero().flatten().tolist()[:8]
            raise ValueError(
                f"{name}: rows {rows} have no end token (id {eos}); tokenize with truncation that keeps the end "
                "token (ALIPProcessor does)"
            )

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        return_loss: bool | None = None,
        interpolate_pos_encoding: bool = False,
        caption_input_ids: torch.LongTensor | None = None,
        caption_attention_mask: torch.Tensor | None = None,
        caption_position_ids: torch.LongTensor | None = None,
        local_loss: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ALIPOutput:
        """`CLIPModel.forward`'s arguments plus the caption path: encodes the image once and both text paths
        with the shared text tower.

        Without captions and loss this is CLIP's call: `N` images against `M` texts, `logits_per_image` of
        shape `(N, M)` (what the zero-shot pipeline does). A training batch (captions, or `return_loss=True`)
        pairs row `i` of every input, so all must have the same `B` rows. The loss is the configuration's
        (`config.adaptive_loss`, `config.loss`), never inferred from which inputs are given: ALIP's adaptive
        loss needs the captions, and a single-path loss refuses them rather than silently ignore them.

        Args:
            input_ids, attention_mask, position_ids: `(M, L)` raw web text (or class prompts).
            pixel_values: `(N, 3, H, W)`.
            return_loss: compute the loss (ALIP's gates update their running means in training mode).
            interpolate_pos_encoding: as in `CLIPModel` (images larger than the training size).
            caption_input_ids, caption_attention_mask, caption_position_ids: `(B, L')` synthetic caption (optional).
            local_loss: loss of local rows against the global batch (see [`contrastive_loss`]).
            kwargs: transformers' model keywords (`output_attentions`, `output_hidden_states`, ...); any other
                keyword is a `TypeError`, so a misspelt argument never goes unnoticed.
        """
        self._check_keywords(kwargs)
        self._check_inputs(input_ids, pixel_values, attention_mask, caption_input_ids, caption_attention_mask,
                           paired=return_loss or caption_input_ids is not None)
        image_embeds, vision_outputs = self._image_embeds(pixel_values, interpolate_pos_encoding, **kwargs)
        text_embeds, text_outputs = self._text_embeds(input_ids, attention_mask, position_ids, "input_ids", **kwargs)
        caption_embeds = None
        if caption_input_ids is not None:
            caption_embeds, _ = self._text_embeds(caption_input_ids, caption_attention_mask, caption_position_ids,
                                                  "caption_input_ids", **kwargs)
        logits_per_image = self.logit_scale.exp() * image_embeds @ text_embeds.T
        if self.config.loss == "siglip":
            logits_per_image = logits_per_image + self.logit_bias
        # The towers' full outputs only when asked for: the training loop caches the outputs of every
        # micro-batch, and their last hidden states would hold `(B, L, width)` activations per micro-batch.
        keep_towers = kwargs.get("output_hidden_states") or kwargs.get("output_attentions")
        output = ALIPOutput(
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_image.T,
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            caption_embeds=caption_embeds,
            text_model_output=text_outputs if keep_towers else None,
            vision_model_output=vision_outputs if keep_towers else None,
        )
        if return_loss:
            self.compute_loss(output, local_loss=local_loss)
        return output

    def compute_loss(self, output: ALIPOutput, local_loss: bool = False, gates: GateOutput | None = None) -> ALIPOutput:
        """Fills `output`'s losses from its embeddings with the configuration's step loss (`modeling_alip.loss`).

        Args:
            output: an [`ALIPOutput`] with local embeddings.
            local_loss: see [`contrastive_loss`].
            gates: precomputed gate values of the global batch (gradient accumulation computes them once on
                the whole cached batch); by default the gates run on the gathered embeddings, as in the
                official code.
        """
        self._check_paired_embeds(output)
        step = self.step_loss({"image": output.image_embeds, "text": output.text_embeds,
                               "caption": output.caption_embeds}, local_loss, gates)
        output.loss, output.loss_text, output.loss_caption = step.loss, step.parts["text"], step.parts.get("caption")
        output.gates = step.gates
        return output

    def step_loss(self, embeds: dict[str, torch.Tensor | None], local_loss: bool = False,
                  gates: GateOutput | None = None) -> StepLoss:
        """The configured step loss of `{"image", "text", "caption"}` local `(B, D)` embeddings (see
        [`modeling_alip.loss.adaptive_loss`] and [`modeling_alip.loss.single_path_loss`])."""
        bias = self.logit_bias if self.config.loss == "siglip" else None
        if not self.config.adaptive_loss:
            if embeds.get("caption") is not None:
                raise ValueError("this model's loss reads one text path (config.adaptive_loss=False): "
                                 "caption_input_ids would not enter it; leave them out, or set "
                                 "config.adaptive_loss=True for ALIP's bi-path loss")
            return single_path_loss(embeds["image"], embeds["text"], self.logit_scale, bias, self.config.loss,
                                    local_loss)
        if embeds.get("caption") is None:
            raise ValueError("this model's loss is ALIP's bi-path adaptive loss (config.adaptive_loss=True), "
                             "which needs caption_input_ids; for CLIP's single-path loss set "
                             "config.adaptive_loss=False")
        return adaptive_loss(embeds["image"], embeds["text"], embeds["caption"], self.logit_scale,
                             gates if gates is not None else self.gates, bias, self.config.loss, local_loss)

    def loss_parameters(self) -> list[nn.Parameter]:
        """The parameters the loss reads directly, not through the embeddings (temperature and bias)."""
        return [self.logit_scale, *([self.logit_bias] if self.config.loss == "siglip" else [])]

    @staticmethod
    def _check_keywords(kwargs: dict):
        unknown = sorted(set(kwargs) - _MODEL_KEYWORDS)
        if unknown:
            raise TypeError(
                f"ALIPModel.forward() got unexpected keyword argument(s) {unknown}; it takes CLIPModel.forward's "
                f"arguments, caption_input_ids / caption_attention_mask / caption_position_ids, local_loss and "
                f"transformers' model keywords {sorted(_MODEL_KEYWORDS)}"
            )

    @staticmethod
    def _check_inputs(input_ids, pixel_values, attention_mask, caption_input_ids, caption_attention_mask, paired):
        if input_ids is None or pixel_values is None:
            raise ValueError("ALIPModel.forward needs both `input_ids` and `pixel_values`")
        if caption_input_ids is not None and attention_mask is not None and caption_attention_mask is None:
            raise ValueError(
                "`caption_input_ids` was given without `caption_attention_mask` while `input_ids` has an "
                "`attention_mask`: pass the caption's mask too (ALIPProcessor returns it)"
            )
        for name, mask, ids in (("attention_mask", attention_mask, input_ids),
                                ("caption_attention_mask", caption_attention_mask, caption_input_ids)):
            if mask is not None and ids is not None and mask.shape != ids.shape:
                raise ValueError(f"{name} has shape {tuple(mask.shape)} but its ids have {tuple(ids.shape)}")
        if not paired:  # CLIP's N images x M texts
            return
        sizes = {"input_ids": input_ids.shape[0], "pixel_values": pixel_values.shape[0]}
        if caption_input_ids is not None:
            sizes["caption_input_ids"] = caption_input_ids.shape[0]
        if len(set(sizes.values())) > 1:
            raise ValueError(
                f"batch sizes differ between inputs: {sizes}; a training batch (captions or return_loss=True) "
                "pairs row i of every input"
            )

    @staticmethod
    def _check_paired_embeds(output: ALIPOutput):
        sizes = {"image_embeds": len(output.image_embeds), "text_embeds": len(output.text_embeds)}
        if output.caption_embeds is not None:
            sizes["caption_embeds"] = len(output.caption_embeds)
        if len(set(sizes.values())) > 1:
            raise ValueError(f"the loss pairs row i of every input, but the batch sizes differ: {sizes}")


__all__ = ["GATE_MODULES", "ALIPModel", "ALIPOutput"]
