"""Reptile: the surrogate loss's gradient is theta - phi, with phi from torch.optim on a copy of the model."""
import copy

import pytest
import torch
import torch.nn.functional as F

from metakit.algorithms import Reptile, build_learner
from metakit.algorithms.inner_loop import AdamRule
from metakit.algorithms.reptile import minibatches

from gradient_reference import SIZE, WAYS, learner_grads, tiny_batch, tiny_options


def tiny(**options):
    torch.manual_seed(0)
    return Reptile(tiny_options(Reptile, **options), image_size=SIZE, ways=WAYS).double()


def phi_by_torch_optim(model, x, y, steps, make_optimizer):
    """``steps`` full-batch steps of a torch optimizer on a deep copy of ``model``."""
    model = copy.deepcopy(model)
    opt = make_optimizer(model.parameters())
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return dict(model.named_parameters())


@pytest.mark.parametrize("inner_optimizer,make_optimizer", [
    ("sgd", lambda ps: torch.optim.SGD(ps, lr=0.1)),
    ("adam", lambda ps: torch.optim.Adam(ps, lr=0.01, betas=(0.0, 0.999))),
])
def test_gradient_is_theta_minus_phi_after_k_steps(inner_optimizer, make_optimizer):
    lr = 0.1 if inner_optimizer == "sgd" else 0.01
    learner = tiny(inner_optimizer=inner_optimizer, inner_lr=lr, inner_steps=3, inner_batch=0, inner_state="task",
                   inner_loss="mean")
    batch = tiny_batch(B=2, shots=2)
    _, grads = learner_grads(learner, batch)
    theta = {k: v.detach().clone() for k, v in learner.model.named_parameters()}
    phis = [phi_by_torch_optim(learner.model, batch.support_x[i], batch.support_y[i], 3, make_optimizer)
            for i in range(2)]
    # Conv biases before BatchNorm have a zero gradient; Adam turns its round-off (1e-17) into steps
    # of lr * g / eps ~ 1e-9, which differ between implementations: hence atol 1e-8 for Adam.
    atol = 1e-12 if inner_optimizer == "sgd" else 1e-8
    for k in theta:
        expected = sum(theta[k] - phi[k].detach() for phi in phis) / 2
        torch.testing.assert_close(grads[f"model.{k}"], expected, rtol=1e-7, atol=atol)
    assert grads["model.head.weight"].abs().sum() > 0
    # the module itself is untouched by the inner loop
    assert all(torch.equal(theta[k], v) for k, v in learner.model.named_parameters())


def test_meta_loss_reports_query_accuracy_and_evaluates_on_the_query_loss():
    learner = tiny(inner_optimizer="sgd", inner_lr=0.1, inner_steps=2, inner_steps_test=4, inner_batch=0,
                   inner_batch_test=0)
    batch = tiny_batch(B=2)
    out = learner.meta_loss(batch)
    assert out.logits.shape == (2, 6, 3) and {"loss", "accuracy", "surrogate"} <= set(out.metrics)
    assert out.loss.item() == pytest.approx(out.metrics["surrogate"])
    learner.eval()
    out = learner.meta_loss(batch)
    assert out.loss.item() == pytest.approx(out.metrics["loss"])
    predict = learner.adapt(batch.support_x[0], batch.support_y[0])
    torch.testing.assert_close(predict(batch.query_x[0]), out.logits[0])


def test_minibatches_draw_without_replacement_through_shuffles():
    torch.manual_seed(0)
    batches = minibatches(10, 4, 5)  # 20 draws: two shuffles of 0..9
    assert [len(b) for b in batches] == [4] * 5
    drawn = torch.cat(batches)
    assert sorted(drawn[:10].tolist()) == list(range(10)) and sorted(drawn[10:].tolist()) == list(range(10))
    assert minibatches(5, 5, 3) == [None] * 3 and minibatches(5, 0, 2) == [None] * 2


def test_defaults_are_the_papers_omniglot_setting():
    o = build_learner("reptile", None).options
    assert (o.inner_optimizer, o.inner_lr, o.inner_steps, o.inner_steps_test, o.inner_batch, o.inner_batch_test,
            o.transductive, o.inner_loss, o.inner_state) == ("adam", 0.001, 5, 50, 10, 5, False, "sum", "shared")


def test_adam_rule_equals_torch_adam_with_momentum():
    torch.manual_seed(0)
    w = torch.randn(5, dtype=torch.float64)
    target = torch.randn(5, dtype=torch.float64)
    ref = w.clone().requires_grad_()
    opt = torch.optim.Adam([ref], lr=0.05, betas=(0.9, 0.99))
    rule, state, params = AdamRule(0.05, betas=(0.9, 0.99)), {}, {"w": w}
    for step in range(4):
        opt.zero_grad()
        (ref - target).pow(3).sum().backward()
        opt.step()
        params = rule.update(params, {"w": 3 * (params["w"] - target) ** 2}, step, state)
    torch.testing.assert_close(params["w"], ref.detach(), rtol=1e-12, atol=1e-12)


def test_shared_inner_state_is_one_torch_adam_carried_from_task_to_task():
    """``inner_state=shared`` (the reference code): one Adam whose moments and step count run on through
    the tasks of a meta-batch while the weights go back to theta after each; ``inner_loss=sum`` its loss."""
    learner = tiny(inner_lr=0.01, inner_steps=3, inner_batch=0)  # the defaults: inner_state=shared, inner_loss=sum
    batch = tiny_batch(B=2, shots=2)
    _, grads = learner_grads(learner, batch)
    model = copy.deepcopy(learner.model)
    theta = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.0, 0.999))
    phis = []
    for i in range(2):
        with torch.no_grad():
            for k, p in model.named_parameters():
                p.copy_(theta[k])
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(batch.support_x[i]), batch.support_y[i], reduction="sum").backward()
            opt.step()
        phis.append({k: v.detach().clone() for k, v in model.named_parameters()})
    for k in theta:  # the conv biases before BatchNorm: Adam's round-off steps (test above), which add up here
        atol = 1e-6 if k.startswith("features.") and k.endswith(".0.bias") else 1e-9
        torch.testing.assert_close(grads[f"model.{k}"], sum(theta[k] - phi[k] for phi in phis) / 2,
                                   rtol=1e-7, atol=atol)
    assert learner.inner_state.state["adam_t"] == 6
    # the moments carried over matter: fresh ones per task give another second task
    fresh = tiny(inner_lr=0.01, inner_steps=3, inner_batch=0, inner_state="task")
    assert not torch.allclose(learner_grads(fresh, batch)[1]["model.head.weight"], grads["model.head.weight"])


def test_shared_inner_state_at_test_starts_from_training_moments_and_is_put_back():
    learner = tiny(inner_lr=0.01, inner_steps=2, inner_steps_test=3, inner_batch=0, inner_batch_test=0)
    batch = tiny_batch(B=2)
    learner.meta_loss(batch).loss.backward()
    learner.eval()
    saved = {k: v.clone() for k, v in learner.inner_state.state["adam_v"].items()}
    first = learner.adapt(batch.support_x[0], batch.support_y[0])(batch.query_x[0])
    again = learner.adapt(batch.support_x[0], batch.support_y[0])(batch.query_x[0])
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert learner.inner_state.state["adam_t"] == 4
    assert all(torch.equal(saved[k], v) for k, v in learner.inner_state.state["adam_v"].items())
    fresh = tiny(inner_lr=0.01, inner_steps_test=3, inner_batch_test=0, inner_state="task")
    fresh.load_state_dict(learner.state_dict())  # inner_state=task drops the saved moments
    fresh.eval()
    assert not torch.allclose(fresh.adapt(batch.support_x[0], batch.support_y[0])(batch.query_x[0]), first)
    # the moments travel with the weights (the checkpoint), and a copy adapts the same way
    copied = tiny(inner_lr=0.01, inner_steps_test=3, inner_batch_test=0)
    copied.load_state_dict(learner.state_dict())
    copied.eval()
    torch.testing.assert_close(copied.adapt(batch.support_x[0], batch.support_y[0])(batch.query_x[0]), first,
                               rtol=0, atol=0)
    # weights saved without moments (inner_state=task) load into shared, which then starts them empty
    copied.load_state_dict(fresh.state_dict())
    assert copied.inner_state.state == {}


def test_inner_state_must_be_task_or_shared():
    with pytest.raises(ValueError, match="inner_state"):
        tiny(inner_state="global")
