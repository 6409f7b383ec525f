"""metakit predict: few-shot prediction on a user's folders, and its bad inputs."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import metakit
from metakit.cli import main
from metakit.config import from_dict
from metakit.data import DataError
from metakit.engine import fit
from metakit.predict import check_channels, predict_images

from synthetic import folder_config, make_image_folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A ProtoNet trained briefly on a synthetic folder, and a support/query layout from held-out classes."""
    root = tmp_path_factory.mktemp("predict")
    images = make_image_folder(root / "images", classes=12, per_class=8)
    fit(from_dict(folder_config(images, steps=30, val_every=0)), root / "run", progress=False)
    support, queries = root / "support", root / "queries"
    for c in ("class_09", "class_10", "class_11"):
        (support / c).mkdir(parents=True)
        files = sorted((images / c).iterdir())
        for f in files[:2]:
            shutil.copy(f, support / c / f.name)
        queries.mkdir(exist_ok=True)
        # queries in colour: the checkpoint's transform brings them back to grey
        for i in (0, 5, 6):
            Image.open(files[i]).convert("RGB").save(queries / f"{c}_{i}.png")
    return root / "run", support, queries


def test_predict_maps_queries_to_the_user_class_names(trained, capsys):
    """With one shot, a query that is (a colour copy of) a class's support image lies on its prototype."""
    run, support, queries = trained
    assert main(["predict", str(run), "--support", str(support), "--query", str(queries), "--json",
                 "--shots", "1"]) == 0
    records = json.loads(capsys.readouterr().out)
    names = [r["query"].rsplit("/", 1)[1] for r in records]
    assert names == sorted(f"class_{c:02d}_{i}.png" for c in (9, 10, 11) for i in (0, 5, 6))
    for r in records:
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert set(r["probabilities"]) == {"class_09", "class_10", "class_11"}
    copies = [r for r in records if r["query"].endswith("_0.png")]
    assert [r["predicted"] for r in copies] == ["class_09", "class_10", "class_11"]
    assert all(r["probabilities"][r["predicted"]] > 0.5 for r in copies)


def test_table_output_and_corrupt_query_skipped(trained, tmp_path, capsys):
    run, support, queries = trained
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    assert main(["predict", str(run), "--support", str(support), "--query", str(queries / "class_09_5.png"),
                 str(bad)]) == 0
    captured = capsys.readouterr()
    assert "predicted" in captured.out and "class_09_5.png" in captured.out
    assert f"skipping query {bad}" in captured.err


def one_line(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    return err[0]


def test_bad_support_folders(trained, tmp_path, capsys):
    run, support, queries = trained
    q = str(queries / "class_09_5.png")
    empty = tmp_path / "empty_class"
    shutil.copytree(support, empty)
    shutil.rmtree(empty / "class_10")
    (empty / "class_10").mkdir()
    assert "class folder" in one_line(capsys, ["predict", str(run), "--support", str(empty), "--query", q])
    line = one_line(capsys, ["predict", str(run), "--support", str(support), "--query", q, "--shots", "3"])
    assert "has 2 readable images; it needs at least 3" in line
    line = one_line(capsys, ["predict", str(run), "--support", str(tmp_path / "nope"), "--query", q])
    assert "not found" in line
    line = one_line(capsys, ["predict", str(run), "--support", str(support), "--query", str(tmp_path / "q.png")])
    assert "query" in line and "not found" in line
    junk = tmp_path / "junk.txt"
    junk.write_text("hello")
    line = one_line(capsys, ["predict", str(run), "--support", str(support), "--query", str(junk)])
    assert "no readable query image" in line


def test_channel_count_is_checked_for_tensors(trained):
    learner = metakit.load(trained[0])
    with pytest.raises(DataError, match=r"has shape \(2, 3, 28, 28\) but the checkpoint takes \[M, 1, 28, 28\]"):
        check_channels(torch.rand(2, 3, 28, 28), learner.transform, "query")
    check_channels(torch.rand(2, 1, 28, 28), learner.transform, "query")


def test_shots_uses_the_first_k_images(trained):
    run, support, queries = trained
    learner = metakit.load(run)
    a = predict_images(learner, support, [queries], shots=1)
    b = predict_images(learner, support, [queries], shots=2)
    assert [r["query"] for r in a] == [r["query"] for r in b]
    assert any(abs(a[i]["probabilities"]["class_09"] - b[i]["probabilities"]["class_09"]) > 1e-6 for i in range(9))


def test_gradient_based_checkpoints_predict_each_query_on_its_own(trained, tmp_path):
    """A MAML checkpoint (batch-statistics BatchNorm) works through the same path, and a query's
    probabilities do not depend on which other queries come along."""
    _, support, queries = trained
    images = trained[0].parent / "images"
    config = folder_config(images, steps=3, val_every=0)
    config.update(algorithm="maml", model={"hidden": 8, "inner_steps_test": 2})
    fit(from_dict(config), tmp_path / "maml", progress=False)
    learner = metakit.load(tmp_path / "maml")
    files = sorted(queries.iterdir())
    together = predict_images(learner, support, files)
    alone = [predict_images(learner, support, [f])[0] for f in files[:3]]
    for a, t in zip(alone, together):
        assert a["query"] == t["query"]
        assert all(abs(a["probabilities"][k] - t["probabilities"][k]) < 1e-5 for k in a["probabilities"])
    assert learner.options.transductive  # restored after prediction
