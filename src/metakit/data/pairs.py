"""Same-class and different-class pairs, for Siamese training and verification (Koch et al. 2015, sec. 3-4).

Two sources, one rule (a set fraction of the pairs are positive, the rest negative; the two
members of a pair are always two distinct examples; positives share a class, negatives do not):

- :func:`episode_pairs` turns the labels of an episode (a :class:`~metakit.tasks.TaskBatch`'s
  support and query sets together) into index pairs, so a Siamese learner trains on the same
  episodes as every other learner;
- :class:`PairSampler` draws pairs of images straight from a :class:`ClassDataset` (a verification
  set, Koch's sec. 4.2), seeded like :class:`~metakit.data.sampler.EpisodeSampler`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import ClassDataset


def positive_count(pairs: int, positive_fraction: float) -> int:
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
    if pairs < 1:
        raise ValueError(f"pairs must be a positive integer, got {pairs}")
    return int(round(pairs * positive_fraction))


def episode_pairs(labels: Tensor, pairs: int, positive_fraction: float = 0.5,
                  generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Index pairs within each task: labels ``[B, M]`` -> ``first, second [B, P]`` (into ``0..M-1``), ``same [B, P]``.

    The first ``round(P * positive_fraction)`` pairs of each task are positive. Each pair's first
    member is uniform over the task's examples that have a partner of the kind wanted (another
    example of their class, or an example of another class), its partner uniform over those
    partners. Randomness comes from ``generator`` (default: torch's global generator, which ``fit``
    seeds and checkpoints).
    """
    B, M = labels.shape
    n_pos = positive_count(pairs, positive_fraction)
    device = labels.device
    same = (torch.arange(pairs, device=device) < n_pos).expand(B, pairs)  # [B, P]
    match = labels.unsqueeze(1) == labels.unsqueeze(2)  # [B, M, M]
    eye = torch.eye(M, dtype=torch.bool, device=device)
    partners = torch.stack([~match, match & ~eye], 1)  # [B, 2, M, M]: [b, kind, first, second]
    has = partners.any(-1)  # [B, 2, M]
    wanted = same.long()  # [B, P]: 1 positive, 0 negative
    if not has.gather(1, wanted.unsqueeze(-1).expand(B, pairs, M)).any(-1).all():
        kind = "another example of its class" if n_pos and not has[:, 1].any(-1).all() else "another class"
        raise ValueError(f"cannot pair an example with {kind}: Siamese training needs tasks with at least "
                         f"2 ways and 2 examples per class (shots + queries >= 2)")

    def uniform(allowed: Tensor) -> Tensor:  # [..., M] bool -> index of a uniform allowed entry [...]
        return torch.rand(allowed.shape, generator=generator, device=device).masked_fill(~allowed, -1.0).argmax(-1)

    first = uniform(has.gather(1, wanted.unsqueeze(-1).expand(B, pairs, M)))  # [B, P]
    rows = partners[torch.arange(B, device=device).unsqueeze(1), wanted, first]  # [B, P, M]
    second = uniform(rows)  # [B, P]
    return first, second, same.clone()


@dataclass
class Pairs:
    """``x1, x2 [P, C, H, W]`` float in [0, 1]; ``same [P]`` bool; ``first, second [P]`` rows of the data set."""

    x1: Tensor
    x2: Tensor
    same: Tensor
    first: Tensor
    second: Tensor


class PairSampler:
    """Seeded pairs of examples of a :class:`ClassDataset`, a set fraction of them same-class.

    A positive pair picks a class uniformly (among those with 2+ examples), then two distinct
    examples of it; a negative pair picks two distinct classes, then one example of each. The
    order of positives and negatives is shuffled.

    >>> pairs = PairSampler(test_set, pairs=1000, seed=0).sample()   # a verification set
    """

    def __init__(self, dataset: ClassDataset, pairs: int = 128, positive_fraction: float = 0.5, seed: int = 0) -> None:
        positive_count(pairs, positive_fraction)
        self._multi = torch.nonzero(dataset.counts >= 2).flatten()  # classes that can give positives
        if positive_fraction > 0 and self._multi.numel() == 0:
            raise ValueError(f"{dataset.name} has no class with 2 examples: it cannot give same-class pairs")
        if positive_fraction < 1 and dataset.num_classes < 2:
            raise ValueError(f"{dataset.name} has fewer than 2 classes: it cannot give different-class pairs")
        self.dataset = dataset
        self.pairs, self.positive_fraction = pairs, positive_fraction
        self.generator = torch.Generator().manual_seed(seed)

    def _rows(self, classes: Tensor, exclude: Tensor | None = None) -> Tensor:
        """One random example of each class ``[P]``; with ``exclude`` (positions within the class), another one."""
        ds, g = self.dataset, self.generator
        n = ds.counts[classes]
        if exclude is None:
            pos = (torch.rand(classes.shape, generator=g) * n).long()
        else:
            pos = (torch.rand(classes.shape, generator=g) * (n - 1)).long()
            pos = pos + (pos >= exclude).long()  # skip the excluded position
        return pos, ds._order[ds._offsets[classes] + pos]

    def sample(self, pairs: int | None = None) -> Pairs:
        P = pairs or self.pairs
        n_pos = positive_count(P, self.positive_fraction)
        n_neg = P - n_pos
        g, C = self.generator, self.dataset.num_classes
        pc = self._multi[torch.randint(0, self._multi.numel(), (n_pos,), generator=g)] if n_pos else \
            torch.empty(0, dtype=torch.long)
        p_pos, p1 = self._rows(pc)
        _, p2 = self._rows(pc, exclude=p_pos)
        c1 = torch.randint(0, C, (n_neg,), generator=g)
        c2 = torch.randint(0, max(C - 1, 1), (n_neg,), generator=g)
        c2 = c2 + (c2 >= c1).long()  # a class other than c1
        _, n1 = self._rows(c1)
        _, n2 = self._rows(c2)
        order = torch.randperm(P, generator=g)
        first, second = torch.cat([p1, n1])[order], torch.cat([p2, n2])[order]
        same = torch.cat([torch.ones(n_pos, dtype=torch.bool), torch.zeros(n_neg, dtype=torch.bool)])[order]
        images = self.dataset.images
        return Pairs(images[first].float() / 255, images[second].float() / 255, same, first, second)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
