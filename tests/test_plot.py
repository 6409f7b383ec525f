"""Pictures: learning curves, accuracy against shots and ways, optional TensorBoard."""
import json
import sys
import types

import pytest
import yaml

from metakit.cli import main
from metakit.config import from_dict
from metakit.engine import fit

from synthetic import folder_config, make_image_folder


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("plot")
    images = make_image_folder(root / "images", classes=12, per_class=8)
    fit(from_dict(folder_config(images, steps=8)), root / "run", progress=False)
    return root / "run"


def test_learning_curve_png(run, tmp_path, capsys):
    assert main(["plot", str(run), "--out", str(tmp_path / "curve.png")]) == 0
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "curve.png").stat().st_size > 10_000
    assert main(["plot", str(tmp_path)]) == 2  # no metrics.jsonl there
    assert "metrics.jsonl not found" in capsys.readouterr().err


def test_accuracy_against_shots_and_ways(run, tmp_path, capsys):
    out = tmp_path / "shots.png"
    assert main(["plot", str(run), "--shots", "1,3", "--ways", "2,3", "--episodes", "10",
                 "--queries", "2", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines[:4]] == ["2-way 1-shot", "2-way 3-shot", "3-way 1-shot",
                                                          "3-way 3-shot"]
    assert out.stat().st_size > 10_000
    # 3 test classes only: 4 ways is refused before any evaluation
    assert main(["plot", str(run), "--shots", "1", "--ways", "4", "--queries", "2",
                 "--out", str(tmp_path / "x.png")]) == 2
    assert "4 ways asked but" in capsys.readouterr().err and not (tmp_path / "x.png").exists()


def test_tensorboard_missing_is_a_clear_error(run, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(folder_config(run.parent / "images", steps=2)))
    assert main(["train", str(config), "--out", str(tmp_path / "r"), "--tensorboard", "--quiet"]) == 2
    assert "pip install tensorboard" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_tensorboard_gets_every_metric(run, tmp_path, monkeypatch):
    scalars = []

    class FakeWriter:
        def __init__(self, logdir):
            self.logdir = logdir

        def add_scalar(self, key, value, step):
            scalars.append((key, step))

        def close(self):
            scalars.append(("closed", -1))

    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    fit(from_dict(folder_config(run.parent / "images", steps=4)), tmp_path / "r", progress=False, tensorboard=True)
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    expected = [(k, r["step"]) for r in records for k in r if k != "step"]
    assert scalars == expected + [("closed", -1)]
