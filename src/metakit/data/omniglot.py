"""Omniglot (Lake et al. 2015, Science 350(6266)) from the official archives, held in memory.

The archives ``images_background.zip`` (30 alphabets, 964 characters) and
``images_evaluation.zip`` (20 alphabets, 659 characters), 20 drawings of each character,
lie in ``<data root>/omniglot/``. Members are
``images_<set>/<Alphabet>/characterNN/<ID>_<drawer>.png`` (105x105, 1 bit, paper white).

Each archive is decoded once to a uint8 tensor ``[characters, 20, S, S]`` at the requested
size (LANCZOS, as in MAML and Prototypical Networks) with **ink 255 and paper 0**, i.e. ink
is 1 and paper 0 once scaled to [0, 1]; drawing ``e`` of a character is drawer ``e + 1``.
The tensor is cached beside the archives, or under ``~/.cache/metakit`` when the data root
cannot be written.

Class splits:
- ``lake``: ``background`` / ``evaluation`` alphabets (Lake et al. 2015);
- ``vinyals``: ``train`` / ``val`` / ``test`` = 1028 / 172 / 423 characters, each in 4
  rotations, from ``omniglot/splits/vinyals/*.txt`` (Vinyals et al. 2016; the files of Snell
  et al. 2017);
- ``maml``: all 1623 characters shuffled with a fixed seed, 1100 / 100 / 423 (Finn et al. 2017).
Rotations by 90/180/270 degrees count as new classes when ``rotations`` is on.
"""
from __future__ import annotations

import hashlib
import os
import re
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .base import ClassDataset
from .download import DataError, cache_root, data_root, fetch_or_explain, writable_dir
from .transforms import apply_transform, make_transform

OMNIGLOT_URL = "https://github.com/brendenlake/omniglot/raw/master/python/"
SPLITS_URL = "https://raw.githubusercontent.com/jakesnell/prototypical-networks/master/data/omniglot/splits/vinyals/"
ARCHIVES = ("images_background", "images_evaluation")
# alphabets, characters, drawings per character
EXPECTED = {"images_background": (30, 964, 20), "images_evaluation": (20, 659, 20)}
SPLITS = {"lake": ("background", "evaluation"), "vinyals": ("train", "val", "test"), "maml": ("train", "val", "test")}
MAML_SIZES = (1100, 100, 423)
MAML_SEED = 1
_MEMBER = re.compile(r"^(images_\w+)/([^/]+)/(character\d+)/(\d+)_(\d+)\.png$")
_CACHE_VERSION = 1


def omniglot_dir(root=None) -> Path:
    return data_root(root) / "omniglot"


def archive_path(name: str, root=None, download: bool = True, base_url: str = OMNIGLOT_URL) -> Path:
    """The archive ``name`` (``images_background``), downloaded when missing."""
    return fetch_or_explain(base_url + name + ".zip", omniglot_dir(root) / f"{name}.zip",
                            f"Omniglot archive {name}.zip", allow_download=download)


def _fingerprint(zf: zipfile.ZipFile) -> str:
    """Hash of the member names, CRCs and sizes: changes when the archive's contents do."""
    h = hashlib.sha1()
    for info in sorted(zf.infolist(), key=lambda i: i.filename):
        h.update(f"{info.filename}:{info.CRC}:{info.file_size};".encode())
    return h.hexdigest()


def decode_archive(path: Path, size: int, expected: tuple[int, int, int] | None = None) -> dict:
    """Read and check an archive -> ``{"images": uint8 [chars, drawings, S, S], "characters": [...]}``.

    ``characters`` are ``"Alphabet/characterNN"`` in sorted order. ``expected`` =
    (alphabets, characters, drawings per character); any mismatch raises DataError.
    """
    name = Path(path).stem
    transform = make_transform(size=size, channels=1, invert=True)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{path} is not a readable zip archive ({exc}); delete it and download it again") from exc
    with zf:
        drawings: dict[str, dict[int, zipfile.ZipInfo]] = {}
        for info in zf.infolist():
            if info.is_dir():
                continue
            m = _MEMBER.match(info.filename)
            if not m:
                if info.filename.endswith(".png"):
                    raise DataError(f"{path}: unexpected member {info.filename!r}; "
                                    f"expected images_<set>/<Alphabet>/characterNN/<ID>_<drawer>.png")
                continue
            drawings.setdefault(f"{m.group(2)}/{m.group(3)}", {})[int(m.group(5))] = info
        characters = sorted(drawings)
        alphabets = sorted({c.split("/")[0] for c in characters})
        found = (len(alphabets), len(characters), min((len(d) for d in drawings.values()), default=0))
        if expected is not None and (found[:2] != expected[:2] or any(len(d) != expected[2] for d in drawings.values())):
            raise DataError(f"{path} holds {found[0]} alphabets, {found[1]} characters, "
                            f"{found[2]}+ drawings each; expected {expected[0]}, {expected[1]}, {expected[2]}: "
                            f"the archive is truncated or not Omniglot's {name}.zip; delete it and fetch it again")
        if not characters:
            raise DataError(f"{path} holds no Omniglot drawings (no member "
                            f"images_<set>/<Alphabet>/characterNN/<ID>_<drawer>.png): it is not Omniglot's "
                            f"{name}.zip; delete it and fetch it again")
        n = found[2]
        images = torch.empty(len(characters), n, size, size, dtype=torch.uint8)
        for i, char in enumerate(characters):
            for e, drawer in enumerate(sorted(drawings[char])[:n]):
                try:
                    with zf.open(drawings[char][drawer]) as f, Image.open(f) as im:
                        im.load()
                        images[i, e] = apply_transform(im, transform)[0]
                except (OSError, zipfile.BadZipFile, ValueError) as exc:
                    raise DataError(f"{path}: cannot decode {drawings[char][drawer].filename} ({exc}); "
                                    f"the archive is damaged: delete it and fetch it again") from exc
        return {"images": images, "characters": characters, "fingerprint": _fingerprint(zf),
                "version": _CACHE_VERSION, "size": size}


def _structure(data: dict) -> tuple[int, int, int]:
    """(alphabets, characters, drawings per character) of a decoded archive."""
    characters = data["characters"]
    return len({c.split("/")[0] for c in characters}), len(characters), int(data["images"].shape[1])


def load_archive(name: str, size: int = 28, root=None, download: bool = True, base_url: str = OMNIGLOT_URL,
                 expected: tuple[int, int, int] | dict | None | str = "official") -> dict:
    """Decoded archive ``name``, from the on-disk cache when it matches the archive.

    ``expected``: (alphabets, characters, drawings), a dict of them by archive name, None (no
    check) or "official"; it is checked on cached data too.
    """
    if isinstance(expected, dict):
        expected = expected.get(name)
    if expected == "official":
        expected = EXPECTED.get(name)
    path = archive_path(name, root, download, base_url)
    try:
        with zipfile.ZipFile(path) as zf:
            fingerprint = _fingerprint(zf)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{path} is not a readable zip archive ({exc}); delete it and download it again") from exc
    cache_dir = writable_dir(path.parent / "cache", cache_root() / "omniglot")
    cache = cache_dir / f"{name}_{size}px.pt"
    if cache.exists():
        try:
            data = torch.load(cache, weights_only=True)
            if (data.get("fingerprint") == fingerprint and data.get("version") == _CACHE_VERSION
                    and (expected is None or _structure(data) == tuple(expected))):
                return data  # else decode again: decode_archive reports a structure mismatch
        except Exception:
            pass  # a damaged or stale cache is rebuilt below
    data = decode_archive(path, size, expected)
    tmp = cache.with_name(cache.name + f".{os.getpid()}.tmp")
    torch.save(data, tmp)
    os.replace(tmp, cache)
    return data


def _split_file(split: str, root=None, download: bool = True, base_url: str = SPLITS_URL) -> list[str]:
    path = fetch_or_explain(base_url + f"{split}.txt", omniglot_dir(root) / "splits" / "vinyals" / f"{split}.txt",
                            f"Vinyals split file {split}.txt", allow_download=download)
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def load_omniglot(split: str = "train", scheme: str = "vinyals", image_size: int = 28, rotations: bool = True,
                  root=None, download: bool = True, base_url: str = OMNIGLOT_URL, splits_url: str = SPLITS_URL,
                  expected: tuple[int, int, int] | dict | None | str = "official") -> ClassDataset:
    """Omniglot classes of one split as a :class:`ClassDataset` (images uint8 ``[M, 1, S, S]``).

    ``scheme`` is ``"lake"`` (split ``background``/``evaluation``), ``"vinyals"`` or ``"maml"``
    (split ``train``/``val``/``test``). With ``rotations`` each character gives 4 classes
    (0, 90, 180, 270 degrees); the Vinyals files name their rotations themselves.
    ``base_url`` / ``splits_url`` are where missing files are downloaded from; ``expected``
    is the (alphabets, characters, drawings) check per archive: one tuple for all archives, a
    dict ``{"images_background": (...), "images_evaluation": (...)}``, None, or "official" (Omniglot's).
    """
    if scheme not in SPLITS:
        raise DataError(f"unknown Omniglot split scheme {scheme!r}; choose one of {sorted(SPLITS)}")
    if split not in SPLITS[scheme]:
        raise DataError(f"unknown split {split!r} for scheme {scheme!r}; choose one of {list(SPLITS[scheme])}")
    names = ARCHIVES if scheme != "lake" else (f"images_{split}",)
    missing = []  # one error naming every missing archive, not one per run
    for n in names:
        try:
            archive_path(n, root, download, base_url)
        except DataError as exc:
            missing.append((f"{n}.zip", str(exc).rsplit("; ", 1)[-1]))
    if missing:
        files = " and ".join(f for f, _ in missing)
        urls = ", ".join(base_url + f for f, _ in missing)
        raise DataError(f"Omniglot {files} not found: put {'them' if len(missing) > 1 else 'it'} in "
                        f"{omniglot_dir(root)} (from {urls}); {missing[0][1]}")
    decoded = [load_archive(n, image_size, root, download, base_url, expected) for n in names]
    index = {c: (d, i) for d in decoded for i, c in enumerate(d["characters"])}
    if scheme == "vinyals":
        classes = []
        for line in _split_file(split, root, download, splits_url):
            alphabet, char, rot = line.split("/")
            classes.append((f"{alphabet}/{char}", int(rot[3:]) // 90))
        if not rotations:
            classes = [c for c in classes if c[1] == 0]
    else:
        chars = sorted(index)
        if scheme == "maml":
            order = np.random.RandomState(MAML_SEED).permutation(len(chars))
            bounds = np.cumsum((0,) + MAML_SIZES)
            s = SPLITS["maml"].index(split)
            if len(chars) == sum(MAML_SIZES):
                chars = [chars[i] for i in order[bounds[s]:bounds[s + 1]]]
            else:  # a smaller (test) archive: same proportions
                cut = np.round(np.cumsum((0,) + MAML_SIZES) / sum(MAML_SIZES) * len(chars)).astype(int)
                chars = [chars[i] for i in order[cut[s]:cut[s + 1]]]
        classes = [(c, k) for c in chars for k in (range(4) if rotations else (0,))]
    missing = [c for c, _ in classes if c not in index]
    if missing:
        raise DataError(f"split {scheme}/{split} names {len(missing)} characters not in the archives "
                        f"(first: {missing[0]}); the archives or the split file are not Omniglot's")
    blocks = []
    for char, k in classes:
        d, i = index[char]
        blocks.append(torch.rot90(d["images"][i], k, dims=(-2, -1)))  # [20, S, S]
    images = torch.stack(blocks).unsqueeze(2)  # [classes, 20, 1, S, S]
    n_classes, per = images.shape[:2]
    return ClassDataset(
        images=images.reshape(n_classes * per, 1, image_size, image_size),
        targets=torch.arange(n_classes).repeat_interleave(per),
        class_names=[f"{c}/rot{90 * k:03d}" for c, k in classes],
        transform=make_transform(size=image_size, channels=1, invert=True),
        name=f"omniglot-{scheme}-{split}",
    )


def describe(root=None) -> list[tuple[str, str]]:
    """``(file, status)`` rows for ``metakit data``: present, cached sizes, complete or not."""
    d = omniglot_dir(root)
    rows = []
    for name in ARCHIVES:
        path = d / f"{name}.zip"
        if not path.exists():
            rows.append((str(path), "missing"))
            continue
        caches = sorted(p.name for base in (d / "cache", cache_root() / "omniglot") if base.exists()
                        for p in base.glob(f"{name}_*px.pt"))
        rows.append((str(path), f"present, {path.stat().st_size / 1e6:.1f} MB"
                     + (f"; decoded: {', '.join(caches)}" if caches else "; not decoded yet")))
    for split in SPLITS["vinyals"]:
        path = d / "splits" / "vinyals" / f"{split}.txt"
        rows.append((str(path), "present" if path.exists() else "missing"))
    return rows
