"""Meta-learning algorithms, one file each, registered by name."""
from .base import REGISTRY, Learner, build_learner, options_class, register
from .protonet import ProtoNet

__all__ = ["REGISTRY", "Learner", "ProtoNet", "build_learner", "options_class", "register"]
