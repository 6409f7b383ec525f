"""Lake's within-alphabet one-shot classification (Lake, Salakhutdinov & Tenenbaum 2015, Science 350(6266)).

Each episode (a "run" of 20 trials in the paper) takes one alphabet of the ``evaluation`` archive,
20 of its characters, one drawing of each by one drawer as the support set, and one drawing of
each by another drawer as the query set: 20-way 1-shot classification with 20 queries, where
all 20 candidates share the alphabet (harder than the across-alphabet episodes of Vinyals et al.).
Episodes cycle through the alphabets in sorted order (episode ``e`` uses alphabet ``e mod 20``), so
``20 * runs`` episodes give every alphabet ``runs`` episodes and ``400 * runs`` trials.
Published 20-way one-shot error: people 4.5%, Bayesian Program Learning 3.3% (Lake et al. 2015),
convolutional Siamese net 8.0% (Koch et al. 2015, table 2: 92.0% accuracy).

With ``shots`` / ``queries`` above 1, ``shots + queries`` distinct drawers are drawn per episode: the
first ``shots`` give the support drawings, the others the queries, for every character alike.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..tasks import TaskBatch
from .omniglot import load_archive
from .sampler import EpisodeError

PUBLISHED_ERROR = {"people": 0.045, "bayesian_program_learning": 0.033, "siamese_convnet_koch2015": 0.080}
PUBLISHED_LABELS = {"people": "people", "bayesian_program_learning": "Bayesian Program Learning",
                    "siamese_convnet_koch2015": "Koch et al.'s Siamese convnet"}


class LakeSampler:
    """Seeded within-alphabet episodes from a decoded archive (``images`` uint8 ``[chars, drawers, S, S]``).

    >>> sampler = LakeSampler(data["images"], data["characters"], seed=0)   # data = load_archive(...)
    >>> batch = sampler.sample()   # support_x [1, 20, 1, S, S] (drawer A), query_x [1, 20, 1, S, S] (drawer B)
    """

    def __init__(self, images: Tensor, characters: list[str], ways: int = 20, shots: int = 1, queries: int = 1,
                 seed: int = 0) -> None:
        for name, value in (("ways", ways), ("shots", shots), ("queries", queries)):
            if not isinstance(value, int) or value < 1:
                raise EpisodeError(f"{name} must be a positive integer, got {value!r}")
        self.images = images
        self.characters = list(characters)
        self.alphabets = sorted({c.split("/")[0] for c in self.characters})
        # alphabet -> indices of its characters (rows of images)
        self.members = {a: torch.tensor([i for i, c in enumerate(self.characters) if c.split("/")[0] == a])
                        for a in self.alphabets}
        small = [f"{a} ({len(m)})" for a, m in self.members.items() if len(m) < ways]
        if small:
            raise EpisodeError(f"{ways} ways asked but {len(small)} alphabets have fewer characters: "
                               f"{', '.join(small[:3])}{', ...' if len(small) > 3 else ''}; use ways <= "
                               f"{min(len(m) for m in self.members.values())}")
        drawers = images.shape[1]
        if shots + queries > drawers:
            raise EpisodeError(f"shots + queries = {shots + queries} drawers per character asked, but the archive "
                               f"has {drawers}; use shots + queries <= {drawers}")
        self.ways, self.shots, self.queries = ways, shots, queries
        self.generator = torch.Generator().manual_seed(seed)
        self.episode = 0

    def draw(self) -> dict:
        """The next episode as indices: ``alphabet``, ``characters [N]`` (rows of ``images``, label = position),
        ``support_drawers [K]`` and ``query_drawers [Q]`` (0-based; drawer number = index + 1)."""
        g = self.generator
        alphabet = self.alphabets[self.episode % len(self.alphabets)]
        members = self.members[alphabet]
        chars = members[torch.randperm(members.numel(), generator=g)[:self.ways]]  # [N]
        drawers = torch.randperm(self.images.shape[1], generator=g)[:self.shots + self.queries]
        self.episode += 1
        return {"alphabet": alphabet, "characters": chars, "support_drawers": drawers[:self.shots],
                "query_drawers": drawers[self.shots:]}

    def _task(self, d: dict) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        N, K, Q = self.ways, self.shots, self.queries
        per_char = self.images[d["characters"]]  # [N, drawers, S, S]
        side = per_char.shape[-1]
        labels = torch.arange(N)
        sx = per_char[:, d["support_drawers"]].reshape(N * K, 1, side, side)
        qx = per_char[:, d["query_drawers"]].reshape(N * Q, 1, side, side)
        return sx, labels.repeat_interleave(K), qx, labels.repeat_interleave(Q)

    def sample(self, meta_batch_size: int | None = None) -> TaskBatch:
        tasks = [self._task(self.draw()) for _ in range(meta_batch_size or 1)]
        sx, sy, qx, qy = (torch.stack(t) for t in zip(*tasks))
        return TaskBatch(sx.float() / 255, sy, qx.float() / 255, qy, ways=self.ways)

    @property
    def trials_per_episode(self) -> int:
        return self.ways * self.queries

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "episode": self.episode}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.episode = state["episode"]


def lake_sampler(image_size: int = 28, root=None, download: bool = True, ways: int = 20, shots: int = 1,
                 queries: int = 1, seed: int = 0, expected="official") -> LakeSampler:
    """A :class:`LakeSampler` over Omniglot's ``images_evaluation.zip`` decoded at ``image_size``."""
    data = load_archive("images_evaluation", image_size, root=root, download=download, expected=expected)
    return LakeSampler(data["images"], data["characters"], ways, shots, queries, seed)
