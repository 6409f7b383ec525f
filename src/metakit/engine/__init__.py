"""What runs any learner: meta-training, evaluation with confidence intervals, checkpoints."""
from .checkpoint import CheckpointError, atomic_save, load
from .evaluate import evaluate, mean_ci95
from .fit import Experiment, FitResult, fit

__all__ = ["CheckpointError", "Experiment", "FitResult", "atomic_save", "evaluate", "fit", "load", "mean_ci95"]
