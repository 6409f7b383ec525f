"""BatchNorm with running statistics kept per inner step (Antoniou, Edwards & Storkey, ICLR 2019, "How to
train your MAML", sec. 4, "per-step batch normalization running statistics", BNRS).

MAML's reference normalises with the statistics of the current batch in training and at test, so a task's
query examples are normalised together: its evaluation is transductive. Running statistics make it
inductive, but one set of them mixes what the features look like at every inner step, while the weights
change from step to step. MAML++ keeps one set per step: the forward pass at inner step ``s`` (the support
set's at ``s = 0 .. S-1``, the query set's after the last update at ``s = S``) folds its batch's mean and
variance into set ``s`` in training, and normalises with set ``s`` in eval mode.

Measured here (``benchmarks/RESULTS.md``, "BatchNorm at test"): MAML weights meta-trained on batch statistics do
not adapt under these sets (5-way Omniglot at chance after three test steps), and MAML++'s own code normalises
with the batch's statistics at test too; ``MAML.Options(transductive=False)`` is the inductive evaluation that works.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PerStepBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` with ``slots`` sets of running statistics, one per inner step: ``running_mean`` and
    ``running_var`` are ``[slots, C]``. ``step`` (set by :func:`set_inner_step` before a forward pass) picks
    the set; a step past the last set uses the last one (testing with more inner steps than training).

    Training mode normalises with the batch's statistics, as ``BatchNorm2d`` does, so the training numbers
    are those of ``bn="batch"``; only eval mode reads the running sets.
    """

    def __init__(self, num_features: int, slots: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        if slots < 1:
            raise ValueError(f"PerStepBatchNorm2d needs at least one slot, got {slots}")
        super().__init__(num_features, eps=eps, momentum=momentum, affine=True, track_running_stats=True)
        self.register_buffer("running_mean", torch.zeros(slots, num_features))  # [slots, C]
        self.register_buffer("running_var", torch.ones(slots, num_features))  # [slots, C]
        self.register_buffer("num_batches_tracked", torch.zeros(slots, dtype=torch.long))  # [slots]
        self.step = 0

    @property
    def slots(self) -> int:
        return self.running_mean.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        """x ``[M, C, H, W]``, normalised per channel."""
        s = min(self.step, self.slots - 1)
        if self.training:
            self.num_batches_tracked[s] += 1
        # running_mean[s] is a view of row s: batch_norm updates it in place, in training only
        return F.batch_norm(x, self.running_mean[s], self.running_var[s], self.weight, self.bias,
                            self.training, self.momentum, self.eps)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, slots={self.slots}"


# module -> its PerStepBatchNorm2d layers, found once: the inner loop calls set_inner_step before every forward
# pass, and walking a Conv4's modules each time cost 11 us, an eighth of the sinusoid MLP's forward pass (83 us).
_LAYERS: "weakref.WeakKeyDictionary[nn.Module, list[PerStepBatchNorm2d]]" = weakref.WeakKeyDictionary()


def set_inner_step(module: nn.Module, step: int) -> None:
    """Tell every :class:`PerStepBatchNorm2d` of ``module`` the inner step of the next forward pass
    (the layers are looked up once per module: add none to it afterwards)."""
    layers = _LAYERS.get(module)
    if layers is None:
        layers = _LAYERS[module] = [m for m in module.modules() if isinstance(m, PerStepBatchNorm2d)]
    for m in layers:
        m.step = step
