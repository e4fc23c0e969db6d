"""Recipes (alip_hf/recipes.py): the registry, per-recipe arguments, the columns each reads, how texts are drawn,
how each forms its loss from the embeddings, and that no other module names a recipe."""

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

from alip_hf import data, recipes
from alip_hf.recipes import AlipArguments, RecipeArguments, VeclipArguments, get_recipe
from alip_hf.training.arguments import parse_args
from modeling_alip.loss import contrastive_loss

ROW = {data.ALT_TEXT: "web text", data.CAPTION: "a caption", data.VECAP: "a vecap text"}
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name, cls", [("clip", recipes.ClipRecipe), ("alip", recipes.AlipRecipe),
                                       ("veclip", recipes.VeclipRecipe)])
def test_each_name_looks_up_its_recipe_class(name, cls):
    assert type(get_recipe(RecipeArguments(recipe=name))) is cls


def test_unknown_recipe_is_rejected_listing_the_choices():
    with pytest.raises(ValueError, match=r"'simclr' is not one of \['alip', 'clip', 'veclip'\]"):
        RecipeArguments(recipe="simclr")


def test_vecap_probability_outside_unit_interval_is_rejected():
    with pytest.raises(ValueError, match="vecap_probability"):
        VeclipArguments(vecap_probability=1.5)


# ---- per-recipe arguments ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, flag, recipe", [
    (["--recipe", "clip", "--vecap_probability", "0.9"], "--vecap_probability", "clip"),
    (["--recipe", "clip", "--vecap_probability", "0.5"], "--vecap_probability", "clip"),  # even at its default
    (["--recipe", "clip", "--caption_column", "nope"], "--caption_column", "clip"),
    (["--recipe", "alip", "--vecap_column", "vecap"], "--vecap_column", "alip"),
    (["--recipe", "veclip", "--caption_column=caption"], "--caption_column", "veclip"),
    (["--recipe", "veclip", "--caption-column", "caption"], "--caption_column", "veclip"),
])
def test_a_flag_of_another_recipe_is_an_error_naming_flag_and_recipe(argv, flag, recipe):
    with pytest.raises(ValueError, match=rf"{flag} does not apply to --recipe {recipe}"):
        parse_args(argv)


def test_a_run_yaml_setting_another_recipes_flag_is_an_error(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("recipe: alip\nvecap_probability: 0.3\n")
    with pytest.raises(ValueError, match="--vecap_probability does not apply to --recipe alip"):
        parse_args([str(config)])


def test_abbreviated_flags_are_not_accepted():
    with pytest.raises(ValueError, match=r"not used by the HfArgumentParser: \['--vecap_prob', '0.9'\]"):
        parse_args(["--recipe", "clip", "--vecap_prob", "0.9"])


@pytest.mark.parametrize("argv, expected", [
    ([], AlipArguments(caption_column="caption")),
    (["--recipe", "alip", "--caption_column", "vecap"], AlipArguments(caption_column="vecap")),
    (["--recipe", "veclip", "--vecap_probability", "0.25"], VeclipArguments(vecap_probability=0.25)),
    (["--recipe", "clip", "--text_column", "caption"], RecipeArguments(recipe="clip", text_column="caption")),
])
def test_each_recipe_gets_exactly_its_own_arguments(argv, expected):
    *_, recipe_args = parse_args(argv)
    assert recipe_args == expected and type(recipe_args) is type(expected)


# ---- columns and texts -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, columns", [
    ("clip", {data.ALT_TEXT: "alt_text"}),
    ("alip", {data.ALT_TEXT: "alt_text", data.CAPTION: "caption"}),
    ("veclip", {data.ALT_TEXT: "alt_text", data.VECAP: "vecap"}),
])
def test_each_recipe_reads_its_columns(name, columns):
    assert get_recipe(RecipeArguments(recipe=name)).columns() == columns


def test_alip_with_vecap_as_second_text_comes_from_arguments():
    recipe = get_recipe(AlipArguments(caption_column="vecap"))
    assert recipe.columns() == {data.ALT_TEXT: "alt_text", data.VECAP: "vecap"}
    texts, _ = recipe.text_selector().select(ROW, np.random.default_rng(0))
    assert texts == {"text": "web text", "caption": "a vecap text"}


def test_veclip_draws_vecap_with_probability_p_reproducibly_per_sample():
    select = get_recipe(VeclipArguments(vecap_probability=0.3)).text_selector().select
    draws = [select(ROW, data.sample_rng(7, 0, i)) for i in range(4000)]
    fraction = np.mean([stats["vecap_drawn"] for _, stats in draws])
    assert abs(fraction - 0.3) < 0.03  # 4000 Bernoulli(0.3) draws: std 0.007
    for (texts, stats) in draws[:50]:
        assert texts["text"] == (ROW[data.VECAP] if stats["vecap_drawn"] else ROW[data.ALT_TEXT])
    again = [select(ROW, data.sample_rng(7, 0, i))[1]["vecap_drawn"] for i in range(200)]
    assert again == [stats["vecap_drawn"] for _, stats in draws[:200]]


@pytest.mark.parametrize("p, expected", [(0.0, "web text"), (1.0, "a vecap text")])
def test_veclip_probability_extremes_always_pick_one_text(p, expected):
    select = get_recipe(VeclipArguments(vecap_probability=p)).text_selector().select
    assert {select(ROW, data.sample_rng(0, 0, i))[0]["text"] for i in range(50)} == {expected}


# ---- the loss each recipe forms ----------------------------------------------------------------------------------


def _batch(n=6, eos=49407):
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 49000, (n, 7), generator=generator)
    caption_ids = torch.randint(0, 49000, (n, 5), generator=generator)
    ids[:, -1] = caption_ids[:, -1] = eos
    return {"input_ids": ids, "caption_input_ids": caption_ids,
            "pixel_values": torch.randn(n, 3, 30, 30, generator=generator)}


def test_alip_recipe_loss_equals_the_models_own_alip_loss(tiny_model):
    """The trainer's path (recipe) and the end user's path (`forward(return_loss=True)` with captions) agree."""
    recipe = get_recipe(RecipeArguments(recipe="alip"))
    tiny_model.train()
    state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    result = recipe.loss(tiny_model, recipe.embed(tiny_model, _batch()), local_loss=False)
    tiny_model.load_state_dict(state)  # the recipe's gates moved the running means once: undo for the model
    expected = tiny_model(**_batch(), return_loss=True)
    torch.testing.assert_close(result.loss, expected.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(result.parts["caption"], expected.loss_caption, rtol=1e-6, atol=1e-7)
    assert set(result.parts) == {"text", "caption"}


def test_clip_recipe_uses_no_caption_even_when_the_batch_has_one(tiny_model):
    """The recipe, not the presence of caption inputs, decides the loss: CLIP's InfoNCE on (image, text)."""
    recipe = get_recipe(RecipeArguments(recipe="clip"))
    before = [b.clone() for b in tiny_model.buffers()]
    embeds = recipe.embed(tiny_model, _batch())
    assert set(embeds) == {"image", "text"}
    result = recipe.loss(tiny_model, embeds, local_loss=False)
    expected, _ = contrastive_loss(embeds["image"], embeds["text"], tiny_model.logit_scale.exp())
    torch.testing.assert_close(result.loss, expected, rtol=1e-6, atol=1e-7)
    assert result.gates is None and set(result.parts) == {"text"}
    assert all(torch.equal(a, b) for a, b in zip(before, tiny_model.buffers()))  # no gate ran


def test_alip_step_state_is_the_gates_and_the_loss_uses_it_without_a_second_update(tiny_model):
    recipe = get_recipe(RecipeArguments(recipe="alip"))
    tiny_model.train()
    with torch.no_grad():
        embeds = recipe.embed(tiny_model, _batch())
        gates = recipe.step_state(tiny_model, embeds)
    after_state = tiny_model.gates.lcg.text_caption.running_mean.clone()
    result = recipe.loss(tiny_model, embeds, local_loss=False, state=gates)
    assert result.gates is gates
    assert torch.equal(tiny_model.gates.lcg.text_caption.running_mean, after_state)


@pytest.mark.parametrize("name, keys", [
    ("clip", {"loss/total", "loss/text"}),
    ("alip", {"loss/total", "loss/text", "loss/caption", "gate/lcg/weight_mean", "gate/dcg/text_running_mean"}),
    ("veclip", {"loss/total", "loss/text", "data/vecap_fraction"}),
])
def test_each_recipe_logs_its_metric_keys(tiny_model, name, keys):
    recipe = get_recipe(RecipeArguments(recipe=name))
    result = recipe.loss(tiny_model, recipe.embed(tiny_model, _batch()), local_loss=False)
    metrics = recipe.metrics(result, {"vecap_drawn": 3}, num_samples=6)
    assert keys <= set(metrics)
    assert metrics["loss/total"] == pytest.approx(result.loss.item())
    if name == "veclip":
        assert metrics["data/vecap_fraction"] == 0.5


# ---- only recipes.py names a recipe --------------------------------------------------------------------------------

# String constants equal to a recipe name that mean something else, by module and the source text around them.
NOT_RECIPES = {
    "modeling_alip/__init__.py": ['AutoConfig.register("alip"'],  # the Hub model type
    "modeling_alip/configuration_alip.py": ['model_type = "alip"'],
    "modeling_alip/processing_alip.py": ['"clip"'],  # the text cleaning of CLIP's tokenizer (text_cleaning="clip")
    "alip_hf/convert/from_veclip.py": ['model_type != "clip"'],  # a VeCLIP release is a transformers CLIP model
    # The captioner presets are named after the paper whose captions they reproduce; no code tests them.
    "recaption/caption.py": ['default="alip"'],
    "recaption/prompts.py": ['"alip": CaptionPreset', '"veclip": CaptionPreset'],
}


def _library_modules() -> list[Path]:
    modules = [ROOT / "train.py", ROOT / "eval.py"]
    for package in ("alip_hf", "recaption", "modeling_alip"):
        modules += sorted((ROOT / package).rglob("*.py"))
    return modules


def _recipe_names_in(source: str, relative: str) -> list[str]:
    """`path:line: text` of every string constant equal to a recipe name that `NOT_RECIPES` does not explain."""
    lines, found = source.splitlines(), []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.lower() in recipes.RECIPES:
            line = lines[node.lineno - 1]
            if not any(allowed in line for allowed in NOT_RECIPES.get(relative, [])):
                found.append(f"{relative}:{node.lineno}: {line.strip()}")
    return found


def test_no_module_outside_recipes_names_a_recipe():
    modules = [p for p in _library_modules() if p.relative_to(ROOT).as_posix() != "alip_hf/recipes.py"]
    assert len(modules) > 30, "the scan missed the library"
    found = []
    for path in modules:
        relative, source = path.relative_to(ROOT).as_posix(), path.read_text()
        found += _recipe_names_in(source, relative)
        assert "uses_caption" not in source, relative
    assert not found, "\n".join(found)


def test_the_scan_finds_a_branch_on_a_recipe_name():
    source = 'def step(args):\n    if args.recipe == "veclip":\n        return 1\n'
    assert _recipe_names_in(source, "alip_hf/training/loop.py") == [
        'alip_hf/training/loop.py:2: if args.recipe == "veclip":']
    assert _recipe_names_in('x = "clip"\n', "modeling_alip/processing_alip.py") == []


def test_arguments_of_one_recipe_cannot_name_another():
    with pytest.raises(ValueError, match="VeclipArguments holds arguments of another recipe than --recipe clip"):
        VeclipArguments(recipe="clip")
