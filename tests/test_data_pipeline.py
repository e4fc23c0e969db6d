"""The training data pipeline: transforms, tokenisation, collation, sampling, skipping bad rows."""

import io

import datasets
import numpy as np
import pytest
import torch
from conftest import make_rows, write_parquet
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from PIL import Image, UnidentifiedImageError
from transformers import AutoTokenizer, CLIPImageProcessor

from alip_hf import data
from alip_hf.recipes import RecipeArguments, get_recipe
from modeling_alip import ALIPProcessor


@pytest.fixture(scope="module")
def tokenizer(tiny_data):
    return AutoTokenizer.from_pretrained(tiny_data.tokenizer)


@pytest.fixture(scope="module")
def processor(tokenizer):
    return ALIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tokenizer)


def _builder(recipe="alip", image_size=30):
    selector = get_recipe(RecipeArguments(recipe=recipe)).text_selector()
    return data.ExampleBuilder(data.IMAGE, selector, data.ImageTransform(image_size, train=True), seed=3)


def test_train_transform_uses_the_official_alip_crop_scale_by_default():
    assert data.ImageTransform(30).crop_scale == (0.9, 1.0)


def test_train_crop_is_a_function_of_the_sample_seed_only():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 64, 3), dtype=np.uint8))
    transform = data.ImageTransform(30, train=True, crop_scale=(0.3, 1.0))
    a = transform(image, data.sample_rng(0, 0, 5))
    torch.manual_seed(123)  # the global RNG must not matter
    b = transform(image, data.sample_rng(0, 0, 5))
    c = transform(image, data.sample_rng(0, 1, 5))
    assert a.shape == (3, 30, 30)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)


def test_eval_transform_resizes_short_side_and_center_crops_with_clip_normalisation():
    image = Image.new("RGB", (60, 40), (255, 255, 255))
    pixels = data.ImageTransform(20, train=False)(image)
    assert pixels.shape == (3, 20, 20)
    # OpenAI CLIP's normalisation as open_clip publishes it.
    expected = (1 - torch.tensor(OPENAI_DATASET_MEAN)) / torch.tensor(OPENAI_DATASET_STD)
    torch.testing.assert_close(pixels.mean(dim=(1, 2)), expected, rtol=1e-4, atol=1e-4)


def test_transform_from_clip_image_processor_reads_size_mean_and_std():
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24},
                                   image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25])
    transform = data.ImageTransform.from_image_processor(processor, train=False)
    assert (transform.image_size, transform.mean, transform.std) == (24, (0.5,) * 3, (0.25,) * 3)


def test_tokenize_pads_to_the_longest_text_of_the_batch(processor, tokenizer):
    encoded, truncated = processor.tokenize(["a cat", "a photo of the red cat"], max_length=77)
    assert encoded["input_ids"].shape == (2, 8)  # 6 words + start + end
    assert encoded["attention_mask"].tolist() == [[1] * 4 + [0] * 4, [1] * 8]
    assert truncated == 0


def test_over_long_text_is_truncated_keeping_the_end_token_and_counted(processor, tokenizer):
    encoded, truncated = processor.tokenize(["cat " * 100, "a dog"], max_length=10)
    ids = encoded["input_ids"]
    assert ids.shape == (2, 10) and truncated == 1
    assert ids[0, 0] == 49406 and ids[0, -1] == tokenizer.eos_token_id == 49407
    assert (ids[1, 3:] == tokenizer.pad_token_id).all()


def test_dynamic_padding_gives_the_same_text_embeddings_as_fixed_padding(processor, tokenizer, tiny_model):
    texts = ["a cat", "a photo of the red cat on the grass"]
    dynamic, _ = processor.tokenize(texts, max_length=77)
    fixed = tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        a = tiny_model.encode_text(dynamic["input_ids"], dynamic["attention_mask"])
        b = tiny_model.encode_text(fixed["input_ids"], fixed["attention_mask"])
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_collator_builds_both_text_paths_and_sums_stats(processor, tokenizer):
    build = _builder("alip")
    rows = make_rows(3)
    examples = [build({k: v[i] for k, v in rows.items()}, 0, i)[0] for i in range(3)]
    batch = data.Collator(processor, max_length=77)(examples)
    assert batch["pixel_values"].shape == (3, 3, 30, 30)
    assert batch["input_ids"].shape[0] == batch["caption_input_ids"].shape[0] == 3
    assert batch["caption_attention_mask"].shape == batch["caption_input_ids"].shape
    assert batch["stats"] == {"truncated_texts": 0, "skipped_images": 0, "skipped_texts": 0}


def test_collator_without_caption_path_has_no_caption_keys(processor, tokenizer):
    build = _builder("clip")
    rows = make_rows(2)
    examples = [build({k: v[i] for k, v in rows.items()}, 0, i)[0] for i in range(2)]
    assert "caption_input_ids" not in data.Collator(processor)(examples)


def test_corrupt_images_and_empty_texts_are_skipped_and_counted(tmp_path):
    path = write_parquet(tmp_path / "d.parquet", 12, corrupt=(1, 5), empty_text=(3,))
    dataset = data.undecoded_images(data.load_source(str(path)), data.IMAGE)
    kept, counts = data.filter_valid_rows(dataset, _builder("alip"))
    assert counts == {"skipped_images": 2, "skipped_texts": 1}
    assert len(kept) == 9
    assert not {"row-0001", "row-0003", "row-0005"} & set(kept["id"])


def test_decode_image_raises_on_garbage_bytes_and_reads_png_bytes():
    with pytest.raises(UnidentifiedImageError, match="cannot identify image file"):
        data.decode_image({"bytes": b"garbage", "path": None})
    buffer = io.BytesIO()
    Image.new("RGB", (4, 3)).save(buffer, format="PNG")
    assert data.decode_image(buffer.getvalue()).size == (4, 3)


def test_global_batches_are_the_same_for_one_and_two_processes():
    one = list(data.GlobalBatchSampler(50, 8, num_batches=9, seed=1))
    two = [list(data.GlobalBatchSampler(50, 4, num_batches=9, rank=r, world_size=2, seed=1)) for r in range(2)]
    for step, batch in enumerate(one):
        assert batch == two[0][step] + two[1][step]
    epoch0 = [i for batch in one[:6] for _, i in batch]
    assert len(set(epoch0)) == 48 and {e for batch in one[6:] for e, _ in batch} == {1}  # tail of 2 dropped


def test_sampler_started_at_a_batch_continues_the_uninterrupted_sequence():
    full = list(data.GlobalBatchSampler(40, 4, num_batches=25, rank=1, world_size=2, seed=0))
    resumed = list(data.GlobalBatchSampler(40, 4, num_batches=25, rank=1, world_size=2, seed=0, start=7))
    assert resumed == full[7:] and len(resumed) == 18


def test_sampler_rejects_data_smaller_than_one_global_batch():
    with pytest.raises(ValueError, match="fewer than one global batch of 16"):
        data.GlobalBatchSampler(10, 8, num_batches=1, world_size=2)


def test_streaming_split_by_node_has_no_duplicates_and_counts_skips(tmp_path):
    from datasets.distributed import split_dataset_by_node

    rows = make_rows(20, corrupt=(4,))
    dataset = datasets.Dataset.from_dict(rows, features=datasets.Features({
        **{k: datasets.Value("string") for k in rows}, "image": datasets.Image(decode=False)}))
    stream = dataset.to_iterable_dataset(num_shards=4)  # rank 0 reads shards 0 and 2 (rows 0-4, 10-14)
    seen, skipped = [], 0
    for rank in range(2):
        part = split_dataset_by_node(stream, rank=rank, world_size=2)
        examples = data.StreamingExamples(part, _builder("clip"), rank=rank)
        for example, _ in zip(examples, range(9 if rank == 0 else 10)):
            seen.append(example["text"])
            skipped += example["stats"].get("skipped_images", 0)
    assert skipped == 1
    assert sorted(seen) == sorted(t for i, t in enumerate(rows["alt_text"]) if i != 4)


def test_missing_caption_column_names_available_columns_and_recaption_step(tmp_path):
    dataset = datasets.Dataset.from_dict({"image": [None], "alt_text": ["x"]})
    recipe = get_recipe(RecipeArguments(recipe="alip"))
    with pytest.raises(ValueError, match=r"'caption'.*available columns: \['image', 'alt_text'\].*recaption.caption"):
        data.require_columns(dataset, {data.IMAGE: "image", **recipe.columns()})
