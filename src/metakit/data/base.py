"""A class-indexed data set held in memory: the one thing the episode sampler needs."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class ClassDataset:
    """Examples grouped by class, all in memory.

    ``images``: uint8 ``[M, C, H, W]`` (ink/foreground 255, background 0 for Omniglot);
    ``targets``: int64 ``[M]`` class index of each example, in ``0..len(class_names)-1``;
    ``class_names``: one name per class. ``transform`` describes how a raw picture becomes a
    row of ``images`` (see :mod:`metakit.data.transforms`), so a trained model can apply
    the same conversion to a user's images.
    """

    images: Tensor
    targets: Tensor
    class_names: list[str]
    transform: dict = field(default_factory=dict)
    name: str = "dataset"

    def __post_init__(self) -> None:
        if self.images.shape[0] != self.targets.shape[0]:
            raise ValueError(f"{self.images.shape[0]} images but {self.targets.shape[0]} targets")
        order = torch.argsort(self.targets, stable=True)
        counts = torch.bincount(self.targets, minlength=len(self.class_names))
        # indices of class c's examples: self._order[self._offsets[c] : self._offsets[c] + counts[c]]
        self._order = order
        self._counts = counts
        self._offsets = torch.cumsum(counts, 0) - counts

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def counts(self) -> Tensor:
        """Examples per class, ``[num_classes]``."""
        return self._counts

    def class_indices(self, c: int) -> Tensor:
        """Row indices of class ``c`` in ``images``."""
        o = int(self._offsets[c])
        return self._order[o:o + int(self._counts[c])]

    def __len__(self) -> int:
        return self.images.shape[0]

    def __repr__(self) -> str:
        return (f"ClassDataset({self.name!r}, classes={self.num_classes}, examples={len(self)}, "
                f"shape={tuple(self.images.shape[1:])})")
