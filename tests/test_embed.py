"""`metakit embed`: PCA and closest-support pictures for metric learners; a clear line for the others."""
import pytest
import torch
from PIL import Image

from metakit.cli import main
from metakit.config import from_dict
from metakit.data import load_split
from metakit.embedding import pca_2d
from metakit.engine import checkpoint

from synthetic import folder_config, make_image_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("embed_images"), classes=12, per_class=5)


def saved(folder, path, algorithm, model):
    values = folder_config(folder)
    values.update(algorithm=algorithm, model=model)
    config = from_dict(values)
    torch.manual_seed(0)
    learner = checkpoint.build_from_config(config)
    return checkpoint.save(path, learner, config, load_split(config.data, "train").transform)


def test_pca_finds_the_direction_of_largest_variance():
    t = torch.linspace(-1, 1, 50)
    z = torch.stack([3 * t, -3 * t, 0.01 * torch.randn(50)], 1) + 5  # almost all variance along (1, -1, 0)
    coords, share = pca_2d(z)
    assert share[0] > 0.999 and coords.shape == (50, 2)
    assert torch.allclose(coords[:, 0].abs(), (3 * t * 2 ** 0.5).abs(), atol=1e-3)


@pytest.mark.parametrize("algorithm, model", [("protonet", {"hidden": 8}), ("siamese", {"hidden": 8}),
                                              ("matching", {"hidden": 8, "fce": True})])
def test_embed_writes_both_pictures(folder, tmp_path, capsys, algorithm, model):
    ckpt = saved(folder, tmp_path / f"{algorithm}.pt", algorithm, model)
    assert main(["embed", str(ckpt), "--out", str(tmp_path / "pics"), "--classes", "3", "--queries", "4"]) == 0
    assert "embedding_pca.png" in capsys.readouterr().out
    for name in ("embedding_pca.png", "nearest_support.png"):
        with Image.open(tmp_path / "pics" / name) as im:
            assert im.format == "PNG" and im.width > 200 and im.height > 200


def test_embed_refuses_a_learner_without_an_embedding(folder, tmp_path, capsys):
    ckpt = saved(folder, tmp_path / "maml.pt", "maml", {"hidden": 8, "inner_steps": 1})
    assert main(["embed", str(ckpt)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a metric learner" in err[0] and "maml" in err[0]
