"""Meta-SGD: with its step frozen at alpha it is MAML; its step's meta-gradient against the chain rule."""
import pytest
import torch

from metakit.algorithms import MAML, MetaSGD, build_learner

from gradient_reference import (SIZE, WAYS, adapted, assert_same_meta_gradients, conv4_forward, grads_of, learner_grads,
                                tiny_batch, tiny_options)


def tiny(cls, **options):
    torch.manual_seed(0)
    return cls(tiny_options(cls, **options), image_size=SIZE, ways=WAYS).double()


def test_meta_sgd_with_its_step_frozen_at_alpha_equals_maml():
    batch = tiny_batch()
    meta_sgd = tiny(MetaSGD, alpha_init=[0.125], inner_steps=2)  # exact in float32
    for p in meta_sgd.rule.parameters():
        p.requires_grad_(False)
    maml = tiny(MAML, inner_lr=0.125, inner_steps=2)
    assert_same_meta_gradients(maml, meta_sgd, batch)


def test_the_learned_step_gets_the_chain_rule_gradient():
    """One step: theta' = theta - alpha * g, so dL/dalpha = -g * dL/dtheta' (Li et al. 2017, eq. 3)."""
    batch = tiny_batch(B=1)
    learner = tiny(MetaSGD, alpha_init=[0.005, 0.1])
    alphas = {k: learner.rule.alpha(k) for k in learner.adapt_names}
    assert all(((a >= 0.005) & (a <= 0.1)).all() and a.std() > 0 for a in alphas.values() if a.numel() > 1)
    _, grads = learner_grads(learner, batch)
    p = {k: v.detach().clone().requires_grad_() for k, v in learner.model.named_parameters()}
    lrs = {k: a.detach() for k, a in alphas.items()}
    sx, sy, qx, qy = batch.support_x[0], batch.support_y[0], batch.query_x[0], batch.query_y[0]
    g = grads_of(torch.nn.functional.cross_entropy(conv4_forward(p, sx), sy), p)
    fast = {k: v.detach().requires_grad_() for k, v in adapted(p, sx, sy, None, 1, lrs=lrs).items()}
    query_grad = grads_of(torch.nn.functional.cross_entropy(conv4_forward(fast, qx), qy), fast)
    for k in alphas:
        torch.testing.assert_close(grads[f"rule.lr.{k.replace('.', '__')}"], -g[k] * query_grad[k],
                                   rtol=1e-7, atol=1e-10)


def test_alpha_covers_the_adapted_parameters_and_defaults_are_the_papers():
    learner = build_learner("metasgd", None)
    o = learner.options
    assert (o.inner_steps, o.inner_steps_test, o.alpha_init, o.first_order) == (1, 1, [0.005, 0.1], False)
    assert {k: learner.rule.alpha(k).shape for k in learner.adapt_names} == \
        {k: p.shape for k, p in learner.model.named_parameters()}
    head_only = MetaSGD(MetaSGD.Options(adapt="head"))
    assert len(head_only.rule.lr) == 2
    with pytest.raises(ValueError, match="alpha_init"):
        MetaSGD(MetaSGD.Options(alpha_init=[0.1, 0.2, 0.3]))
