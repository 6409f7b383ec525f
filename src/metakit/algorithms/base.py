"""The learner contract and the registry that lets configs and the CLI build learners by name."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

from torch import Tensor, nn

from ..tasks import MetaOutput, TaskBatch

REGISTRY: dict[str, type["Learner"]] = {}


def register(name: str):
    """Class decorator: make a learner buildable as ``algorithm: name`` in configs."""
    def wrap(cls):
        cls.name = name
        REGISTRY[name] = cls
        return cls
    return wrap


class Learner(nn.Module):
    """An ``nn.Module`` whose parameters are the meta-parameters.

    Subclasses define ``Options`` (a dataclass of their hyperparameters, the published
    defaults), build themselves from it, and implement :meth:`meta_loss` and :meth:`adapt`.
    ``grad_at_test`` says whether evaluation needs autograd (gradient-based inner loops).
    """

    name: ClassVar[str] = "learner"
    task: ClassVar[str] = "classification"  # or "regression"
    grad_at_test: ClassVar[bool] = False
    Options: ClassVar[type]

    def meta_loss(self, batch: TaskBatch) -> MetaOutput:
        raise NotImplementedError

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Callable[[Tensor], Tensor]:
        """One task, inference: ``support_x [N*K, ...]``, ``support_y [N*K]`` -> ``predict(query_x) -> logits``."""
        raise NotImplementedError


def build_learner(algorithm: str, options, in_channels: int = 1, image_size: int = 28, ways: int = 5,
                  task: str = "classification") -> Learner:
    """Build a registered learner. Every learner's ``__init__`` takes ``(options, in_channels,
    image_size, ways, task)``: ``ways`` sizes a classifier head (gradient-based learners), ``task``
    is ``"classification"`` or ``"regression"`` (sinusoids); learners that need neither ignore them."""
    if algorithm not in REGISTRY:
        raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {sorted(REGISTRY)}")
    return REGISTRY[algorithm](options, in_channels=in_channels, image_size=image_size, ways=ways, task=task)


def options_class(algorithm: str) -> type:
    if algorithm not in REGISTRY:
        raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {sorted(REGISTRY)}")
    return REGISTRY[algorithm].Options


@dataclass
class NoOptions:
    pass
