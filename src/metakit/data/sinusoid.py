"""Sinusoid regression, the toy task family of MAML (Finn et al. 2017, sec. 5.1).

A task is ``y = A sin(x - phi)`` with amplitude ``A ~ U[0.1, 5]``, phase ``phi ~ U[0, pi]``
and inputs ``x ~ U[-5, 5]``; the learner sees ``K`` support points and is judged on
``Q`` query points of the same sinusoid by mean squared error.
"""
from __future__ import annotations

import math

import torch

from ..tasks import TaskBatch
from .sampler import EpisodeError


class SinusoidSampler:
    """Seeded sampler of ``TaskBatch`` es of ``meta_batch_size`` sinusoid tasks.

    ``support_x/support_y [B, K, 1]``, ``query_x/query_y [B, Q, 1]``.
    """

    def __init__(self, shots: int = 10, queries: int = 10, meta_batch_size: int = 25, seed: int = 0,
                 amplitude: tuple[float, float] = (0.1, 5.0), phase: tuple[float, float] = (0.0, math.pi),
                 x_range: tuple[float, float] = (-5.0, 5.0)) -> None:
        for name, value in (("shots", shots), ("queries", queries), ("meta_batch_size", meta_batch_size)):
            if not isinstance(value, int) or value < 1:
                raise EpisodeError(f"{name} must be a positive integer, got {value!r}")
        self.shots, self.queries, self.meta_batch_size = shots, queries, meta_batch_size
        self.amplitude, self.phase, self.x_range = amplitude, phase, x_range
        self.generator = torch.Generator().manual_seed(seed)

    def _uniform(self, shape, low: float, high: float) -> torch.Tensor:
        return torch.rand(shape, generator=self.generator) * (high - low) + low

    def sample(self, meta_batch_size: int | None = None) -> TaskBatch:
        B, K, Q = meta_batch_size or self.meta_batch_size, self.shots, self.queries
        amp = self._uniform((B, 1, 1), *self.amplitude)
        phase = self._uniform((B, 1, 1), *self.phase)
        x = self._uniform((B, K + Q, 1), *self.x_range)  # [B, K+Q, 1]
        y = amp * torch.sin(x - phase)
        return TaskBatch(x[:, :K], y[:, :K], x[:, K:], y[:, K:], ways=None)

    def __iter__(self):
        while True:
            yield self.sample()

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
