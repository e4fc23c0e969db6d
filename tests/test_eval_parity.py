"""eval.py against the references: CLIP_benchmark's zero-shot and retrieval metrics on the same model and data
(equal to the last digit), and a model exported as a plain `CLIPModel` (identical metrics)."""

import builtins

import datasets
import numpy as np
import pytest
import torch
from conftest import tiny_alip_config
from PIL import Image
from transformers import AutoModel, AutoProcessor, CLIPModel

from alip_hf import evaluation as ev
from modeling_alip import ALIPModel, ALIPProcessor

clip_benchmark_zeroshot = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
clip_benchmark_retrieval = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")

NAMES = ("cat", "dog", "ship", "frog", "horse", "red car", "tree")
TEMPLATES = ("a photo of a {}.", "a drawing of the {}.", "{} in the wild")


@pytest.fixture(scope="module")
def model_and_processor():
    config = tiny_alip_config()
    torch.manual_seed(0)
    return ALIPModel(config).eval(), ALIPProcessor.from_config(config)


class OpenClipStyle(torch.nn.Module):
    """The `encode_image`/`encode_text` interface CLIP_benchmark calls, over transformers' feature methods.

    Texts arrive padded to the context length: the causal text tower pools at the end token, so the padding
    after it does not change the features beyond float rounding."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def encode_image(self, pixel_values):
        return self.model.get_image_features(pixel_values=pixel_values).pooler_output

    def encode_text(self, input_ids):
        return self.model.get_text_features(input_ids=input_ids).pooler_output


def reference_tokenizer(processor):
    return lambda texts: processor(text=list(texts), padding="max_length")["input_ids"]


def random_images(n, seed):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(n)]


def test_zeroshot_metrics_equal_clip_benchmark(model_and_processor, tmp_path, monkeypatch):
    model, processor = model_and_processor
    # CLIP_benchmark 1.6.2's `accuracy` calls float() on a 1-element array, which NumPy 2 rejects; a module-level
    # `float` that accepts it leaves the reference's arithmetic unchanged.
    monkeypatch.setattr(clip_benchmark_zeroshot, "float",
                        lambda x: builtins.float(np.asarray(x).reshape(-1)[0]), raising=False)
    rng = np.random.default_rng(1)
    labels = rng.integers(0, len(NAMES), 90).tolist()
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(NAMES))})
    dataset = datasets.Dataset.from_dict({"image": random_images(90, 2), "label": labels}, features=features)
    dataset.save_to_disk(str(tmp_path / "d"))
    task = ev.EvalTask("toy", "zeroshot", str(tmp_path / "d"), "train", label_column="label", templates=TEMPLATES)
    (record,) = ev.run_evaluation(model, processor, task, settings=ev.EvalSettings(batch_size=32))

    class Images(torch.utils.data.Dataset):
        classes = list(NAMES)

        def __len__(self):
            return len(dataset)

        def __getitem__(self, i):
            row = dataset[i]
            return processor(images=[row["image"].convert("RGB")])["pixel_values"][0], row["label"]

    loader = torch.utils.data.DataLoader(Images(), batch_size=16)
    reference = clip_benchmark_zeroshot.evaluate(
        OpenClipStyle(model), loader, reference_tokenizer(processor), list(NAMES),
        [t.replace("{}", "{c}") for t in TEMPLATES], device="cpu", amp=False)
    assert record["metrics"] == reference
    assert 0 < reference["acc1"] < 1 and reference["acc5"] > reference["acc1"]  # a non-degenerate case


def test_retrieval_metrics_equal_clip_benchmark(model_and_processor, tmp_path):
    model, processor = model_and_processor
    words = ["red", "blue", "green", "small", "large", "cat", "dog", "house", "boat", "tree", "on", "a", "hill"]
    rng = np.random.default_rng(3)
    # 24 images with 1 to 3 captions each, as a list column (COCO/Flickr30k layout with varying counts).
    captions = [[" ".join(rng.choice(words, 5)) for _ in range(rng.integers(1, 4))] for _ in range(24)]
    dataset = datasets.Dataset.from_dict({"image": random_images(24, 4), "caption": captions},
                                         features=datasets.Features({"image": datasets.Image(),
                                                                     "caption": [datasets.Value("string")]}))
    dataset.save_to_disk(str(tmp_path / "d"))
    task = ev.EvalTask("toy", "retrieval", str(tmp_path / "d"), "train", caption_columns=("caption",))
    (record,) = ev.run_evaluation(model, processor, task, settings=ev.EvalSettings(batch_size=10))

    pairs = [(processor(images=[row["image"].convert("RGB")])["pixel_values"][0], row["caption"]) for row in dataset]
    loader = torch.utils.data.DataLoader(pairs, batch_size=8, collate_fn=lambda b: (
        torch.stack([x for x, _ in b]), [texts for _, texts in b]))
    reference = clip_benchmark_retrieval.evaluate(OpenClipStyle(model), loader, reference_tokenizer(processor),
                                                  device="cpu", amp=False, recall_k_list=[1, 5, 10])
    assert record["metrics"] == reference
    assert any(0 < v < 1 for v in reference.values())


def test_exported_clip_model_gives_the_metrics_of_the_alip_model(model_and_processor, tmp_path):
    export_to_clip = pytest.importorskip("alip_hf.convert.to_clip").export_to_clip
    model, processor = model_and_processor
    export_to_clip(model, tmp_path / "clip", processor=processor)
    clip = AutoModel.from_pretrained(tmp_path / "clip").eval()
    assert type(clip) is CLIPModel
    settings = ev.EvalSettings(max_samples=60)
    expected = ev.run_evaluation(model, processor, "demo", settings=settings)
    # Same processor: the model export alone; then the exported processor too (end to end).
    for clip_processor in (processor, AutoProcessor.from_pretrained(tmp_path / "clip")):
        got = ev.run_evaluation(clip, clip_processor, "demo", settings=settings)
        assert [r["metrics"] for r in got] == [r["metrics"] for r in expected]
