"""transformers' own model and processor test suites, run against CLIP's classes and ALIP's with the same inputs.

`ModelTesterMixin` and `ProcessorTesterMixin` come from the sdist of the installed transformers (see
`_transformers_suite.py`). Each suite runs twice: once on `CLIPModel` / `CLIPProcessor` (the reference) and once on
`ALIPModel` / `ALIPProcessor`. The tests skipped for both say why (as transformers' own CLIP test file skips them);
ALIP passes everything CLIP passes, except the differences named in `ALIP_DIFFERENCES` below.
"""

import unittest

import pytest
import torch
from _transformers_suite import transformers_suite
from conftest import tiny_alip_config
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from modeling_alip import ALIPConfig, ALIPModel, ALIPProcessor, clip_tokenizer

modeling_common = transformers_suite("test_modeling_common")
configuration_common = transformers_suite("test_configuration_common")
processing_common = transformers_suite("test_processing_common")

# The intentional differences between ALIP's classes and CLIP's in transformers' contract, each with its reason.
ALIP_DIFFERENCES = {
    "end token": "ALIPModel raises on a text row without the end token; CLIPModel silently pools token 0 there",
}


class TextImageTester:
    """Builds tiny configs and paired inputs for a CLIP-style model (the `model_tester` of `ModelTesterMixin`).

    Hidden 32, 2 layers, 4 heads, intermediate 37, image 30, patch 2, a 99-token vocabulary; each text row is
    `length` tokens (random, 2..7) ending in the end token, then padding, as a tokenizer gives them.
    """

    def __init__(self, parent, config_class, batch_size: int = 12, seq_length: int = 7, vocab_size: int = 99):
        self.parent, self.config_class = parent, config_class
        self.batch_size, self.seq_length, self.vocab_size = batch_size, seq_length, vocab_size
        self.is_training = True
        self.eos_token_id = vocab_size - 1
        # Attributes the mixin reads from its tester (composite models: the text tower's).
        self.hidden_size, self.num_hidden_layers, self.num_attention_heads = 32, 2, 4

    def get_config(self):
        tower = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, dropout=0.1,
                     attention_dropout=0.1, initializer_range=0.02)
        text_config = dict(tower, vocab_size=self.vocab_size, max_position_embeddings=512, projection_dim=32,
                           bos_token_id=0, eos_token_id=self.eos_token_id, pad_token_id=1)
        vision_config = dict(tower, image_size=30, patch_size=2, num_channels=3, projection_dim=32)
        return self.config_class(text_config=text_config, vision_config=vision_config, projection_dim=64)

    def prepare_config_and_inputs(self):
        generator = torch.Generator().manual_seed(0)
        shape = (self.batch_size, self.seq_length)
        input_ids = torch.randint(2, self.eos_token_id, shape, generator=generator)
        lengths = torch.randint(2, self.seq_length + 1, (self.batch_size,), generator=generator)
        positions = torch.arange(self.seq_length)
        attention_mask = (positions < lengths[:, None]).long()
        input_ids[positions == (lengths[:, None] - 1)] = self.eos_token_id
        input_ids[attention_mask == 0] = 1
        pixel_values = modeling_common.floats_tensor([self.batch_size, 3, 30, 30])
        return self.get_config(), input_ids, attention_mask, pixel_values

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, attention_mask, pixel_values = self.prepare_config_and_inputs()
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
                  "return_loss": True}
        return config, inputs


class ModelContract(modeling_common.ModelTesterMixin):
    """`ModelTesterMixin` set up as transformers' `CLIPModelTest` is (a composite model without resizable
    embeddings); subclasses name the model class."""

    config_class = CLIPConfig
    test_resize_embeddings = False
    test_attention_outputs = False
    test_torch_exportable = False  # the sdist ships no exporters/ tests (see _transformers_suite.py)
    _is_composite = True

    def setUp(self):
        self.model_tester = TextImageTester(self, self.config_class)
        self.config_tester = configuration_common.ConfigTester(
            self, config_class=self.config_class, has_text_modality=False,
            common_properties=["projection_dim", "logit_scale_init_value"])

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model_logits_are_images_by_texts(self):
        config, input_ids, attention_mask, pixel_values = self.model_tester.prepare_config_and_inputs()
        model = self.all_model_classes[0](config).eval()
        with torch.no_grad():
            output = model(input_ids=input_ids[:5], pixel_values=pixel_values[:3], attention_mask=attention_mask[:5])
        self.assertEqual(tuple(output.logits_per_image.shape), (3, 5))
        self.assertEqual(tuple(output.logits_per_text.shape), (5, 3))

    # The skips of transformers' CLIPModelTest, for the same reasons: the towers are tested on their own there.
    @unittest.skip(reason="composite model: hidden states are tested per tower")
    def test_hidden_states_output(self):
        pass

    @unittest.skip(reason="composite model: inputs_embeds is tested per tower")
    def test_inputs_embeds(self):
        pass

    @unittest.skip(reason="composite model: retain_grad is tested per tower")
    def test_retain_grad_hidden_states_attentions(self):
        pass

    @unittest.skip(reason="CLIPModel has no single input/output embedding")
    def test_model_get_set_embeddings(self):
        pass


# transformers' CLIPModelTest replaces the mixin's generic eager-vs-SDPA test with its own (CLIP returns image and
# text logits, and its text tower does not take left padding); the generic one fails on CLIPModel. The project's
# test_model.py compares the attention backends on ALIP's loss instead.
for _name in dir(ModelContract):
    if _name.startswith("test_eager_matches_sdpa_inference"):
        setattr(ModelContract, _name, unittest.skip("CLIP-style models replace this test (see above)")(lambda self: None))


class CLIPModelContractTest(ModelContract, unittest.TestCase):
    all_model_classes = (CLIPModel,)


class ALIPModelContractTest(ModelContract, unittest.TestCase):
    all_model_classes = (ALIPModel,)
    config_class = ALIPConfig


# ---- the documented difference and the fixed call -----------------------------------------------------------------
def test_alip_requires_the_end_token_where_clip_pools_token_zero():
    tester = TextImageTester(None, ALIPConfig)
    config, input_ids, attention_mask, pixel_values = tester.prepare_config_and_inputs()
    input_ids[input_ids == tester.eos_token_id] = 2
    CLIPModel(CLIPConfig(**config.to_dict()))(input_ids=input_ids, pixel_values=pixel_values)
    with pytest.raises(ValueError, match="no end token"):
        ALIPModel(config)(input_ids=input_ids, pixel_values=pixel_values)


def test_from_pretrained_none_with_config_and_state_dict_builds_the_model():
    config = tiny_alip_config()
    torch.manual_seed(0)
    model = ALIPModel(config)
    model.gates.lcg.text_caption.running_mean.fill_(0.25)  # a trained gate: its buffer must load too
    state_dict = model.state_dict()
    loaded = ALIPModel.from_pretrained(None, config=config, state_dict=state_dict)
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, state_dict[name], rtol=0, atol=0, msg=name)


# ---- processors ---------------------------------------------------------------------------------------------------
def _image_processor():
    return CLIPImageProcessor(size={"shortest_edge": 20}, crop_size={"height": 18, "width": 18})


class ProcessorContract(processing_common.ProcessorTesterMixin):
    """`ProcessorTesterMixin` on a processor built from the offline CLIP tokenizer and a small image processor."""

    @classmethod
    def _setup_image_processor(cls):
        return _image_processor()

    @classmethod
    def _setup_tokenizer(cls):
        return clip_tokenizer()


class CLIPProcessorContractTest(ProcessorContract, unittest.TestCase):
    processor_class = CLIPProcessor


class ALIPProcessorContractTest(ProcessorContract, unittest.TestCase):
    processor_class = ALIPProcessor
