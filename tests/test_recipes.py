"""Recipes: the registry, the columns each reads and how texts are drawn."""

import numpy as np
import pytest

from alip_hf import data, recipes
from alip_hf.recipes import RecipeArguments, get_recipe

ROW = {data.ALT_TEXT: "web text", data.CAPTION: "a caption", data.VECAP: "a vecap text"}


def test_registry_holds_the_three_recipes_by_name():
    assert sorted(recipes.RECIPES) == ["alip", "clip", "veclip"]
    for name, cls in recipes.RECIPES.items():
        assert get_recipe(RecipeArguments(recipe=name)).name == name == cls.name


def test_unknown_recipe_is_rejected_listing_the_choices():
    with pytest.raises(ValueError, match=r"'simclr' is not one of \['alip', 'clip', 'veclip'\]"):
        RecipeArguments(recipe="simclr")


def test_vecap_probability_outside_unit_interval_is_rejected():
    with pytest.raises(ValueError, match="vecap_probability"):
        RecipeArguments(recipe="veclip", vecap_probability=1.5)


@pytest.mark.parametrize("name, columns, uses_caption", [
    ("clip", {data.ALT_TEXT: "alt_text"}, False),
    ("alip", {data.ALT_TEXT: "alt_text", data.CAPTION: "caption"}, True),
    ("veclip", {data.ALT_TEXT: "alt_text", data.VECAP: "vecap"}, False),
])
def test_each_recipe_reads_its_columns(name, columns, uses_caption):
    recipe = get_recipe(RecipeArguments(recipe=name))
    assert recipe.columns() == columns
    assert recipe.uses_caption is uses_caption


def test_alip_with_vecap_as_second_text_comes_from_arguments():
    recipe = get_recipe(RecipeArguments(recipe="alip", caption_column="vecap"))
    assert recipe.columns() == {data.ALT_TEXT: "alt_text", data.VECAP: "vecap"}
    texts, _ = recipe.text_selector().select(ROW, np.random.default_rng(0))
    assert texts == {"text": "web text", "caption": "a vecap text"}


def test_veclip_draws_vecap_with_probability_p_reproducibly_per_sample():
    select = get_recipe(RecipeArguments(recipe="veclip", vecap_probability=0.3)).text_selector().select
    draws = [select(ROW, data.sample_rng(7, 0, i)) for i in range(4000)]
    fraction = np.mean([stats["vecap_drawn"] for _, stats in draws])
    assert abs(fraction - 0.3) < 0.03  # 4000 Bernoulli(0.3) draws: std 0.007
    for (texts, stats) in draws[:50]:
        assert texts["text"] == (ROW[data.VECAP] if stats["vecap_drawn"] else ROW[data.ALT_TEXT])
    again = [select(ROW, data.sample_rng(7, 0, i))[1]["vecap_drawn"] for i in range(200)]
    assert again == [stats["vecap_drawn"] for _, stats in draws[:200]]


@pytest.mark.parametrize("p, expected", [(0.0, "web text"), (1.0, "a vecap text")])
def test_veclip_probability_extremes_always_pick_one_text(p, expected):
    select = get_recipe(RecipeArguments(recipe="veclip", vecap_probability=p)).text_selector().select
    assert {select(ROW, data.sample_rng(0, 0, i))[0]["text"] for i in range(50)} == {expected}


def test_only_recipes_module_names_the_recipes():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "alip_hf"
    for path in [root / "data.py", *sorted((root / "training").glob("*.py"))]:
        name = path.name
        source = path.read_text().lower()
        for recipe in ("'alip'", '"alip"', '"veclip"', "'veclip'", '"clip"', "'clip'"):
            assert recipe not in source, f"{name} mentions the recipe {recipe}"
