"""Reptile (Nichol, Achiam & Schulman 2018, "On First-Order Meta-Learning Algorithms", Algorithm 2).

For each task, ``k`` steps of an ordinary optimizer on the task's examples turn ``theta`` into
``phi``; the meta-update moves ``theta`` towards ``phi``: ``theta <- theta + epsilon mean_i (phi_i - theta)``.
Here that update is the gradient of the surrogate loss

    0.5 * sum_params ||theta - stopgrad(phi)||^2, averaged over tasks,

whose gradient w.r.t. ``theta`` is ``theta - phi``: the engine's optimizer sees ``theta - phi``,
and plain SGD with learning rate ``epsilon`` is exactly Reptile's update. Nothing is
differentiated through the inner loop.

Defaults: the paper's Omniglot setting (appendix A): inner Adam with ``beta1 = 0`` and
step 0.001, 5 inner steps on minibatches of 10 in training (the task's support set, 10 shots per
class in the paper's 1-shot training), 50 steps on minibatches of 5 at test.

Where the inner optimizer's state lives (``inner_state``): ``task`` starts Adam's moments afresh
for each task, so its first step is ``lr * sign(g)`` on every coordinate; ``shared`` keeps one set
of moments and one step count across all tasks and meta-iterations, as the reference code
(openai/supervised-reptile) does with its one TensorFlow optimizer: only the weights are restored
after each task, and at test each task starts from training's moments, which are then put back.
The shared moments are saved with the weights (:class:`InnerOptimizerState`). With ``--nproc``
each process keeps its own, and the checkpoint holds the first process's.
Non-transductive evaluation by default (each query classified with the support set as its
BatchNorm batch, ``transductive=False``), the paper's headline setting in its final version.
``meta_loss`` reports the query loss and accuracy of the adapted weights in its metrics.

The tasks adapt in a plain loop. Tried in session 10 and not kept: the meta-batch's inner steps side by
side in :mod:`metakit.algorithms.batched`'s grouped layout, each task on its own minibatches with its own
Adam moments (equal to the loop in float64 but for the convolution biases before BatchNorm, whose zero
gradient Adam scales up from rounding noise). Process CPU time on one thread: 0.453 s against 0.467 s per
training iteration of ``reptile_5w1s.yaml`` (1.03x), and 1.11x on ``metakit eval`` of 48 test episodes;
the non-transductive test pass (one pass per query) was 2-3x slower as one grouped call than the Conv4's
own pass per query. At 5-10 images per step a task already fills the convolutions. (Since session 17 the
``[support; query_j]`` sets of that test pass go 16 per grouped call, 1.52x faster than one pass per query on
5-way 1-shot MAML, where all 75 in one call were 0.90x: ``benchmarks/each_with_support.py``.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..tasks import MetaOutput, TaskBatch
from .base import register
from .inner_loop import AdamRule, Params, SGDRule, UpdateRule, forward, inner_step, parameters_of
from .maml import MAML, InnerLoopOptions


def minibatches(n: int, size: int, count: int):
    """``count`` index tensors of ``size`` from ``range(n)``, drawn without replacement through
    successive shuffles (as the reference does); ``None`` (the whole set) when ``size`` is 0 or >= ``n``."""
    if size <= 0 or size >= n:
        return [None] * count
    order = torch.cat([torch.randperm(n) for _ in range(-(-count * size // n))])
    return list(order[:count * size].view(count, size))


class InnerOptimizerState(nn.Module):
    """The inner optimizer's state carried across tasks (``inner_state: shared``), saved in the
    learner's ``state_dict`` as extra state: ``{"adam_m": {name: tensor}, "adam_v": ..., "adam_t": int}``."""

    KEYS = ("adam_m", "adam_v", "adam_t")

    def __init__(self) -> None:
        super().__init__()
        self.state: dict = {}

    def get_extra_state(self) -> dict:
        return {k: self.state[k] for k in self.KEYS if k in self.state}

    def set_extra_state(self, state: dict) -> None:
        self.state = dict(state)

    def for_task(self, training: bool, device: torch.device) -> dict:
        """Training: the state itself, which the task's steps move on; test: a copy (the reference
        restores the optimizer after each test task), whose dicts the update rule replaces, not mutates.
        Moments loaded from a checkpoint move to ``device`` here."""
        for key in ("adam_m", "adam_v"):
            moments = self.state.get(key, {})
            for name, value in moments.items():
                moments[name] = value.to(device)
        if training:
            return self.state
        return {k: dict(v) if isinstance(v, dict) else v for k, v in self.state.items()}


@register("reptile")
class Reptile(MAML):
    """Reptile's meta-gradient ``theta - phi`` through a surrogate loss; any inner optimizer rule."""

    @dataclass
    class Options(InnerLoopOptions):
        inner_steps: int = 5
        inner_steps_test: int = 50
        first_order: bool = True              # Reptile never differentiates through the inner loop
        transductive: bool = False
        inner_lr: float = 0.001
        inner_lr_test: float | None = None    # None: inner_lr
        inner_optimizer: str = "adam"         # adam (beta1 = 0, the paper) | sgd
        inner_batch: int = 10                 # support examples per inner step in training; 0: all
        inner_batch_test: int = 5             # the same at test
        inner_loss: str = "sum"               # the reference's: the support cross-entropy summed over the minibatch
        inner_state: str = "shared"           # shared: inner-optimizer moments kept across tasks (the reference) | task: fresh per task

    def __init__(self, options=None, in_channels: int = 1, image_size: int = 28, ways: int = 5,
                 task: str = "classification", **_) -> None:
        super().__init__(options, in_channels=in_channels, image_size=image_size, ways=ways, task=task)
        if self.options.inner_optimizer not in ("adam", "sgd"):
            raise ValueError(f"reptile: model.inner_optimizer must be adam or sgd, "
                             f"got {self.options.inner_optimizer!r}")
        if self.options.bn == "per_step":
            raise ValueError("reptile: model.bn=per_step keeps statistics per inner step of MAML's schedule, where the "
                             "query pass follows the last update; Reptile's evaluation does not: use batch or running")
        if self.options.inner_state not in ("task", "shared"):
            raise ValueError(f"reptile: model.inner_state must be task or shared, got {self.options.inner_state!r}")
        if self.options.inner_state == "shared":
            self.inner_state = InnerOptimizerState()

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Weights trained with either ``inner_state`` load into either: ``task`` drops saved moments,
        ``shared`` without saved moments starts them empty."""
        key, state_dict = "inner_state._extra_state", dict(state_dict)
        if self.options.inner_state == "task":
            state_dict.pop(key, None)
        else:
            state_dict.setdefault(key, {})
        return super().load_state_dict(state_dict, strict, assign)

    def update_rule(self, training: bool) -> UpdateRule:
        o = self.options
        lr = o.inner_lr if training or o.inner_lr_test is None else o.inner_lr_test
        return AdamRule(lr, betas=(0.0, 0.999)) if o.inner_optimizer == "adam" else SGDRule(lr)

    def adapt_params(self, support_x: Tensor, support_y: Tensor, training: bool, create_graph: bool = False) -> Params:
        """``phi`` of one task (detached): ``k`` steps of the inner optimizer on support minibatches."""
        size = self.options.inner_batch if training else self.options.inner_batch_test
        steps = self.inner_steps(training)
        rule = self.update_rule(training)
        state = ({} if self.options.inner_state == "task"
                 else self.inner_state.for_task(training, support_x.device))
        params = parameters_of(self.model)
        for step, idx in enumerate(minibatches(support_x.shape[0], size, steps)):
            x, y = (support_x, support_y) if idx is None else (support_x[idx], support_y[idx])
            params = inner_step(self.model, params, x, y, self.support_loss, rule, step, state, self.adapt_names,
                                first_order=True, create_graph=False)
        return {k: v.detach() for k, v in params.items()}

    def monitor_outputs(self, params: Params, query_x: Tensor, support_x: Tensor) -> Tensor:
        """Query logits ``[M, N]`` for the training metrics only (the loss never sees them): with batch
        statistics, one pass over ``[support; queries]`` instead of one pass per query. The queries
        are a small part of that batch, so the figures track the non-transductive ones that
        validation reports, at about half the cost per iteration of the paper's 5-way Omniglot setting."""
        if self.options.transductive or not self.uses_batch_statistics():
            return self.outputs(params, query_x, support_x)
        return forward(self.model, params, torch.cat([support_x, query_x]))[support_x.shape[0]:]

    def meta_loss(self, batch: TaskBatch) -> MetaOutput:
        """Training: the surrogate ``0.5 ||theta - stopgrad(phi)||^2`` averaged over tasks; eval: the query loss.
        Metrics and logits: the query predictions of the adapted weights ``phi``."""
        self.check_batch(batch)
        theta = parameters_of(self.model)
        surrogates, losses, outs = [], [], []
        for i in range(batch.meta_batch_size):
            sx, sy = batch.support_x[i], batch.support_y[i]  # [N*K, C, H, W], [N*K]
            phi = self.adapt_params(sx, sy, self.training)
            if self.training:
                surrogates.append(0.5 * sum((theta[k] - phi[k]).pow(2).sum() for k in theta))
            with torch.no_grad():
                out = (self.monitor_outputs(phi, batch.query_x[i], sx) if self.training
                       else self.outputs(phi, batch.query_x[i], sx))  # [M, N]
                losses.append(self.query_loss(out, batch.query_y[i]))
            outs.append(out)
        query_loss, outs = torch.stack(losses).mean(), torch.stack(outs)
        loss = torch.stack(surrogates).mean() if self.training else query_loss
        metrics = self.metrics(query_loss, outs, batch)
        if self.training:
            metrics["surrogate"] = loss.item()
        return MetaOutput(loss, outs, metrics)
