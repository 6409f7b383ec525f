"""A user's image folder: one sub-folder per class, any size, colour or grey."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from metakit.data import DataError, list_classes, load_folder, make_transform, split_classes


def page(size, mode="RGB", ink=(0, 0, 0), paper=(255, 255, 255)) -> Image.Image:
    """Paper with an ink rectangle over the middle half."""
    w, h = size
    if mode == "L":
        ink, paper = ink[0], paper[0]
    elif mode == "RGBA":
        ink, paper = ink + (255,), (255, 255, 255, 0)  # transparent paper
    im = Image.new(mode, size, paper)
    ImageDraw.Draw(im).rectangle([w // 4, h // 4, 3 * w // 4 - 1, 3 * h // 4 - 1], fill=ink)
    return im


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "images"
    sizes = [(40, 30), (64, 64), (100, 50), (20, 20), (33, 77)]
    (root / "apples").mkdir(parents=True)
    for i, s in enumerate(sizes):
        page(s, "RGB", ink=(200, 20, 20)).save(root / "apples" / f"a{i}.png")
    (root / "bananas").mkdir()
    for i, s in enumerate(sizes[:3]):
        page(s, "L").save(root / "bananas" / f"b{i}.jpg", quality=95)
    (root / "cherries").mkdir()
    for i, s in enumerate(sizes[:4]):
        page(s, "RGBA").save(root / "cherries" / f"c{i}.png")
    (root / "cherries" / ".DS_Store").write_bytes(b"\x00\x01hidden")  # hidden files are ignored
    (root / ".hidden_class").mkdir()
    (root / "README.txt").write_text("not a class")  # files at the top level are not classes
    return root


def test_list_classes(folder):
    assert list_classes(folder) == ["apples", "bananas", "cherries"]


@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_after_transform(folder, channels):
    ds = load_folder(folder, make_transform(size=16, channels=channels, invert=True))
    assert ds.images.shape == (12, channels, 16, 16)
    assert ds.images.dtype == torch.uint8
    assert ds.class_names == ["apples", "bananas", "cherries"]
    assert ds.counts.tolist() == [5, 3, 4]
    assert ds.transform["size"] == 16 and ds.transform["channels"] == channels
    sub = load_folder(folder, make_transform(size=8), classes=["cherries", "apples"])
    assert sub.class_names == ["cherries", "apples"] and sub.counts.tolist() == [4, 5]


def test_inversion(tmp_path):
    root = tmp_path / "ink"
    (root / "grey").mkdir(parents=True)
    page((32, 32), "L").save(root / "grey" / "x.png")
    page((32, 32), "RGBA").save(root / "grey" / "y.png")  # transparent paper counts as white
    mark = torch.zeros(32, 32, dtype=torch.bool)
    mark[8:24, 8:24] = True

    inv = load_folder(root, make_transform(size=32, channels=1, invert=True)).images
    for img in inv:  # dark ink on white paper -> ink 255, paper 0
        assert (img[0][mark] == 255).all() and (img[0][~mark] == 0).all()
    plain = load_folder(root, make_transform(size=32, channels=1, invert=False)).images
    for img in plain:
        assert (img[0][mark] == 0).all() and (img[0][~mark] == 255).all()


def test_colour_channels_in_order(tmp_path):
    root = tmp_path / "colour"
    (root / "red").mkdir(parents=True)
    im = page((32, 32), "RGB", ink=(255, 0, 0))
    ImageDraw.Draw(im).rectangle([0, 0, 31, 3], fill=(0, 0, 255))  # a blue band over the top 4 rows
    im.save(root / "red" / "r.png")
    img = load_folder(root, make_transform(size=32, channels=3, invert=True)).images[0]  # [3, 32, 32]
    assert img[:, 16, 16].tolist() == [0, 255, 255]  # red ink inverted: cyan
    assert img[:, 20, 2].tolist() == [0, 0, 0]  # white paper inverted: black
    assert img[:, 2, 20].tolist() == [255, 255, 0]  # row 2 (not column 2) is blue, inverted: yellow
    grey = load_folder(root, make_transform(size=32, channels=1, invert=False)).images[0]
    assert 50 < int(grey[0, 16, 16]) < 100  # luminance of pure red is 76


def test_corrupt_file_is_skipped_with_warning(folder):
    (folder / "apples" / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (folder / "apples" / "notes.txt").write_text("hello")
    with pytest.warns(UserWarning) as record:
        ds = load_folder(folder, make_transform(size=16))
    messages = [str(w.message) for w in record]
    assert any("zz_broken.png" in m for m in messages)
    assert any("notes.txt" in m for m in messages)
    assert ds.counts.tolist() == [5, 3, 4]  # the good images are all kept


def test_empty_class_folder(folder):
    (folder / "durians").mkdir()
    with pytest.raises(DataError, match="durians"):
        load_folder(folder, make_transform(size=16))
    (folder / "durians" / "bad.jpg").write_bytes(b"not an image")  # only unreadable files: still empty
    with pytest.raises(DataError, match="durians"), pytest.warns(UserWarning, match="bad.jpg"):
        load_folder(folder, make_transform(size=16))


def test_missing_folders(tmp_path, folder):
    with pytest.raises(DataError, match="not found"):
        load_folder(tmp_path / "nowhere", make_transform())
    with pytest.raises(DataError, match="not found"):
        list_classes(tmp_path / "nowhere")
    with pytest.raises(DataError, match="grapes"):
        load_folder(folder, make_transform(), classes=["apples", "grapes"])
    (tmp_path / "flat").mkdir()
    page((10, 10)).save(tmp_path / "flat" / "one.png")  # images but no class sub-folders
    with pytest.raises(DataError, match="sub-folder"):
        load_folder(tmp_path / "flat", make_transform())


NAMES = [f"class{i:03d}" for i in range(50)]


def test_split_classes_deterministic_disjoint_covering():
    parts = split_classes(NAMES, [0.6, 0.2, 0.2], seed=3)
    assert [len(p) for p in parts] == [30, 10, 10]
    flat = [c for p in parts for c in p]
    assert sorted(flat) == NAMES  # disjoint and covering
    assert split_classes(NAMES, [0.6, 0.2, 0.2], seed=3) == parts
    shuffled = NAMES[:]
    random.Random(0).shuffle(shuffled)
    assert split_classes(shuffled, [0.6, 0.2, 0.2], seed=3) == parts  # input order does not matter
    assert split_classes(NAMES, [0.6, 0.2, 0.2], seed=4) != parts
    assert parts[0] != NAMES[:30]  # shuffled, not cut in name order


def test_split_classes_covers_all_within_tolerance():
    names = [f"c{i}" for i in range(100)]
    parts = split_classes(names, [0.33, 0.33, 0.33])  # sums to 0.99: accepted, so nothing may be lost
    assert sorted(c for p in parts for c in p) == sorted(names)
    assert all(33 <= len(p) <= 34 for p in parts)


@pytest.mark.parametrize("fractions", [[0.5, 0.6], [-0.1, 0.6, 0.5], [0.3, 0.3], []])
def test_split_classes_rejects_bad_fractions(fractions):
    with pytest.raises(DataError, match="fractions"):
        split_classes(NAMES, fractions)
