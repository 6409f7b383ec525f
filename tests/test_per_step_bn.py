"""``bn="per_step"``: BatchNorm running statistics kept per inner step (MAML++, Antoniou et al. 2019).
Training gives ``bn="batch"``'s numbers and records each step's statistics in its own set; evaluation
normalises with the set of its step, each example on its own."""
import pytest
import torch
import torch.nn.functional as F

from metakit.algorithms import MAML, Reptile
from metakit.algorithms.inner_loop import adapt, parameters_of
from metakit.nn import PerStepBatchNorm2d

from gradient_reference import SIZE, WAYS, assert_same_meta_gradients, tiny_batch, tiny_options


def learner(bn: str, **options) -> MAML:
    torch.manual_seed(0)
    return MAML(tiny_options(MAML, inner_lr=0.1, bn=bn, batched=False, **options), image_size=SIZE, ways=WAYS).double()


def per_step_layers(m: MAML) -> list[PerStepBatchNorm2d]:
    return [x for x in m.modules() if isinstance(x, PerStepBatchNorm2d)]


def test_training_gives_the_numbers_of_batch_statistics():
    plain, per_step = learner("batch", inner_steps=2), learner("per_step", inner_steps=2)
    assert len(per_step_layers(per_step)) == 4
    assert_same_meta_gradients(plain, per_step, tiny_batch(B=2), rtol=1e-10, atol=1e-13)
    assert per_step.batched_unsupported(True) is not None  # the loop runs it


def test_each_inner_step_records_its_own_statistics():
    """With momentum 1 a set holds the last batch's statistics: set s those of the first convolution's output on
    the support set at the weights of step s, the last set those of the query set after the last update."""
    m = learner("per_step", inner_steps=2)
    for bn in per_step_layers(m):
        bn.momentum = 1.0
    batch = tiny_batch(B=1)
    sx, sy, qx = batch.support_x[0], batch.support_y[0], batch.query_x[0]
    theta = parameters_of(m.model)
    weights = [adapt(m.model, theta, sx, sy, m.support_loss, m.update_rule(True), s, m.adapt_names) for s in range(3)]
    inputs = [sx, sx, qx]  # steps 0 and 1 on the support set, step 2 (after the last update) on the query set
    m.meta_loss(batch)
    first = m.model.features[0][1]
    assert first.running_mean.shape == (3, first.num_features)
    for s, (p, x) in enumerate(zip(weights, inputs)):
        z = F.conv2d(x, p["features.0.0.weight"], p["features.0.0.bias"], padding=1)  # [M, C, H, W]
        torch.testing.assert_close(first.running_mean[s], z.mean((0, 2, 3)).detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(first.running_var[s], z.var((0, 2, 3)).detach(), rtol=1e-10, atol=1e-12)
    assert first.num_batches_tracked.tolist() == [3, 2, 1]  # the adapt calls above, then the meta-loss


@pytest.mark.parametrize("steps_test, used, unused", [(1, 1, 2), (2, 2, None), (4, 2, None)])
def test_evaluation_reads_the_set_of_its_step_one_example_at_a_time(steps_test, used, unused):
    """The query pass after ``t`` test updates reads set ``t`` (the last set past the trained steps)."""
    m = learner("per_step", inner_steps=2, inner_steps_test=steps_test)
    for bn in per_step_layers(m):
        bn.momentum = 1.0
    m.meta_loss(tiny_batch(B=1, seed=5))  # training: each set holds its step's statistics on another task
    m.eval()
    batch = tiny_batch(B=1, queries=3)
    sx, sy, qx = batch.support_x[0], batch.support_y[0], batch.query_x[0]
    logits = m.adapt(sx, sy)(qx)  # [M, N]
    torch.testing.assert_close(m.adapt(sx, sy)(qx[:1]), logits[:1], rtol=1e-10, atol=1e-12)  # inductive
    torch.testing.assert_close(m.meta_loss(batch).logits[0], logits, rtol=1e-10, atol=1e-12)

    def shifted(slot: int):
        last = m.model.features[3][1]
        saved = last.running_mean[slot].clone()
        last.running_mean[slot] -= 1.0  # larger activations after the ReLU
        try:
            return m.adapt(sx, sy)(qx)
        finally:
            last.running_mean[slot] = saved

    assert not torch.allclose(shifted(used), logits)  # the query pass read this set
    if unused is not None:
        torch.testing.assert_close(shifted(unused), logits, rtol=0, atol=0)


def test_the_sets_are_saved_with_the_weights():
    m = learner("per_step", inner_steps=1)
    m.meta_loss(tiny_batch(B=2))
    state = m.state_dict()
    assert state["model.features.0.1.running_mean"].shape == (2, m.options.hidden)
    other = learner("per_step", inner_steps=1)
    other.load_state_dict(state)
    m.eval(), other.eval()
    batch = tiny_batch(B=1, seed=3)
    torch.testing.assert_close(other.meta_loss(batch).logits, m.meta_loss(batch).logits, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="running_mean"):  # another number of training steps: other sets
        learner("per_step", inner_steps=3).load_state_dict(state)


def test_reptile_refuses_per_step_statistics():
    with pytest.raises(ValueError, match="per_step"):
        Reptile(Reptile.Options(bn="per_step"))


def test_weights_trained_with_batch_statistics_start_a_per_step_run_with_fresh_statistics():
    """``metakit train --init`` from bn=batch weights: the weights load, the sets start at mean 0 and variance 1
    for the run to fill; loading the same file as a finished model (no fresh statistics) refuses."""
    from metakit.engine.checkpoint import CheckpointError, load_weights

    source = learner("batch", inner_steps=1)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.1)
    target = learner("per_step", inner_steps=1)
    fresh = load_weights(target, {"model": source.state_dict()}, "x.pt", "maml", fresh_statistics=True)
    assert sorted(fresh) == sorted(f"model.features.{i}.1.{k}" for i in range(4)
                                   for k in ("running_mean", "running_var", "num_batches_tracked"))
    for (name, p), q in zip(target.named_parameters(), source.parameters()):
        assert torch.equal(p, q), name
    assert torch.equal(target.model.features[0][1].running_var, torch.ones(2, target.options.hidden, dtype=torch.float64))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_weights(learner("per_step", inner_steps=1), {"model": source.state_dict()}, "x.pt", "maml")
    back = learner("batch", inner_steps=1)  # and the other way: statistics the learner does not keep are dropped
    assert load_weights(back, {"model": target.state_dict()}, "y.pt", "maml", fresh_statistics=True) == []
