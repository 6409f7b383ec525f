"""Plain-autograd references for the gradient-based learners: a tiny Conv4 written out with
``torch.nn.functional`` (conv -> batch norm with batch statistics -> max-pool -> ReLU, then a
linear head) and MAML's meta-loss as a loop over tasks with ``torch.autograd.grad``. Nothing
here uses metakit's inner loop, ``functional_call`` or the Conv4 module's forward."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metakit.tasks import TaskBatch

WAYS, SHOTS, QUERIES, SIZE, HIDDEN = 3, 1, 2, 16, 3


def tiny_options(cls, **overrides):
    """Options of a learner class for a float64-sized Conv4: 3 filters, 16x16 images."""
    return cls.Options(**{"hidden": HIDDEN, **overrides})


def tiny_batch(B: int = 2, seed: int = 0, shots: int = SHOTS, queries: int = QUERIES) -> TaskBatch:
    """``B`` random 3-way tasks of 16x16 float64 images: support [B, 3*shots, 1, 16, 16]."""
    g = torch.Generator().manual_seed(seed)
    S, Q = WAYS * shots, WAYS * queries
    sy = torch.arange(WAYS).repeat_interleave(shots).repeat(B, 1)
    qy = torch.arange(WAYS).repeat_interleave(queries).repeat(B, 1)
    return TaskBatch(torch.rand(B, S, 1, SIZE, SIZE, generator=g, dtype=torch.float64), sy,
                     torch.rand(B, Q, 1, SIZE, SIZE, generator=g, dtype=torch.float64), qy, ways=WAYS)


def conv4_forward(p: dict, x: torch.Tensor) -> torch.Tensor:
    """Conv4 with batch statistics, from the parameter dict ``p`` (Conv4's names): x [M, 1, H, W] -> [M, ways]."""
    for i in range(4):
        x = F.conv2d(x, p[f"features.{i}.0.weight"], p[f"features.{i}.0.bias"], padding=1)
        x = F.batch_norm(x, None, None, p[f"features.{i}.1.weight"], p[f"features.{i}.1.bias"], training=True)
        x = F.relu(F.max_pool2d(x, 2))
    return F.linear(x.flatten(1), p["head.weight"], p["head.bias"])


def per_shot_cross_entropy(logits, y, ways=WAYS):
    """The MAML reference's inner loss: cross-entropy summed over the support set, divided by K."""
    return F.cross_entropy(logits, y, reduction="sum") * ways / y.numel()


def adapted(p: dict, x, y, lr, steps, adapt=None, second_order=True, lrs=None,
            inner_loss=F.cross_entropy) -> dict:
    """``steps`` SGD steps on ``(x, y)`` for the names in ``adapt`` (all by default); ``lrs``: a step per name."""
    names = list(p) if adapt is None else list(adapt)
    fast = dict(p)
    for _ in range(steps):
        loss = inner_loss(conv4_forward(fast, x), y)
        grads = torch.autograd.grad(loss, [fast[k] for k in names], create_graph=second_order)
        if not second_order:
            grads = [g.detach() for g in grads]
        fast.update({k: fast[k] - (lrs[k] if lrs else lr) * g for k, g in zip(names, grads)})
    return fast


def maml_meta_loss(p: dict, batch: TaskBatch, lr, steps, **kw) -> torch.Tensor:
    """Mean over tasks of the query cross-entropy at the adapted parameters (MAML eq. 2-3)."""
    total = 0
    for i in range(batch.meta_batch_size):
        fast = adapted(p, batch.support_x[i], batch.support_y[i], lr, steps, **kw)
        total = total + F.cross_entropy(conv4_forward(fast, batch.query_x[i]), batch.query_y[i])
    return total / batch.meta_batch_size


def grads_of(loss, params: dict) -> dict:
    return dict(zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True,
                                                materialize_grads=True)))


def learner_grads(learner, batch) -> tuple[float, dict]:
    """(meta-loss, {name: meta-gradient}) of a learner in its current mode, for the parameters that require one."""
    learner.zero_grad(set_to_none=True)
    out = learner.meta_loss(batch)
    out.loss.backward()
    return out.loss.item(), {k: p.grad.clone() for k, p in learner.named_parameters() if p.requires_grad}


def assert_same_meta_gradients(a, b, batch, rtol: float = 1e-9, atol: float = 1e-12) -> None:
    """Two learners give the same meta-loss on ``batch`` and the same meta-gradient for every parameter."""
    loss_a, grads_a = learner_grads(a, batch)
    loss_b, grads_b = learner_grads(b, batch)
    assert loss_b == pytest.approx(loss_a, rel=1e-12)
    assert grads_a.keys() == grads_b.keys()
    for k in grads_a:
        torch.testing.assert_close(grads_b[k], grads_a[k], rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")


def assert_matches_finite_differences(learner, batch, grads: dict, coordinates: int, directions: int, seed: int,
                                      eps: float = 1e-6) -> None:
    """Central finite differences of ``learner.meta_loss(batch)`` (float64) against ``grads``: ``coordinates``
    random coordinates of every parameter tensor, then ``directions`` random directions through all of them."""
    params = dict(learner.named_parameters())

    def loss_at(shift: dict) -> float:
        with torch.no_grad():
            for k, d in shift.items():
                params[k].add_(d)
        value = learner.meta_loss(batch).loss.item()
        with torch.no_grad():
            for k, d in shift.items():
                params[k].sub_(d)
        return value

    g = torch.Generator().manual_seed(seed)
    for k, p in params.items():
        for j in torch.randperm(p.numel(), generator=g)[:coordinates].tolist():
            e = torch.zeros(p.numel(), dtype=p.dtype)
            e[j] = eps
            e = e.view(p.shape)
            fd = (loss_at({k: e}) - loss_at({k: -e})) / (2 * eps)
            assert fd == pytest.approx(grads[k].reshape(-1)[j].item(), rel=1e-5, abs=1e-8), (k, j)
    for _ in range(directions):
        v = {k: torch.randn(p.shape, generator=g, dtype=p.dtype) for k, p in params.items()}
        fd = (loss_at({k: eps * d for k, d in v.items()}) - loss_at({k: -eps * d for k, d in v.items()})) / (2 * eps)
        assert fd == pytest.approx(sum((grads[k] * v[k]).sum().item() for k in v), rel=1e-5)
