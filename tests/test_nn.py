"""Backbones."""
import pytest
import torch

from metakit.nn import MLP, Conv4


def test_conv4_equals_the_textbook_block_order():
    """Channels-last with max-pool before ReLU computes conv -> BN -> ReLU -> pool exactly."""
    torch.manual_seed(0)
    net = Conv4(hidden=8).double()
    x = torch.randn(6, 1, 28, 28, dtype=torch.float64)
    h = x
    for conv, bn, pool, relu in net.features:
        h = pool(relu(bn(conv(h))))
    assert torch.allclose(net(x), h.flatten(1), atol=1e-10)
    assert net(x).shape == (6, 8) and net.embedding_dim == 8


def test_conv4_shapes():
    assert Conv4(image_size=84)(torch.rand(2, 1, 84, 84)).shape == (2, 64 * 25)
    assert Conv4(in_channels=3, out_features=5)(torch.rand(2, 3, 28, 28)).shape == (2, 5)
    assert MLP()(torch.rand(7, 1)).shape == (7, 1)


def test_conv4_blocks_set_the_depth_and_the_embedding_size():
    """A fifth block pools 56x56 down to 1x1 (64-d), where four leave 3x3 (576-d); too many blocks for the image is an error."""
    five = Conv4(image_size=56, blocks=5)
    assert len(five.features) == 5 and five.embedding_dim == 64
    assert five(torch.rand(2, 1, 56, 56)).shape == (2, 64)
    assert Conv4(image_size=56).embedding_dim == 64 * 9
    assert Conv4(image_size=56, blocks=3, out_features=5)(torch.rand(2, 1, 56, 56)).shape == (2, 5)
    with pytest.raises(ValueError, match="at least 64x64"):
        Conv4(image_size=28, blocks=6)


def test_metric_learners_pass_blocks_to_their_conv4():
    """``model.blocks`` reaches the encoder of every Conv4 metric learner (ProtoNet, Matching, Siamese)."""
    from metakit.algorithms.matching import MatchingNet
    from metakit.algorithms.protonet import ProtoNet
    from metakit.algorithms.siamese import Siamese

    for cls in (ProtoNet, MatchingNet, Siamese):
        assert cls(cls.Options(blocks=5), image_size=56).encoder.embedding_dim == 64, cls.__name__
        assert cls(cls.Options(), image_size=56).encoder.embedding_dim == 64 * 9, cls.__name__


def test_strided_conv4_is_the_maml_reference_network():
    """``pool="stride"``: stride-2 convolutions, no max-pool, the mean over the last 2x2 map (28 -> 14 -> 7 -> 4 -> 2)."""
    torch.manual_seed(0)
    net = Conv4(hidden=8, out_features=5, pool="stride").double()
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in net.modules())
    assert all(block[0].stride == (2, 2) for block in net.features)
    x = torch.randn(6, 1, 28, 28, dtype=torch.float64)
    h = x
    for conv, bn, relu in net.features:
        h = relu(bn(conv(h)))
    assert h.shape == (6, 8, 2, 2) and net.embedding_dim == 8
    torch.testing.assert_close(net(x), net.head(h.mean((2, 3))))
    assert Conv4(image_size=84, pool="stride")(torch.rand(2, 1, 84, 84)).shape == (2, 64)
