"""The Omniglot reader against tiny archives in the official layout (see conftest.py)."""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import metakit.data.omniglot as omniglot
from metakit.data import DataError, load_omniglot
from metakit.data.download import writable_dir

from conftest import DRAWERS, box_origin, draw_drawing, drawer_column, png_bytes

pytestmark = pytest.mark.usefixtures("metakit_cache")

ROTS = ("rot000", "rot090", "rot180", "rot270")


def load(tiny, split, scheme, **kw):
    kw.setdefault("expected", tiny.expected)
    return load_omniglot(split, scheme=scheme, root=tiny.root, download=False, **kw)


def class_images(ds, name: str) -> torch.Tensor:
    """The ``[drawings, 1, S, S]`` images of class ``name``."""
    c = ds.class_names.index(name)
    return ds.images[ds.targets == c]


def cache_files(*folders: Path) -> list[Path]:
    return [p for f in folders if f.exists() for p in f.rglob("*") if p.is_file()]


# ---------------------------------------------------------------- shapes and splits

@pytest.mark.parametrize("split,archive", [("background", "images_background"), ("evaluation", "images_evaluation")])
def test_lake_shapes_and_names(tiny_omniglot, split, archive):
    chars = tiny_omniglot.characters[archive]
    ds = load(tiny_omniglot, split, "lake")
    n = len(chars) * 4
    assert ds.images.shape == (n * DRAWERS, 1, 28, 28)
    assert ds.images.dtype == torch.uint8
    assert ds.targets.tolist() == [c for c in range(n) for _ in range(DRAWERS)]
    assert ds.class_names == [f"{c}/{r}" for c in chars for r in ROTS]
    assert ds.counts.tolist() == [DRAWERS] * n

    plain = load(tiny_omniglot, split, "lake", rotations=False, image_size=20)
    assert plain.images.shape == (len(chars) * DRAWERS, 1, 20, 20)
    assert plain.class_names == [f"{c}/rot000" for c in chars]


def test_vinyals_split_files_are_honoured(tiny_omniglot):
    for split, lines in tiny_omniglot.splits.items():
        ds = load(tiny_omniglot, split, "vinyals")
        assert ds.class_names == lines  # same classes, in the file's order (test.txt is unsorted)
        assert ds.images.shape == (len(lines) * DRAWERS, 1, 28, 28)
        plain = load(tiny_omniglot, split, "vinyals", rotations=False)
        assert plain.class_names == [line for line in lines if line.endswith("rot000")]
    # the val split spans both archives: each class holds its own character's pictures
    val = load(tiny_omniglot, "val", "vinyals", image_size=105)
    for name in tiny_omniglot.splits["val"][::4]:  # the rot000 lines
        g = tiny_omniglot.global_index(name.rsplit("/", 1)[0])
        x, y = box_origin(g)
        assert (class_images(val, name)[:, 0, y + 7, x + 7] == 255).all(), name


def test_vinyals_split_naming_unknown_character(tiny_copy):
    (tiny_copy.omniglot / "splits" / "vinyals" / "val.txt").write_text("Nowhere/character01/rot000\n")
    with pytest.raises(DataError, match="Nowhere/character01"):
        load(tiny_copy, "val", "vinyals")


def test_maml_split_deterministic_disjoint_covering(tiny_omniglot):
    parts = {}
    for split in ("train", "val", "test"):
        ds = load(tiny_omniglot, split, "maml")
        again = load(tiny_omniglot, split, "maml")
        assert ds.class_names == again.class_names
        assert torch.equal(ds.images, again.images)
        chars = [n.rsplit("/", 1)[0] for n in ds.class_names[::4]]
        assert ds.class_names == [f"{c}/{r}" for c in chars for r in ROTS]
        assert ds.images.shape == (len(chars) * 4 * DRAWERS, 1, 28, 28)
        parts[split] = chars
    everything = tiny_omniglot.all_characters
    # 1100 / 100 / 423 of 1623, scaled to 18 characters
    assert [len(parts[s]) for s in ("train", "val", "test")] == [12, 1, 5]
    assert sorted(parts["train"] + parts["val"] + parts["test"]) == sorted(everything)  # disjoint and covering
    # the order is a seeded shuffle, not the sorted list of characters
    assert parts["train"] != sorted(everything)[:12]


def test_unknown_scheme_or_split(tiny_omniglot):
    with pytest.raises(DataError, match="scheme"):
        load(tiny_omniglot, "train", "snell")
    with pytest.raises(DataError, match="background"):
        load(tiny_omniglot, "train", "lake")


# ---------------------------------------------------------------- pixels

def test_ink_is_one_paper_is_zero(tiny_omniglot):
    ds = load(tiny_omniglot, "background", "lake", rotations=False)
    x = ds.images.float() / 255
    assert x.mean() < 0.1  # mostly paper
    assert (x.flatten(1).median(1).values == 0).all()  # paper is 0 in every picture
    assert ((x < 0.05).float().mean((1, 2, 3)) > 0.8).all()
    for c, char in enumerate(tiny_omniglot.characters["images_background"]):
        bx, by = box_origin(tiny_omniglot.global_index(char))
        cx, cy = int((bx + 7) * 28 / 105), int((by + 7) * 28 / 105)  # centre of the ink box
        assert (x[ds.targets == c][:, 0, cy, cx] > 0.9).all(), char


def test_exact_pixels_and_drawing_order(tiny_omniglot):
    """At 105 px there is no resize: each picture is its drawing, inverted; drawing e is drawer e + 1."""
    ds = load(tiny_omniglot, "evaluation", "lake", rotations=False, image_size=105)
    for c, char in enumerate(tiny_omniglot.characters["images_evaluation"]):
        g = tiny_omniglot.global_index(char)
        imgs = class_images(ds, f"{char}/rot000")
        assert imgs.shape == (DRAWERS, 1, 105, 105)
        for e in range(DRAWERS):
            ink = 255 - 255 * torch.from_numpy(np.asarray(draw_drawing(g, e + 1), dtype=np.uint8))
            assert torch.equal(imgs[e, 0], ink), (char, e)
            # the drawer's bar is where drawer e + 1 drew it, and nowhere else along row 80
            bars = torch.nonzero(imgs[e, 0, 80]).flatten().tolist()
            assert bars == [drawer_column(e + 1) + i for i in range(3)]


def test_pictures_differ(tiny_omniglot):
    ds = load(tiny_omniglot, "background", "lake", rotations=False)
    flat = ds.images.flatten(1)
    assert torch.unique(flat, dim=0).shape[0] == flat.shape[0]


def test_rotations_are_classes(tiny_omniglot):
    ds = load(tiny_omniglot, "background", "lake", image_size=105)
    char = tiny_omniglot.characters["images_background"][5]
    base = class_images(ds, f"{char}/rot000")
    for k, rot in enumerate(ROTS):
        rotated = class_images(ds, f"{char}/{rot}")
        assert torch.equal(rotated, torch.rot90(base, k, dims=(-2, -1)))
        # direction: counter-clockwise, as PIL's Image.rotate used by the Vinyals/Snell loaders
        pil = Image.fromarray(base[0, 0].numpy()).rotate(90 * k)
        assert torch.equal(rotated[0, 0], torch.from_numpy(np.asarray(pil).copy()))
    assert not torch.equal(class_images(ds, f"{char}/rot090"), base)


# ---------------------------------------------------------------- cache

def test_second_load_uses_cache(tiny_copy, metakit_cache, monkeypatch):
    first = load(tiny_copy, "background", "lake")
    cache = tiny_copy.omniglot / "cache" / "images_background_28px.pt"
    assert cache.is_file()
    assert not cache_files(metakit_cache)  # the data root was writable: nothing in the fallback

    def no_decode(*args, **kwargs):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(omniglot, "decode_archive", no_decode)
    second = load(tiny_copy, "background", "lake")
    assert torch.equal(first.images, second.images)
    assert first.class_names == second.class_names
    # another size is another cache entry
    with pytest.raises(AssertionError, match="decoded again"):
        load(tiny_copy, "background", "lake", image_size=20)


def rewrite_member(path: Path, member: str, data: bytes) -> None:
    with zipfile.ZipFile(path) as zf:
        members = [(i, zf.read(i)) for i in zf.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for info, content in members:
            zf.writestr(info, data if info.filename == member else content)


def test_changed_archive_invalidates_cache(tiny_copy, monkeypatch):
    first = load(tiny_copy, "background", "lake", rotations=False, image_size=105)
    char = tiny_copy.characters["images_background"][0]
    member = f"images_background/{char}/0001_03.png"
    blank = Image.new("1", (105, 105), 1)  # a blank page for drawer 03
    rewrite_member(tiny_copy.omniglot / "images_background.zip", member, png_bytes(blank))

    calls = []
    real = omniglot.decode_archive
    monkeypatch.setattr(omniglot, "decode_archive", lambda *a, **k: calls.append(a) or real(*a, **k))
    second = load(tiny_copy, "background", "lake", rotations=False, image_size=105)
    assert len(calls) == 1
    assert first.images[2].sum() > 0 and second.images[2].sum() == 0  # drawing 2 = drawer 03, now blank
    assert torch.equal(first.images[3:], second.images[3:])
    # and the refreshed cache is used from now on
    load(tiny_copy, "background", "lake", rotations=False, image_size=105)
    assert len(calls) == 1


def test_damaged_cache_is_rebuilt(tiny_copy):
    first = load(tiny_copy, "evaluation", "lake")
    cache = tiny_copy.omniglot / "cache" / "images_evaluation_28px.pt"
    cache.write_bytes(b"not a torch file")
    second = load(tiny_copy, "evaluation", "lake")
    assert torch.equal(first.images, second.images)
    assert cache.stat().st_size > 1000


def test_writable_dir_falls_back(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    fallback = tmp_path / "fallback" / "omniglot"
    assert writable_dir(blocker / "cache", fallback) == fallback  # cannot be created under a file
    assert fallback.is_dir()
    ok = tmp_path / "ok" / "cache"
    assert writable_dir(ok, tmp_path / "unused") == ok
    assert ok.is_dir() and not (tmp_path / "unused").exists()


def test_a_data_root_without_write_bits_gets_no_cache_even_as_root(tiny_copy, metakit_cache):
    """CI lays ../shared/data out without write bits; root could still write there, and must not."""
    tiny_copy.omniglot.chmod(0o555)
    try:
        load(tiny_copy, "evaluation", "lake")
    finally:
        tiny_copy.omniglot.chmod(0o755)
    assert not (tiny_copy.omniglot / "cache").exists()
    assert (metakit_cache / "omniglot" / "images_evaluation_28px.pt").is_file()


def test_cache_goes_to_metakit_cache_when_data_root_unwritable(tiny_copy, metakit_cache):
    # we run as root, so chmod does not stop writes: block the cache folder with a file instead
    (tiny_copy.omniglot / "cache").write_text("not a folder")
    ds = load(tiny_copy, "evaluation", "lake")
    assert ds.images.shape[0] == 6 * 4 * DRAWERS
    assert (metakit_cache / "omniglot" / "images_evaluation_28px.pt").is_file()
    assert (tiny_copy.omniglot / "cache").read_text() == "not a folder"


# ---------------------------------------------------------------- errors

def test_truncated_archive(tiny_copy, metakit_cache):
    path = tiny_copy.omniglot / "images_background.zip"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as info:
        load(tiny_copy, "background", "lake")
    msg = str(info.value)
    assert str(path) in msg and "zip" in msg and "download it again" in msg
    assert not cache_files(tiny_copy.omniglot / "cache", metakit_cache)


def test_damaged_member(tiny_copy, metakit_cache):
    char = tiny_copy.characters["images_background"][1]
    member = f"images_background/{char}/0002_07.png"
    rewrite_member(tiny_copy.omniglot / "images_background.zip", member, b"\x89PNG garbage")
    with pytest.raises(DataError, match="0002_07.png"):
        load(tiny_copy, "background", "lake")
    assert not cache_files(tiny_copy.omniglot / "cache", metakit_cache)


@pytest.mark.parametrize("expected", ["tiny", None])
def test_foreign_zip(tiny_copy, expected):
    path = tiny_copy.omniglot / "images_background.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("README.txt", "hello")
        zf.writestr("data/table.csv", "a,b\n1,2\n")
    exp = tiny_copy.expected if expected == "tiny" else None
    with pytest.raises(DataError) as info:
        load(tiny_copy, "background", "lake", expected=exp)
    msg = str(info.value)
    assert "images_background.zip" in msg
    if expected == "tiny":
        assert "0 alphabets, 0 characters" in msg and "expected 3, 12, 20" in msg
    assert not cache_files(tiny_copy.omniglot / "cache")


def test_official_structure_check_fails_on_tiny_archive(tiny_copy):
    # decode and cache with the tiny numbers first: the check must still run on the cached data
    load(tiny_copy, "background", "lake")
    with pytest.raises(DataError) as info:
        load(tiny_copy, "background", "lake", expected="official")
    msg = str(info.value)
    assert "3 alphabets, 12 characters" in msg and "expected 30, 964, 20" in msg
    with pytest.raises(DataError, match="expected 20, 659, 20"):
        load(tiny_copy, "evaluation", "lake", expected="official")


def test_one_tuple_checks_every_archive(tiny_omniglot):
    ds = load(tiny_omniglot, "background", "lake", expected=(3, 12, 20))
    assert ds.num_classes == 48
    with pytest.raises(DataError, match="expected 3, 12, 20"):  # the evaluation archive has 2, 6, 20
        load(tiny_omniglot, "train", "vinyals", expected=(3, 12, 20))
    with pytest.raises(DataError, match="expected 3, 12, 21"):
        load(tiny_omniglot, "background", "lake", expected=(3, 12, 21))


def test_missing_archives_without_download(tmp_path):
    root = tmp_path / "empty"
    with pytest.raises(DataError) as info:
        load_omniglot("train", scheme="vinyals", root=root, download=False, base_url="http://example.invalid/og/")
    msg = str(info.value)
    for name in ("images_background.zip", "images_evaluation.zip"):
        assert name in msg
        assert f"http://example.invalid/og/{name}" in msg
    assert str(root / "omniglot") in msg
    assert "switched off" in msg
    assert not root.exists()  # nothing was fetched or created


def test_missing_split_file_without_download(tiny_copy):
    (tiny_copy.omniglot / "splits" / "vinyals" / "test.txt").unlink()
    with pytest.raises(DataError) as info:
        load(tiny_copy, "test", "vinyals", splits_url="http://example.invalid/splits/")
    msg = str(info.value)
    assert "test.txt" in msg and str(tiny_copy.omniglot / "splits" / "vinyals") in msg
    assert "http://example.invalid/splits/test.txt" in msg
