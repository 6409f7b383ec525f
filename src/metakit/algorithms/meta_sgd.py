"""Meta-SGD (Li, Zhou, Chen & Li 2017, "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning").

MAML with the step size learned per coordinate (eq. 3): ``theta' = theta - alpha (.) grad L_support(theta)``,
where ``alpha`` has the shape of ``theta`` and is meta-learned with it, so the update direction
as well as its size is learned (eq. 4: ``min_{theta, alpha} sum_i L_query_i(theta'_i)``). One inner
step in training and at test. The paper initialises ``alpha`` uniformly at random in
``[0.005, 0.1]`` (sec. 4); ``alpha_init`` takes that range, or one number for a constant.
With ``alpha`` frozen at a constant, Meta-SGD is MAML with that inner step.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .base import register
from .inner_loop import MetaSGDRule, UpdateRule
from .maml import MAML, InnerLoopOptions


@register("metasgd")
class MetaSGD(MAML):
    """MAML's inner loop with :class:`~metakit.algorithms.inner_loop.MetaSGDRule` as the update rule."""

    @dataclass
    class Options(InnerLoopOptions):
        inner_steps_test: int = 1
        alpha_init: list[float] = field(default_factory=lambda: [0.005, 0.1])  # [low, high] uniform, or [value]

    def __init__(self, options=None, in_channels: int = 1, image_size: int = 28, ways: int = 5,
                 task: str = "classification", **_) -> None:
        super().__init__(options, in_channels=in_channels, image_size=image_size, ways=ways, task=task)
        init = list(self.options.alpha_init)
        if len(init) not in (1, 2):
            raise ValueError(f"metasgd: model.alpha_init must be [value] or [low, high], got {init}")
        adapted = dict(self.model.named_parameters())
        self.rule = MetaSGDRule({k: adapted[k] for k in self.adapt_names}, init)

    def update_rule(self, training: bool) -> UpdateRule:
        return self.rule
