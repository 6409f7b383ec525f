"""metakit: meta-learning (learning to learn) for PyTorch.

>>> import metakit
>>> learner = metakit.load("checkpoints/omniglot/protonet_1shot.pt")
>>> predict = learner.adapt(support_x, support_y)     # one new task
>>> predict(query_x).argmax(-1)
"""
__version__ = "0.1.0"

from .algorithms import (ANIL, FOMAML, MAML, REGISTRY, Learner, MatchingNet, MetaLSTM, MetaSGD,  # noqa: E402
                         ProtoNet, Reptile, Siamese, build_learner, register)
from .config import Config, ConfigError, load_config  # noqa: E402
from .data import ClassDataset, EpisodeSampler, SinusoidSampler, load_folder, load_omniglot  # noqa: E402
from .engine import CheckpointError, evaluate, fit, load, mean_ci95  # noqa: E402
from .tasks import MetaOutput, TaskBatch  # noqa: E402

__all__ = ["ANIL", "FOMAML", "MAML", "MetaLSTM", "MetaSGD", "Reptile", "REGISTRY", "CheckpointError", "ClassDataset", "Config", "ConfigError", "EpisodeSampler", "Learner",
           "MatchingNet", "MetaOutput", "ProtoNet", "Siamese", "SinusoidSampler", "TaskBatch", "__version__", "build_learner", "evaluate",
           "fit", "load", "load_config", "load_folder", "load_omniglot", "mean_ci95", "register"]
