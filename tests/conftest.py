"""Shared fixtures: a tiny Omniglot built on the fly, an isolated decode cache, a local HTTP server."""
from __future__ import annotations

import functools
import http.server
import io
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

SIZE = 105  # Omniglot's raw image size
DRAWERS = 20
# archive -> alphabets (each with characters character01..characterNN)
TINY_LAYOUT = {
    "images_background": {"Alpha_(Tiny)": 4, "Beta": 4, "Gamma": 4},
    "images_evaluation": {"Delta": 3, "Epsilon": 3},
}


def box_origin(g: int) -> tuple[int, int]:
    """Top-left (x, y) of the 14x14 ink box that marks global character ``g`` (0-based)."""
    return 5 + (g % 6) * 16, 5 + (g // 6) * 16


def drawer_column(drawer: int) -> int:
    """Left x of the 3-pixel vertical ink bar (rows 60..100) that marks ``drawer`` (1-based)."""
    return 5 + (drawer - 1) * 5


def draw_drawing(g: int, drawer: int) -> Image.Image:
    """A 105x105 mode-"1" drawing: paper white (True), ink black (False).

    Character ``g`` has a filled box at :func:`box_origin`; drawer ``d`` a vertical bar at
    :func:`drawer_column`. Every (character, drawer) pair gives a distinct picture, and no picture
    is symmetric under rotation (the box sits in the upper part, the bars in the lower).
    """
    im = Image.new("1", (SIZE, SIZE), 1)
    d = ImageDraw.Draw(im)
    x, y = box_origin(g)
    d.rectangle([x, y, x + 13, y + 13], fill=0)
    bx = drawer_column(drawer)
    d.rectangle([bx, 60, bx + 2, 100], fill=0)
    return im


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def build_archive(path: Path, name: str, layout: dict[str, int], first_id: int, first_g: int,
                  drawing=draw_drawing) -> list[str]:
    """Write ``<name>.zip`` in the official member layout; returns its ``Alphabet/characterNN`` list."""
    characters = []
    members = []
    cid, g = first_id, first_g
    for alphabet in sorted(layout):
        for c in range(1, layout[alphabet] + 1):
            char = f"character{c:02d}"
            characters.append(f"{alphabet}/{char}")
            # drawers written in reverse order: the reader must sort by drawer, not trust the zip order
            for drawer in range(DRAWERS, 0, -1):
                members.append((f"{name}/{alphabet}/{char}/{cid:04d}_{drawer:02d}.png",
                                png_bytes(drawing(g, drawer))))
            cid += 1
            g += 1
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        # directory entries, as in the upstream archives
        zf.writestr(zipfile.ZipInfo(f"{name}/"), b"")
        for alphabet in sorted(layout):
            zf.writestr(zipfile.ZipInfo(f"{name}/{alphabet}/"), b"")
        for member, data in members:
            zf.writestr(member, data)
    return characters


@dataclass
class TinyOmniglot:
    root: Path  # the data root: holds omniglot/
    expected: dict[str, tuple[int, int, int]]  # archive name -> (alphabets, characters, drawings)
    characters: dict[str, list[str]]  # archive name -> "Alphabet/characterNN", sorted
    splits: dict[str, list[str]] = field(default_factory=dict)  # vinyals split -> lines

    @property
    def omniglot(self) -> Path:
        return self.root / "omniglot"

    @property
    def all_characters(self) -> list[str]:
        return [c for name in ("images_background", "images_evaluation") for c in self.characters[name]]

    def global_index(self, character: str) -> int:
        """The ``g`` drawn into ``character``'s pictures (see :func:`draw_drawing`)."""
        return self.all_characters.index(character)


def make_tiny_omniglot(root: Path) -> TinyOmniglot:
    om = root / "omniglot"
    om.mkdir(parents=True)
    characters, expected = {}, {}
    first_id, first_g = 1, 0
    for name, layout in TINY_LAYOUT.items():
        chars = build_archive(om / f"{name}.zip", name, layout, first_id, first_g)
        characters[name] = chars
        expected[name] = (len(layout), len(chars), DRAWERS)
        first_id += len(chars)
        first_g += len(chars)
    all_chars = characters["images_background"] + characters["images_evaluation"]  # 12 + 6
    rots = ("rot000", "rot090", "rot180", "rot270")
    splits = {
        "train": [f"{c}/{r}" for c in all_chars[:10] for r in rots],
        # spans both archives
        "val": [f"{c}/{r}" for c in all_chars[10:13] for r in rots],
        # unsorted characters and rotations: the file's order is the class order
        "test": [f"{c}/{r}" for c in reversed(all_chars[13:]) for r in ("rot270", "rot000", "rot180", "rot090")],
    }
    sp = om / "splits" / "vinyals"
    sp.mkdir(parents=True)
    for split, lines in splits.items():
        (sp / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return TinyOmniglot(root, expected, characters, splits)


@pytest.fixture(scope="session")
def tiny_omniglot(tmp_path_factory) -> TinyOmniglot:
    """A tiny Omniglot data root ``<tmp>/data`` (read it, do not modify it: copy with ``tiny_copy``).

    ``images_background.zip``: 3 alphabets x 4 characters x 20 drawers; ``images_evaluation.zip``:
    2 alphabets x 3 characters x 20; ``splits/vinyals/{train,val,test}.txt`` over those characters.
    """
    return make_tiny_omniglot(tmp_path_factory.mktemp("tiny") / "data")


@pytest.fixture
def tiny_copy(tiny_omniglot, tmp_path) -> TinyOmniglot:
    """A private copy of the tiny data root, for tests that change archives or caches."""
    import shutil

    root = tmp_path / "data"
    (root / "omniglot").mkdir(parents=True)
    for name in ("images_background.zip", "images_evaluation.zip"):
        shutil.copyfile(tiny_omniglot.omniglot / name, root / "omniglot" / name)
    shutil.copytree(tiny_omniglot.omniglot / "splits", root / "omniglot" / "splits")
    return TinyOmniglot(root, tiny_omniglot.expected, tiny_omniglot.characters, tiny_omniglot.splits)


@pytest.fixture
def metakit_cache(tmp_path, monkeypatch) -> Path:
    """``$METAKIT_CACHE`` in a temporary folder, so decoding never writes to ``~/.cache``."""
    cache = tmp_path / "metakit-cache"
    monkeypatch.setenv("METAKIT_CACHE", str(cache))
    return cache


@pytest.fixture
def http_server():
    """Factory: ``http_server(folder)`` serves ``folder`` on 127.0.0.1 and returns ``http://127.0.0.1:PORT``.

    ``handler=`` replaces the request handler class. Every server is shut down after the test.
    """
    servers = []

    def start(directory: Path | None = None, handler=None) -> str:
        if handler is None:
            class Quiet(http.server.SimpleHTTPRequestHandler):
                def log_message(self, *args):  # keep the test output clean
                    pass

            handler = functools.partial(Quiet, directory=str(directory))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        servers.append((server, thread))
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def one_thread():
    """Tiny networks run faster on one thread (and a busy machine spins less); restored afterwards.
    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def assert_adapt_equals_evaluation(learner, batch, task: int) -> None:
    """``learner.adapt`` on task ``task``'s support set scores its queries as the eval-mode ``meta_loss`` does."""
    learner.eval()
    with torch.no_grad():
        logits = learner.meta_loss(batch).logits[task]
    predict = learner.adapt(batch.support_x[task], batch.support_y[task])
    assert torch.allclose(predict(batch.query_x[task]), logits, atol=1e-5)
