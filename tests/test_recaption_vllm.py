"""`recaption.caption --backend vllm`: requests built for vLLM's multimodal API and its outputs handled, tested
with a stand-in engine at vLLM's boundary (`LLM.generate(requests, sampling_params, use_tqdm=...)`). The stand-in
answers each request by running the same tiny model through transformers on exactly the prompt and image it
was given, so the captions can only match the transformers backend if the requests carry the right prompt
(chat template, image placeholder) and image, and the outputs are read the way vLLM returns them."""

import importlib.util
from types import SimpleNamespace

import pytest
import torch

import recaption.caption as caption_module
from alip_hf.data import load_source
from alip_hf.schema import CAPTION, CAPTION_PROMPT_VERSION, ERROR
from recaption.caption import CaptionArguments, Captioner, VllmCaptioner, caption
from _tiny_captioners import save_tiny_captioner, save_tiny_chat_captioner
from tests.test_recaption import gen, load_image_bytes, make_rows, run_args, write_parquet


class StandInLLM:
    """vLLM's `LLM` at its boundary: takes `{"prompt", "multi_modal_data": {"image"}}` requests and returns, per
    request in order, an object with `.outputs[0].text` (the completion only) and `.outputs[0].token_ids`."""

    def __init__(self, model: str):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(model)
        self.model = AutoModelForImageTextToText.from_pretrained(model).eval()
        self.requests = []

    def generate(self, requests, sampling_params, use_tqdm=True):
        self.requests += requests
        outputs = []
        for request in requests:
            text = request["prompt"] or None
            inputs = self.processor(images=[request["multi_modal_data"]["image"]],
                                    text=[text] if text else None, return_tensors="pt")
            with torch.inference_mode():
                out = self.model.generate(**inputs, max_new_tokens=sampling_params["max_tokens"], do_sample=False)
            if "input_ids" in inputs and not self.model.config.is_encoder_decoder and out.shape[1] > \
                    inputs["input_ids"].shape[1] and torch.equal(out[0, :inputs["input_ids"].shape[1]],
                                                                 inputs["input_ids"][0]):
                out = out[:, inputs["input_ids"].shape[1]:]  # vLLM returns the completion, not the prompt
            tokens = out[0].tolist()
            outputs.append(SimpleNamespace(outputs=[SimpleNamespace(
                text=self.processor.batch_decode(out, skip_special_tokens=True)[0], token_ids=tokens)]))
        return outputs


def vllm_captioner(model, prompt, generation, *args, **kw):
    return VllmCaptioner(model, prompt, generation, *args, llm=StandInLLM(model),
                         sampling_params={"temperature": 0.0, "max_tokens": generation.max_new_tokens}, **kw)


@pytest.mark.parametrize("chat", [False, True])
def test_vllm_requests_carry_the_transformers_prompt_and_the_image_and_give_the_same_captions(tmp_path, chat):
    if chat:
        model, prompt = save_tiny_chat_captioner(str(tmp_path / "chat")), CaptionArguments(preset="veclip").prompt
    else:
        model, prompt = save_tiny_captioner(str(tmp_path / "blip")), "w5 w6"
    generation = gen(batch_size=3)
    images = [load_image_bytes(i) for i in range(3)]
    reference = Captioner(model, prompt, generation)
    captioner = vllm_captioner(model, prompt, generation)
    requests = captioner.requests(images)
    assert [r["prompt"] for r in requests] == [reference.text or ""] * 3
    assert [r["multi_modal_data"]["image"] for r in requests] == images
    if chat:
        assert requests[0]["prompt"].startswith("<|user|> <image> Describe the image concisely")
    assert captioner(images) == reference(images)


def test_caption_with_the_vllm_backend_writes_the_same_rows_and_prompt_version(tmp_path, monkeypatch):
    model = save_tiny_chat_captioner(str(tmp_path / "chat"))
    source = write_parquet(str(tmp_path / "in.parquet"), make_rows(5))
    caption(run_args(source, tmp_path / "hf"), CaptionArguments(preset="veclip", model=model), gen())
    monkeypatch.setattr(caption_module, "VllmCaptioner", vllm_captioner)
    summary = caption(run_args(source, tmp_path / "vllm"), CaptionArguments(preset="veclip", model=model,
                                                                            backend="vllm"), gen())
    hf, vllm = load_source(str(tmp_path / "hf" / "data")), load_source(str(tmp_path / "vllm" / "data"))
    assert summary["rows"] == 5 and summary["throughput"]["output_tokens_per_replica_per_second"] > 0
    for column in (CAPTION, CAPTION_PROMPT_VERSION, ERROR, "id"):
        assert vllm[column] == hf[column], column
    assert set(vllm[CAPTION_PROMPT_VERSION]) == {"veclip-v1"}


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_vllm_caption_backend_without_vllm_names_the_package(tmp_path):
    model = save_tiny_captioner(str(tmp_path / "blip"))
    with pytest.raises(ImportError, match="pip install vllm"):
        VllmCaptioner(model, "", gen())


def test_vllm_caption_backend_refuses_beam_search(tmp_path):
    with pytest.raises(ValueError, match="--num_beams"):
        VllmCaptioner(str(tmp_path), "", gen(num_beams=2))
