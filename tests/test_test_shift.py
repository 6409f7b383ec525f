"""Test-time translations of the metric learners (``model.test_shift``, :func:`metakit.algorithms.metric.encode`)."""
import pytest
import torch
from torch import nn

from metakit.algorithms import MatchingNet, ProtoNet, Siamese
from metakit.algorithms.metric import encode
from metakit.config import load_config
from metakit.tasks import TaskBatch


def bordered_images(n: int, border: int, size: int = 12, seed: int = 0) -> torch.Tensor:
    """Random strokes inside a zero border of ``border`` px: ``[n, 1, size, size]``."""
    x = torch.zeros(n, 1, size, size)
    inner = torch.rand(n, 1, size - 2 * border, size - 2 * border, generator=torch.Generator().manual_seed(seed))
    x[..., border:size - border, border:size - border] = inner
    return x


def test_encode_is_the_mean_over_every_translation_by_up_to_n_pixels():
    # Inside a zero border, translating by (dy, dx) is a roll by (dy, dx): an independent reference.
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 10 * 10, 4))
    x = bordered_images(5, border=2)  # [5, 1, 12, 12]
    want = torch.stack([encoder(torch.roll(x, (dy, dx), dims=(-2, -1)))
                        for dy in (-2, -1, 0, 1, 2) for dx in (-2, -1, 0, 1, 2)]).mean(0)  # [5, 4]
    got = encode(encoder, x.view(1, 5, 1, 12, 12), shift=2)  # leading dims kept: [1, 5, 4]
    assert got.shape == (1, 5, 4)
    assert torch.allclose(got[0], want, atol=1e-6)
    assert torch.equal(encode(encoder, x, shift=0), encoder(x))
    # a translation-sensitive encoder gives another embedding once translations are averaged
    assert not torch.allclose(encode(encoder, x, shift=1), encoder(x), atol=1e-3)


def test_edges_are_repeated_not_zeroed():
    # A constant image stays constant under edge-repeating translations, so its embedding does not change.
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    x = torch.full((2, 1, 8, 8), 0.7)
    assert torch.allclose(encode(encoder, x, shift=3), encoder(x), atol=1e-6)


@pytest.mark.parametrize("cls", [ProtoNet, MatchingNet, Siamese])
def test_learners_average_translations_at_test_only(cls):
    torch.manual_seed(0)
    plain = cls(image_size=28)
    shifted = cls(cls.Options(test_shift=1), image_size=28)
    shifted.load_state_dict(plain.state_dict())
    x = bordered_images(6, border=3, size=28)
    plain.eval(), shifted.eval()
    with torch.no_grad():
        assert torch.allclose(shifted.embed(x), encode(plain.encoder, x, shift=1), atol=1e-5)
        assert not torch.allclose(shifted.embed(x), plain.embed(x), atol=1e-4)
        # adapt and meta_loss (what metakit eval scores) both see the averaged embedding
        support_y = torch.arange(3).repeat(2)  # 3-way 2-shot
        predict = shifted.adapt(x, support_y)
        batch = TaskBatch(x[None], support_y[None], x[None], support_y[None], ways=3)
        assert torch.allclose(predict(x), shifted.meta_loss(batch).logits[0], atol=1e-4)
    plain.train(), shifted.train()
    torch.manual_seed(1)
    a = plain.embed(x)
    torch.manual_seed(1)
    assert torch.allclose(shifted.embed(x), a)  # training: no translations


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_a_bad_test_shift_is_refused_when_the_learner_is_built(bad):
    with pytest.raises(ValueError, match="model.test_shift"):
        ProtoNet(ProtoNet.Options(test_shift=bad))


def test_test_shift_is_a_config_setting():
    config = load_config(None, ["algorithm=protonet", "model.test_shift=2"])
    assert config.model.test_shift == 2
