"""ALIP: a CLIP model whose one text tower reads both the raw web text and a synthetic caption.

`ALIPModel` is transformers' `CLIPModel` (same modules, same weight names, same `get_text_features` and
`get_image_features`) plus the two consistency gates, whose running means are buffers. Without captions
it is a plain CLIP model; with captions it computes the bi-path adaptive contrastive loss.
"""

from dataclasses import dataclass

import torch
from transformers import CLIPModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_alip import ALIPConfig
from .gates import ALIPGates, GateOutput, RunningMeanSimilarity
from .loss import contrastive_loss, gather_features


@dataclass
class ALIPOutput(ModelOutput):
    r"""
    Output of [`ALIPModel.forward`]. `N` is the global batch (all processes), `B` the local one.

    Args:
        loss (`torch.FloatTensor` of shape `()`): `loss_text + loss_caption` (only `loss_text` without captions).
        loss_text (`torch.FloatTensor` of shape `()`): adaptive contrastive loss of the (image, raw text) path.
        loss_caption (`torch.FloatTensor` of shape `()`): adaptive contrastive loss of the (image, caption) path.
        logits_per_image (`torch.FloatTensor` of shape `(B, B)`): scaled image-raw text cosine similarities.
        logits_per_text (`torch.FloatTensor` of shape `(B, B)`): the transpose of `logits_per_image`.
        image_embeds, text_embeds, caption_embeds (`torch.FloatTensor` of shape `(B, projection_dim)`):
            L2-normalised embeddings of the image, the raw text and the caption.
        gates ([`GateOutput`]): gate weights, similarities and running means of the global batch (`(N,)`).
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

    def _init_weights(self, module):
        super()._init_weights(module)
        # Keyed on the module that owns the buffer: transformers initialises a module only if it owns tensors,
        # so running means missing from a loaded CLIP checkpoint start at their initial value.
        if isinstance(module, RunningMeanSimilarity):
            init.constant_(module.running_mean, self.config.gate_initial_mean)

    def encode_text(self, input_ids, attention_mask=None, name="input_ids") -> torch.Tensor:
        """`(B, L)` token ids -> `(B, projection_dim)` L2-normalised text embeddings."""
        self._check_end_token(input_ids, name)
        features = self.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return features / features.norm(dim=-1, keepdim=True)

    def encode_image(self, pixel_values) -> torch.Tensor:
        """`(B, 3, H, W)` pixels -> `(B, projection_dim)` L2-normalised image embeddings."""
        features = self.get_image_features(pixel_values=pixel_values).pooler_output
        return features / features.norm(dim=-1, keepdim=True)

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

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        caption_input_ids: torch.LongTensor | None = None,
        caption_attention_mask: torch.Tensor | None = None,
        return_loss: bool | None = None,
        local_loss: bool = False,
        **kwargs,
    ) -> ALIPOutput:
        """Encodes the image once and both text paths with the shared text tower.

        Args:
            input_ids, attention_mask: `(B, L)` raw web text.
            pixel_values: `(B, 3, H, W)`.
            caption_input_ids, caption_attention_mask: `(B, L')` synthetic caption (optional).
            return_loss: compute the loss (the gates update their running means in training mode).
            local_loss: loss of local rows against the global batch (see [`contrastive_loss`]).
        """
        self._check_inputs(input_ids, pixel_values, attention_mask, caption_input_ids, caption_attention_mask)
        image_embeds = self.encode_image(pixel_values)
        text_embeds = self.encode_text(input_ids, attention_mask)
        caption_embeds = None
        if caption_input_ids is not None:
            caption_embeds = self.encode_text(caption_input_ids, caption_attention_mask, "caption_input_ids")
        logit_scale = self.logit_scale.exp()
        logits_per_image = logit_scale * image_embeds @ text_embeds.T
        output = ALIPOutput(
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_image.T,
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            caption_embeds=caption_embeds,
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
    def _check_inputs(input_ids, pixel_values, attention_mask, caption_input_ids, caption_attention_mask):
        if input_ids is None or pixel_values is None:
            raise ValueError("ALIPModel.forward needs both `input_ids` and `pixel_values`")
        sizes = {"input_ids": input_ids.shape[0], "pixel_values": pixel_values.shape[0]}
        if caption_input_ids is not None:
            sizes["caption_input_ids"] = caption_input_ids.shape[0]
            if attention_mask is not None and caption_attention_mask is None:
                raise ValueError(
                    "`caption_input_ids` was given without `caption_attention_mask` while `input_ids` has an "
                    "`attention_mask`: pass the caption's mask too (ALIPProcessor returns it)"
                )
        for name, mask, ids in (("attention_mask", attention_mask, input_ids),
                                ("caption_attention_mask", caption_attention_mask, caption_input_ids)):
            if mask is not None and ids is not None and mask.shape != ids.shape:
                raise ValueError(f"{name} has shape {tuple(mask.shape)} but its ids have {tuple(ids.shape)}")
        if len(set(sizes.values())) > 1:
            raise ValueError(f"batch sizes differ between inputs: {sizes}")


__all__ = ["ALIPModel", "ALIPOutput"]
