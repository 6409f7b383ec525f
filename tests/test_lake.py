"""Lake's within-alphabet protocol: one alphabet per episode, two drawers, seeded; `metakit eval --protocol`."""
import json

import pytest
import torch
import yaml
from torch import nn

from metakit.algorithms import ProtoNet
from metakit.cli import main
from metakit.config import DataConfig
from metakit.data import EpisodeError
from metakit.data import omniglot
from metakit.data.lake import LakeSampler, lake_sampler
from metakit.data.omniglot import load_archive
from metakit.engine import evaluate
from metakit.engine.protocols import evaluate_lake, trained_on_evaluation_alphabets

from conftest import build_archive
from synthetic import folder_config, make_image_folder

LAYOUT = {"Delta": 20, "Epsilon": 22}  # Lake's protocol needs 20 characters in every alphabet


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lake_root(tmp_path_factory):
    """A data root whose images_evaluation.zip has 2 alphabets of 20 and 22 characters, 20 drawers each."""
    root = tmp_path_factory.mktemp("lake") / "data"
    (root / "omniglot").mkdir(parents=True)
    build_archive(root / "omniglot" / "images_evaluation.zip", "images_evaluation", LAYOUT, first_id=1, first_g=0)
    return root


@pytest.fixture
def official(monkeypatch):
    """Make the small archive pass the structure check the command line applies."""
    monkeypatch.setitem(omniglot.EXPECTED, "images_evaluation", (2, sum(LAYOUT.values()), 20))


@pytest.fixture(scope="module")
def archive(lake_root):
    return load_archive("images_evaluation", 28, root=lake_root, download=False, expected=None)


def test_each_episode_is_20_characters_of_one_alphabet_by_two_drawers(archive):
    sampler = LakeSampler(archive["images"], archive["characters"], seed=0)
    seen = []
    for e in range(6):
        d = sampler.draw()
        alphabets = {archive["characters"][i].split("/")[0] for i in d["characters"].tolist()}
        assert alphabets == {d["alphabet"]} and d["alphabet"] == sorted(LAYOUT)[e % 2]  # episodes cycle alphabets
        assert len(set(d["characters"].tolist())) == 20
        assert d["support_drawers"].numel() == d["query_drawers"].numel() == 1
        assert d["support_drawers"].item() != d["query_drawers"].item()
        seen.append((d["characters"].tolist(), d["support_drawers"].item(), d["query_drawers"].item()))
    assert len({tuple(sorted(c)) for c, _, _ in seen[1::2]}) > 1  # 20 of Epsilon's 22 characters, varying
    again = LakeSampler(archive["images"], archive["characters"], seed=0)
    assert [(again.draw()["characters"].tolist()) for _ in range(6)] == [c for c, _, _ in seen]


def test_batches_hold_the_drawn_images_with_labels_by_position(archive):
    images = archive["images"]
    d = LakeSampler(images, archive["characters"], seed=3).draw()
    batch = LakeSampler(images, archive["characters"], seed=3).sample()
    assert batch.support_x.shape == (1, 20, 1, 28, 28) and batch.query_x.shape == (1, 20, 1, 28, 28)
    assert batch.ways == 20 and torch.equal(batch.support_y[0], torch.arange(20))
    assert torch.equal(batch.query_y[0], torch.arange(20))
    chars, a, b = d["characters"], d["support_drawers"].item(), d["query_drawers"].item()
    assert torch.equal(batch.support_x[0, :, 0], images[chars, a].float() / 255)
    assert torch.equal(batch.query_x[0, :, 0], images[chars, b].float() / 255)
    assert not torch.equal(batch.support_x, batch.query_x)  # another drawer, another drawing


def test_impossible_requests_are_refused(archive):
    with pytest.raises(EpisodeError, match=r"Delta \(20\).*use ways <= 20"):
        LakeSampler(archive["images"], archive["characters"], ways=21)
    with pytest.raises(EpisodeError, match="shots \\+ queries <= 20"):
        LakeSampler(archive["images"], archive["characters"], shots=15, queries=6)


def test_pixel_nearest_prototype_is_right_on_every_trial_at_the_checkpoint_size(lake_root, official):
    learner = ProtoNet()
    learner.encoder = nn.Flatten()  # pixels: in the test drawings the character box outweighs the drawer bar
    data = DataConfig(root=str(lake_root), image_size=20, download=False, scheme="lake", train_split="background")
    record = evaluate_lake(learner, data, episodes=4)
    assert record["image_size"] == 20 and record["trials"] == 80 and record["alphabets"] == 2
    assert record["accuracy"] == 1.0 and record["error_rate"] == 0.0
    assert record["published_error"]["people"] == 0.045
    assert record["trained_on_evaluation_alphabets"] is False  # Lake's background set
    assert trained_on_evaluation_alphabets(DataConfig(scheme="vinyals")) is True
    sampler = lake_sampler(20, root=lake_root, download=False, seed=1, expected=None)
    assert evaluate(learner, sampler, 2)["accuracy"] == 1.0


def test_eval_protocol_lake_on_the_command_line(lake_root, official, tmp_path, capsys):
    folder = make_image_folder(tmp_path / "images", classes=6, per_class=4)
    values = folder_config(folder, steps=2, ways=2, shots=1, queries=1, val_every=0)
    values.update(algorithm="siamese", model={"hidden": 8, "pairs": 8})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(values))
    assert main(["train", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    capsys.readouterr()
    argv = ["eval", str(tmp_path / "run"), "--protocol", "lake-within-alphabet", "--data-root", str(lake_root),
            "--episodes", "6"]
    assert main(argv + ["--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["protocol"] == "lake-within-alphabet" and record["algorithm"] == "siamese"
    assert record["trials"] == 120 and record["ways"] == 20 and record["shots"] == 1
    assert abs(record["error_rate"] - (1 - record["accuracy"])) < 1e-12 and record["ci95"] >= 0
    assert record["trained_on_evaluation_alphabets"] is None  # a folder data set
    assert main(argv) == 0
    line = capsys.readouterr().out
    assert "Lake within-alphabet 20-way 1-shot, 120 trials" in line and "people 4.5%" in line


def test_training_within_alphabets_on_the_command_line(tiny_copy, monkeypatch, tmp_path, capsys):
    """``train.within_alphabet``: tasks drawn inside one background alphabet, refused before work when no
    alphabet has ``train.ways`` classes, and for data without alphabets."""
    monkeypatch.setitem(omniglot.EXPECTED, "images_background", tiny_copy.expected["images_background"])
    config = {"name": "within", "algorithm": "protonet", "seed": 0, "model": {"hidden": 8},
              "data": {"dataset": "omniglot", "root": str(tiny_copy.root), "download": False, "scheme": "lake",
                       "image_size": 20, "train_split": "background"},
              "train": {"ways": 16, "shots": 1, "queries": 2, "steps": 2, "val_every": 0, "within_alphabet": 1.0,
                        "log_every": 1, "checkpoint_every": 1}}
    path = tmp_path / "within.yaml"
    path.write_text(yaml.safe_dump(config))
    # 3 alphabets of 4 characters x 4 rotations: 16 classes each, 48 in all
    assert main(["train", str(path), "--out", str(tmp_path / "ok"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["train", str(path), "--set", "train.ways=17", "--out", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err
    assert "largest group (alphabet)" in err and "has 16 classes" in err and "ways <= 16" in err
    assert not (tmp_path / "no").exists()  # refused before any work
    assert main(["train", str(path), "--set", "train.within_alphabet=1.5"]) == 2
    assert "train.within_alphabet is a fraction of tasks in [0, 1], got 1.5" in capsys.readouterr().err
    folder = tmp_path / "own.yaml"
    folder.write_text(yaml.safe_dump(folder_config(make_image_folder(tmp_path / "images"), within_alphabet=0.5)))
    assert main(["train", str(folder), "--out", str(tmp_path / "f")]) == 2
    assert "within-alphabet episodes need Omniglot's alphabets" in capsys.readouterr().err
    assert not (tmp_path / "f").exists()
