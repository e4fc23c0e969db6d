"""eval.py: metric definitions, prompt ensembling and its cache, linear probe, presets on local copies of their
Hub layouts, bad input, the CLI's results file and the model card.

Metric values are checked against hand counts or an independent computation (sklearn, a per-prompt loop);
tolerances are stated where floats are compared.
"""

import dataclasses
import json
import math

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from alip_hf import eval as eval_cli
from alip_hf import evaluation as ev
from alip_hf.evaluation import runners
from alip_hf.resources import DEMO_DATA, EVALUATE_MODULES
from modeling_alip import ALIPModel

FEATURE_ATOL = 1e-6  # float32 features of the same texts encoded in different batches


def colour_images(n: int, seed: int = 0, size: int = 12) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def classification_dir(tmp_path, image_column="img", label_column="label", names=("cat", "dog", "ship"), n=12,
                       split="test", num_labelled_classes=None):
    """A `save_to_disk` dataset with a `ClassLabel` column, as CIFAR-10 is laid out on the Hub; rows cycle
    through the first `num_labelled_classes` classes (all by default)."""
    labels = [i % (num_labelled_classes or len(names)) for i in range(n)]
    features = datasets.Features({image_column: datasets.Image(), label_column: datasets.ClassLabel(names=list(names))})
    dataset = datasets.Dataset.from_dict({image_column: colour_images(n), label_column: labels}, features=features)
    path = tmp_path / "classification"
    datasets.DatasetDict({split: dataset}).save_to_disk(str(path))
    return str(path)


# --------------------------------------------------------------------------------------------------------------
# Metric definitions
# --------------------------------------------------------------------------------------------------------------


def test_classification_metrics_match_hand_counts():
    logits = torch.tensor([[0.9, 0.1, 0.0, 0.2, 0.3, 0.4],   # label 0: top-1 hit
                           [0.9, 0.1, 0.0, 0.2, 0.3, 0.4],   # label 1: rank 5 -> top-5 hit only
                           [0.1, 0.2, 0.9, 0.0, 0.3, 0.4],   # label 3: rank 6 -> miss
                           [0.0, 0.1, 0.2, 0.3, 0.4, 0.9]])  # label 5: top-1 hit
    metrics = ev.classification_metrics(logits, np.array([0, 1, 3, 5]))
    assert metrics["acc1"] == 2 / 4
    assert metrics["acc5"] == 3 / 4
    assert metrics["mean_per_class_recall"] == pytest.approx((1 + 0 + 0 + 1) / 4, abs=0)


def test_mean_per_class_recall_equals_sklearn_balanced_accuracy_with_unrepresented_predicted_classes():
    from sklearn.metrics import balanced_accuracy_score

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, 200)
    predictions = rng.integers(0, 9, 200)  # classes 7 and 8 are predicted but never true
    with pytest.warns(UserWarning):
        expected = balanced_accuracy_score(labels, predictions)
    assert ev.mean_per_class_recall(predictions, labels) == expected


def test_acc5_is_nan_with_fewer_than_five_classes():
    metrics = ev.classification_metrics(torch.randn(6, 3), np.array([0, 1, 2, 0, 1, 2]))
    assert math.isnan(metrics["acc5"]) and 0 <= metrics["acc1"] <= 1


def test_retrieval_counts_a_hit_when_any_caption_of_the_image_is_in_the_top_k():
    # 3 images; image 0 has captions 0 and 1, image 1 has caption 2, image 2 has caption 3.
    image_embeds = torch.eye(3)
    # (No exact ties: caption 0 scores 0.1 with image 0 and 0 with image 2.)
    text_embeds = torch.tensor([[0.1, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.9, 0.1], [0.0, 0.0, 1.0]])
    metrics = ev.retrieval_metrics(image_embeds, text_embeds, [0, 0, 1, 2], ks=(1, 2))
    # text -> image: caption 0 retrieves image 1 first (miss at 1, hit at 2); the others hit at 1.
    assert metrics["image_retrieval_recall@1"] == pytest.approx(3 / 4)
    assert metrics["image_retrieval_recall@2"] == 1.0
    # image -> text: image 0's best text is caption 1 (its own); image 1's best is caption 0 (image 0's) and
    # its own caption 2 comes second; image 2 finds caption 3.
    assert metrics["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert metrics["text_retrieval_recall@2"] == 1.0


def _retrieval_data_with_duplicate_captions(seed: int = 0):
    """12 images with 2 captions each, the 24 captions drawn from 5 distinct ones: duplicates across images."""
    g = torch.Generator().manual_seed(seed)
    images = torch.nn.functional.normalize(torch.randn(12, 8, generator=g), dim=-1)
    distinct = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    texts = distinct[torch.randint(0, 5, (24,), generator=g)]
    return images, texts, np.repeat(np.arange(12), 2)


@pytest.mark.parametrize("seed", range(5))
def test_recall_with_duplicate_captions_does_not_depend_on_row_order(seed):
    images, texts, index = _retrieval_data_with_duplicate_captions()
    expected = ev.retrieval_metrics(images, texts, index, ks=(1, 5, 10))
    rng = np.random.default_rng(seed)
    image_order, text_order = rng.permutation(12), rng.permutation(24)
    new_row_of_image = np.argsort(image_order)
    got = ev.retrieval_metrics(images[image_order], texts[text_order], new_row_of_image[index[text_order]],
                               ks=(1, 5, 10))
    assert got == expected  # exactly: the rule has no order in it, and equal rows score bitwise equal


def test_tied_candidates_count_by_their_expected_rank():
    # Two images, one caption each, the two captions identical: every query ties its match with one other
    # candidate, so R@1 is the chance (1/2) that a random order puts the match first; R@2 is a sure hit.
    text = torch.nn.functional.normalize(torch.ones(1, 2), dim=-1)
    metrics = ev.retrieval_metrics(torch.eye(2), text.repeat(2, 1), [0, 1], ks=(1, 2))
    assert metrics == {"image_retrieval_recall@1": 0.5, "image_retrieval_recall@2": 1.0,
                       "text_retrieval_recall@1": 0.5, "text_retrieval_recall@2": 1.0}
    # One image above the tie (g = 1), then its own caption tied with 2 foreign copies (t = 2, m = 1):
    # P(hit@2) = 1 - C(2, 1) / C(3, 1) = 1/3; P(hit@3) = 1 - C(2, 2) / C(3, 2) = 2/3; @4 = 1.
    scores = torch.tensor([[0.5, 0.5, 0.5, 0.9]]).T  # (T=4, I=1) seen from the image: captions 0-2 tie, 3 above
    recalls = ev.recall_at_ks(scores, [0, 1, 1, 1], ks=(1, 2, 3, 4))["text_retrieval_recall"]
    assert recalls == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0], abs=1e-7)


def test_retrieval_k_above_the_number_of_candidates_counts_every_query_as_a_hit():
    metrics = ev.retrieval_metrics(torch.eye(2), -torch.eye(2), [0, 1], ks=(10,))
    assert metrics == {"image_retrieval_recall@10": 1.0, "text_retrieval_recall@10": 1.0}


def test_evaluate_modules_loaded_from_local_paths_equal_the_eval_functions():
    evaluate = pytest.importorskip("evaluate")
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(50, 8)).astype(np.float32), rng.integers(0, 8, 50)
    expected = ev.classification_metrics(torch.from_numpy(logits), labels)
    got = evaluate.load(str(EVALUATE_MODULES / "zeroshot_accuracy")).compute(predictions=logits, references=labels)
    assert got == pytest.approx(expected, abs=0)

    images, texts = rng.normal(size=(12, 4)).astype(np.float32), rng.normal(size=(30, 4)).astype(np.float32)
    index = np.concatenate([np.arange(12), rng.integers(0, 12, 18)])
    expected = ev.retrieval_metrics(torch.from_numpy(images), torch.from_numpy(texts), index)
    got = evaluate.load(str(EVALUATE_MODULES / "retrieval_recall")).compute(predictions=texts @ images.T, references=index)
    # eval.py averages in float32 as CLIP_benchmark does, the module in float64: equal hits, 1e-7 apart.
    assert got == pytest.approx(expected, abs=1e-7)


# --------------------------------------------------------------------------------------------------------------
# Prompt ensembling and its cache
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("template", ["a photo", "a {} and a {}", "a {0} photo", "{x} of a {}"])
def test_template_without_exactly_one_class_slot_is_rejected(template):
    with pytest.raises(ValueError, match="exactly one"):
        ev.check_templates(["a photo of a {}.", template])


def test_clip_benchmark_style_templates_are_accepted():
    assert ev.check_templates(["a photo of a {c}."]) == ["a photo of a {}."]
    assert len(ev.named_list("clip_benchmark:cifar10", "templates")) == 18
    assert len(ev.named_list("openai_imagenet", "templates")) == 80
    assert ev.named_list("imagenet", "classnames")[0] == "tench"


def test_classifier_is_the_renormalised_mean_of_normalised_template_embeddings(model_and_processor):
    model, processor = model_and_processor
    names, templates = ["cat", "big dog"], ["a photo of a {}.", "{} drawing", "an image showing a {} outdoors"]
    classifier = ev.zeroshot_classifier(model, processor, names, templates, batch_size=4,
                                        cache=ev.ClassifierCache())
    assert classifier.shape == (16, 2)
    for c, name in enumerate(names):
        columns = []
        for template in templates:  # one prompt at a time: no padding shared with other prompts
            inputs = processor(text=[template.format(name)])
            feature = model.get_text_features(**inputs).pooler_output[0]
            columns.append(feature / feature.norm())
        mean = torch.stack(columns).mean(0)
        torch.testing.assert_close(classifier[:, c], (mean / mean.norm()).detach(), atol=FEATURE_ATOL, rtol=0)


def test_classifier_cache_hits_in_memory_and_on_disk_and_misses_after_a_weight_change(model_and_processor, tmp_path):
    model, processor = model_and_processor
    names, templates = ["cat", "dog"], ["a {}."]
    cache = ev.ClassifierCache(tmp_path / "cache")
    first = ev.zeroshot_classifier(model, processor, names, templates, cache=cache)
    assert (cache.hits, cache.misses) == (0, 1) and len(list((tmp_path / "cache").glob("*.pt"))) == 1
    assert ev.zeroshot_classifier(model, processor, names, templates, cache=cache) is first
    assert cache.hits == 1

    fresh = ev.ClassifierCache(tmp_path / "cache")  # a later run: read from disk
    torch.testing.assert_close(ev.zeroshot_classifier(model, processor, names, templates, cache=fresh), first,
                               atol=0, rtol=0)
    assert (fresh.hits, fresh.misses) == (1, 0)

    changed = ALIPModel(model.config).eval()
    changed.load_state_dict(model.state_dict())
    with torch.no_grad():
        changed.text_projection.weight.mul_(-1)  # a training step changes weights, never the object identity
    recomputed = ev.zeroshot_classifier(changed, processor, names, templates, cache=fresh)
    assert fresh.misses == 1
    torch.testing.assert_close(recomputed, -first, atol=FEATURE_ATOL, rtol=0)
    assert ev.zeroshot_classifier(model, processor, ["cat", "cow"], templates, cache=fresh) is not first
    assert fresh.misses == 2

    with torch.no_grad():  # an in-place update of the same model object, as an optimizer step does
        changed.text_projection.weight.mul_(-1)
    torch.testing.assert_close(ev.zeroshot_classifier(changed, processor, names, templates, cache=fresh), first,
                               atol=0, rtol=0)  # back to the original weights: the original key, a hit
    assert (fresh.hits, fresh.misses) == (2, 2)
    with torch.no_grad():
        changed.text_projection.weight.mul_(2)
    ev.zeroshot_classifier(changed, processor, names, templates, cache=fresh)
    assert fresh.misses == 3


# --------------------------------------------------------------------------------------------------------------
# Linear probe
# --------------------------------------------------------------------------------------------------------------


def test_linear_probe_picks_C_on_validation_and_classifies_separable_features():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 8)) * 4

    def sample(n):
        labels = rng.integers(0, 4, n)
        return centres[labels] + rng.normal(size=(n, 8)), labels

    (x_train, y_train), (x_test, y_test) = sample(120), sample(60)
    metrics = ev.linear_probe(x_train, y_train, x_test, y_test, cs=(1e-6, 1e-2, 1.0), num_classes=5)
    assert metrics["lp_acc1"] == 1.0 and metrics["lp_mean_per_class_recall"] == 1.0
    assert metrics["lp_acc5"] == 1.0  # 5 classes (one never seen in training): all in the top 5
    assert metrics["lp_C"] >= 1e-2 * 10 ** -0.5  # 1e-6 regularises the classes away: not chosen


# --------------------------------------------------------------------------------------------------------------
# Tasks, presets and bad input
# --------------------------------------------------------------------------------------------------------------


def test_label_not_among_the_class_names_is_an_error_naming_the_row(model_and_processor, tmp_path):
    model, processor = model_and_processor
    dataset = datasets.Dataset.from_dict({"image": colour_images(3), "category": ["cat", "dog", "cow"]},
                                         features=datasets.Features({"image": datasets.Image(),
                                                                     "category": datasets.Value("string")}))
    dataset.to_parquet(str(tmp_path / "test.parquet"))
    task = ev.EvalTask("pets", "zeroshot", str(tmp_path / "test.parquet"), label_column="category",
                       class_names=("cat", "dog"), templates=("a {}",))
    with pytest.raises(ValueError, match="row 2: label 'cow'"):
        ev.run_evaluation(model, processor, task)


def test_class_name_list_of_the_wrong_length_is_an_error(model_and_processor, tmp_path):
    model, processor = model_and_processor
    task = ev.EvalTask("x", "zeroshot", classification_dir(tmp_path), label_column="label",
                       class_names=("a", "b"), templates=("a {}",))
    with pytest.raises(ValueError, match="2 class names for 3 classes"):
        ev.run_evaluation(model, processor, task)


def test_class_without_images_is_left_out_of_mean_per_class_recall_and_recorded(model_and_processor, tmp_path):
    model, processor = model_and_processor
    source = classification_dir(tmp_path, names=("cat", "dog", "ship", "frog"), n=9, num_labelled_classes=3)
    task = ev.EvalTask("x", "zeroshot", source, label_column="label", templates=("a {}",))
    (record,) = ev.run_evaluation(model, processor, task)
    assert record["classes_without_images"] == 1 and record["num_classes"] == 4

    dataset, _ = ev.load_split(task, "test")
    classifier = ev.zeroshot_classifier(model, processor, ["cat", "dog", "ship", "frog"], ["a {}"])
    predictions = (ev.encode_images(model, processor, dataset["img"]) @ classifier).argmax(1).numpy()
    labels = np.array(dataset["label"])
    expected = np.mean([(predictions[labels == c] == c).mean() for c in range(3)])  # the 3 classes with images
    assert record["metrics"]["mean_per_class_recall"] == pytest.approx(expected, abs=1e-12)
    assert record["metrics"]["acc1"] == (predictions == labels).mean()


def test_retrieval_image_without_caption_is_an_error(model_and_processor, tmp_path):
    model, processor = model_and_processor
    dataset = datasets.Dataset.from_dict({"image": colour_images(3), "alt_text": ["a", "", "c"],
                                          "caption": ["x", "  ", None]})
    dataset.save_to_disk(str(tmp_path / "d"))
    task = ev.EvalTask("d", "retrieval", str(tmp_path / "d"), "train", caption_columns=("alt_text", "caption"))
    with pytest.raises(ValueError, match=r"1 images have no caption .*rows \[1\]"):
        ev.run_evaluation(model, processor, task)


def test_empty_split_is_an_error(model_and_processor, tmp_path):
    model, processor = model_and_processor
    task = ev.EvalTask("x", "zeroshot", classification_dir(tmp_path), label_column="label", templates=("a {}",),
                       row_filter=("label", "nothing"))
    with pytest.raises(ValueError, match="has no rows with label == 'nothing'"):
        ev.run_evaluation(model, processor, task)


def test_missing_column_is_an_error_naming_it(model_and_processor, tmp_path):
    model, processor = model_and_processor
    task = ev.EvalTask("x", "zeroshot", classification_dir(tmp_path), label_column="fine_label")
    with pytest.raises(ValueError, match="'fine_label'"):
        ev.run_evaluation(model, processor, task)


def test_images_shared_by_tasks_of_one_run_are_encoded_once(model_and_processor, monkeypatch):
    model, processor = model_and_processor
    calls = []
    original = ev.encode_images
    monkeypatch.setattr(runners, "encode_images", lambda *a, **k: calls.append(len(a[2])) or original(*a, **k))
    records = ev.run_evaluation(model, processor, "demo", settings=ev.EvalSettings(max_samples=30))
    assert [r["task"] for r in records] == ["zeroshot_classification", "zeroshot_retrieval"]
    assert calls == [30]


# --------------------------------------------------------------------------------------------------------------
# Entry points: train.py's call, the CLI, the model card
# --------------------------------------------------------------------------------------------------------------


def test_evaluate_model_accepts_the_demo_data_path_and_returns_eval_namespaced_keys(model_and_processor):
    model, processor = model_and_processor
    flat = ev.evaluate_model(model, processor, str(DEMO_DATA), split="test", max_samples=24)
    assert set(flat) == {"eval/demo/acc1", "eval/demo/acc5", "eval/demo/mean_per_class_recall",
                         *(f"eval/demo/{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10))}
    assert all(isinstance(v, float) and 0 <= v <= 1 for v in flat.values())


def test_cli_writes_results_json_and_a_model_card_rendered_from_it(model_and_processor, tmp_path):
    model, processor = model_and_processor
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    out, card = tmp_path / "out" / "results.json", tmp_path / "README.md"
    records = eval_cli.main(["--model", str(tmp_path / "model"), "--preset", "demo", "--max_samples", "24",
                       "--output", str(out), "--model_card", str(card)])
    payload = json.loads(out.read_text())
    assert payload["results"] == json.loads(json.dumps(records))
    zeroshot = payload["results"][0]
    assert (zeroshot["dataset"], zeroshot["split"], zeroshot["settings"]["max_samples"]) == ("demo", "test", 24)
    text = card.read_text()
    assert "{{" not in text
    assert f"| demo | test | {100 * zeroshot['metrics']['acc1']:.2f} |" in text
    assert not list(out.parent.glob("*.tmp"))


def test_cli_rejects_dataset_without_task_and_both_sources():
    with pytest.raises(ValueError, match="--task"):
        eval_cli.main(["--model", "m", "--dataset", "d"])
    with pytest.raises(ValueError, match="exactly one"):
        eval_cli.main(["--model", "m", "--dataset", "d", "--preset", "demo", "--task", "zeroshot"])


def test_model_card_renders_train_py_flat_metrics_and_rejects_unknown_placeholders(tmp_path):
    flat = {"eval/demo/acc1": 0.5, "eval/demo/acc5": 0.75, "eval/demo/mean_per_class_recall": 0.25,
            "eval/demo/image_retrieval_recall@1": 0.125}
    card = ev.render_model_card(flat, train_args={"recipe": "alip", "max_steps": 10})
    assert "| demo |  | 50.00 | 75.00 | 25.00 |" in card and "| demo |  | 12.50 |" in card
    assert "- `recipe`: `alip`" in card
    template = tmp_path / "card.md"
    sections = "{{usage}} {{training}} <!-- evaluation:start -->{{results_table}}<!-- evaluation:end -->"
    template.write_text(sections + " {{seed_note}}")
    with pytest.raises(KeyError, match="seed_note"):
        ev.render_model_card(flat, template=template)
    assert ev.render_model_card(flat, template=template, seed_note="seed 0").endswith(" seed 0")


def test_model_card_of_train_py_shows_its_eval_split_and_a_command_for_its_eval_data(tmp_path):
    flat = {"eval/demo/acc1": 0.5, "eval/demo/image_retrieval_recall@1": 0.125}
    reproduce = "python eval.py --model <this directory> "
    card = ev.render_model_card(flat, train_args={"eval_data": str(DEMO_DATA), "eval_split": "test"})
    assert "| demo | test | 50.00 |" in card and reproduce + "--preset demo\n" in card
    card = ev.render_model_card(flat, train_args={"eval_data": str(DEMO_DATA), "eval_split": "train"})
    assert "| demo | train | 50.00 |" in card and reproduce + "--preset demo --split train\n" in card
    other = str(tmp_path / "val.parquet")
    card = ev.render_model_card({"eval/val.parquet/image_retrieval_recall@1": 0.25},
                                train_args={"eval_data": other, "eval_split": "validation"})
    assert "| val.parquet | validation | 25.00 |" in card
    assert (reproduce + "--dataset val.parquet --task zeroshot_retrieval --split validation "
            "--caption_columns alt_text caption\n") in card and str(tmp_path) not in card  # no local paths


def test_folder_style_class_names_become_words_and_string_labels_still_match():
    dataset = datasets.Dataset.from_dict({"label": ["apple_pie", "hot_dog", "apple_pie"]})
    task = ev.EvalTask("food", "zeroshot", "unused", label_column="label", class_name_style="underscores")
    names, ids = ev.class_names_and_labels(task, dataset)
    assert names == ["apple pie", "hot dog"] and ids.tolist() == [0, 1, 0]


def test_integer_labels_without_class_names_are_an_error():
    task = ev.EvalTask("x", "zeroshot", "unused", label_column="label")
    with pytest.raises(ValueError, match="pass class_names"):
        ev.class_names_and_labels(task, datasets.Dataset.from_dict({"label": [0, 1]}))


def test_cli_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        eval_cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(f"--{f.name}" in out for f in dataclasses.fields(eval_cli.EvalArguments))


def test_in_memory_classifier_cache_keeps_only_the_most_recent_entries():
    cache = ev.ClassifierCache(max_in_memory=2)
    for key in "abc":
        cache.put(key, torch.zeros(1))
    assert cache.get("a") is None and cache.get("c") is not None and list(cache.memory) == ["b", "c"]


def test_veclip_layout_clip_model_with_t5_tokenizer_evaluates_through_the_feature_methods(tmp_path):
    """VeCLIP checkpoints are `CLIPModel`s reading T5 ids (`</s>` = 1, `<pad>` = 0): nothing in eval.py changes."""
    import sentencepiece as spm
    from transformers import CLIPConfig, CLIPModel, T5Tokenizer

    from modeling_alip import veclip_processor

    texts = ["clip art of animals", "a drawing of food", "an illustration of people", "a photo of a cat"]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts * 25), model_prefix=str(tmp_path / "spiece"),
                                   vocab_size=48, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    tokenizer = T5Tokenizer.from_pretrained(tmp_path, extra_ids=4)
    tower = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
    config = CLIPConfig(text_config=dict(tower, vocab_size=64, max_position_embeddings=16, eos_token_id=1,
                                         pad_token_id=0),
                        vision_config=dict(tower, image_size=30, patch_size=2), projection_dim=16)
    torch.manual_seed(0)
    model, processor = CLIPModel(config).eval(), veclip_processor(config, tokenizer)

    records = ev.run_evaluation(model, processor, "demo", settings=ev.EvalSettings(max_samples=20))
    assert [r["num_images"] for r in records] == [20, 20]
    names, templates = ["cat", "food"], ["a photo of a {}", "an illustration of {} in the snow"]
    classifier = ev.zeroshot_classifier(model, processor, names, templates, cache=ev.ClassifierCache())
    for c, name in enumerate(names):
        alone = [model.get_text_features(**processor(text=[t.format(name)])).pooler_output[0] for t in templates]
        mean = torch.stack([f / f.norm() for f in alone]).mean(0)
        torch.testing.assert_close(classifier[:, c], (mean / mean.norm()).detach(), atol=FEATURE_ATOL, rtol=0)
