"""Meta-learning algorithms, one file each, registered by name."""
from .base import REGISTRY, Learner, build_learner, options_class, register
from .maml import ANIL, FOMAML, MAML
from .meta_sgd import MetaSGD
from .protonet import ProtoNet
from .reptile import Reptile

__all__ = ["ANIL", "FOMAML", "MAML", "REGISTRY", "Learner", "MetaSGD", "ProtoNet", "Reptile", "build_learner",
           "options_class", "register"]
