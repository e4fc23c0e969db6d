"""The committed demo dataset (demo_data/), its builder, and the synthetic WebDataset writer."""

import importlib.util
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from alip_hf import data
from alip_hf.resources import DEMO_DATA

ROOT = Path(__file__).resolve().parents[1]
DEMO_DIR = DEMO_DATA
OPENCLIPART = Path("/usr/share/openclipart")


def _load_script(name: str):
    """scripts/ is a folder of runnable files, not a package: import one by path."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


builder = _load_script("build_demo_data")
webdataset_writer = _load_script("make_synthetic_webdataset")


# ---------------------------------------------------------------------------------------------------------
# The committed data


@pytest.fixture(scope="module")
def demo_splits():
    return {split: data.load_source(str(DEMO_DIR), split=split) for split in ("train", "test")}


def test_committed_demo_data_loads_through_load_source_with_contract_columns(demo_splits):
    for split, dataset in demo_splits.items():
        data.require_columns(dataset, {name: name for name in data.FEATURES})
        assert dataset.features == builder.FEATURES, split
        assert dataset.num_rows > 0, split
    assert 2500 <= sum(d.num_rows for d in demo_splits.values()) <= 4000


def test_every_committed_image_decodes_to_a_64px_rgb_square(demo_splits):
    for dataset in demo_splits.values():
        for image in dataset[data.IMAGE]:
            assert image.mode == "RGB" and image.size == (64, 64)


def test_committed_ids_are_unique_and_disjoint_between_splits(demo_splits):
    train_ids, test_ids = demo_splits["train"][data.ID], demo_splits["test"][data.ID]
    assert len(set(train_ids)) == len(train_ids)
    assert len(set(test_ids)) == len(test_ids)
    assert not set(train_ids) & set(test_ids)


def test_every_test_category_occurs_in_train_with_enough_images(demo_splits):
    train_categories = demo_splits["train"][builder.CATEGORY]
    test_categories = set(demo_splits["test"][builder.CATEGORY])
    assert test_categories == set(train_categories)
    assert 10 <= len(test_categories) <= 30
    assert min(train_categories.count(category) for category in test_categories) >= 25


def test_committed_texts_follow_the_card(demo_splits):
    for dataset in demo_splits.values():
        for row in dataset.remove_columns(data.IMAGE):
            assert row[data.ALT_TEXT] and row[data.ALT_TEXT] == " ".join(row[data.ALT_TEXT].split())
            assert row[data.CAPTION].startswith("clip art of ") and len(row[data.CAPTION]) > len("clip art of ")
            assert row[data.VECAP] == f"{row[data.ALT_TEXT]}: {row[data.CAPTION]}"
            assert row[data.CAPTION_MODEL] == "keywords" and row[data.REWRITE_MODEL] == "template"
            assert row[data.ERROR] == ""


def test_committed_demo_data_is_under_15_mb():
    total = sum(path.stat().st_size for path in DEMO_DIR.rglob("*") if path.is_file())
    assert total < 15 * 2**20


def test_dataset_card_header_matches_the_committed_splits(demo_splits):
    header = yaml.safe_load((DEMO_DIR / "README.md").read_text(encoding="utf-8").split("---")[1])
    assert header["license"] == "cc0-1.0"
    sizes = {split["name"]: split["num_examples"] for split in header["dataset_info"]["splits"]}
    assert sizes == {split: dataset.num_rows for split, dataset in demo_splits.items()}
    assert [f["name"] for f in header["dataset_info"]["features"]] == list(builder.FEATURES)


# ---------------------------------------------------------------------------------------------------------
# The builder on a small synthetic Open Clip Art tree


def _write_png(path: Path, size=(40, 30), colour=(255, 0, 0, 255)) -> None:
    """A transparent canvas with an opaque block in the middle."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGBA", size, (0, 0, 0, 0))
    w, h = size
    image.paste(colour, (w // 4, h // 4, 3 * w // 4, 3 * h // 4))
    image.save(path)


def _write_svg(path: Path, title: str, tags: list[str], creator: str = "Jane Doe") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    items = "".join(f"<rdf:li>{tag}</rdf:li>" for tag in tags)
    path.write_text(
        '<svg xmlns="http://www.w3.org/2000/svg" xmlns:dc="http://purl.org/dc/elements/1.1/" '
        'xmlns:cc="http://web.resource.org/cc/" xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        f'<metadata><rdf:RDF><cc:Work rdf:about=""><dc:title>{title}</dc:title>'
        f"<dc:subject><rdf:Bag>{items}</rdf:Bag></dc:subject>"
        f"<dc:creator><cc:Agent><dc:title>{creator}</dc:title></cc:Agent></dc:creator>"
        "</cc:Work></rdf:RDF></metadata></svg>",
        encoding="utf-8",
    )


def _clip(root: Path, relative: str, title: str | None, tags=(), **png) -> None:
    _write_png(root / "png" / f"{relative}.png", **png)
    if title is not None:
        _write_svg(root / "svg" / f"{relative}.svg", title, list(tags))


@pytest.fixture
def fake_tree(tmp_path) -> Path:
    """animals (5 drawings), food (4 usable + 4 to skip), logos (1: too few), unsorted (excluded)."""
    root = tmp_path / "openclipart"
    _clip(root, "animals/birds/penguin_01", "  New \n Penguin ", ["hash", "Penguin", "animal", "Bird", "bird",
                                                                  "Jane Doe", "lemon_theme-icon"])
    _clip(root, "animals/birds/no_metadata_02", None, colour=(9, 9, 9, 255))
    for i in range(3):
        _clip(root, f"animals/mammals/cat_{i}", f"Cat {i}", ["cat", "mammal"], colour=(0, 0, 255 - i, 255))
    for i in range(4):
        _clip(root, f"food/fruit/apple_{i}", f"Apple {i}", ["magick", "fruit"], colour=(0, 200 - i, 0, 255))
    (root / "png/food/broken.png").write_bytes(b"not a png")
    (root / "png/food/alias_cat.png").symlink_to("../animals/mammals/cat_0.png")
    shutil.copy(root / "png/animals/mammals/cat_1.png", root / "png/food/same_bytes_as_cat_1.png")
    _clip(root, "food/huge", "Huge", ["fruit"], size=(200, 200))
    _clip(root, "logos/only_one", "Logo", ["logo"])
    _clip(root, "unsorted/thing", "Thing", ["unsorted"])
    return root


def _build(root: Path, out: Path):
    return builder.build(root, out, image_size=16, per_category=10, min_per_category=2, test_fraction=0.25,
                         max_pixels=100 * 100)


def _rows(out: Path) -> dict[str, dict]:
    rows = {}
    for split in ("train", "test"):
        for row in data.load_source(str(out), split=split):
            rows[row[data.ID]] = dict(row, split=split)
    return rows


def test_builder_skips_symlinks_duplicates_unreadable_and_huge_files_and_counts_them(fake_tree, tmp_path):
    summary = _build(fake_tree, tmp_path / "out")
    assert summary.symlinks == 1
    assert dict(summary.skipped) == {"duplicate": 1, "unreadable": 1, "too large": 1}
    assert dict(summary.excluded) == {"logos": 1, "unsorted": 1}
    assert summary.missing_metadata == 1
    rows = _rows(tmp_path / "out")
    assert set(rows) == {"animals/birds/penguin_01", "animals/birds/no_metadata_02"} | {
        f"animals/mammals/cat_{i}" for i in range(3)} | {f"food/fruit/apple_{i}" for i in range(4)}
    assert summary.rows == {"train": {"animals": 4, "food": 3}, "test": {"animals": 1, "food": 1}}


def test_builder_makes_texts_from_svg_title_and_tags(fake_tree, tmp_path):
    _build(fake_tree, tmp_path / "out")
    rows = _rows(tmp_path / "out")
    penguin = rows["animals/birds/penguin_01"]
    assert penguin[data.ALT_TEXT] == "New Penguin"
    # "hash" is bookkeeping, "Jane Doe" the artist, "bird" repeats "Bird".
    assert penguin[data.CAPTION] == "clip art of penguin, animal, bird, lemon theme icon"
    assert penguin[data.VECAP] == "New Penguin: clip art of penguin, animal, bird, lemon theme icon"
    assert penguin[builder.CATEGORY] == "animals"
    no_metadata = rows["animals/birds/no_metadata_02"]
    assert no_metadata[data.ALT_TEXT] == "no_metadata_02"
    assert no_metadata[data.CAPTION] == "clip art of birds, animals"
    assert rows["food/fruit/apple_0"][data.CAPTION] == "clip art of fruit"


def test_builder_composites_transparency_on_white_and_pads_to_a_square(fake_tree, tmp_path):
    _build(fake_tree, tmp_path / "out")
    image = np.asarray(_rows(tmp_path / "out")["animals/birds/penguin_01"][data.IMAGE], dtype=np.float64)
    assert image.shape == (16, 16, 3)
    # Corners were transparent (and the 40x30 drawing is padded top and bottom): white, up to JPEG ringing
    # from the red block sharing their 8x8 block (on black they would be 0).
    for corner in (image[0, 0], image[0, -1], image[-1, 0], image[-1, -1]):
        np.testing.assert_allclose(corner, 255, atol=16)
    np.testing.assert_allclose(image[8, 8], [255, 0, 0], atol=12)


def test_builder_output_is_byte_identical_across_runs(fake_tree, tmp_path):
    _build(fake_tree, tmp_path / "a")
    _build(fake_tree, tmp_path / "b")
    names = sorted(path.name for path in (tmp_path / "a").iterdir())
    assert names == ["README.md", "test-00000-of-00001.parquet", "train-00000-of-00001.parquet"]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_builder_names_the_flag_when_the_packages_are_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="--source_root.*apt-get install"):
        builder.build(tmp_path / "nowhere", tmp_path / "out")


def test_builder_refuses_to_write_an_empty_test_split(tmp_path):
    _clip(tmp_path / "root", "animals/only_cat", "Cat", ["cat"])
    with pytest.raises(ValueError, match="test split is empty"):
        builder.build(tmp_path / "root", tmp_path / "out", min_per_category=1)
    assert not (tmp_path / "out").exists()


def test_split_is_stratified_and_keeps_every_category_in_train():
    rows = {c: [{data.ID: f"{c}/{i}"} for i in range(n)] for c, n in {"a": 100, "b": 9, "c": 2, "d": 1}.items()}
    splits = builder.split_rows(rows, test_fraction=0.12)
    test_count = {c: sum(r[data.ID].startswith(c + "/") for r in splits["test"]) for c in rows}
    assert test_count == {"a": 12, "b": 1, "c": 1, "d": 0}
    assert {r[data.ID].split("/")[0] for r in splits["train"]} == set(rows)


@pytest.mark.skipif(not (OPENCLIPART / "png").is_dir(), reason="Debian packages openclipart-png/-svg not installed")
def test_builder_on_real_package_files_reproduces_the_committed_rows(tmp_path, demo_splits):
    """A handful of committed test rows rebuilt from the installed packages: same texts, same pixels."""
    test = demo_splits["test"]
    # Two rows from each of three categories, so the rebuilt test split is not empty.
    picks = [i for category in ("animals", "food", "tools") for i in
             [j for j, c in enumerate(test[builder.CATEGORY]) if c == category][:2]]
    committed = test.select(picks)
    root = tmp_path / "openclipart"
    for clip_id in committed[data.ID]:
        for kind in ("png", "svg"):
            source = OPENCLIPART / kind / f"{clip_id}.{kind}"
            if source.exists():
                (root / kind / clip_id).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(source, root / kind / f"{clip_id}.{kind}")
    builder.build(root, tmp_path / "out", min_per_category=1, test_fraction=0.5)
    builder.build(root, tmp_path / "again", min_per_category=1, test_fraction=0.5)
    for name in ("train-00000-of-00001.parquet", "test-00000-of-00001.parquet"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
    rebuilt = _rows(tmp_path / "out")
    assert set(rebuilt) == set(committed[data.ID])
    for row in committed:
        again = rebuilt[row[data.ID]]
        for column in (data.ALT_TEXT, data.CAPTION, data.VECAP, builder.CATEGORY):
            assert again[column] == row[column]
        # Same Pillow gives the same bytes; another libjpeg may round differently, hence a pixel tolerance.
        diff = np.abs(np.asarray(again[data.IMAGE], float) - np.asarray(row[data.IMAGE], float))
        assert diff.mean() < 2.0, row[data.ID]


# ---------------------------------------------------------------------------------------------------------
# Synthetic WebDataset shards


def test_synthetic_webdataset_shards_load_through_brace_pattern(tmp_path):
    paths = webdataset_writer.write_shards(tmp_path, num_samples=7, samples_per_shard=4, image_size=20,
                                           extra_text_keys=["caption", "vecap"])
    assert [p.name for p in paths] == ["00000.tar", "00001.tar"]
    dataset = data.load_source(str(tmp_path / "{00000..00001}.tar"))
    assert dataset.num_rows == 7
    assert {"jpg", "txt", "json", "caption.txt", "vecap.txt"} <= set(dataset.column_names)
    assert dataset["__key__"] == [f"{i:09d}" for i in range(7)]
    first = dataset[0]
    assert first["jpg"].size == (20, 20)
    assert first["json"]["caption"] == first["txt"] and first["json"]["key"] == "000000000"
    assert all(text for text in dataset["caption.txt"])


def test_synthetic_webdataset_is_byte_identical_for_a_seed_and_differs_across_seeds(tmp_path):
    a = webdataset_writer.write_shards(tmp_path / "a", num_samples=3, seed=1)
    b = webdataset_writer.write_shards(tmp_path / "b", num_samples=3, seed=1)
    c = webdataset_writer.write_shards(tmp_path / "c", num_samples=3, seed=2)
    assert a[0].read_bytes() == b[0].read_bytes() != c[0].read_bytes()


def test_synthetic_webdataset_rejects_reserved_extra_keys(tmp_path):
    with pytest.raises(ValueError, match="--extra_text_keys.*'txt'"):
        webdataset_writer.write_shards(tmp_path, num_samples=2, extra_text_keys=["txt"])
