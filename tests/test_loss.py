"""modeling_alip/loss.py: the pair losses (CLIP's softmax, SigLIP's sigmoid) and the step losses that the model and
the recipes both call. The 2-process checks are in test_distributed_loss.py and test_distributed_sigmoid_loss.py."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_alip_config
from open_clip.loss import SigLipLoss

from modeling_alip import ALIPConfig, ALIPModel
from modeling_alip.gates import ALIPGates
from modeling_alip.loss import PAIR_LOSSES, adaptive_loss, contrastive_loss, sigmoid_loss, single_path_loss

EXACT = dict(rtol=0, atol=1e-6)


def _embeds(n=6, d=8, seed=0, requires_grad=False):
    generator = torch.Generator().manual_seed(seed)
    out = [F.normalize(torch.randn(n, d, generator=generator, dtype=torch.float64), dim=-1) for _ in range(3)]
    return [e.requires_grad_(requires_grad) for e in out]


def _direct_sigmoid_loss(image, text, t, b):
    """The paper's formula written out pair by pair: -1/|B| sum_i sum_j log sigmoid(z_ij (t x_i.y_j + b))."""
    n, total = image.shape[0], 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            total = total - F.logsigmoid(z * (t * image[i] @ text[j] + b))
    return total / n


def test_sigmoid_loss_equals_the_papers_formula_and_open_clips_siglip_loss_in_value_and_gradient():
    t, b = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    results = []
    for compute in (lambda i, x: sigmoid_loss(i, x, t, logit_bias=b)[0],
                    lambda i, x: _direct_sigmoid_loss(i, x, t, b),
                    lambda i, x: SigLipLoss()(i, x, t, b)):
        image, text, _ = _embeds(requires_grad=True)
        loss = compute(image, text)
        loss.backward()
        results.append((loss.detach(), image.grad, text.grad))
    ours, direct, open_clip = results
    for reference in (direct, open_clip):
        for a, r in zip(ours, reference):
            torch.testing.assert_close(a, r, **EXACT)
    # float32 as in training, against open_clip
    image, text, _ = (e.float() for e in _embeds())
    torch.testing.assert_close(sigmoid_loss(image, text, 10.0, logit_bias=-10.0)[0],
                               SigLipLoss()(image, text, 10.0, -10.0), **EXACT)


def test_weighted_sigmoid_loss_with_unit_weights_equals_plain_siglip_and_weights_enter_as_documented():
    image, text, _ = _embeds()
    plain, diagnostics = sigmoid_loss(image, text, 10.0, logit_bias=-10.0)
    unit, _ = sigmoid_loss(image, text, 10.0, torch.ones(6, dtype=torch.float64), logit_bias=-10.0)
    torch.testing.assert_close(unit, plain, **EXACT)
    torch.testing.assert_close(diagnostics["unweighted_loss"], plain, **EXACT)
    weights = torch.linspace(0.2, 1.5, 6, dtype=torch.float64)
    weighted, diagnostics = sigmoid_loss(image, text, 10.0, weights, logit_bias=-10.0)
    signs = 2 * torch.eye(6, dtype=torch.float64) - 1
    pairs = -F.logsigmoid(signs * (10.0 * image @ text.T - 10.0))
    torch.testing.assert_close(weighted, (pairs * (weights[:, None] + weights[None, :]) / 2).sum() / 6, **EXACT)
    torch.testing.assert_close(diagnostics["unweighted_loss"], plain, **EXACT)


@pytest.mark.parametrize("name", sorted(PAIR_LOSSES))
def test_local_rows_of_every_process_average_to_the_global_loss(name):
    image, text, _ = _embeds(n=8)
    weights = torch.linspace(0.5, 1.2, 8, dtype=torch.float64)
    bias = -10.0 if name == "siglip" else None
    compute = PAIR_LOSSES[name]
    whole, _ = compute(image, text, 10.0, weights, logit_bias=bias)
    halves = [compute(image, text, 10.0, weights, rows, logit_bias=bias)[0] for rows in (slice(0, 4), slice(4, 8))]
    torch.testing.assert_close((halves[0] + halves[1]) / 2, whole, **EXACT)


def test_each_pair_loss_refuses_the_wrong_bias():
    image, text, _ = _embeds()
    with pytest.raises(ValueError, match="needs logit_bias"):
        sigmoid_loss(image, text, 10.0)
    with pytest.raises(ValueError, match="no bias"):
        contrastive_loss(image, text, 10.0, logit_bias=-10.0)


@pytest.mark.parametrize("name", sorted(PAIR_LOSSES))
def test_adaptive_loss_with_unit_gate_weights_is_the_sum_of_two_plain_paths(name):
    image, text, caption = (e.float() for e in _embeds())
    gates = ALIPGates().train()
    gates.lcg.text_caption.running_mean.fill_(-1.0)  # every sample agrees: W^s = 1 and pair weights 1
    scale, bias = torch.tensor(math.log(10.0)), (torch.tensor(-10.0) if name == "siglip" else None)
    step = adaptive_loss(image, text, caption, scale, gates, bias, name)
    assert torch.all(step.gates.text_weights() == 1) and torch.all(step.gates.caption_weights() == 1)
    for path, embeds in (("text", text), ("caption", caption)):
        plain = single_path_loss(image, embeds, scale, bias, name)
        torch.testing.assert_close(step.parts[path], plain.loss, **EXACT)
        torch.testing.assert_close(step.unweighted[path], plain.loss, **EXACT)
    torch.testing.assert_close(step.loss, step.parts["text"] + step.parts["caption"], **EXACT)


def test_unweighted_losses_are_the_clip_loss_of_the_same_embeddings_whatever_the_gates():
    image, text, caption = (e.float() for e in _embeds())
    scale = torch.tensor(math.log(10.0))
    step = adaptive_loss(image, text, caption, scale, ALIPGates().train())
    assert not torch.allclose(step.parts["text"], step.unweighted["text"])  # the gates weighted this batch
    for path, embeds in (("text", text), ("caption", caption)):
        torch.testing.assert_close(step.unweighted[path], contrastive_loss(image, embeds, 10.0)[0], **EXACT)


# ---- the model: the configured loss, its bias, and its scores ------------------------------------------------


def _siglip_model(**overrides) -> ALIPModel:
    torch.manual_seed(0)
    config = tiny_alip_config(loss="siglip", logit_scale_init_value=math.log(10), **overrides)
    return ALIPModel(config).train()


def _batch(n=4):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49000, (n, 7), generator=generator)
    captions = torch.randint(0, 49000, (n, 5), generator=generator)
    ids[:, -1] = captions[:, -1] = 49407
    return {"input_ids": ids, "caption_input_ids": captions,
            "pixel_values": torch.randn(n, 3, 30, 30, generator=generator)}


def test_a_sigmoid_model_has_siglips_bias_scores_with_it_and_saves_it(tmp_path):
    model = _siglip_model(adaptive_loss=False)
    assert model.logit_bias.item() == -10.0 and model.logit_scale.exp().item() == pytest.approx(10.0)
    assert not hasattr(ALIPModel(tiny_alip_config()), "logit_bias")  # a softmax model has no unused parameter
    batch = {k: v for k, v in _batch().items() if k != "caption_input_ids"}
    output = model(**batch, return_loss=True)
    cosine = output.image_embeds @ output.text_embeds.T
    torch.testing.assert_close(output.logits_per_image, 10.0 * cosine - 10.0, rtol=1e-5, atol=1e-5)
    expected, _ = sigmoid_loss(output.image_embeds, output.text_embeds, model.logit_scale.exp(),
                               logit_bias=model.logit_bias)
    torch.testing.assert_close(output.loss, expected)
    output.loss.backward()
    assert model.logit_bias.grad is not None and model.logit_bias.grad != 0
    with torch.no_grad():
        model.logit_bias.fill_(-3.25)
    model.save_pretrained(tmp_path)
    reloaded = ALIPModel.from_pretrained(tmp_path)
    assert reloaded.config.loss == "siglip" and reloaded.logit_bias.item() == -3.25


def test_a_clip_checkpoint_trained_on_with_the_sigmoid_loss_starts_its_bias_at_minus_ten(tmp_path):
    torch.manual_seed(0)
    ALIPModel(tiny_alip_config()).save_pretrained(tmp_path)
    config = ALIPConfig.from_pretrained(tmp_path, loss="siglip")
    model = ALIPModel.from_pretrained(tmp_path, config=config)
    assert model.logit_bias.item() == -10.0


def test_the_models_alip_sigmoid_loss_is_the_step_loss_the_recipe_computes():
    from alip_hf.recipes import RecipeArguments, get_recipe

    recipe = get_recipe(RecipeArguments(recipe="alip", loss="siglip"))
    model = _siglip_model()
    assert {k: getattr(model.config, k) for k in ("loss", "adaptive_loss")} == {"loss": "siglip", "adaptive_loss": True}
    ours = model(**_batch(), return_loss=True)
    model.gates.load_state_dict(ALIPModel(model.config).gates.state_dict())  # rewind the running means
    embeds = {"image": ours.image_embeds, "text": ours.text_embeds, "caption": ours.caption_embeds}
    theirs = recipe.loss(model, embeds, local_loss=False)
    torch.testing.assert_close(ours.loss, theirs.loss, **EXACT)
    torch.testing.assert_close(ours.loss_caption, theirs.parts["caption"], **EXACT)
