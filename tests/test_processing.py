"""ALIPProcessor and the offline CLIP tokenizer: parity with open_clip, dynamic padding, errors, round-trip."""

import numpy as np
import open_clip
import pytest
import torch
from conftest import tiny_alip_config
from PIL import Image
from transformers import T5Tokenizer

from modeling_alip import ALIPProcessor, clean_clip_text, clip_tokenizer
from modeling_alip.processing_alip import clip_vocab_and_merges

# Within the context length; text that clean_clip_text leaves unchanged apart from whitespace and case.
PLAIN_TEXTS = [
    "a photo of a cat.",
    "Hello, World!! What's up?!",
    "  multiple   spaces\tand\nnew lines ",
    "Numbers: 3.14159, 2024-05-01, 1,000,000 and 42nd",
    "UPPER lower MiXeD cAsE",
    "Café naïve résumé Ångström",
    "日本語のテキスト 中文 한국어",
    "emoji 😀👍 in text",
    "it's don't we'll they're I'M you've he'd",
    "x=3.14e-10; y=(a+b)*c // #hashtag @user https://example.com/a?b=c",
    "ÀÉÎÕÜ İstanbul",
    "\u00a0non-breaking\u2003em space",
    "",
]
# Text that open_clip's cleaning (ftfy, HTML unescaping, Python's lower-casing) changes, and special-token
# strings that open_clip tokenizes as plain text.
DIRTY_TEXTS = [
    "spam <|endoftext|> in web text <|startoftext|>",
    "“curly quotes” and ‘single’ ones",
    "&amp; &lt;b&gt;bold&lt;/b&gt; &amp;amp; double-escaped",
    "ﬁne ligature and ｆｕｌｌｗｉｄｔｈ letters",
    "mojibake: cafÃ©",
    "ΟΔΟΣ final sigma",
]
LONG_TEXT = " ".join(f"Word{i}, and more" for i in range(60))


@pytest.fixture(scope="module")
def tokenizer():
    return clip_tokenizer()


@pytest.fixture(scope="module")
def processor():
    return ALIPProcessor.default(image_size=30)


@pytest.fixture(scope="module")
def open_clip_tokenize():
    return open_clip.get_tokenizer("ViT-B-32")


def assert_ids_equal_open_clip(ids: list[int], open_clip_row: torch.Tensor):
    """open_clip pads with id 0, which is also a real token ("!"): compare the prefix, then require zeros."""
    row = open_clip_row.tolist()
    assert ids == row[: len(ids)]
    assert all(i == 0 for i in row[len(ids) :])


def test_clip_vocabulary_equals_open_clip_encoder_with_special_tokens_49406_49407(open_clip_tokenize):
    vocab, merges = clip_vocab_and_merges()
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    reference = open_clip_tokenize.encoder  # open_clip names the special tokens <start_of_text>/<end_of_text>
    ours = {token: i for token, i in vocab.items() if i < 49406}
    assert ours == {token: i for token, i in reference.items() if i < 49406}


def test_clip_tokenizer_ids_equal_open_clip_for_plain_texts(tokenizer, open_clip_tokenize):
    reference = open_clip_tokenize(PLAIN_TEXTS)
    encoded = tokenizer(PLAIN_TEXTS)["input_ids"]
    for text, ids, row in zip(PLAIN_TEXTS, encoded, reference):
        assert ids[0] == 49406 and ids[-1] == 49407, text
        assert_ids_equal_open_clip(ids, row)


def test_clip_tokenizer_alone_differs_from_open_clip_where_ftfy_and_html_cleaning_matter(tokenizer, open_clip_tokenize):
    # Documented: the fast tokenizer's normaliser only does NFC, whitespace and lower case.
    reference = open_clip_tokenize(DIRTY_TEXTS)
    encoded = tokenizer(DIRTY_TEXTS)["input_ids"]
    differ = [ids != row[: len(ids)].tolist() for ids, row in zip(encoded, reference)]
    assert all(differ)


def test_processor_ids_equal_open_clip_for_plain_and_dirty_texts(processor, open_clip_tokenize):
    texts = PLAIN_TEXTS + DIRTY_TEXTS
    batch = processor(text=texts)
    for ids, mask, row in zip(batch["input_ids"], batch["attention_mask"], open_clip_tokenize(texts)):
        assert_ids_equal_open_clip(ids[mask.bool()].tolist(), row)


def test_clean_clip_text_matches_open_clip_cleaning():
    from open_clip.tokenizer import _clean_lower

    for text in PLAIN_TEXTS + DIRTY_TEXTS:
        assert clean_clip_text(text) == _clean_lower(text)


def test_over_long_texts_are_truncated_to_77_with_end_token_last_like_open_clip(tokenizer, processor, open_clip_tokenize):
    reference = open_clip_tokenize([LONG_TEXT])[0].tolist()
    from_tokenizer = tokenizer(LONG_TEXT, truncation=True)["input_ids"]
    from_processor = processor(text=[LONG_TEXT, "short"])["input_ids"]
    assert len(from_tokenizer) == 77 and from_tokenizer[-1] == 49407
    assert from_tokenizer == reference
    assert from_processor.shape == (2, 77)
    assert from_processor[0].tolist() == reference


def test_processor_pads_each_text_path_to_its_longest_row_not_to_77(processor):
    text = ["a cat", "a dog sitting on a red mat"]
    captions = ["one", "two words", "three whole words"]
    batch = processor(text=text, captions=captions[:2])
    lengths = [len(processor.tokenizer(clean_clip_text(t))["input_ids"]) for t in text]
    assert batch["input_ids"].shape == (2, max(lengths))
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    assert batch["caption_input_ids"].shape == (2, 4)  # <start> two words <end>
    assert batch["caption_attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    # Padding uses the end token, so each row still has its end token at `length - 1`.
    assert (batch["input_ids"][0, lengths[0] - 1 :] == 49407).all()


def test_processor_pads_to_max_length_only_when_asked(processor):
    batch = processor(text=["a cat"], padding="max_length")
    assert batch["input_ids"].shape == (1, 77)
    batch = processor(text=["a cat"], padding="max_length", max_length=12)
    assert batch["input_ids"].shape == (1, 12)


def test_processor_rejects_training_batches_whose_sizes_differ_naming_the_arguments(processor):
    image = Image.new("RGB", (32, 32))
    with pytest.raises(ValueError, match="captions.*2|text.*3"):
        processor(text=["a", "b", "c"], captions=["a", "b"])
    with pytest.raises(ValueError, match="images"):
        processor(images=[image], text=["a", "b"], captions=["a", "b"])
    # Without captions it is CLIP's call: N images and M texts.
    batch = processor(images=[image], text=["a", "b"])
    assert batch["pixel_values"].shape[0] == 1 and batch["input_ids"].shape[0] == 2
    with pytest.raises(ValueError, match="at least one"):
        processor()


def test_processor_rejects_non_string_texts_naming_argument_and_index(processor):
    with pytest.raises(TypeError, match=r"`captions`\[1\]"):
        processor(text=["a", "b"], captions=["a", None])
    with pytest.raises(TypeError, match="`text` must be"):
        processor(text=3)


def test_processor_rejects_unknown_text_cleaning(processor):
    with pytest.raises(ValueError, match="text_cleaning"):
        ALIPProcessor(processor.image_processor, processor.tokenizer, text_cleaning="lower")


def test_default_image_processing_is_short_side_resize_centre_crop_and_clip_normalisation(processor):
    colour = (200, 100, 50)
    images = [Image.new("RGB", (40, 50), colour), Image.new("RGB", (64, 30), colour)]
    pixel_values = processor(images=images)["pixel_values"]
    assert pixel_values.shape == (2, 3, 30, 30)
    # OpenAI CLIP's normalisation as open_clip publishes it.
    mean, std = open_clip.constants.OPENAI_DATASET_MEAN, open_clip.constants.OPENAI_DATASET_STD
    expected = (torch.tensor(colour) / 255 - torch.tensor(mean)) / torch.tensor(std)
    torch.testing.assert_close(pixel_values, expected.view(1, 3, 1, 1).expand_as(pixel_values), atol=1e-5, rtol=0)


def test_from_config_uses_image_size_and_context_length_and_rejects_other_vocabularies():
    processor = ALIPProcessor.from_config(tiny_alip_config())
    assert processor.image_processor.crop_size.height == 30
    assert processor.tokenizer.model_max_length == 77
    other = tiny_alip_config()
    other.text_config.vocab_size = 32128
    with pytest.raises(ValueError, match="vocab_size"):
        ALIPProcessor.from_config(other)


def tiny_t5_tokenizer() -> T5Tokenizer:
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0), ("▁a", -1.0), ("▁cat", -1.0),
              ("▁Cat", -1.0), ("▁on", -1.0), ("▁mat", -1.0)]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=6)


def test_processor_with_a_t5_tokenizer_keeps_case_and_pads_with_its_pad_token(processor):
    t5 = ALIPProcessor(processor.image_processor, tiny_t5_tokenizer())
    assert t5.text_cleaning == "none"
    batch = t5(text=["a Cat", "a cat on a mat"], captions=["a cat", "a cat"])
    assert batch["input_ids"][0].tolist() == [4, 6, 1, 0, 0, 0]  # cased "▁Cat", </s>, then <pad>
    assert batch["input_ids"][1].tolist() == [4, 5, 7, 4, 8, 1]  # exactly model_max_length
    assert batch["caption_input_ids"].tolist() == [[4, 5, 1], [4, 5, 1]]
    truncated = t5(text=["a cat on a mat a cat"])["input_ids"]
    assert truncated.shape == (1, 6) and truncated[0, -1].item() == 1  # end token kept


def test_save_pretrained_from_pretrained_round_trip(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = ALIPProcessor.from_pretrained(tmp_path)
    assert loaded.text_cleaning == "clip"
    assert loaded.tokenizer.model_max_length == 77
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (41, 37, 3), dtype=np.uint8))
    inputs = dict(images=[image, image], text=PLAIN_TEXTS[:2], captions=DIRTY_TEXTS[:2])
    expected, actual = processor(**inputs), loaded(**inputs)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


def test_text_features_do_not_depend_on_padding_length(tiny_model, processor, open_clip_tokenize):
    tiny_model.eval()
    assert tiny_model.config.text_config.eos_token_id == processor.tokenizer.eos_token_id
    texts = ["a cat", "a dog sitting on a red mat", "3 birds!"]
    longest = processor(text=texts)
    to_77 = processor(text=texts, padding="max_length")
    assert longest["input_ids"].shape[1] < 77 == to_77["input_ids"].shape[1]
    with torch.no_grad():
        features = [
            tiny_model.get_text_features(input_ids=longest["input_ids"], attention_mask=longest["attention_mask"]),
            tiny_model.get_text_features(input_ids=to_77["input_ids"], attention_mask=to_77["attention_mask"]),
            tiny_model.get_text_features(input_ids=to_77["input_ids"]),
            tiny_model.get_text_features(input_ids=longest["input_ids"]),
            # open_clip's own ids, zero-padded to 77, no mask
            tiny_model.get_text_features(input_ids=open_clip_tokenize(texts)),
        ]
    for other in features[1:]:
        assert (other.pooler_output - features[0].pooler_output).abs().max() < 1e-5


# ---- transformers' processor keywords (tests/test_transformers_contract.py runs transformers' own suite) -----------
def test_structured_text_kwargs_apply_to_both_text_paths(processor):
    batch = processor(text=["a cat"], captions=["a dog"], text_kwargs={"padding": "max_length", "max_length": 12},
                      common_kwargs={"return_tensors": "np"})
    assert isinstance(batch["input_ids"], np.ndarray)
    assert batch["input_ids"].shape == batch["caption_input_ids"].shape == (1, 12)


def test_flat_image_option_reaches_the_image_processor(processor):
    image = np.full((30, 30, 3), 200, dtype=np.uint8)
    pixels = processor(images=[image], do_rescale=False, do_normalize=False)["pixel_values"]
    assert pixels.max().item() == pytest.approx(200.0)  # not rescaled to [0, 1]


def test_tokenizer_saved_with_max_length_padding_is_honoured_on_both_paths(processor, tmp_path):
    tokenizer = clip_tokenizer()
    tokenizer.init_kwargs.update(padding="max_length", max_length=117)
    ALIPProcessor(processor.image_processor, tokenizer).save_pretrained(tmp_path)
    loaded = ALIPProcessor.from_pretrained(tmp_path)
    batch = loaded(text=["a cat"], captions=["a dog"])
    assert batch["input_ids"].shape == batch["caption_input_ids"].shape == (1, 117)
    assert loaded(text=["a cat"], padding="longest")["input_ids"].shape == (1, 4)  # a call still overrides it


def test_call_declares_only_inputs_and_takes_options_as_keywords():
    import inspect

    parameters = inspect.signature(ALIPProcessor.__call__).parameters
    assert [name for name in parameters if name not in ("self", "kwargs")] == ["images", "text", "captions"]
    assert all(parameters[name].default is None for name in ("images", "text", "captions"))


def test_text_option_the_processor_cannot_honour_is_an_error_naming_it(processor):
    with pytest.raises(ValueError, match="stride"):
        processor(text=["a cat"], stride=2)
    padded = processor(text=["a cat"], pad_to_multiple_of=8, padding_side="left")
    assert padded["input_ids"].shape == (1, 8) and padded["attention_mask"][0].tolist() == [0] * 4 + [1] * 4
