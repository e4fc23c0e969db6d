"""The default mode reproduces the official ALIP training step (gates + adaptive loss) on the golden vectors.

Golden data: `tests/data/alip_official_steps.json`, produced by the official code (layout and tolerances in
`tests/data/GOLDEN_README.md`).
"""

import json
from pathlib import Path

import pytest
import torch

from modeling_alip.gates import ALIPGates
from modeling_alip.loss import contrastive_loss

GOLDEN = json.loads((Path(__file__).parent / "data" / "alip_official_steps.json").read_text())
SCENARIOS = {s["name"]: s for s in GOLDEN["scenarios"]}
SIM = dict(atol=1e-6, rtol=0)
WEIGHT = dict(rtol=1e-5, atol=1e-6)
LOSS = dict(rtol=1e-5, atol=1e-6)
GRAD = dict(rtol=1e-4, atol=1e-6)


def _gates_with_state(state: dict) -> ALIPGates:
    gates = ALIPGates().train()
    gates.lcg.text_caption.running_mean.fill_(state["momentum_sim"])
    gates.dcg.image_text.running_mean.fill_(state["momentum_sim_raw"])
    gates.dcg.image_caption.running_mean.fill_(state["momentum_sim_caption"])
    return gates


def _inputs(step: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    names = ("image_embeddings", "text_embeddings_laion", "text_embeddings_caption")
    return tuple(torch.tensor(step["inputs"][n], dtype=torch.float32) for n in names)


def _alip_step(gates, image, text, caption, logit_scale):
    out = gates(image, text, caption)
    loss_text, _ = contrastive_loss(image, text, logit_scale, out.text_weights())
    loss_caption, _ = contrastive_loss(image, caption, logit_scale, out.caption_weights())
    return out, loss_text, loss_caption


def _close(actual, expected, **tol):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float32), **tol)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_gates_and_adaptive_loss_match_official_every_step(name):
    scenario = SCENARIOS[name]
    gates = _gates_with_state(scenario["initial_state"])
    logit_scale = torch.tensor(scenario["logit_scale"], dtype=torch.float32)
    for step in scenario["steps"]:
        expected = step["outputs"]
        out, loss_text, loss_caption = _alip_step(gates, *_inputs(step), logit_scale)
        _close(out.similarity_text_caption, expected["cur_sim"], **SIM)
        _close(out.similarity_image_text, expected["cur_sim_raw"], **SIM)
        _close(out.similarity_image_caption, expected["cur_sim_caption"], **SIM)
        _close(out.running_mean_text_caption, expected["momentum_sim"], **SIM)
        _close(out.running_mean_image_text, expected["momentum_sim_raw"], **SIM)
        _close(out.running_mean_image_caption, expected["momentum_sim_caption"], **SIM)
        _close(out.sample_weight_raw, expected["weight_sample_raw"], **WEIGHT)
        _close(out.sample_weight, expected["weight_sample"], **WEIGHT)
        _close(out.text_pair_weight, expected["weight_raw"], **WEIGHT)
        _close(out.caption_pair_weight, expected["weight_caption"], **WEIGHT)
        assert out.dcg_applied.tolist() == expected["dcg_applied"]
        _close(loss_text, expected["loss_laion"], **LOSS)
        _close(loss_caption, expected["loss_caption"], **LOSS)
        _close(loss_text + loss_caption, expected["loss"], **LOSS)


def test_running_means_carry_over_between_steps_through_buffers():
    scenario = SCENARIOS[next(iter(SCENARIOS))]
    gates = _gates_with_state(scenario["initial_state"])
    for step in scenario["steps"]:
        gates(*_inputs(step))
    last = scenario["steps"][-1]["outputs"]
    _close(gates.lcg.text_caption.running_mean, last["momentum_sim"], **SIM)
    _close(gates.dcg.image_text.running_mean, last["momentum_sim_raw"], **SIM)
    _close(gates.dcg.image_caption.running_mean, last["momentum_sim_caption"], **SIM)


@pytest.mark.parametrize("check", GOLDEN["gradient_checks"], ids=lambda c: f'{c["scenario"]}-step{c["step"]}')
def test_adaptive_loss_gradients_match_official(check):
    scenario = SCENARIOS[check["scenario"]]
    gates = _gates_with_state(scenario["initial_state"])
    logit_scale = torch.tensor(scenario["logit_scale"], dtype=torch.float32)
    for step in scenario["steps"][: check["step"]]:  # replay earlier steps to reach the step's state
        gates(*_inputs(step))
    image, text, caption = (x.requires_grad_() for x in _inputs(scenario["steps"][check["step"]]))
    _, loss_text, loss_caption = _alip_step(gates, image, text, caption, logit_scale)
    (loss_text + loss_caption).backward()
    _close(image.grad, check["grad_image_embeddings"], **GRAD)
    _close(text.grad, check["grad_text_embeddings_laion"], **GRAD)
    _close(caption.grad, check["grad_text_embeddings_caption"], **GRAD)


def test_gates_do_not_update_in_eval_mode():
    scenario = SCENARIOS[next(iter(SCENARIOS))]
    gates = _gates_with_state(scenario["initial_state"]).eval()
    before = [b.clone() for b in gates.buffers()]
    gates(*_inputs(scenario["steps"][0]))
    assert all(torch.equal(a, b) for a, b in zip(before, gates.buffers()))
