"""N-way K-shot episodes from any class-indexed data set (Vinyals et al. 2016, sec. 4).

Each task draws ``ways`` classes without replacement, then ``shots + queries`` distinct
examples of each class without replacement; the first ``shots`` form the support set, the
rest the query set, so the two are disjoint. Class labels are remapped to ``0..ways-1`` in a
random order per task. Everything is tensor indexing on the in-memory data set: no file or
PIL work per episode.

With ``within_group`` > 0, that fraction of the tasks draws all its classes from one group (one
alphabet for Omniglot: the part of a class name before its first ``/``), chosen uniformly among
the groups that have ``ways`` classes: the hard episodes of Lake et al.'s within-alphabet test
(Science 2015), where every distractor shares the query's script.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..tasks import TaskBatch
from .base import ClassDataset


class EpisodeError(ValueError):
    """An impossible episode request (more ways than classes, too few examples...)."""


def check_episode(dataset: ClassDataset, ways: int, shots: int, queries: int, meta_batch_size: int = 1) -> None:
    """Raise :class:`EpisodeError` naming the limit when the request cannot be met."""
    for name, value in (("ways", ways), ("shots", shots), ("queries", queries), ("meta_batch_size", meta_batch_size)):
        if not isinstance(value, int) or value < 1:
            raise EpisodeError(f"{name} must be a positive integer, got {value!r}")
    if ways > dataset.num_classes:
        raise EpisodeError(f"{ways} ways asked but {dataset.name} has only {dataset.num_classes} classes: "
                           f"use ways <= {dataset.num_classes}")
    eligible = int((dataset.counts >= shots + queries).sum())
    if eligible < ways:
        most = int(dataset.counts.max()) if dataset.num_classes else 0
        fewest = int(dataset.counts.min()) if dataset.num_classes else 0
        # the most examples per class that ``ways`` classes all have: the ways-th largest class size
        limit = int(torch.sort(dataset.counts, descending=True).values[ways - 1])
        raise EpisodeError(
            f"shots + queries = {shots} + {queries} = {shots + queries} examples per class asked, but only "
            f"{eligible} of {dataset.num_classes} classes in {dataset.name} have that many "
            f"(examples per class: {fewest} to {most}); use shots + queries <= {limit}"
            + (f" or fewer ways" if eligible else ""))


class EpisodeSampler:
    """Seeded sampler of ``TaskBatch`` es of ``meta_batch_size`` N-way K-shot tasks.

    >>> sampler = EpisodeSampler(dataset, ways=5, shots=1, queries=15, meta_batch_size=32, seed=0)
    >>> batch = sampler.sample()     # support_x [32, 5, 1, 28, 28], query_x [32, 75, 1, 28, 28]

    Images come out as float in ``[0, 1]``. The stream of tasks is fixed by ``seed``;
    :meth:`state_dict` / :meth:`load_state_dict` carry it across a checkpoint.
    Only classes with at least ``shots + queries`` examples are drawn. ``within_group``: the
    fraction of tasks whose classes share one group (see the module docstring); 0 draws the
    same stream as before the option existed.
    """

    def __init__(self, dataset: ClassDataset, ways: int, shots: int, queries: int,
                 meta_batch_size: int = 1, seed: int = 0, within_group: float = 0.0) -> None:
        check_episode(dataset, ways, shots, queries, meta_batch_size)
        if not 0.0 <= within_group <= 1.0:
            raise EpisodeError(f"within_group is a fraction of tasks in [0, 1], got {within_group!r}")
        self.dataset = dataset
        self.ways, self.shots, self.queries = ways, shots, queries
        self.meta_batch_size = meta_batch_size
        self.generator = torch.Generator().manual_seed(seed)
        per_task = shots + queries
        self._eligible = torch.nonzero(dataset.counts >= per_task).flatten()  # [C']
        counts = dataset.counts[self._eligible]
        # Equal class sizes (Omniglot): examples of class c are rows offsets[c] + 0..n-1 of the
        # class-sorted order, so one argsort of random keys draws all tasks at once.
        self._uniform = bool((counts == counts[0]).all())
        self.within_group = float(within_group)
        self._groups: list[Tensor] = []  # positions in _eligible of each group with >= ways classes
        if self.within_group > 0:
            names = [dataset.class_names[c].split("/")[0] for c in self._eligible.tolist()]
            members: dict[str, list[int]] = {}
            for i, name in enumerate(names):
                members.setdefault(name, []).append(i)
            self._groups = [torch.tensor(m) for _, m in sorted(members.items()) if len(m) >= ways]
            if not self._groups:
                largest = max(len(m) for m in members.values())
                raise EpisodeError(f"within-group episodes of {ways} ways asked, but the largest group (alphabet) "
                                   f"of {dataset.name} has {largest} classes with {per_task} examples; "
                                   f"use ways <= {largest} or within_group = 0")

    def _draw_indices(self, B: int) -> Tensor:
        """Row indices ``[B, N, K+Q]`` into ``dataset.images``."""
        g, ds = self.generator, self.dataset
        N, per = self.ways, self.shots + self.queries
        C = self._eligible.numel()
        chosen = torch.rand(B, C, generator=g).argsort(-1)[:, :N]  # [B, N] positions in _eligible
        if self.within_group > 0:
            inside = torch.rand(B, generator=g) < self.within_group  # [B] tasks drawn within one group
            which = torch.randint(len(self._groups), (B,), generator=g)
            for b in torch.nonzero(inside).flatten().tolist():
                members = self._groups[int(which[b])]
                chosen[b] = members[torch.randperm(members.numel(), generator=g)[:N]]
        classes = self._eligible[chosen]  # [B, N]
        if self._uniform:
            n = int(ds.counts[self._eligible[0]])
            picks = torch.rand(B, N, n, generator=g).argsort(-1)[..., :per]  # [B, N, K+Q]
            return ds._order[ds._offsets[classes].unsqueeze(-1) + picks]
        rows = torch.empty(B, N, per, dtype=torch.long)
        for b in range(B):
            for j, c in enumerate(classes[b].tolist()):
                idx = ds.class_indices(c)
                rows[b, j] = idx[torch.randperm(idx.numel(), generator=g)[:per]]
        return rows

    def sample(self, meta_batch_size: int | None = None) -> TaskBatch:
        B = meta_batch_size or self.meta_batch_size
        N, K, Q = self.ways, self.shots, self.queries
        rows = self._draw_indices(B)  # [B, N, K+Q]
        # Random label per class in each task: class j of task b is called perm[b, j].
        perm = torch.rand(B, N, generator=self.generator).argsort(-1)  # [B, N]
        x = self.dataset.images[rows].float().div_(255)  # [B, N, K+Q, C, H, W]
        labels = perm.unsqueeze(-1).expand(B, N, K + Q)
        shape = x.shape[3:]
        return TaskBatch(
            support_x=x[:, :, :K].reshape(B, N * K, *shape),
            support_y=labels[:, :, :K].reshape(B, N * K),
            query_x=x[:, :, K:].reshape(B, N * Q, *shape),
            query_y=labels[:, :, K:].reshape(B, N * Q),
            ways=N,
        )

    def __iter__(self):
        while True:
            yield self.sample()

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def fixed_episodes(sampler_factory, episodes: int, batch: int = 50) -> list[TaskBatch]:
    """``episodes`` tasks from a fresh seeded sampler, in batches: the same for every algorithm."""
    sampler = sampler_factory()
    out, left = [], episodes
    while left > 0:
        b = min(batch, left)
        out.append(sampler.sample(b))
        left -= b
    return out
