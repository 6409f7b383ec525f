"""Meta-learning algorithms, one file each, registered by name."""
from .base import REGISTRY, Learner, build_learner, options_class, register
from .maml import ANIL, FOMAML, MAML
from .matching import MatchingNet
from .meta_lstm import MetaLSTM
from .meta_sgd import MetaSGD
from .protonet import ProtoNet
from .reptile import Reptile
from .siamese import Siamese

__all__ = ["ANIL", "FOMAML", "MAML", "REGISTRY", "Learner", "MatchingNet", "MetaLSTM", "MetaSGD", "ProtoNet", "Reptile", "Siamese",
           "build_learner", "options_class", "register"]
