"""ALIP: a CLIP model whose one text tower reads both the raw web text and a synthetic caption.

`ALIPModel` is transformers' `CLIPModel` (same modules, same weight names, same `get_text_features` and
`get_image_features`) plus the two consistency gates, whose running means are buffers. Without captions
it is a plain CLIP model; with captions it computes the bi-path adaptive contrastive loss.
"""

from dataclasses import dataclass

import torch
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
from .loss import contrastive_loss, gather_features
from .processing_alip import missing_processor_files

logger = logging.get_logger(__name__)

# The keywords transformers passes to every model (attention outputs, hidden states, ...), as CLIPModel takes them.
_MODEL_KEYWORDS = frozenset(TransformersKwargs.__annotations__)


@dataclass
class ALIPOutput(ModelOutput):
    r"""
    Output of [`ALIPModel.forward`]. `N` is the global batch (all processes), `B` the local one.

    Args:
        loss (`torch.FloatTensor` of shape `()`): `loss_text + loss_caption` (only `loss_text` without captions).
        loss_text (`torch.FloatTensor` of shape `()`): adaptive contrastive loss of the (image, raw text) path.
        loss_caption (`torch.FloatTensor` of shape `()`): adaptive contrastive loss of the (image, caption) path.
        logits_per_image (`torch.FloatTensor` of shape `(B, M)`): scaled image-text cosine similarities (`M = B`
            in training; `M` candidate texts at inference).
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
        pairs row `i` of every input, so all must have the same `B` rows.

        Args:
            input_ids, attention_mask, position_ids: `(M, L)` raw web text (or class prompts).
            pixel_values: `(N, 3, H, W)`.
            return_loss: compute the loss (the gates update their running means in training mode).
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
        logit_scale = self.logit_scale.exp()
        logits_per_image = logit_scale * image_embeds @ text_embeds.T
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
        """Fills `output`'s losses from its embeddings: gather once, gate, and one loss per text path.

        Args:
            output: an [`ALIPOutput`] with local embeddings.
            local_loss: see [`contrastive_loss`].
            gates: precomputed gate values of the global batch (gradient accumulation computes them once on
                the whole cached batch); by default the gates run here, on the gathered embeddings, as in the
                official code.
        """
        self._check_paired_embeds(output)
        embeds = [output.image_embeds, output.text_embeds]
        if output.caption_embeds is not None:
            embeds.append(output.caption_embeds)
        # Loss and gates in float32 whatever the autocast dtype, as the official code does (`.float()`).
        gathered, local_rows = gather_features(*(e.float() for e in embeds))
        rows = local_rows if local_loss else None
        logit_scale = self.logit_scale.exp().float()
        if output.caption_embeds is None:
            output.loss_text, _ = contrastive_loss(gathered[0], gathered[1], logit_scale, local_rows=rows)
            output.loss = output.loss_text
            return output
        image, text, caption = gathered
        output.gates = gates if gates is not None else self.gates(image, text, caption)
        output.loss_text, _ = contrastive_loss(image, text, logit_scale, output.gates.text_weights(), rows)
        output.loss_caption, _ = contrastive_loss(image, caption, logit_scale, output.gates.caption_weights(), rows)
        output.loss = output.loss_text + output.loss_caption
        return output

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
