"""Model-Agnostic Meta-Learning (Finn, Abbeel & Levine, ICML 2017), its first-order variant, and ANIL.

For each task the meta-parameters ``theta`` take a few gradient steps on the support set
(eq. 1), ``theta' = theta - alpha grad_theta L_support(f_theta)``, and the meta-objective is the
query loss at the adapted parameters averaged over the tasks of a meta-batch (eq. 2-3),
``min_theta sum_i L_query_i(f_theta'_i)``, differentiated through the inner steps (second
order). First-order MAML (sec. 5.2) detaches the inner gradients. ANIL (Raghu et al., ICLR
2020, "Rapid Learning or Feature Reuse?") adapts only the linear head in the inner loop; the
body is still meta-learned by the outer loss.

Choices, against the reference implementation (github.com/cbfinn/maml):

- The scale of the inner loss. The reference sums the support cross-entropy over
  the ``N*K`` examples and divides by ``K``: ``N`` times the mean, so its alpha = 0.4 is a step of
  ``0.4 * N`` on the mean loss. ``inner_loss="per_shot"`` reproduces that exactly. The default is
  the mean with ``inner_lr=0.4`` (as learn2learn and torchmeta do): in short runs here it learns
  far faster (5-way 1-shot, Conv4 with 32 filters, 200 meta-iterations of 8 tasks: 80% test
  accuracy against 45% for ``per_shot``, whose first steps overshoot). Regression uses the mean
  squared error, as the reference does. The outer loss is the mean over queries and tasks (the
  reference's sum differs by a constant factor, which Adam does not see).
- As in the reference, BatchNorm normalises with the statistics of the current batch in training
  and at test (``bn="batch"``: no running statistics). Evaluation is then transductive: the query examples
  of a task are normalised together. ``transductive=False`` normalises each query example with
  the support set instead (as Reptile's evaluation does; the ``[support; query_j]`` sets 16 per grouped
  pass, :func:`metakit.algorithms.batched.each_with_support`).
  ``bn="running"`` keeps running statistics (updated by every forward pass in training,
  support and query alike) and uses them in eval mode. ``bn="per_step"`` keeps one set of running
  statistics per inner step, the query pass after the last update having its own (Antoniou et al. 2019,
  MAML++'s BNRS; :mod:`metakit.nn.batchnorm`): training normalises with the batch's statistics, so its
  numbers are ``bn="batch"``'s, and evaluation is inductive. MAML++'s per-step BatchNorm weights and
  biases (BNWB) are not offered. Weights meta-trained on batch statistics do not adapt under stored ones
  (``benchmarks/RESULTS.md``, "BatchNorm at test"); ``transductive=False`` is the inductive evaluation that works.
- The reference's BatchNorm has an offset but no scale and does not adapt it in the inner loop;
  here BatchNorm's scale and offset are parameters like the others and adapt with them, unless
  ``adapt="no_bn"``, which leaves them to the outer loop as the reference does.
- The reference's Omniglot network has stride-2 convolutions in place of max-pools and averages its
  last 2x2 map (``pool="stride"``, :class:`~metakit.nn.Conv4`); the default ``pool="max"`` is
  Vinyals et al.'s network, which most later work and the peer libraries use.

A whole meta-batch adapts at once by default (``batched``; :mod:`metakit.algorithms.batched`:
grouped convolutions, BatchNorm statistics per task), with the numbers of the plain loop over
tasks (``batched=False``), which stays for the settings the batched path does not know
(``bn="running"`` and ``bn="per_step"``, other layers or update rules); transductive or not, both give
the same numbers.

Training and test may take different numbers of steps and step sizes (``inner_steps`` 1 in
training, ``inner_steps_test`` 3 at test on 5-way Omniglot).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import MLP, Conv4
from ..nn.conv4 import POOLS
from ..tasks import MetaOutput, TaskBatch, accuracy
from .base import Learner, register
from .batched import COORDINATEWISE_RULES, Unsupported, batched_task_outputs, each_with_support, layout_for, plan
from .metric import uses_batch_statistics
from .inner_loop import Params, SGDRule, UpdateRule, adapt, forward, parameters_of

CHOICES = {"adapt": ("all", "head", "no_bn"), "backbone": ("conv4", "mlp"), "bn": ("batch", "running", "per_step"), "pool": POOLS,
           "inner_loss": ("per_shot", "mean", "sum")}


@dataclass
class InnerLoopOptions:
    """What every learner of the gradient-based family shares (defaults: MAML on 5-way Omniglot)."""
    inner_steps: int = 1              # inner updates per task in meta-training
    inner_steps_test: int = 3         # inner updates at evaluation and in adapt()
    first_order: bool = False         # detach the inner gradients (first-order MAML)
    adapt: str = "all"                # which parameters adapt: all (MAML) | head (ANIL) | no_bn (all but BatchNorm's, the MAML reference)
    backbone: str = "conv4"           # classification: conv4 | mlp (flattened pixels); regression: always mlp
    hidden: int = 64                  # conv4 filters per block
    pool: str = "max"                 # conv4: max (2x2 max-pools, Vinyals et al.) | stride (stride-2 convs, the MAML reference's Omniglot net)
    mlp_hidden: list[int] = field(default_factory=lambda: [40, 40])  # MLP hidden widths (MAML sec. 5.1)
    bn: str = "batch"                 # batch: current-batch statistics, training and test | running | per_step: running statistics per inner step (MAML++)
    inner_loss: str = "mean"          # mean | per_shot: support cross-entropy summed / K (the MAML reference: N x mean) | sum
    transductive: bool = True         # query examples share BatchNorm statistics; False: each with the support set
    batched: bool = True              # adapt the meta-batch at once (algorithms/batched.py); False: a loop over tasks, same numbers
    recompute_queries: bool = False   # batched: recompute query activations in backward (~1.25x slower; the default frees them already)


def check_options(options, name: str) -> None:
    for key, allowed in CHOICES.items():
        value = getattr(options, key, None)
        if value is not None and value not in allowed:
            raise ValueError(f"{name}: model.{key} must be one of {list(allowed)}, got {value!r}")
    for key in ("inner_steps", "inner_steps_test"):
        if getattr(options, key) < 0:
            raise ValueError(f"{name}: model.{key} must be >= 0, got {getattr(options, key)}")


def build_model(options: InnerLoopOptions, in_channels: int, image_size: int, ways: int, task: str) -> nn.Module:
    """Regression: the MLP ``1 -> 40 -> 40 -> 1`` (ReLU); classification: Conv4 (or an MLP) with a ``ways`` head."""
    if task == "regression":
        return MLP(1, tuple(options.mlp_hidden), 1)
    if task != "classification":
        raise ValueError(f"task must be classification or regression, got {task!r}")
    if options.backbone == "conv4":
        return Conv4(in_channels, options.hidden, out_features=ways, image_size=image_size,
                     bn_track_running_stats=options.bn == "running", pool=options.pool,
                     bn_slots=options.inner_steps + 1 if options.bn == "per_step" else 0)
    return nn.Sequential(nn.Flatten(), MLP(in_channels * image_size * image_size, tuple(options.mlp_hidden), ways))


def adapted_names(model: nn.Module, adapt: str) -> list[str]:
    """The parameters the inner loop updates: all of them (MAML), the head's (ANIL), or all but
    BatchNorm's scale and offset (``no_bn``: the MAML reference, whose BatchNorm offset lies outside
    the adapted weights and is only meta-learned)."""
    if adapt == "head":
        return head_names(model)
    names = [n for n, _ in model.named_parameters()]
    if adapt == "no_bn":
        bn = {f"{m}.{n}" for m, mod in model.named_modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)
              for n, _ in mod.named_parameters(recurse=False)}
        names = [n for n in names if n not in bn]
    return names


def head_names(model: nn.Module) -> list[str]:
    """Names of the parameters of the model's last linear layer (ANIL's adapted head)."""
    last = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    return [f"{last}.{n}" for n, _ in model.get_submodule(last).named_parameters()]


@register("maml")
class MAML(Learner):
    """MAML (Finn et al. 2017, eq. 1-3); ``first_order`` and ``adapt="head"`` give FOMAML and ANIL.

    ``model`` is the network whose parameters are the initialisation ``theta``. ``ways`` sizes
    the classifier head: tasks at test must have as many ways as in training.
    """

    grad_at_test = True

    @dataclass
    class Options(InnerLoopOptions):
        inner_lr: float = 0.4                 # alpha, the inner step (0.01 for sinusoids, 0.1 for 20-way)
        inner_lr_test: float | None = None    # None: inner_lr

    def __init__(self, options=None, in_channels: int = 1, image_size: int = 28, ways: int = 5,
                 task: str = "classification", **_) -> None:
        super().__init__()
        self.options = options or type(self).Options()
        check_options(self.options, self.name)
        self.task = task
        self.ways = ways if task == "classification" else None
        self.model = build_model(self.options, in_channels, image_size, ways, task)
        self.adapt_names = adapted_names(self.model, self.options.adapt)

    # ---- what the family's members change
    def update_rule(self, training: bool) -> UpdateRule:
        o = self.options
        return SGDRule(o.inner_lr if training or o.inner_lr_test is None else o.inner_lr_test)

    def inner_steps(self, training: bool) -> int:
        return self.options.inner_steps if training else self.options.inner_steps_test

    def support_loss(self, output: Tensor, target: Tensor) -> Tensor:
        """Inner loss: output ``[N*K, N]``, target ``[N*K]`` (or ``[K, 1]`` both, regression)."""
        if self.ways is None:
            return F.mse_loss(output, target)
        if self.options.inner_loss == "per_shot":
            return F.cross_entropy(output, target, reduction="sum") * self.ways / target.numel()  # sum / K
        if self.options.inner_loss == "sum":
            return F.cross_entropy(output, target, reduction="sum")
        return F.cross_entropy(output, target)

    def query_loss(self, output: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(output, target) if self.ways is None else F.cross_entropy(output, target)

    def adapt_params(self, support_x: Tensor, support_y: Tensor, training: bool, create_graph: bool) -> Params:
        """``theta'`` of one task: support_x ``[N*K, C, H, W]``, support_y ``[N*K]``."""
        return adapt(self.model, parameters_of(self.model), support_x, support_y, self.support_loss,
                     self.update_rule(training), self.inner_steps(training), self.adapt_names,
                     first_order=self.options.first_order, create_graph=create_graph)

    # ---- prediction at adapted parameters
    def uses_batch_statistics(self) -> bool:
        return uses_batch_statistics(self.model)

    def outputs(self, params: Params, query_x: Tensor, support_x: Tensor, step: int | None = None) -> Tensor:
        """Query outputs at ``params``: ``[M, N]`` logits or ``[M, 1]`` values. ``step``: how many inner
        updates ``params`` have had (for ``bn="per_step"``'s statistics).

        Non-transductive with batch statistics: query ``j`` is normalised with the support set,
        ``f([support; query_j])[-1]`` (:meth:`each_with_support`).
        """
        if self.options.transductive or not self.uses_batch_statistics():
            return forward(self.model, params, query_x, step)
        return self.each_with_support(params, query_x, support_x, step)

    def each_with_support(self, params: Params, query_x: Tensor, support_x: Tensor, step: int | None = None,
                          chunk: int = 16) -> Tensor:
        """``f([support; query_j])[-1]`` for every query ``j``: ``[M, N]``, the ``[support; query_j]`` sets ``chunk``
        at a time in the grouped layout (:func:`metakit.algorithms.batched.each_with_support`); one pass per query
        where that layout does not know the model."""
        try:
            layers = plan(self.model)
        except Unsupported:
            return torch.cat([forward(self.model, params, torch.cat([support_x, q[None]]), step)[-1:] for q in query_x])
        return each_with_support(layers, params, query_x, support_x, chunk)

    def task_outputs(self, batch: TaskBatch, training: bool) -> tuple[Tensor, Tensor]:
        """Query loss ``[B]`` and outputs ``[B, M, N]`` (or ``[B, Q, 1]``) of each adapted task.

        ``training``: the training schedule and the graph back to ``theta``; otherwise the test
        schedule, nothing recorded, detached results. With ``batched`` (and a model, rule and
        setting the batched path knows, see :meth:`batched_unsupported`) the whole meta-batch
        adapts at once (:mod:`metakit.algorithms.batched`); otherwise a plain loop over the tasks.
        Both give the same numbers.
        """
        if self.options.batched and self.batched_unsupported(training) is None:
            return batched_task_outputs(plan(self.model), parameters_of(self.model), batch.support_x,
                                        batch.support_y, batch.query_x, batch.query_y, self.support_loss,
                                        self.query_loss, self.update_rule(training), self.inner_steps(training),
                                        self.adapt_names, self.options.first_order, training,
                                        recompute_queries=self.options.recompute_queries,
                                        transductive=self.options.transductive, **layout_for(batch.query_x))
        losses, outs = [], []
        for i in range(batch.meta_batch_size):
            sx, sy = batch.support_x[i], batch.support_y[i]  # [N*K, C, H, W], [N*K]
            params = self.adapt_params(sx, sy, training, create_graph=training)
            with torch.enable_grad() if training else torch.no_grad():
                out = self.outputs(params, batch.query_x[i], sx, self.inner_steps(training))  # [M, N]
                losses.append(self.query_loss(out, batch.query_y[i]))
            outs.append(out)
        return torch.stack(losses), torch.stack(outs)

    def batched_unsupported(self, training: bool) -> str | None:
        """Why the batched path cannot run this setting (the loop then does), or None.

        It needs: a model made of the layers :func:`~metakit.algorithms.batched.plan` knows (Conv4,
        MLP; BatchNorm on batch statistics, ``bn="batch"``), a coordinate-wise update rule (SGD,
        Meta-SGD's, Adam), and this class's own ``adapt_params`` and ``outputs`` (a subclass that changes
        them keeps the loop). Transductive or not, it gives the loop's numbers.
        """
        rule = self.update_rule(training)
        if not isinstance(rule, COORDINATEWISE_RULES):
            return f"the update rule {type(rule).__name__} is not known to act coordinate-wise"
        if type(self).adapt_params is not MAML.adapt_params or type(self).outputs is not MAML.outputs:
            return f"{type(self).__name__} changes adapt_params or outputs"
        try:
            plan(self.model)
        except Unsupported as e:
            return str(e)
        return None

    def check_batch(self, batch: TaskBatch) -> None:
        if (self.ways is None) != (batch.ways is None):
            kind = "regression" if self.ways is None else "classification"
            raise ValueError(f"this {self.name} learner was built for {kind} but got the other kind of task")
        if self.ways is not None and batch.ways != self.ways:
            raise ValueError(f"this {self.name} learner has a {self.ways}-way head but the tasks have {batch.ways} "
                             f"ways: evaluate with as many ways as in training (eval.ways = train.ways)")

    def metrics(self, loss: Tensor, outs: Tensor, batch: TaskBatch) -> dict[str, float]:
        if self.ways is None:
            return {"loss": loss.item(), "mse": loss.item()}
        return {"loss": loss.item(), "accuracy": accuracy(outs.detach(), batch.query_y).mean().item()}

    # ---- the learner contract
    def meta_loss(self, batch: TaskBatch) -> MetaOutput:
        """Mean query loss after adaptation; the train or test schedule as ``self.training`` says."""
        self.check_batch(batch)
        losses, outs = self.task_outputs(batch, self.training)
        loss = losses.mean()
        return MetaOutput(loss, outs, self.metrics(loss, outs, batch))

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Callable[[Tensor], Tensor]:
        """One new task with the test schedule; the module is not changed. ``predict(query_x [M, ...])``
        gives ``[M, N]`` logits (or ``[M, 1]`` values)."""
        params = self.adapt_params(support_x, support_y, training=False, create_graph=False)

        def predict(query_x: Tensor) -> Tensor:
            with torch.no_grad():
                return self.outputs(params, query_x, support_x, self.inner_steps(False))
        return predict


@register("fomaml")
class FOMAML(MAML):
    """First-order MAML (Finn et al. 2017, sec. 5.2): the meta-gradient is ``grad L_query(theta')``,
    the second derivatives through the inner steps dropped."""

    @dataclass
    class Options(MAML.Options):
        first_order: bool = True


@register("anil")
class ANIL(MAML):
    """ANIL, Almost No Inner Loop (Raghu et al. 2020, sec. 4): only the head adapts in the inner
    loop; the body is a meta-parameter shared by all tasks. MAML's hyperparameters otherwise."""

    @dataclass
    class Options(MAML.Options):
        adapt: str = "head"
