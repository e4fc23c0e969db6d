"""Several text sources per path, drawn with their probabilities (`alip_hf.text_sources`), for every recipe."""

import numpy as np
import pytest
import torch
from conftest import read_metrics
from safetensors.torch import load_file

from alip_hf import data, train
from alip_hf.recipes import AlipArguments, RecipeArguments, VeclipArguments, get_recipe
from alip_hf.text_sources import TextPath, TextSource, parse_sources, subcaption

ROW = {"alt_text": "a dog on grass", "blip": "a dog", "llava": "A dog runs. It is brown! The grass is green? Yes.",
       "vecap": "a brown dog running on green grass"}
N = 20_000


def _draws(select, row, n=N, seed=3):
    return [select(row, data.sample_rng(seed, 0, i)) for i in range(n)]


def test_caption_sources_are_drawn_with_their_probabilities():
    recipe = get_recipe(AlipArguments(caption_column="blip;llava;vecap", caption_column_probs="0.5;0.3;0.2"))
    draws = _draws(recipe.text_selector().select, ROW)
    stats = {}
    for _, s in draws:
        for key, value in s.items():
            stats[key] = stats.get(key, 0) + value
    metrics = recipe.args.caption_path().metrics(stats, N)
    # Binomial standard deviations are at most 0.0036 here: 0.015 is over 4 of them.
    for source, p in (("blip", 0.5), ("llava", 0.3), ("vecap", 0.2)):
        assert metrics[f"data/caption_source/{source}_fraction"] == pytest.approx(p, abs=0.015)
    assert metrics["data/caption_source/fallback_fraction"] == 0
    assert {texts["caption"] for texts, _ in draws} == {ROW["blip"], ROW["llava"], ROW["vecap"]}
    assert all(texts["text"] == ROW["alt_text"] for texts, _ in draws)


def test_an_empty_drawn_source_falls_back_to_the_others_and_is_counted():
    path = TextPath(parse_sources("blip;llava;vecap", "0.5;0.3;0.2"), name="caption")
    row = {**ROW, "blip": "\u200b"}  # empty by the data contract's rule
    draws = [path.draw(row, data.sample_rng(0, 0, i)) for i in range(N)]
    assert all(text in (ROW["llava"], ROW["vecap"]) for text, _ in draws)
    fallback = np.mean([s.get("caption_source/fallback", 0) for _, s in draws])
    assert fallback == pytest.approx(0.5, abs=0.015)  # every draw of blip fell back
    # Fallback draws follow the others' renormalised probabilities (0.3 : 0.2): llava 0.3 + 0.5 * 0.6 = 0.6.
    assert np.mean([s.get("caption_source/llava", 0) for _, s in draws]) == pytest.approx(0.6, abs=0.015)
    assert path.draw({**row, "llava": None, "vecap": ""}, data.sample_rng(0, 0, 0))[0] is None
    assert not path.usable({**row, "llava": None, "vecap": ""}) and path.usable(row)


def test_a_row_with_every_source_empty_is_skipped_and_one_with_a_source_left_is_kept():
    recipe = get_recipe(AlipArguments(caption_column="blip;vecap"))
    selector = recipe.text_selector()
    build = data.ExampleBuilder("image", selector, data.ImageTransform(8, train=False))
    assert selector.usable({**ROW, "blip": ""}) and not selector.usable({**ROW, "blip": "", "vecap": "&nbsp;"})
    assert build({**ROW, "image": None, "blip": "", "vecap": " "}, 0, 0) == (None, "skipped_texts")


def test_veclip_flags_keep_their_meaning_as_the_two_source_case():
    """`--vecap_probability p` is the mix `vecap;alt_text` with `p;1-p`, drawing the same texts as before (VeCap
    when the sample's first uniform number is below p)."""
    recipe = get_recipe(VeclipArguments(vecap_probability=0.3))
    for i in range(500):
        rng = data.sample_rng(7, 0, i)
        expected = ROW["vecap"] if data.sample_rng(7, 0, i).random() < 0.3 else ROW["alt_text"]
        texts, stats = recipe.text_selector().select(ROW, rng)
        assert texts["text"] == expected and stats["vecap_drawn"] == int(expected == ROW["vecap"])
    mixed = get_recipe(VeclipArguments(vecap_probability=0.5, text_column="alt_text;blip"))
    draws = _draws(mixed.text_selector().select, ROW)
    assert np.mean([t["text"] == ROW["vecap"] for t, _ in draws]) == pytest.approx(0.5, abs=0.015)
    assert np.mean([t["text"] == ROW["blip"] for t, _ in draws]) == pytest.approx(0.25, abs=0.015)
    with pytest.raises(ValueError, match="also a --text_column source"):
        VeclipArguments(text_column="alt_text;vecap")


def test_raw_text_sources_for_the_clip_recipe():
    recipe = get_recipe(RecipeArguments(recipe="clip", text_column="alt_text;vecap", text_column_probs="0.7;0.3"))
    assert recipe.columns() == {"alt_text": "alt_text", "alt_text (vecap)": "vecap"}
    draws = _draws(recipe.text_selector().select, ROW)
    assert np.mean([t["text"] == ROW["vecap"] for t, _ in draws]) == pytest.approx(0.3, abs=0.015)


@pytest.mark.parametrize("flags, match", [
    (dict(caption_column="blip;llava", caption_column_probs="0.5"), "gives 1 probabilities for the 2 columns"),
    (dict(caption_column="blip;blip"), "distinct"),
    (dict(caption_column="blip;llava", caption_column_probs="1;-1"), ">= 0 with a positive sum"),
    (dict(caption_column="blip;llava", caption_column_subcaption="words"), "--caption_column_subcaption"),
])
def test_bad_source_flags_are_named(flags, match):
    with pytest.raises(ValueError, match=match):
        AlipArguments(**flags)


def test_subcaptions_are_a_random_sentence_or_a_random_run_of_sentences():
    text = ROW["llava"]
    sentences = ["A dog runs.", "It is brown!", "The grass is green?", "Yes."]
    one = [subcaption(text, "sentence", data.sample_rng(0, 0, i)) for i in range(4000)]
    assert set(one) == set(sentences)
    assert all(abs(one.count(s) / 4000 - 0.25) < 0.04 for s in sentences)
    runs = {subcaption(text, "sentences", data.sample_rng(0, 0, i)) for i in range(4000)}
    contiguous = {" ".join(sentences[a:b]) for a in range(4) for b in range(a + 1, 5)}
    assert runs == contiguous  # every run of consecutive sentences, and nothing else
    assert subcaption("one sentence only.", "sentence", np.random.default_rng(0)) == "one sentence only."
    assert subcaption(text, "none", np.random.default_rng(0)) == text
    path = TextPath([TextSource("llava", 1.0, "sentence")])
    assert path.draw(ROW, data.sample_rng(0, 0, 1))[0] in sentences


def test_one_source_draws_nothing_so_crops_stay_the_same():
    """A single source per path (every recipe's default) takes no number from the sample's generator."""
    rng = data.sample_rng(0, 0, 5)
    get_recipe(AlipArguments()).text_selector().select(ROW | {"caption": "c"}, rng)
    assert rng.random() == data.sample_rng(0, 0, 5).random()


def test_draws_depend_only_on_seed_epoch_and_sample_so_any_process_count_draws_the_same():
    select = get_recipe(AlipArguments(caption_column="blip;llava;vecap")).text_selector().select
    one = data.GlobalBatchSampler(64, 8, num_batches=6, seed=1)
    two = [data.GlobalBatchSampler(64, 4, num_batches=6, rank=r, world_size=2, seed=1) for r in range(2)]
    for batch, halves in zip(one, zip(*two)):
        items = [item for half in halves for item in half]
        assert items == batch
        assert ([select(ROW, data.sample_rng(1, e, i))[0] for e, i in items]
                == [select(ROW, data.sample_rng(1, e, i))[0] for e, i in batch])


def _weights(output_dir):
    return load_file(str(output_dir / "model.safetensors"))


@pytest.mark.slow  # four tiny training runs
@pytest.mark.parametrize("streaming", [False, True], ids=["map-style", "streaming"])
def test_a_stopped_and_resumed_run_draws_the_same_sources(tiny_data, tmp_path, streaming):
    flags = ("--recipe", "alip", "--caption_column", "caption;vecap;alt_text", "--caption_column_probs", "0.5;0.3;0.2",
             "--caption_column_subcaption", "none;sentence;none", "--max_steps", "4", "--save_steps", "2",
             "--per_device_train_batch_size", "4",
             *(("--streaming", "true", "--shuffle_buffer", "16") if streaming else ()))
    train.main(tiny_data.argv(tmp_path / "full", *flags))
    train.main(tiny_data.argv(tmp_path / "cut", *flags, "--stop_after_steps", "2"))
    train.main(tiny_data.argv(tmp_path / "cut", *flags, "--resume_from_checkpoint", "latest"))
    keys = [f"data/caption_source/{k}_fraction" for k in ("caption", "vecap", "alt_text", "fallback")]
    full = [[row[k] for k in keys] for row in read_metrics(tmp_path / "full")]
    assert [[row[k] for k in keys] for row in read_metrics(tmp_path / "cut")] == full
    assert len({tuple(r) for r in full}) > 1  # the draws differ from step to step
    for name, value in _weights(tmp_path / "full").items():
        torch.testing.assert_close(_weights(tmp_path / "cut")[name], value, rtol=0, atol=0, msg=name)
