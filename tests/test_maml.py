"""MAML, first-order MAML and ANIL: meta-gradients against finite differences and a plain autograd
reference (float64, a tiny Conv4 with BatchNorm on batch statistics), special cases against each
other, and the learner contract (adapt, eval schedule, no mutation)."""
import pytest
import torch
import torch.nn.functional as F

from metakit.algorithms import ANIL, FOMAML, MAML, build_learner
from metakit.algorithms.inner_loop import SGDRule, adapt, forward, parameters_of
from metakit.data import SinusoidSampler

from gradient_reference import (SIZE, WAYS, adapted, assert_matches_finite_differences, conv4_forward, grads_of,
                                learner_grads, maml_meta_loss, per_shot_cross_entropy, tiny_batch, tiny_options)


def tiny(cls=MAML, **options):
    torch.manual_seed(0)
    return cls(tiny_options(cls, **options), image_size=SIZE, ways=WAYS).double()


def assert_grads_close(a: dict, b: dict, rtol=1e-7, atol=1e-9):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")


def test_second_order_meta_gradient_matches_central_finite_differences():
    learner = tiny(inner_lr=0.1, inner_steps=2)
    batch = tiny_batch()
    _, grads = learner_grads(learner, batch)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in learner.modules())
    # three coordinates of every parameter tensor (conv, BatchNorm scale and offset, head), then two directions
    assert_matches_finite_differences(learner, batch, grads, coordinates=3, directions=2, seed=1)


@pytest.mark.parametrize("inner_loss,reference_loss", [("mean", F.cross_entropy),
                                                       ("per_shot", per_shot_cross_entropy)])
def test_second_order_meta_gradient_matches_a_plain_autograd_loop(inner_loss, reference_loss):
    learner = tiny(inner_lr=0.1, inner_steps=2, inner_loss=inner_loss)
    batch = tiny_batch(B=3, shots=2)
    loss, grads = learner_grads(learner, batch)
    p = {k: v.detach().clone().requires_grad_() for k, v in learner.model.named_parameters()}
    ref = maml_meta_loss(p, batch, lr=0.1, steps=2, inner_loss=reference_loss)
    assert loss == pytest.approx(ref.item(), rel=1e-12)
    assert_grads_close({k[len("model."):]: g for k, g in grads.items()}, grads_of(ref, p))


def test_first_order_equals_detached_inner_gradients_and_differs_from_second_order():
    batch = tiny_batch()
    learner = tiny(FOMAML, inner_lr=0.1, inner_steps=2)
    assert learner.options.first_order
    _, grads = learner_grads(learner, batch)
    p = {k: v.detach().clone().requires_grad_() for k, v in learner.model.named_parameters()}
    first = grads_of(maml_meta_loss(p, batch, lr=0.1, steps=2, second_order=False), p)
    assert_grads_close({k[len("model."):]: g for k, g in grads.items()}, first)
    second = grads_of(maml_meta_loss(p, batch, lr=0.1, steps=2), p)
    assert not torch.allclose(first["features.0.0.weight"], second["features.0.0.weight"], rtol=1e-3)
    # the same through the MAML class and its option
    _, via_option = learner_grads(tiny(MAML, inner_lr=0.1, inner_steps=2, first_order=True), batch)
    assert_grads_close(grads, via_option)


def test_anil_equals_maml_with_the_body_frozen():
    batch = tiny_batch()
    learner = tiny(ANIL, inner_lr=0.1, inner_steps=2)
    assert learner.adapt_names == ["head.weight", "head.bias"]
    loss, grads = learner_grads(learner, batch)
    p = {k: v.detach().clone().requires_grad_() for k, v in learner.model.named_parameters()}
    ref = maml_meta_loss(p, batch, lr=0.1, steps=2, adapt=["head.weight", "head.bias"])
    assert loss == pytest.approx(ref.item(), rel=1e-12)
    assert_grads_close({k[len("model."):]: g for k, g in grads.items()}, grads_of(ref, p))
    assert grads["model.features.0.0.weight"].abs().sum() > 0  # the body is still meta-learned
    # the body passes through the inner loop as the meta-parameters themselves
    theta = parameters_of(learner.model)
    fast = learner.adapt_params(batch.support_x[0], batch.support_y[0], training=True, create_graph=True)
    assert all(fast[k] is theta[k] for k in theta if not k.startswith("head."))
    assert fast["head.weight"] is not theta["head.weight"]


def test_no_bn_adapts_all_but_batchnorm_as_the_maml_reference():
    """``adapt="no_bn"``: BatchNorm's scale and offset pass through the inner loop unchanged and are meta-learned."""
    batch = tiny_batch()
    learner = tiny(MAML, inner_lr=0.1, inner_steps=2, adapt="no_bn")
    bn = [f"features.{i}.1.{n}" for i in range(4) for n in ("weight", "bias")]  # features.i.1: the BatchNorm of block i
    assert all(isinstance(learner.model.get_submodule(k.rsplit(".", 1)[0]), torch.nn.BatchNorm2d) for k in bn)
    assert bn and not set(bn) & set(learner.adapt_names)
    assert set(learner.adapt_names) | set(bn) == {k for k, _ in learner.model.named_parameters()}
    loss, grads = learner_grads(learner, batch)
    p = {k: v.detach().clone().requires_grad_() for k, v in learner.model.named_parameters()}
    ref = maml_meta_loss(p, batch, lr=0.1, steps=2, adapt=learner.adapt_names)
    assert loss == pytest.approx(ref.item(), rel=1e-12)
    assert_grads_close({k[len("model."):]: g for k, g in grads.items()}, grads_of(ref, p))
    assert grads[f"model.{bn[0]}"].abs().sum() > 0
    _, all_grads = learner_grads(tiny(MAML, inner_lr=0.1, inner_steps=2), batch)
    assert not torch.allclose(all_grads["model.features.0.0.weight"], grads["model.features.0.0.weight"])


def test_adapt_does_not_mutate_the_module_and_gives_meta_loss_predictions_in_eval_mode():
    learner = tiny(inner_lr=0.1)
    batch = tiny_batch(B=1)
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    learner.meta_loss(batch).loss.backward()  # training mode
    learner.eval()
    with torch.enable_grad():
        logits = learner.meta_loss(batch).logits[0]
    predict = learner.adapt(batch.support_x[0], batch.support_y[0])
    with torch.no_grad():  # adapt works under no_grad too (the server and the CLI call it so)
        predict_no_grad = learner.adapt(batch.support_x[0], batch.support_y[0])
    torch.testing.assert_close(predict(batch.query_x[0]), logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(predict_no_grad(batch.query_x[0]), logits, rtol=1e-12, atol=1e-12)
    after = learner.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not predict(batch.query_x[0]).requires_grad


def test_eval_mode_uses_the_test_steps_and_step_size():
    learner = tiny(inner_lr=0.1, inner_steps=1, inner_steps_test=3, inner_lr_test=0.05)
    batch = tiny_batch(B=1)
    p = {k: v.detach() for k, v in learner.model.named_parameters()}
    sx, sy, qx = batch.support_x[0], batch.support_y[0], batch.query_x[0]

    def ref_logits(lr, steps):
        q = {k: v.clone().requires_grad_() for k, v in p.items()}
        return conv4_forward(adapted(q, sx, sy, lr, steps), qx).detach()

    train_logits = learner.meta_loss(batch).logits[0].detach()
    torch.testing.assert_close(train_logits, ref_logits(0.1, 1))
    learner.eval()
    eval_logits = learner.meta_loss(batch).logits[0]
    torch.testing.assert_close(eval_logits, ref_logits(0.05, 3))
    assert not torch.allclose(eval_logits, ref_logits(0.1, 1))


def test_per_shot_inner_loss_is_the_mean_loss_with_a_step_times_ways():
    batch = tiny_batch(shots=2)
    loss_a, grads_a = learner_grads(tiny(inner_lr=0.1, inner_loss="per_shot"), batch)
    loss_b, grads_b = learner_grads(tiny(inner_lr=0.1 * WAYS, inner_loss="mean"), batch)
    assert loss_a == pytest.approx(loss_b, rel=1e-12)
    assert_grads_close(grads_a, grads_b)


def test_non_transductive_prediction_normalises_each_query_with_the_support_set():
    learner = tiny(transductive=False)
    batch = tiny_batch(B=1)
    learner.eval()
    logits = learner.meta_loss(batch).logits[0]  # [M, N]
    params = learner.adapt_params(batch.support_x[0], batch.support_y[0], training=False, create_graph=False)
    for j in range(batch.query_x.shape[1]):
        x = torch.cat([batch.support_x[0], batch.query_x[0, j:j + 1]])
        torch.testing.assert_close(logits[j], conv4_forward(params, x)[-1])
    with torch.no_grad():  # the sets in chunks of 4 queries (6 here): the same logits
        chunked = learner.each_with_support(params, batch.query_x[0], batch.support_x[0], chunk=4)
    torch.testing.assert_close(chunked, logits, rtol=1e-12, atol=1e-13)
    transductive = tiny(transductive=True).eval().meta_loss(batch).logits[0]
    assert not torch.allclose(logits, transductive)


def test_running_statistics_are_used_in_eval_mode_and_left_alone_by_adapt():
    learner = tiny(bn="running")
    batch = tiny_batch(B=2)
    learner.meta_loss(batch).loss.backward()  # training updates the running averages
    bn = learner.model.features[0][1]
    assert bn.track_running_stats and bn.num_batches_tracked > 0
    learner.eval()
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    logits = learner.meta_loss(batch).logits[0]
    predict = learner.adapt(batch.support_x[0], batch.support_y[0])
    torch.testing.assert_close(predict(batch.query_x[0]), logits)
    # with running statistics one query alone gets the same logits as with the others
    torch.testing.assert_close(predict(batch.query_x[0, :1])[0], logits[0])
    assert all(torch.equal(before[k], v) for k, v in learner.state_dict().items())


def test_inner_loop_adapts_only_the_named_parameters_and_keeps_the_others():
    learner = tiny()
    theta = parameters_of(learner.model)
    sx, sy = tiny_batch(B=1).support_x[0], tiny_batch(B=1).support_y[0]
    loss_fn = lambda out, y: F.cross_entropy(out, y)  # noqa: E731
    fast = adapt(learner.model, theta, sx, sy, loss_fn, SGDRule(0.5), steps=1, adapt_names=["head.bias"])
    assert all(fast[k] is theta[k] for k in theta if k != "head.bias")
    g = torch.autograd.grad(loss_fn(forward(learner.model, theta, sx), sy), theta["head.bias"])[0]
    torch.testing.assert_close(fast["head.bias"], theta["head.bias"] - 0.5 * g)
    assert adapt(learner.model, theta, sx, sy, loss_fn, SGDRule(0.5), steps=0) == theta
    detached = adapt(learner.model, theta, sx, sy, loss_fn, SGDRule(0.5), steps=2, create_graph=False)
    assert not any(v.requires_grad for v in detached.values())


def test_regression_uses_the_mlp_and_reports_mse():
    torch.manual_seed(0)
    learner = build_learner("maml", MAML.Options(inner_lr=0.01), task="regression").double()
    assert [m.out_features for m in learner.model.modules() if isinstance(m, torch.nn.Linear)] == [40, 40, 1]
    batch = SinusoidSampler(shots=5, queries=7, meta_batch_size=3).sample()
    batch = type(batch)(*(t.double() for t in (batch.support_x, batch.support_y, batch.query_x, batch.query_y)))
    out = learner.meta_loss(batch)
    assert out.logits.shape == (3, 7, 1) and set(out.metrics) == {"loss", "mse"}
    # one step of SGD on the support MSE, then the query MSE, averaged over tasks
    theta = parameters_of(learner.model)
    total = 0
    for i in range(3):
        loss = F.mse_loss(forward(learner.model, theta, batch.support_x[i]), batch.support_y[i])
        grads = torch.autograd.grad(loss, list(theta.values()))
        fast = {k: v - 0.01 * g for (k, v), g in zip(theta.items(), grads)}
        total += F.mse_loss(forward(learner.model, fast, batch.query_x[i]), batch.query_y[i]).item()
    assert out.loss.item() == pytest.approx(total / 3, rel=1e-12)


def test_wrong_ways_and_bad_options_are_refused_with_the_fix():
    learner = tiny()
    with pytest.raises(ValueError, match="3-way head but the tasks have 2 ways.*eval.ways = train.ways"):
        b = tiny_batch(B=1)
        learner.meta_loss(type(b)(b.support_x[:, :2], b.support_y[:, :2], b.query_x, b.query_y, ways=2))
    with pytest.raises(ValueError, match=r"model.adapt must be one of \['all', 'head', 'no_bn'\]"):
        MAML(MAML.Options(adapt="body"))
    with pytest.raises(ValueError, match="model.bn must be one of"):
        MAML(MAML.Options(bn="layer"))


@pytest.mark.parametrize("name,first_order,adapt_", [("maml", False, "all"), ("fomaml", True, "all"),
                                                      ("anil", False, "head")])
def test_registered_variants_have_the_papers_defaults(name, first_order, adapt_):
    o = build_learner(name, None).options
    assert (o.inner_lr, o.inner_steps, o.inner_steps_test, o.first_order, o.adapt, o.bn, o.inner_loss) == \
        (0.4, 1, 3, first_order, adapt_, "batch", "mean")
