"""Model cards: huggingface_hub's card classes, model-index, a usage snippet that runs as written, no local paths,
and eval.py adding its results to a trained model's card without losing the training section."""

import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from huggingface_hub import ModelCard

from alip_hf import train
from alip_hf.eval import main as eval_main
from alip_hf.evaluation.cards import (
    EVALUATION_END,
    EVALUATION_START,
    ModelCardInfo,
    build_model_card,
    eval_results,
    records_from_eval_results,
)
from conftest import HIDE_PACKAGE, tiny_alip_config, write_parquet
from modeling_alip import ALIPModel, ALIPProcessor

RECORDS = [
    {"dataset": "cifar10", "task": "zeroshot_classification", "split": "test", "source": "uoft-cs/cifar10",
     "model": "/abs/models/run", "metrics": {"acc1": 0.5, "acc5": 0.875, "mean_per_class_recall": 0.25}},
    {"dataset": "val.parquet", "task": "zeroshot_retrieval", "split": "validation", "source": "/abs/data/val.parquet",
     "metrics": {"image_retrieval_recall@1": 0.125, "text_retrieval_recall@1": float("nan")}},
]
TRAIN_ARGS = {"recipe": "alip", "model_name_or_path": "openai/clip-vit-base-patch32", "train_data": "me/web-pairs",
              "output_dir": "/abs/outputs/my-run", "max_steps": 10, "license": "mit"}


def local_paths(text: str, *roots) -> list[str]:
    """Absolute paths of this machine that appear in `text`."""
    found = [str(r) for r in roots if str(r) in text]
    return found + re.findall(r"(?<![\w.<])/(?:abs|tmp|root|home|work)/[\w./-]*", text)


def test_card_metadata_comes_from_the_card_classes_with_model_index():
    card = build_model_card(RECORDS, train_args=TRAIN_ARGS)
    loaded = ModelCard(str(card))  # round-trips through huggingface_hub's parser
    data = loaded.data
    assert (data.license, data.library_name, data.pipeline_tag) == ("mit", "transformers",
                                                                     "zero-shot-image-classification")
    assert data.base_model == "openai/clip-vit-base-patch32" and data.datasets == ["me/web-pairs"]
    assert {"clip", "alip"} <= set(data.tags) and data.model_name == "my-run"
    by_metric = {(r.dataset_name, r.metric_type): r for r in data.eval_results}
    assert by_metric[("cifar10", "acc1")].metric_value == 50.0
    assert by_metric[("cifar10", "acc1")].dataset_type == "uoft-cs/cifar10"  # a Hub dataset keeps its id
    assert by_metric[("cifar10", "acc1")].task_type == "zero-shot-image-classification"
    assert by_metric[("val.parquet", "image_retrieval_recall@1")].dataset_split == "validation"
    assert ("val.parquet", "text_retrieval_recall@1") not in by_metric  # NaN is left out
    assert records_from_eval_results(data.eval_results)[0]["metrics"]["acc5"] == pytest.approx(0.875)


def test_card_holds_no_local_absolute_paths():
    text = str(build_model_card(RECORDS, train_args={**TRAIN_ARGS, "model_name_or_path": "/abs/ckpt/base",
                                                     "train_data": "/abs/data/train.parquet",
                                                     "eval_data": "/abs/data/val.parquet"}))
    assert not local_paths(text), local_paths(text)
    assert "a local checkpoint `base`" in text and "`train.parquet`" in text
    card = ModelCard(text)
    assert card.data.base_model is None and card.data.datasets is None  # local ones are not Hub ids


def test_template_missing_a_field_is_an_error_naming_it(tmp_path):
    template = tmp_path / "card.md"
    template.write_text(f"# {{{{model_name}}}}\n{{{{usage}}}}\n{{{{training}}}}\n{EVALUATION_START}\n{EVALUATION_END}\n")
    with pytest.raises(ValueError, match=r"card\.md is missing \{\{results_table\}\}"):
        build_model_card(RECORDS, template=template)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    torch.manual_seed(0)
    model = ALIPModel(tiny_alip_config()).eval()
    directory = tmp_path_factory.mktemp("card-model") / "tiny-alip"
    model.save_pretrained(directory)
    ALIPProcessor.default(image_size=model.config.vision_config.image_size).save_pretrained(directory)
    return directory


def usage_code(card: ModelCard) -> str:
    match = re.search(r"## Use\s+```python\n(.*?)```", card.text, re.S)
    assert match, "no python usage snippet in the card"
    return match.group(1)


@pytest.mark.parametrize("package", ["installed", "hidden"])
def test_the_usage_snippet_runs_as_written(saved_model, tmp_path, package):
    card = build_model_card(RECORDS, train_args=TRAIN_ARGS, repo_id="me/tiny-alip")
    code = usage_code(card)
    assert 'from_pretrained("me/tiny-alip", trust_remote_code=True)' in code and 'model="me/tiny-alip"' in code
    code = code.replace('"me/tiny-alip"', repr(str(saved_model)))  # the Hub id -> the saved directory
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSTARTUP",)}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    if package == "hidden":
        env.pop("PYTHONPATH", None)
        prelude = HIDE_PACKAGE + textwrap.dedent('''
            class HideLibrary(HidePackage):
                def find_spec(self, name, path=None, target=None):
                    if name.split(".")[0] in ("alip_hf", "recaption", "modeling_alip"):
                        raise ModuleNotFoundError(name)
            sys.meta_path.insert(0, HideLibrary())
            ''')
    else:
        env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(__file__)), env.get("PYTHONPATH", "")])
        prelude = ""
    result = subprocess.run([sys.executable, "-c", prelude + code], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    pipeline_scores, feature_scores = map(eval, result.stdout.strip().splitlines()[-2:])  # {label: probability}
    for scores in (pipeline_scores, feature_scores):
        assert set(scores) == {"a photo of a cat", "a photo of a dog"}
        assert sum(scores.values()) == pytest.approx(1, abs=2e-3)
    # both halves score the same texts: the pipeline is not left to its "This is a photo of {}." template
    assert pipeline_scores == pytest.approx(feature_scores, abs=1.5e-3)  # each printed to 3 decimals


def test_the_cards_install_line_needs_no_package_index_to_serve_alip_hf():
    text = str(build_model_card(RECORDS, train_args=TRAIN_ARGS))
    assert "pip install alip-hf" not in text and "alip-hf[" not in text
    assert "# pip install torch transformers pillow" in usage_code(ModelCard(text))


def test_card_of_a_run_on_the_demo_data_takes_the_licence_its_card_states():
    from alip_hf.resources import DEMO_DATA

    card = build_model_card(RECORDS, train_args={"recipe": "alip", "train_data": str(DEMO_DATA)})
    assert card.data.license == "cc0-1.0" and "`cc0-1.0`, as the card of the training data `demo_data` states" in card.text
    assert str(DEMO_DATA) not in str(card)
    assert build_model_card(RECORDS, train_args={"train_data": "demo"}).data.license == "cc0-1.0"  # by its name


def test_card_licence_name_and_link_and_base_model_come_from_the_local_cards(tmp_path):
    data, checkpoint = tmp_path / "data", tmp_path / "start"
    data.mkdir()
    checkpoint.mkdir()
    (data / "README.md").write_text("---\nlicense: other\nlicense_name: my-data-licence\n"
                                    "license_link: https://example.org/licence\n---\n# data\n")
    (checkpoint / "README.md").write_text("---\nbase_model: openai/clip-vit-base-patch32\n---\n# start\n")
    train_args = {"train_data": str(data / "train-*.parquet"), "model_name_or_path": str(checkpoint)}
    card = build_model_card(RECORDS, train_args=train_args)
    assert (card.data.license, card.data.license_name, card.data.license_link) == (
        "other", "my-data-licence", "https://example.org/licence")
    assert card.data.base_model == "openai/clip-vit-base-patch32"
    assert "a local checkpoint `start`, itself from [openai/clip-vit-base-patch32]" in card.text
    # nothing states a licence: none is written (not a made-up `other`), and the card says how to set one
    bare = build_model_card(RECORDS, train_args={"train_data": str(tmp_path / "nowhere.parquet")})
    assert bare.data.license is None and "not stated (train.py's `--license` sets it)" in bare.text


def test_card_fields_are_typed_and_a_misspelled_one_is_an_error():
    with pytest.raises(TypeError, match=r"'licence' \(did you mean 'license'\?\)"):
        build_model_card(RECORDS, licence="mit")
    info = ModelCardInfo(license="mit", datasets=["me/web-pairs"], base_model="openai/clip-vit-base-patch32")
    card = build_model_card(RECORDS, info, model_name="typed")
    assert (card.data.license, card.data.datasets, card.data.base_model, card.data.model_name) == (
        "mit", ["me/web-pairs"], "openai/clip-vit-base-patch32", "typed")


def test_eval_model_card_adds_results_to_a_trained_models_card_keeping_its_training_section(tiny_data, tmp_path):
    run = tmp_path / "run"
    argv = tiny_data.argv(run)
    i = argv.index("--eval_data")
    argv[i + 1] = str(tiny_data.train)
    train.main([*argv, "--eval_split", "train", "--license", "apache-2.0"])
    readme = run / "README.md"
    other = write_parquet(tmp_path / "other.parquet", 12, seed=3)
    before = ModelCard.load(readme)
    training = before.text.split("## Training")[1].split(EVALUATION_START)[0]
    assert "- `recipe`: `alip`" in training and len(before.data.eval_results) > 0

    eval_main(["--model", str(run), "--dataset", str(other), "--task", "zeroshot_retrieval",
               "--split", "train", "--caption_columns", "caption", "--name", "dirty", "--max_samples", "8",
               "--output", str(tmp_path / "results.json"), "--model_card", str(readme)])
    after = ModelCard.load(readme)
    assert after.text.split("## Training")[1].split(EVALUATION_START)[0] == training  # untouched
    assert after.data.license == "apache-2.0" and after.data.tags == before.data.tags
    datasets = {r.dataset_name for r in after.data.eval_results}
    assert datasets == {"train.parquet", "dirty"}  # added, the training-time results kept
    assert "| dirty | train |" in after.text and "| train.parquet | train |" in after.text
    assert not local_paths(after.text, tmp_path), local_paths(after.text, tmp_path)
    assert "--model '<this directory>'" in after.text or "--model <this directory>" in after.text

    # evaluated again: the metric is replaced, not duplicated
    eval_main(["--model", str(run), "--dataset", str(other), "--task", "zeroshot_retrieval",
               "--split", "train", "--caption_columns", "caption", "--name", "dirty", "--max_samples", "4",
               "--output", str(tmp_path / "results2.json"), "--model_card", str(readme)])
    again = ModelCard.load(readme)
    assert len(again.data.eval_results) == len(after.data.eval_results)
    assert again.text.count(EVALUATION_START) == 1


def test_eval_results_skip_the_linear_probes_regularisation_constant():
    record = {"dataset": "d", "task": "linear_probe", "split": "test", "metrics": {"lp_acc1": 0.5, "lp_C": 3.0}}
    assert [r.metric_type for r in eval_results([record])] == ["lp_acc1"]
