"""Evaluation over fixed episodes: mean and 95% confidence interval ``1.96 * std / sqrt(n)``."""
from __future__ import annotations

import math

import torch
from tqdm import tqdm

from ..algorithms import Learner
from ..tasks import accuracy, cat_batches


def mean_ci95(values) -> tuple[float, float]:
    """Mean and half-width of the normal 95% interval, ``1.96 * std / sqrt(n)`` (std with n-1)."""
    t = torch.as_tensor(values, dtype=torch.float64).flatten()
    n = t.numel()
    if n == 0:
        raise ValueError("no values")
    std = float(t.std(unbiased=True)) if n > 1 else 0.0
    return float(t.mean()), 1.96 * std / math.sqrt(n)


def auto_batch(ways: int | None, shots: int, queries: int, budget: int = 1000) -> int:
    """Episodes per forward pass keeping about ``budget`` images in memory at once."""
    per_episode = (ways or 1) * (shots + queries)
    return max(1, min(50, budget // per_episode))


def per_task_scores(learner: Learner, batch) -> torch.Tensor:
    """Accuracy (classification) or mean squared error (regression) of each task: [B]."""
    out = learner.meta_loss(batch)
    if batch.is_classification:
        return accuracy(out.logits.detach(), batch.query_y)
    return (out.logits.detach() - batch.query_y).pow(2).flatten(1).mean(1)


def episode_scores(learner: Learner, sampler, episodes: int, batch: int | None = None, progress: bool = False,
                   desc: str = "evaluating", part: tuple[int, int] | None = None) -> torch.Tensor:
    """Scores ``[hi - lo]`` of episodes ``lo..hi-1`` (``part``; default all) of the ``episodes`` drawn
    from ``sampler``: the episodes before ``lo`` are drawn and skipped, so a part's episodes are
    those of a whole run (how :mod:`.distributed` shares evaluation across processes)."""
    lo, hi = part or (0, episodes)
    ways = getattr(sampler, "ways", None)
    batch = batch or auto_batch(ways, sampler.shots, sampler.queries)
    device = next(learner.parameters(), torch.empty(0)).device
    for _ in range(lo):
        sampler.sample(1)
    was_training = learner.training
    learner.eval()
    scores = [torch.empty(0)]
    grad = torch.enable_grad() if learner.grad_at_test else torch.no_grad()
    try:
        with grad, tqdm(total=hi - lo, desc=desc, disable=not progress, leave=False) as bar:
            left = hi - lo
            while left > 0:
                b = min(batch, left)
                tasks = cat_batches([sampler.sample(1) for _ in range(b)]).to(device)
                scores.append(per_task_scores(learner, tasks).cpu())
                left -= b
                bar.update(b)
    finally:
        learner.train(was_training)
    return torch.cat(scores)


def summarize(scores: torch.Tensor, ways: int | None) -> dict:
    mean, ci = mean_ci95(scores)
    return {"accuracy" if ways is not None else "mse": mean, "ci95": ci, "episodes": scores.numel()}


def evaluate(learner: Learner, sampler, episodes: int, batch: int | None = None, progress: bool = False,
             desc: str = "evaluating") -> dict:
    """Score ``learner`` on ``episodes`` tasks from ``sampler`` (seeded: the same tasks each time).

    Episodes are drawn one at a time, so they do not depend on ``batch`` (how many are
    scored per forward pass). Returns ``{"accuracy" or "mse": mean, "ci95": half-width, "episodes": n}``.
    """
    scores = episode_scores(learner, sampler, episodes, batch, progress, desc)
    return summarize(scores, getattr(sampler, "ways", None))
