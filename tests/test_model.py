"""ALIPModel: a CLIP model with one shared text tower, gates and the adaptive loss."""

import pytest
import torch
from conftest import tiny_alip_config
from transformers import CLIPConfig, CLIPModel

from modeling_alip import ALIPModel, contrastive_loss

EOS = 49407


def _batch(batch_size=4, text_len=9, caption_len=6, image_size=30, seed=0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 49000, (batch_size, text_len), generator=generator)
    caption_input_ids = torch.randint(0, 49000, (batch_size, caption_len), generator=generator)
    input_ids[:, -1] = caption_input_ids[:, -1] = EOS
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "caption_input_ids": caption_input_ids,
        "caption_attention_mask": torch.ones_like(caption_input_ids),
        "pixel_values": torch.randn(batch_size, 3, image_size, image_size, generator=generator),
    }


def test_adaptive_loss_with_unit_weights_equals_clip_loss():
    generator = torch.Generator().manual_seed(0)
    image, text = (torch.nn.functional.normalize(torch.randn(6, 8, generator=generator), dim=-1) for _ in range(2))
    weighted, _ = contrastive_loss(image, text, 14.3, torch.ones(6))
    plain, _ = contrastive_loss(image, text, 14.3)
    logits = 14.3 * image @ text.T
    labels = torch.arange(6)
    reference = (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels)) / 2
    torch.testing.assert_close(weighted, reference)
    torch.testing.assert_close(plain, reference)


def test_without_captions_the_model_is_clip_with_the_same_loss_and_features(tiny_model):
    batch = _batch()
    clip = CLIPModel(CLIPConfig(**{k: v for k, v in tiny_model.config.to_dict().items() if k in ("text_config", "vision_config", "projection_dim")}))
    missing, unexpected = clip.load_state_dict(tiny_model.state_dict(), strict=False)
    assert not missing and all(k.startswith("gates.") for k in unexpected)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    ours = tiny_model(**inputs, return_loss=True)
    theirs = clip(**inputs, return_loss=True)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.logits_per_image, theirs.logits_per_image, rtol=1e-5, atol=1e-5)
    assert ours.loss_caption is None and ours.gates is None


def test_bi_path_loss_is_sum_of_text_and_caption_terms_and_reaches_every_tower(tiny_model):
    output = tiny_model.train()(**_batch(), return_loss=True)
    torch.testing.assert_close(output.loss, output.loss_text + output.loss_caption)
    output.loss.backward()
    for name in ("vision_model.embeddings.patch_embedding.weight", "text_model.embeddings.token_embedding.weight",
                 "visual_projection.weight", "text_projection.weight", "logit_scale"):
        assert tiny_model.get_parameter(name).grad.abs().sum() > 0, name


def test_gate_running_means_update_in_train_mode_only_and_are_saved(tiny_model, tmp_path):
    means = lambda m: torch.stack([b.clone() for n, b in m.named_buffers() if "running_mean" in n])
    tiny_model.eval()(**_batch(), return_loss=True)
    assert torch.equal(means(tiny_model), torch.ones(3))
    tiny_model.train()(**_batch(), return_loss=True)
    updated = means(tiny_model)
    assert not torch.equal(updated, torch.ones(3))
    tiny_model.save_pretrained(tmp_path)
    torch.testing.assert_close(means(ALIPModel.from_pretrained(tmp_path)), updated, rtol=0, atol=0)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_attention_backends_and_gradient_checkpointing_give_the_same_loss(attn_implementation):
    torch.manual_seed(0)
    reference = ALIPModel(tiny_alip_config()).eval()
    model = ALIPModel._from_config(tiny_alip_config(), attn_implementation=attn_implementation)
    model.load_state_dict(reference.state_dict())
    model.activation_checkpointing_enable()
    assert model.text_model.encoder.gradient_checkpointing
    batch = _batch()
    # Both in train mode: checkpointing is active and the gates update from the same running means.
    expected = reference.train()(**batch, return_loss=True).loss
    loss = model.train()(**batch, return_loss=True).loss
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)
    loss.backward()
    assert model.text_projection.weight.grad is not None


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda b: b.update(caption_input_ids=b["caption_input_ids"][:3], caption_attention_mask=b["caption_attention_mask"][:3]), "batch sizes differ"),
        (lambda b: b.update(pixel_values=b["pixel_values"][:2]), "batch sizes differ"),
        (lambda b: b.pop("caption_attention_mask"), "caption_attention_mask"),
        (lambda b: b["input_ids"].__setitem__((1, -1), 5), "input_ids: rows [1] have no end token"),
        (lambda b: b["caption_input_ids"].__setitem__((2, -1), 5), "caption_input_ids: rows [2] have no end token"),
        (lambda b: b.update(pixel_values=torch.randn(4, 3, 32, 32)), "Input image size"),
        (lambda b: b.update(attention_mask=b["attention_mask"][:, :3]), "attention_mask has shape"),
    ],
    ids=["caption-batch", "image-batch", "caption-without-mask", "text-without-end", "caption-without-end",
         "image-size", "mask-shape"],
)
def test_bad_input_gets_an_error_naming_it(tiny_model, change, message):
    batch = _batch()
    change(batch)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        tiny_model(**batch, return_loss=True)


def test_precomputed_gates_give_the_same_loss_without_updating_twice(tiny_model):
    batch = _batch()
    tiny_model.train()
    output = tiny_model(**{k: v for k, v in batch.items()}, return_loss=False)
    gates = tiny_model.gates(output.image_embeds, output.text_embeds, output.caption_embeds)
    before = tiny_model.gates.lcg.text_caption.running_mean.clone()
    tiny_model.compute_loss(output, gates=gates)
    assert torch.equal(before, tiny_model.gates.lcg.text_caption.running_mean)
    torch.testing.assert_close(output.gates.sample_weight, gates.sample_weight)


def _lora_round_trip(base_dir, config, tmp_path):
    """Applies peft to a saved model, takes one training step, saves the adapter, reloads it onto the base model
    and merges it. Returns the trained and the merged running means."""
    from peft import PeftModel, get_peft_model

    model = get_peft_model(ALIPModel.from_pretrained(base_dir), config).train()
    ids = torch.randint(0, 49406, (4, 6), generator=torch.Generator().manual_seed(0))
    ids[:, -1] = 49407
    model(input_ids=ids, pixel_values=torch.randn(4, 3, 30, 30), caption_input_ids=ids.flip(0), return_loss=True)
    trained = {k.split("gates.")[-1].replace("modules_to_save.default.", ""): v.clone()
               for k, v in model.state_dict().items() if "running_mean" in k and "original_module" not in k}
    model.save_pretrained(tmp_path / "adapter")
    merged = PeftModel.from_pretrained(ALIPModel.from_pretrained(base_dir), tmp_path / "adapter").merge_and_unload()
    return trained, {k.split("gates.")[-1]: v for k, v in merged.state_dict().items() if "running_mean" in k}


def test_peft_adapter_from_lora_config_carries_the_gates_running_means(tiny_model, tmp_path):
    from peft import LoraConfig

    from alip_hf.models import lora_config

    tiny_model.save_pretrained(tmp_path / "base")
    config = lora_config(r=4, target_modules=["q_proj", "v_proj"])
    assert "gates" in config.modules_to_save
    trained, merged = _lora_round_trip(tmp_path / "base", config, tmp_path / "with")
    assert trained.keys() == merged.keys() and len(trained) == 3
    assert all(trained[k].item() != 1.0 for k in trained)  # the step moved every mean
    for name in trained:
        assert torch.equal(merged[name], trained[name]), name
    # The reason: a plain LoraConfig saves no buffer, so the merged model has the base model's means back.
    trained, merged = _lora_round_trip(tmp_path / "base", LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
                                       tmp_path / "plain")
    assert all(merged[k].item() == 1.0 != trained[k].item() for k in trained)
