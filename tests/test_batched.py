"""The batched path (a whole meta-batch adapted at once) against the loop over tasks and against
float64 finite differences, with BatchNorm on per-task batch statistics in the model: second order,
first order, ANIL, Meta-SGD's learned step, regression; the layouts it may choose; its fallbacks."""
import pytest
import torch
import torch.nn.functional as F

from metakit.algorithms import ANIL, FOMAML, MAML, MetaSGD, build_learner
from metakit.algorithms.batched import (Unsupported, _in_format, batched_task_outputs, cancelled_biases, layout_for,
                                        leave, plan, run_layers, to_grouped)
from metakit.algorithms.inner_loop import AdamRule, adapt, forward, parameters_of
from metakit.data import SinusoidSampler
from metakit.tasks import TaskBatch

from gradient_reference import SIZE, WAYS, assert_matches_finite_differences, learner_grads, tiny_batch, tiny_options

CASES = {
    "maml-2-steps": (MAML, dict(inner_lr=0.1, inner_steps=2)),
    "maml-recompute-queries": (MAML, dict(inner_lr=0.1, inner_steps=2, recompute_queries=True)),
    "fomaml": (FOMAML, dict(inner_lr=0.1, inner_steps=2)),
    "anil": (ANIL, dict(inner_lr=0.1, inner_steps=2)),
    "metasgd": (MetaSGD, dict(inner_steps=2)),  # alpha drawn per coordinate in [0.005, 0.1]
    "maml-per-shot": (MAML, dict(inner_lr=0.1, inner_loss="per_shot")),
    "maml-strided-no-bn": (MAML, dict(inner_lr=0.1, inner_steps=2, pool="stride", adapt="no_bn")),  # the MAML reference's
    "maml-each-query-with-support": (MAML, dict(inner_lr=0.1, inner_steps=2, transductive=False)),
    "anil-each-query-with-support": (ANIL, dict(inner_lr=0.1, inner_steps=2, transductive=False)),
}


def pair(cls, **options):
    """The same learner twice (same weights): the loop and the batched path."""
    out = []
    for batched in (False, True):
        torch.manual_seed(0)
        out.append(cls(tiny_options(cls, batched=batched, **options), image_size=SIZE, ways=WAYS).double())
    return out


def batched_only(learner, monkeypatch):
    """Make sure the batched path is the one that runs: the loop's per-task adaptation would fail."""
    assert learner.batched_unsupported(learner.training) is None
    monkeypatch.setattr(learner, "adapt_params", lambda *a, **k: pytest.fail("the loop ran"))


def assert_same(a: dict, b: dict, rtol=1e-9, atol=1e-12):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("case", list(CASES))
def test_batched_equals_the_loop_losses_logits_and_every_meta_gradient(case, monkeypatch):
    cls, options = CASES[case]
    loop, batched = pair(cls, **options)
    batched_only(batched, monkeypatch)
    assert any(isinstance(m, torch.nn.BatchNorm2d) and not m.track_running_stats for m in batched.modules())
    batch = tiny_batch(B=3, shots=2)
    losses_a, logits_a = loop.task_outputs(batch, training=True)
    losses_b, logits_b = batched.task_outputs(batch, training=True)
    torch.testing.assert_close(losses_b, losses_a, rtol=1e-10, atol=0)  # [B]
    torch.testing.assert_close(logits_b, logits_a, rtol=1e-9, atol=1e-12)  # [B, M, N]
    loss_a, grads_a = learner_grads(loop, batch)
    loss_b, grads_b = learner_grads(batched, batch)
    assert loss_b == pytest.approx(loss_a, rel=1e-12)
    assert_same(grads_b, grads_a)  # every meta-parameter, Meta-SGD's alpha included
    if cls is MetaSGD:
        assert any(k.startswith("rule.lr.") for k in grads_b)


@pytest.mark.parametrize("case", ["maml-2-steps", "anil", "metasgd", "maml-each-query-with-support"])
def test_batched_eval_schedule_equals_the_loop_and_records_nothing(case, monkeypatch):
    cls, options = CASES[case]
    loop, batched = pair(cls, inner_steps_test=3, **options)
    if cls is not MetaSGD:
        loop.options.inner_lr_test = batched.options.inner_lr_test = 0.05
    loop.eval(), batched.eval()
    batched_only(batched, monkeypatch)
    batch = tiny_batch(B=3)
    before = {k: v.clone() for k, v in batched.state_dict().items()}
    with torch.no_grad():  # as the engine's evaluation may call it
        out_a, out_b = loop.meta_loss(batch), batched.meta_loss(batch)
    torch.testing.assert_close(out_b.logits, out_a.logits, rtol=1e-9, atol=1e-12)
    assert out_b.loss.item() == pytest.approx(out_a.loss.item(), rel=1e-12)
    assert not out_b.loss.requires_grad and not out_b.logits.requires_grad
    assert all(torch.equal(before[k], v) for k, v in batched.state_dict().items())


@pytest.mark.parametrize("pool", ["max", "stride"])
def test_batched_second_order_meta_gradient_matches_central_finite_differences(pool, monkeypatch):
    _, learner = pair(MAML, inner_lr=0.1, inner_steps=2, pool=pool)
    batched_only(learner, monkeypatch)
    batch = tiny_batch(B=2)
    _, grads = learner_grads(learner, batch)
    # two coordinates of every tensor (conv, BatchNorm scale and offset, head), then one random direction
    assert_matches_finite_differences(learner, batch, grads, coordinates=2, directions=1, seed=2)


def test_each_task_is_normalised_with_its_own_examples(monkeypatch):
    """A task's outputs do not depend on the other tasks of the meta-batch (BatchNorm statistics per task)."""
    _, learner = pair(MAML, inner_lr=0.1)
    batched_only(learner, monkeypatch)
    batch = tiny_batch(B=3)
    shifted = TaskBatch(batch.support_x.clone(), batch.support_y, batch.query_x.clone(), batch.query_y, batch.ways)
    shifted.support_x[1:] = shifted.support_x[1:] * 3 + 1  # other tasks' statistics change a lot
    shifted.query_x[1:] = shifted.query_x[1:] * 3 + 1
    losses, logits = learner.task_outputs(batch, training=True)
    losses_s, logits_s = learner.task_outputs(shifted, training=True)
    torch.testing.assert_close(logits_s[0], logits[0], rtol=1e-12, atol=1e-13)
    assert not torch.allclose(logits_s[1], logits[1])
    one, one_logits = learner.task_outputs(batch.task(0), training=True)
    torch.testing.assert_close(one_logits[0], logits[0], rtol=1e-12, atol=1e-13)


def _run_batched(learner, batch, **kw):
    """``batched_task_outputs`` of a learner's training schedule, the layout in ``kw``."""
    theta = parameters_of(learner.model)
    o = learner.options
    return theta, batched_task_outputs(plan(learner.model), theta, batch.support_x, batch.support_y, batch.query_x,
                                       batch.query_y, learner.support_loss, learner.query_loss,
                                       learner.update_rule(True), o.inner_steps, learner.adapt_names, o.first_order,
                                       True, transductive=o.transductive, **kw)


@pytest.mark.parametrize("layout", [dict(), dict(query_chunk=1, channels_last=True),
                                    dict(support_chunk=2, query_chunk=2), dict(support_chunk=1, channels_last=True),
                                    dict(query_chunk=1, recompute_queries=True)])
def test_every_layout_gives_the_same_numbers(layout):
    """Chunks of tasks, channels-last and recomputed query activations change the speed and the memory,
    never the numbers (second order, 2 steps)."""
    _, learner = pair(MAML, inner_lr=0.1, inner_steps=2)
    batch = tiny_batch(B=3)

    def run(**kw):
        theta, (losses, out) = _run_batched(learner, batch, **kw)
        return losses, out, torch.autograd.grad(losses.sum(), list(theta.values()))

    ref, other = run(), run(**layout)
    for a, b in zip(ref[:2] + ref[2], other[:2] + other[2]):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-13)
    assert layout_for(batch.query_x) == dict(support_chunk=8, query_chunk=1, channels_last=True)  # images on CPU
    assert layout_for(torch.zeros(3, 5, 1)) == {}


def test_one_channel_images_get_channels_last_strides():
    """With one channel ``contiguous(channels_last)`` keeps NCHW strides and the convolution answers in NCHW."""
    x = torch.rand(4, 1, 8, 8)
    y = _in_format(x, torch.channels_last)
    assert y.stride() == (64, 1, 8, 1) and torch.equal(y, x)
    out = F.conv2d(y, torch.rand(5, 1, 3, 3), padding=1)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()


def test_regression_mlp_batched_equals_the_loop(monkeypatch):
    learners = []
    for batched in (False, True):
        torch.manual_seed(0)
        learners.append(build_learner("maml", MAML.Options(inner_lr=0.01, inner_steps=2, batched=batched),
                                      task="regression").double())
    loop, batched = learners
    batched_only(batched, monkeypatch)
    b = SinusoidSampler(shots=5, queries=7, meta_batch_size=4).sample()
    b = type(b)(*(t.double() for t in (b.support_x, b.support_y, b.query_x, b.query_y)))
    loss_a, grads_a = learner_grads(loop, b)
    loss_b, grads_b = learner_grads(batched, b)
    assert loss_b == pytest.approx(loss_a, rel=1e-12)
    assert_same(grads_b, grads_a)


def test_a_coordinatewise_rule_with_state_adam_matches_the_loop():
    """The update rules broadcast over the task dimension, their state (Adam's moments) per task too."""
    _, learner = pair(MAML)
    batch = tiny_batch(B=3)
    theta = parameters_of(learner.model)
    rule = AdamRule(0.01)
    losses, outs = batched_task_outputs(plan(learner.model), theta, batch.support_x, batch.support_y, batch.query_x,
                                        batch.query_y, learner.support_loss, learner.query_loss, rule, 3,
                                        list(theta), True, True)
    for i in range(3):
        fast = adapt(learner.model, theta, batch.support_x[i], batch.support_y[i], learner.support_loss, rule, 3,
                     first_order=True)
        torch.testing.assert_close(outs[i], forward(learner.model, fast, batch.query_x[i]), rtol=1e-9, atol=1e-12)


def test_settings_the_batched_path_does_not_know_run_in_the_loop():
    running = pair(MAML, bn="running")[1]
    assert "running statistics" in running.batched_unsupported(True)
    assert "PerStepBatchNorm2d" in pair(MAML, bn="per_step")[1].batched_unsupported(False)
    with pytest.raises(Unsupported, match="Tanh"):
        plan(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh()))


def test_grouped_layout_keeps_tasks_apart():
    """``[B, M, C, H, W] -> [M, B*C, H, W]``; a shared convolution weight acts on each task's channels alone."""
    x = torch.rand(2, 3, 4, 5, 5, dtype=torch.float64)
    g = to_grouped(x)
    assert g.shape == (3, 8, 5, 5) and torch.equal(g[:, 4:8], x[1])
    conv = torch.nn.Conv2d(4, 6, 3, padding=1).double()
    layers = plan(torch.nn.Sequential(conv))
    out = run_layers(layers, dict(conv.named_parameters(prefix="0")), g, 2)  # [3, 2*6, 5, 5]
    torch.testing.assert_close(out[:, 6:], conv(x[1]))


def test_relu_works_in_place_only_on_outputs_of_the_pass():
    """A ReLU overwrites the output of the layer before it (2-3% faster), never the tensor the caller gave."""
    model = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(3, 4), torch.nn.ReLU()).double()
    theta = parameters_of(model)
    x = torch.randn(2, 5, 3, dtype=torch.float64)  # [B, M, F], with negatives
    given = x.clone()
    out = run_layers(plan(model), theta, x, 2)
    assert torch.equal(x, given)
    torch.testing.assert_close(out, model(x))
    assert (out >= 0).all() and (out == 0).any()


def test_a_convolution_bias_is_left_out_only_where_batchnorm_follows():
    """BatchNorm on batch statistics cancels the bias of the convolution before it, ``BN(z + b) = BN(z)``: the
    batched path leaves those biases out and keeps every other one, with the module's outputs either way."""
    nn = torch.nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3, track_running_stats=False), nn.ReLU(),
                          nn.Conv2d(3, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).double()
    with torch.no_grad():  # biases large enough to matter wherever they are kept
        model[0].bias.normal_(0, 5), model[3].bias.normal_(0, 5)
    layers = plan(model)
    assert cancelled_biases(layers) == ["0.bias"]
    x = torch.rand(2, 4, 1, 6, 6, dtype=torch.float64)  # [B, M, C, H, W]
    out = leave(run_layers(layers, parameters_of(model), to_grouped(x), 2), 2)  # [B, M, 3]
    for b in range(2):
        torch.testing.assert_close(out[b], model(x[b]), rtol=1e-10, atol=1e-12)
    assert cancelled_biases(plan(MAML(tiny_options(MAML), image_size=SIZE, ways=WAYS).model)) == [
        f"features.{i}.0.bias" for i in range(4)]


@pytest.mark.parametrize("case", ["maml-2-steps", "fomaml", "anil", "metasgd", "maml-strided-no-bn",
                                  "anil-each-query-with-support"])
@pytest.mark.parametrize("chunk", [1, 2])
def test_query_backward_now_gives_each_tasks_own_meta_gradient(case, chunk):
    """Back-propagating each query chunk at once (the surrogate losses of ``with_query_gradients``) leaves every
    task's meta-gradient as it was, under any weighting of the tasks' losses: chunks of one task and of two,
    shared parameters (ANIL's body, the reference's BatchNorm) and learned steps (Meta-SGD) included."""
    cls, options = CASES[case]
    _, learner = pair(cls, **options)
    batch = tiny_batch(B=3)
    weights = torch.tensor([0.7, -1.3, 2.1], dtype=torch.float64)  # not the mean: per-task gradients must be exact
    results = []
    for now in (False, True):
        theta, (losses, out) = _run_batched(learner, batch, query_chunk=chunk, query_backward_now=now)
        params = [v for v in theta.values()] + [v for v in learner.parameters() if not any(v is t for t in theta.values())]
        grads = torch.autograd.grad((weights * losses).sum(), params, allow_unused=True, materialize_grads=True)
        results.append((losses.detach(), out.detach(), grads))
    (l0, o0, g0), (l1, o1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-12, atol=0)
    torch.testing.assert_close(o1, o0, rtol=1e-10, atol=1e-13)
    assert len(g0) == len(g1) and any(g.abs().sum() > 0 for g in g1)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)


def _live_saved_bytes(fn) -> tuple[object, int]:
    """``fn()``, and the bytes of the tensors its autograd graph still holds when it returns."""
    import gc
    import weakref

    class Saved:
        def __init__(self, t):
            self.t = t

    held = weakref.WeakSet()

    def pack(t):
        s = Saved(t)
        held.add(s)
        return s

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda s: s.t):
        result = fn()
    gc.collect()
    return result, sum(s.t.numel() * s.t.element_size() for s in list(held))


def test_query_backward_now_frees_the_query_activations():
    """With ``query_backward_now`` the graph left after the query passes holds what the support passes saved, the
    same however many queries there are; without it, it grows with the queries (the activations of every task)."""
    _, learner = pair(MAML, inner_lr=0.1, inner_steps=1)
    held = {}
    for queries in (2, 8):
        batch = tiny_batch(B=3, queries=queries)
        for now in (False, True):
            result, held[queries, now] = _live_saved_bytes(
                lambda: _run_batched(learner, batch, query_chunk=1, query_backward_now=now))
            theta, (losses, _) = result
            torch.autograd.grad(losses.sum(), list(theta.values()))  # the losses still lead back to every parameter
            del result, theta, losses
    assert held[8, True] == held[2, True] > 0
    assert held[8, False] > held[2, False] > held[2, True]
    assert held[8, False] - held[2, False] > 2 * held[2, True]  # the query activations dominated what was held
