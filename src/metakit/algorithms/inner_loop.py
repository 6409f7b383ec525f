"""The functional inner loop shared by the gradient-based family (MAML, first-order MAML, ANIL, Meta-SGD, Reptile).

Parameters are a ``dict[str, Tensor]`` keyed like ``module.named_parameters()``; the model runs
through ``torch.func.functional_call(module, (params, buffers), x)``, so adapting a task builds
new tensors and never clones, patches or mutates the module. One inner step (MAML eq. 1 with a
general update rule)::

    loss = L_support(f(x; theta))
    g    = d loss / d theta                    (create_graph: second order; detached: first order)
    theta <- rule.update(theta, g, step)       (SGD: theta - alpha g; Meta-SGD: theta - alpha * g; ...)

applied to the adapted names only; the other parameters pass through as the very tensors given
(still the meta-parameters, still in the graph). :func:`adapt` is a plain Python loop over the
steps of one task; a batched path over a meta-batch must give the same numbers.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..nn.batchnorm import set_inner_step

Params = dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]


def parameters_of(module: nn.Module) -> Params:
    """The module's parameters as a dict (the tensors themselves, not copies)."""
    return dict(module.named_parameters())


def forward(module: nn.Module, params: Params, x: Tensor, step: int | None = None) -> Tensor:
    """``module(x)`` with ``params`` in place of its parameters; its buffers as they are. ``step``: the
    inner step ``params`` are at (0: the meta-parameters), for layers that keep something per step
    (MAML++'s per-step BatchNorm statistics, :mod:`metakit.nn.batchnorm`); None leaves them as they are."""
    if step is not None:
        set_inner_step(module, step)
    return functional_call(module, (params, dict(module.named_buffers())), (x,))


class UpdateRule:
    """Turns ``(params, grads, step)`` into new params for the adapted names.

    ``update`` receives only the adapted entries (``grads`` has the same keys as the returned
    dict) and ``state``, a dict that is fresh for each adaptation: rules with a recurrence (Adam
    moments, the cell and hidden states of the Meta-Learner LSTM of Ravi & Larochelle 2017) keep
    it there, never on ``self``, so one rule serves many tasks at once. :func:`inner_step` puts
    the support loss of the current step in ``state["loss"]`` (an input of the Meta-Learner LSTM).
    """

    def update(self, params: Params, grads: Params, step: int, state: dict) -> Params:
        raise NotImplementedError


class SGDRule(UpdateRule):
    """``theta - lr * g`` with a fixed step (MAML, Finn et al. 2017, eq. 1)."""

    def __init__(self, lr: float) -> None:
        self.lr = lr

    def update(self, params: Params, grads: Params, step: int, state: dict) -> Params:
        return {k: params[k] - self.lr * g for k, g in grads.items()}


def _key(name: str) -> str:
    return name.replace(".", "__")  # ParameterDict keys cannot hold dots


class MetaSGDRule(nn.Module, UpdateRule):
    """``theta - alpha (.) g`` with ``alpha`` a learned meta-parameter of the shape of each adapted
    parameter (Meta-SGD, Li et al. 2017, eq. 3: the step size and direction per coordinate).

    ``alpha`` is initialised to ``init``: one number for all coordinates, or ``(low, high)`` for
    uniform random values (the paper draws them from ``[0.005, 0.1]``).
    """

    def __init__(self, params: Params, init: float | tuple[float, float] | list[float] = 0.01) -> None:
        super().__init__()
        self.lr = nn.ParameterDict()
        for name, p in params.items():
            alpha = torch.empty_like(p, memory_format=torch.contiguous_format)
            if isinstance(init, (tuple, list)) and len(init) == 2:
                alpha.uniform_(float(init[0]), float(init[1]))
            else:
                alpha.fill_(float(init[0] if isinstance(init, (tuple, list)) else init))
            self.lr[_key(name)] = nn.Parameter(alpha)

    def alpha(self, name: str) -> Tensor:
        return self.lr[_key(name)]

    def update(self, params: Params, grads: Params, step: int, state: dict) -> Params:
        return {k: params[k] - self.alpha(k) * g for k, g in grads.items()}


class AdamRule(UpdateRule):
    """Adam (Kingma & Ba 2015) as an inner optimizer.

    Reptile's Omniglot setting uses it with ``beta1 = 0`` (Nichol et al. 2018, appendix A). The
    update equals ``torch.optim.Adam``'s. Its moments and step count live in ``state``
    (``adam_m``, ``adam_v``, ``adam_t``): an empty dict gives fresh moments for the task; a dict
    carried from task to task keeps them, as the Reptile reference code's one TensorFlow optimizer
    does. Meant for first-order use (Reptile): the square root of a zero second moment has no
    usable second derivative.
    """

    def __init__(self, lr: float, betas: tuple[float, float] = (0.0, 0.999), eps: float = 1e-8) -> None:
        self.lr, self.betas, self.eps = lr, betas, eps

    def update(self, params: Params, grads: Params, step: int, state: dict) -> Params:
        b1, b2 = self.betas
        m, v = state.setdefault("adam_m", {}), state.setdefault("adam_v", {})
        t = state["adam_t"] = state.get("adam_t", 0) + 1  # the step count for the bias correction
        new = {}
        for k, g in grads.items():
            if b1:  # with beta1 = 0 (Reptile) the first moment is the gradient: nothing to keep
                m[k] = (b1 * m[k] if k in m else 0) + (1 - b1) * g
            v[k] = (b2 * v[k] if k in v else 0) + (1 - b2) * g * g
            denom = v[k].sqrt() / (1 - b2 ** t) ** 0.5 + self.eps
            new[k] = params[k] - self.lr / (1 - b1 ** t) * (m[k] if b1 else g) / denom
        return new


def inner_step(model: nn.Module, params: Params, x: Tensor, y: Tensor, loss_fn: LossFn, rule: UpdateRule,
               step: int, state: dict, adapt_names: Iterable[str] | None = None, first_order: bool = False,
               create_graph: bool = True) -> Params:
    """One update of ``params`` on ``(x, y)``; see :func:`adapt` for the arguments."""
    names = list(params) if adapt_names is None else list(adapt_names)
    with torch.enable_grad():
        if not create_graph:
            # Inference: every step starts from detached leaves, so memory holds one step.
            params = {k: v.detach() for k, v in params.items()}
        params = {k: (v if v.requires_grad or k not in names else v.detach().requires_grad_())
                  for k, v in params.items()}
        loss = loss_fn(forward(model, params, x, step), y)
        state["loss"] = loss.detach()
        # Without create_graph the gradients come back detached: first order.
        grads = torch.autograd.grad(loss, [params[k] for k in names], create_graph=create_graph and not first_order,
                                    materialize_grads=True)
        new = rule.update({k: params[k] for k in names}, dict(zip(names, grads)), step, state)
    out = dict(params)
    out.update(new if create_graph else {k: v.detach() for k, v in new.items()})
    return out


def adapt(model: nn.Module, params: Params, support_x: Tensor, support_y: Tensor, loss_fn: LossFn,
          rule: UpdateRule, steps: int, adapt_names: Iterable[str] | None = None, first_order: bool = False,
          create_graph: bool = True) -> Params:
    """Adapted parameters of one task after ``steps`` updates on its support set.

    ``params``: the meta-parameters ``{name: tensor}`` (usually the module's own); ``support_x``
    ``[N*K, ...]``, ``support_y`` ``[N*K]`` or ``[K, 1]``; ``loss_fn(output, target)`` a scalar.
    ``adapt_names``: the parameters that adapt (None: all, MAML; the head only, ANIL); the others
    come back as the same tensors. ``first_order``: the inner gradients are detached, so the
    meta-gradient is ``dL_query/dtheta'`` (first-order MAML, Finn et al. 2017, sec. 5.2), while
    the path ``theta' = theta - ...`` still carries gradients to ``theta`` and to a learned rule.
    ``create_graph=False``: inference; nothing is recorded back to the meta-parameters and the
    result is detached. ``steps=0`` returns ``params`` unchanged.
    """
    state: dict = {}
    for step in range(steps):
        params = inner_step(model, params, support_x, support_y, loss_fn, rule, step, state, adapt_names,
                            first_order, create_graph)
    return params
