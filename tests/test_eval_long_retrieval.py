"""The long-caption retrieval presets (Urban1k, ShareGPT4V-1k, DOCCI, DCI) on tiny copies in their publishers'
layouts (tests/_long_retrieval_layout.py): each image paired with its own long text through the real retrieval
path, the published subset (the first 1000 ShareGPT4V entries, DOCCI's test split, all of DCI's splits), the
publisher's text, errors naming the missing file or field, and texts cut at the model's text positions (248 for a
Long-CLIP model, whatever its tokenizer says), never at 77."""

import json
import zipfile
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from _long_retrieval_layout import (
    SHAREGPT4V_JSON,
    write_dci_copy,
    write_docci_copy,
    write_sharegpt4v_copy,
    write_urban1k_copy,
)
from alip_hf import eval as eval_cli
from alip_hf import evaluation as ev
from alip_hf.evaluation import features, loading, long_retrieval, presets
from conftest import tiny_alip_config
from modeling_alip import ALIPModel, ALIPProcessor

GROUP = ["urban1k", "sharegpt4v_1k", "docci", "dci"]
COLOURS = [(220, 30, 30), (30, 200, 40), (30, 40, 220), (230, 220, 40), (40, 220, 220), (220, 40, 220)]
MARKERS = ["apple", "banana", "cherry", "lemon", "mango", "peach"]  # one CLIP BPE token each
# About 20 tokens; seven of them and the marker make a caption of about 150 tokens: past 77, within 248.
FILLER = "the picture shows a quiet street with old houses , parked cars and people walking under tall trees . "


def long_caption(i: int) -> str:
    return FILLER * 7 + f"in the corner there is a {MARKERS[i]}"


def colour_images(count: int) -> list[Image.Image]:
    return [Image.new("RGB", (20, 16), colour) for colour in COLOURS[:count]]


@pytest.fixture(scope="module")
def processor():
    return ALIPProcessor.default(image_size=30, model_max_length=77)  # a tokenizer that says 77, on purpose


class PairingOracle(torch.nn.Module):
    """Not a network: image i (solid colour `COLOURS[i]`) and any text holding the word `MARKERS[i]` both get the
    feature e_i. Retrieval is then perfect exactly when every image is paired with its own text, and a text cut
    before its marker (the last word of a ~150-token caption) gets the zero feature."""

    def __init__(self, processor, positions: int, count: int = 5):
        super().__init__()
        self.config = SimpleNamespace(text_config=SimpleNamespace(max_position_embeddings=positions))
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # the encoders read the device and dtype from it
        pixels = processor(images=colour_images(count), return_tensors="pt")["pixel_values"]
        self.register_buffer("centres", pixels.mean(dim=(2, 3)))
        ids = [processor.tokenize([word])[0]["input_ids"][0, 1:-1].tolist() for word in MARKERS[:count]]
        assert all(len(i) == 1 for i in ids), ids
        self.markers = torch.tensor([i[0] for i in ids])
        self.text_lengths = []

    def get_image_features(self, pixel_values):
        nearest = torch.cdist(pixel_values.mean(dim=(2, 3)), self.centres).argmin(dim=1)
        return SimpleNamespace(pooler_output=F.one_hot(nearest, len(self.centres)).float())

    def get_text_features(self, input_ids, attention_mask=None):
        self.text_lengths.append(input_ids.shape[1])
        return SimpleNamespace(pooler_output=(input_ids[:, :, None] == self.markers).any(dim=1).float())


def write_copy(preset: str, data_root, count: int = 5, more_sharegpt4v_entries: int = 0):
    """A copy of `preset` under `data_root` (where `--data_root` looks), holding `count` images with their long
    captions, among entries of other splits where the set has them."""
    images, captions = colour_images(count), [long_caption(i) for i in range(count)]
    if preset == "urban1k":
        return write_urban1k_copy(data_root / "Urban1k", images, captions)
    if preset == "sharegpt4v_1k":
        return write_sharegpt4v_copy(data_root / "ShareGPT4V", images, captions, more_entries=more_sharegpt4v_entries)
    if preset == "docci":
        grey = Image.new("RGB", (20, 16), (128, 128, 128))
        records = [("train_00000", "train", grey, "a train image"), ("qual_dev_00000", "qual_dev", grey, "dev")]
        records += [(f"test_{i:05d}", "test", image, text) for i, (image, text) in enumerate(zip(images, captions))]
        return write_docci_copy(data_root / "docci", records[:3] + [("train_00001", "train", grey, "x")] + records[3:])
    entries = [(120494 + i, image, "A street scene.", text) for i, (image, text) in enumerate(zip(images, captions))]
    return write_dci_copy(data_root, {"train": entries[:2], "valid": entries[2:3], "test": entries[3:]})


def long_task(preset: str, data_root, count: int = 5) -> ev.EvalTask:
    task = presets.with_data_root(presets.PRESETS[preset][0], data_root)
    return replace(task, first_rows=count) if preset == "sharegpt4v_1k" else task


# --------------------------------------------------------------------------------------------------------------
# The presets
# --------------------------------------------------------------------------------------------------------------


def test_long_retrieval_group_is_the_four_sets_with_their_published_sizes(tmp_path):
    tasks = ev.resolve_tasks("long_retrieval")
    assert [(t.name, t.layout, t.split, t.expected_rows, t.first_rows) for t in tasks] == [
        ("urban1k", "urban1k", "test", 1000, None), ("sharegpt4v_1k", "sharegpt4v", "all", 1000, 1000),
        ("docci", "docci", "test", 5000, None), ("dci", "dci", "all", 7805, None)]
    assert {(t.task, t.caption_columns, t.main_metric) for t in tasks} == {
        ("zeroshot_retrieval", ("caption",), "mean_recall@1")}
    assert [presets.with_data_root(t, tmp_path).source for t in tasks] == [
        str(tmp_path / name) for name in ("Urban1k", "ShareGPT4V", "docci", "densely_captioned_images")]


# --------------------------------------------------------------------------------------------------------------
# Each image with its own text, through the retrieval runner; texts cut at the model's positions
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", GROUP)
def test_each_image_is_retrieved_with_its_own_long_caption(preset, processor, tmp_path):
    write_copy(preset, tmp_path, more_sharegpt4v_entries=3)
    oracle = PairingOracle(processor, positions=248)
    (record,) = ev.run_evaluation(oracle, processor, long_task(preset, tmp_path))
    assert record["metrics"] == {f"{d}_retrieval_recall@{k}": 1.0 for d in ("image", "text") for k in (1, 5, 10)}
    assert (record["num_images"], record["num_texts"], record["texts_truncated"]) == (5, 5, 0)
    assert record["text_positions"] == 248 and min(oracle.text_lengths) > 77  # whole captions, not 77 tokens


@pytest.mark.parametrize("preset", ["urban1k", "dci"])
def test_a_77_position_model_loses_the_tail_of_the_captions_and_the_record_says_so(preset, processor, tmp_path):
    write_copy(preset, tmp_path)
    (record,) = ev.run_evaluation(PairingOracle(processor, positions=77), processor, long_task(preset, tmp_path))
    assert (record["text_positions"], record["texts_truncated"]) == (77, 5)
    # every text lost its marker: all scores tie, and a query finds its match first 1 time in 5 on average
    assert record["metrics"]["image_retrieval_recall@1"] == pytest.approx(1 / 5)


def test_swapped_images_are_caught_by_the_pairing_check(processor, tmp_path):
    root = write_copy("urban1k", tmp_path)
    with zipfile.ZipFile(root / "Urban1k.zip") as zf:
        members = {name: zf.read(name) for name in zf.namelist()}
    members["Urban1k/image/1.jpg"], members["Urban1k/image/2.jpg"] = (members["Urban1k/image/2.jpg"],
                                                                       members["Urban1k/image/1.jpg"])
    with zipfile.ZipFile(root / "Urban1k.zip", "w") as zf:
        for name, payload in members.items():
            zf.writestr(name, payload)
    (record,) = ev.run_evaluation(PairingOracle(processor, positions=248), processor, long_task("urban1k", tmp_path))
    assert record["metrics"]["image_retrieval_recall@1"] == pytest.approx(3 / 5)


def test_a_248_position_alip_model_encodes_a_long_caption_whole_though_its_tokenizer_says_77(processor):
    config = tiny_alip_config()
    config.text_config.max_position_embeddings = 248
    torch.manual_seed(0)
    model = ALIPModel(config).eval()
    lengths = []
    original = model.get_text_features
    model.get_text_features = lambda **kw: lengths.append(kw["input_ids"].shape[1]) or original(**kw)
    caption = long_caption(0)
    whole = processor.tokenize([caption], truncation=False)[0]["input_ids"].shape[1]
    assert features.text_limit(model) == 248 and processor.tokenizer.model_max_length == 77 and 77 < whole < 248
    embeddings = features.encode_texts(model, processor, [caption, caption.rsplit(" ", 1)[0] + " banana"])
    assert lengths == [whole]
    assert not torch.allclose(embeddings[0], embeddings[1])  # the last word, past token 77, changes the feature
    assert features.texts_over_limit(processor, [caption, "a short one"], 248) == 0
    assert features.texts_over_limit(processor, [caption, "a short one"], 77) == 1


# --------------------------------------------------------------------------------------------------------------
# What each set reads: subset, order, text
# --------------------------------------------------------------------------------------------------------------


def test_urban1k_pairs_caption_n_with_image_n_in_numeric_order_and_reads_the_first_line(tmp_path):
    images = colour_images(3) * 4
    captions = [f"caption of {n}\nsecond line" for n in range(1, 13)]
    root = write_urban1k_copy(tmp_path / "Urban1k", images, captions)
    task = long_task("urban1k", tmp_path)
    dataset, image_column = loading.load_split(task, "test")
    assert dataset["id"] == [str(n) for n in range(1, 13)]  # 1, 2, ..., 10, 11, 12: not 1, 10, 11, 12, 2, ...
    assert dataset["caption"] == [f"caption of {n}" for n in range(1, 13)]
    assert dataset[image_column] == [str(root / "Urban1k" / "image" / f"{n}.jpg") for n in range(1, 13)]
    (root / "Urban1k.zip").unlink()  # the folder the zip was unpacked to is read as it is
    assert loading.load_split(task, "test")[0]["caption"] == dataset["caption"]


def test_urban1k_without_a_mirror_downloads_urban1k_zip_from_its_hub_dataset(tmp_path, monkeypatch):
    import huggingface_hub

    cache = write_urban1k_copy(tmp_path / "hub-cache", colour_images(3), ["one", "two", "three"])
    calls = []

    def hf_hub_download(repo_id, filename, repo_type=None, revision=None):
        calls.append((repo_id, filename, repo_type))
        return str(cache / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    dataset, _ = loading.load_split(presets.PRESETS["urban1k"][0], "test")
    assert calls == [("BeichenZhang/Urban1k", "Urban1k.zip", "dataset")]
    assert dataset["caption"] == ["one", "two", "three"] and (cache / "Urban1k" / "image" / "3.jpg").is_file()


def test_sharegpt4v_1k_reads_exactly_the_first_1000_entries_of_the_captioner_json(tmp_path):
    captions = [f"The image {i} shows a street.\n\nA car is parked." for i in range(1000)]
    root = write_sharegpt4v_copy(tmp_path / "ShareGPT4V", [Image.new("RGB", (4, 4), (i % 256, 0, 0))
                                                           for i in range(1000)], captions)
    path = root / SHAREGPT4V_JSON
    path.write_text(path.read_text()[:-1] + ', {"id": "sa_1", "image": "sam/images/gone.jpg"}, {"broken": ]')
    task = presets.with_data_root(presets.PRESETS["sharegpt4v_1k"][0], tmp_path)
    dataset, image_column = loading.load_split(task, task.split)  # the malformed tail is never parsed
    assert dataset["id"] == [f"sa_{545504 + i}" for i in range(1000)]
    assert dataset["caption"][7] == "The image 7 shows a street.  A car is parked."  # Long-CLIP: "\n" -> " "
    assert dataset[image_column][999] == str(root / "sam" / "images" / "sa_546503.jpg")


def test_sharegpt4v_images_are_found_beside_the_json_or_in_its_parent_as_sharegpt4v_lays_them_out(tmp_path):
    data = write_sharegpt4v_copy(tmp_path / "data", colour_images(2), ["one", "two"])
    (data / "sharegpt4v").mkdir()
    (data / SHAREGPT4V_JSON).rename(data / "sharegpt4v" / SHAREGPT4V_JSON)  # data/sharegpt4v/<json>, data/sam/images
    task = replace(presets.PRESETS["sharegpt4v_1k"][0], source=str(data / "sharegpt4v"))
    dataset, _ = loading.load_split(task, "all")
    assert dataset["image"] == [str(data / "sam" / "images" / f"sa_{545504 + i}.jpg") for i in range(2)]


def test_docci_takes_the_test_split_only_in_file_order_and_unpacks_only_its_images(tmp_path):
    root = write_copy("docci", tmp_path)
    task = long_task("docci", tmp_path)
    dataset, image_column = loading.load_split(task, task.split)
    assert dataset["id"] == [f"test_{i:05d}" for i in range(5)]
    assert dataset["caption"] == [long_caption(i) for i in range(5)]
    assert dataset[image_column][0] == str(root / "images" / "test_00000.jpg")
    assert sorted(p.name for p in (root / "images").iterdir()) == [f"test_{i:05d}.jpg" for i in range(5)]
    (root / "docci_images.tar.gz").unlink()  # unpacked once: the folder is read without the tar
    assert loading.load_split(task, task.split)[0]["id"] == dataset["id"]


def test_dci_reads_every_split_of_splits_json_in_its_order_with_lotlips_text(tmp_path):
    write_copy("dci", tmp_path)
    task = long_task("dci", tmp_path)
    dataset, _ = loading.load_split(task, "all")
    assert dataset["id"] == [f"{120494 + i}-data" for i in range(5)]  # train, valid, test as splits.json lists them
    assert dataset["caption"][0] == "A street scene. " + ". ".join(
        part.strip() for part in long_caption(0).split(".") if part.strip())
    assert loading.load_split(task, "test")[0]["id"] == ["120497-data", "120498-data"]
    # the copy's parent folder (LoTLIP's `dci_root`) is read too
    assert loading.load_split(replace(task, source=str(tmp_path)), "valid")[0]["id"] == ["120496-data"]


def test_lotlip_caption_joins_short_and_extra_caption_as_sentences():
    assert long_retrieval.lotlip_caption("A water pump.", "It is red.\n\nThe sky </s> is blue. ") == \
        "A water pump. It is red. The sky. is blue"


def test_json_array_items_are_parsed_while_reading_across_chunk_boundaries(tmp_path):
    items = [{"id": "sa_1", "value": "line\n] , {"}, 12.5, [1, {"a": None}], "x", True, -3e-05, {}]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(items, indent=1))
    for chunk in (1, 2, 5, 1 << 20):
        assert list(long_retrieval.iter_json_array(path, chunk)) == items
    for text, error in (('{"a": 1}', "not a JSON array"), ("[1, 2", "without its closing"), ("[1 2]", "after item 0"),
                        ('[{"a": }]', "item 0 is not valid JSON")):
        path.write_text(text)
        with pytest.raises(ValueError, match=error):
            list(long_retrieval.iter_json_array(path, 2))


# --------------------------------------------------------------------------------------------------------------
# A broken copy: errors naming the file or field
# --------------------------------------------------------------------------------------------------------------


def test_urban1k_errors_name_the_missing_zip_image_or_the_empty_caption_file(tmp_path):
    task = long_task("urban1k", tmp_path)
    with pytest.raises(FileNotFoundError, match="not a folder holding Urban1k.zip"):
        loading.load_split(task, "test")
    (tmp_path / "Urban1k").mkdir()
    with pytest.raises(FileNotFoundError, match="Urban1k.zip not found"):
        loading.load_split(task, "test")
    with zipfile.ZipFile(tmp_path / "Urban1k" / "Urban1k.zip", "w") as zf:
        zf.writestr("Urban-1k/caption/1.txt", "a caption")
    with pytest.raises(FileNotFoundError, match=r"no Urban1k/caption/<n>.txt members .*'Urban-1k/caption/1.txt'"):
        loading.load_split(task, "test")
    root = write_urban1k_copy(tmp_path / "Urban1k", colour_images(3), ["one", "", "three"])
    with pytest.raises(ValueError, match=r"caption/2.txt: the first line is empty"):
        loading.load_split(task, "test")
    write_urban1k_copy(root, colour_images(3), ["one", "two", "three"])
    (root / "Urban1k" / "image" / "3.jpg").unlink()
    (root / "Urban1k.zip").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of the 3 Urban1k images .* missing: .*image/3.jpg"):
        loading.load_split(task, "test")
    with pytest.raises(ValueError, match="no split 'train'"):
        loading.load_split(task, "train")


def test_sharegpt4v_errors_name_the_json_the_entry_or_the_image(tmp_path):
    task = long_task("sharegpt4v_1k", tmp_path, count=2)
    (tmp_path / "ShareGPT4V").mkdir()
    with pytest.raises(FileNotFoundError, match=f"{SHAREGPT4V_JSON} not found"):
        loading.load_split(task, "all")
    root = write_sharegpt4v_copy(tmp_path / "ShareGPT4V", colour_images(1), ["one", "two"])
    with pytest.raises(FileNotFoundError, match=r"1 of the 2 images .* missing: .*sam/images/sa_545505.jpg"):
        loading.load_split(task, "all")
    entries = json.loads((root / SHAREGPT4V_JSON).read_text())
    entries[1]["conversations"] = entries[1]["conversations"][:1]
    (root / SHAREGPT4V_JSON).write_text(json.dumps(entries))
    with pytest.raises(ValueError, match=r"entry 1 has no 'image' or 'conversations'\[1\]\['value'\]"):
        loading.load_split(task, "all")
    entries[1]["conversations"] = [{"from": "human", "value": "q"}, {"from": "human", "value": "again"}]
    (root / SHAREGPT4V_JSON).write_text(json.dumps(entries))
    with pytest.raises(ValueError, match="conversations\\[1\\] is from 'human', not 'gpt'"):
        loading.load_split(task, "all")


def test_docci_errors_name_the_descriptions_line_the_split_or_the_missing_images(tmp_path):
    task = long_task("docci", tmp_path)
    root = write_copy("docci", tmp_path)
    with pytest.raises(ValueError, match=r"no description of split 'validation'; splits: \['qual_dev', 'test', "):
        loading.load_split(task, "validation")
    (root / "docci_images.tar.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"docci_images.tar.gz not found, and 5 of the 5 DOCCI test images"):
        loading.load_split(task, "test")
    lines = (root / "docci_descriptions.jsonlines").read_text().splitlines()
    record = json.loads(lines[1])
    del record["description"]
    (root / "docci_descriptions.jsonlines").write_text("\n".join([lines[0], json.dumps(record)] + lines[2:]))
    with pytest.raises(ValueError, match=r"docci_descriptions.jsonlines line 2: no field\(s\) \['description'\]"):
        loading.load_split(task, "test")
    (root / "docci_descriptions.jsonlines").unlink()
    with pytest.raises(FileNotFoundError, match="docci_descriptions.jsonlines not found"):
        loading.load_split(task, "test")


def test_dci_errors_name_the_annotation_file_the_field_or_the_photo(tmp_path):
    task = long_task("dci", tmp_path)
    with pytest.raises(FileNotFoundError, match="not a folder holding splits.json"):
        loading.load_split(task, "all")
    folder = write_copy("dci", tmp_path)
    with pytest.raises(ValueError, match=r"no split 'val'; splits: \['all', 'train', 'valid', 'test'\]"):
        loading.load_split(task, "val")
    (folder / "photos" / "sa_120495.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of the 5 DCI photos \(SA-1B's sa_000138.tar .*sa_120495.jpg"):
        loading.load_split(task, "all")
    annotation = json.loads((folder / "annotations" / "120494-data.json").read_text())
    del annotation["extra_caption"]
    (folder / "annotations" / "120494-data.json").write_text(json.dumps(annotation))
    with pytest.raises(ValueError, match=r"120494-data.json: no field\(s\) \['extra_caption'\]"):
        loading.load_split(task, "all")
    (folder / "annotations" / "120498-data.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of the 5 DCI annotation files .*120498-data.json"):
        loading.load_split(task, "all")


# --------------------------------------------------------------------------------------------------------------
# eval.py --preset long_retrieval --data_root DIR
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture
def saved_model(tmp_path):
    config = tiny_alip_config()
    torch.manual_seed(0)
    ALIPModel(config).save_pretrained(tmp_path / "model")
    ALIPProcessor.from_config(config).save_pretrained(tmp_path / "model")
    return str(tmp_path / "model")


def test_eval_py_runs_the_long_retrieval_group_on_a_mirror_and_records_what_was_cut(saved_model, tmp_path):
    mirror = tmp_path / "mirror"
    for preset in GROUP:
        write_copy(preset, mirror)
    out = tmp_path / "results.json"
    records = eval_cli.main(["--model", saved_model, "--preset", "long_retrieval", "--data_root", str(mirror),
                             "--output", str(out), "--recall_curve_max_k", "0"])
    assert [(r["dataset"], r["status"], r["num_images"], r["expected_rows"]) for r in records] == [
        ("urban1k", "ok", 5, 1000), ("sharegpt4v_1k", "ok", 5, 1000), ("docci", "ok", 5, 5000), ("dci", "ok", 5, 7805)]
    saved = json.loads(out.read_text())["results"]
    assert {(r["text_positions"], r["texts_truncated"]) for r in saved} == {(77, 5)}  # a 77-token model cuts them
    # cut at 77 tokens, the five captions are the same text: every score ties, R@1 is 1 in 5
    assert [r["metrics"]["image_retrieval_recall@1"] for r in records] == pytest.approx([1 / 5] * 4)
    assert saved[1]["first_rows"] == 1000 and "first_rows" not in saved[0]


def test_eval_py_on_an_empty_data_root_records_each_set_failing_with_the_files_it_needs(saved_model, tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "results.json"
    with pytest.raises(SystemExit, match="4 of 4 evaluations failed"):
        eval_cli.main(["--model", saved_model, "--preset", "long_retrieval", "--data_root", str(tmp_path / "empty"),
                       "--output", str(out)])
    errors = [r["error"] for r in json.loads(out.read_text())["results"]]
    for error, needed in zip(errors, ("Urban1k.zip", SHAREGPT4V_JSON, "docci_descriptions.jsonlines", "splits.json")):
        assert error.startswith("FileNotFoundError") and needed in error and str(tmp_path / "empty") in error
