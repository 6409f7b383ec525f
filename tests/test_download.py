"""Downloading Omniglot from a local HTTP server (no other network)."""
from __future__ import annotations

import http.server
import socket
from pathlib import Path

import pytest

from metakit.data import DataError, load_omniglot
from metakit.data.download import download

from conftest import DRAWERS

pytestmark = pytest.mark.usefixtures("metakit_cache")

ARCHIVES = ("images_background.zip", "images_evaluation.zip")


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".part")] if root.exists() else []


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there any more


def test_download_archives_and_split_files(tiny_omniglot, http_server, tmp_path):
    url = http_server(tiny_omniglot.omniglot)
    root = tmp_path / "fresh"
    for split, lines in tiny_omniglot.splits.items():
        ds = load_omniglot(split, scheme="vinyals", root=root, base_url=f"{url}/",
                           splits_url=f"{url}/splits/vinyals/", expected=tiny_omniglot.expected)
        assert ds.class_names == lines
        assert ds.images.shape == (len(lines) * DRAWERS, 1, 28, 28)
    om = root / "omniglot"
    for name in ARCHIVES:
        assert (om / name).read_bytes() == (tiny_omniglot.omniglot / name).read_bytes()
    for split in ("train", "val", "test"):
        got = (om / "splits" / "vinyals" / f"{split}.txt").read_text()
        assert got == (tiny_omniglot.omniglot / "splits" / "vinyals" / f"{split}.txt").read_text()
    assert not leftovers(root)
    # present files are not fetched again: a dead address is never contacted
    dead = closed_port_url()
    again = load_omniglot("test", scheme="vinyals", root=root, base_url=f"{dead}/",
                          splits_url=f"{dead}/splits/", expected=tiny_omniglot.expected)
    assert again.class_names == tiny_omniglot.splits["test"]


def test_download_lake_fetches_only_its_archive(tiny_omniglot, http_server, tmp_path):
    url = http_server(tiny_omniglot.omniglot)
    root = tmp_path / "fresh"
    ds = load_omniglot("evaluation", scheme="lake", root=root, base_url=f"{url}/", splits_url=f"{url}/nowhere/",
                       expected=tiny_omniglot.expected)
    assert ds.num_classes == 6 * 4
    assert sorted(p.name for p in (root / "omniglot").glob("*.zip")) == ["images_evaluation.zip"]


def check_failed(exc: DataError, root: Path, base: str) -> None:
    msg = str(exc)
    for name in ARCHIVES:
        assert name in msg
        assert f"{base}{name}" in msg
    assert str(root / "omniglot") in msg
    assert "download failed" in msg
    assert not leftovers(root)
    assert not list(root.rglob("*.zip"))


def test_http_404(http_server, tmp_path):
    empty = tmp_path / "served"
    empty.mkdir()
    base = http_server(empty) + "/python/"
    root = tmp_path / "data"
    with pytest.raises(DataError) as info:
        load_omniglot("train", scheme="vinyals", root=root, base_url=base, splits_url=base)
    check_failed(info.value, root, base)
    assert "404" in str(info.value)


def test_unreachable_server(tmp_path):
    base = closed_port_url() + "/omniglot/"
    root = tmp_path / "data"
    with pytest.raises(DataError) as info:
        load_omniglot("val", scheme="maml", root=root, base_url=base, splits_url=base)
    check_failed(info.value, root, base)


class Truncating(http.server.BaseHTTPRequestHandler):
    """Promises 100000 bytes, sends 10, hangs up."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "100000")
        self.end_headers()
        self.wfile.write(b"PK\x03\x04 junk")
        self.close_connection = True

    def log_message(self, *args):
        pass


def test_interrupted_download_leaves_nothing(http_server, tmp_path):
    base = http_server(handler=Truncating) + "/"
    root = tmp_path / "data"
    with pytest.raises(DataError) as info:
        load_omniglot("background", scheme="lake", root=root, base_url=base)
    msg = str(info.value)
    assert "images_background.zip" in msg and str(root / "omniglot") in msg
    om = root / "omniglot"
    assert not leftovers(root)
    assert not (om / "images_background.zip").exists()
    # the low-level function raises and cleans up too
    with pytest.raises(Exception):
        download(base + "x.zip", tmp_path / "direct" / "x.zip")
    assert list((tmp_path / "direct").iterdir()) == []


def test_missing_split_file_on_server(tiny_omniglot, http_server, tmp_path):
    url = http_server(tiny_omniglot.omniglot)
    root = tmp_path / "fresh"
    with pytest.raises(DataError) as info:
        load_omniglot("val", scheme="vinyals", root=root, base_url=f"{url}/", splits_url=f"{url}/wrong/",
                      expected=tiny_omniglot.expected)
    msg = str(info.value)
    assert "val.txt" in msg and f"{url}/wrong/val.txt" in msg
    assert str(root / "omniglot" / "splits" / "vinyals") in msg
    assert not leftovers(root)
