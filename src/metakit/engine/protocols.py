"""Evaluations beyond N-way episodes from a split: Lake's within-alphabet protocol, pair verification."""
from __future__ import annotations

import torch

from ..data import DataError
from ..data.lake import PUBLISHED_ERROR, lake_sampler
from ..data.pairs import Pairs
from .evaluate import evaluate, mean_ci95

LAKE_EPISODES = 400  # 20 alphabets x 20 runs = 8000 trials


def trained_on_evaluation_alphabets(data) -> bool | None:
    """Whether a checkpoint's training data holds characters of Omniglot's evaluation alphabets
    (the Vinyals and MAML splits do; Lake's ``background`` does not); None for other data sets."""
    if data.dataset != "omniglot":
        return None
    return not (data.scheme == "lake" and data.train_split == "background")


def evaluate_lake(learner, data, episodes: int = LAKE_EPISODES, ways: int = 20, shots: int = 1, queries: int = 1,
                  seed: int = 0, progress: bool = False, evaluator=evaluate) -> dict:
    """Lake et al. (2015) within-alphabet one-shot classification on the ``evaluation`` archive, decoded at the
    checkpoint's image size (``data``: its :class:`~metakit.config.DataConfig`).

    Returns accuracy and error rate (``1 - accuracy``) with the 95% CI over episodes, the trial count
    and the published error rates to compare with. ``evaluator``: :func:`~metakit.engine.evaluate` or a
    distributed context's ``evaluate``.
    """
    channels = data.channels if data.dataset == "folder" else 1
    if channels != 1:
        raise DataError(f"Lake's protocol uses grey Omniglot images, but this checkpoint takes {channels} channels")
    sampler = lake_sampler(data.image_size, root=data.root, download=data.download, ways=ways, shots=shots,
                           queries=queries, seed=seed)
    result = evaluator(learner, sampler, episodes, progress=progress, desc=f"Lake {ways}-way {shots}-shot")
    return {"protocol": "lake-within-alphabet", "accuracy": result["accuracy"], "error_rate": 1 - result["accuracy"],
            "ci95": result["ci95"], "episodes": episodes, "trials": episodes * sampler.trials_per_episode,
            "alphabets": len(sampler.alphabets), "ways": ways, "shots": shots, "queries": queries, "seed": seed,
            "image_size": data.image_size, "published_error": dict(PUBLISHED_ERROR),
            "trained_on_evaluation_alphabets": trained_on_evaluation_alphabets(data)}


def verification_accuracy(learner, pairs: Pairs, threshold: float | None = None, batch: int = 256) -> dict:
    """Same / different accuracy of ``learner.similarity`` on ``pairs`` (e.g. ``PairSampler(test_set).sample(1000)``).

    A pair is called "same" when its score exceeds ``threshold`` (default ``learner.same_threshold``).
    Returns ``{"accuracy", "ci95", "pairs", "threshold", "true_positive_rate", "true_negative_rate"}``;
    the CI is the normal interval over pairs.
    """
    threshold = learner.same_threshold if threshold is None else threshold
    was_training = learner.training
    learner.eval()
    scores = []
    try:
        with torch.no_grad():
            for i in range(0, pairs.same.numel(), batch):
                scores.append(learner.similarity(pairs.x1[i:i + batch], pairs.x2[i:i + batch]).cpu())
    finally:
        learner.train(was_training)
    said_same = torch.cat(scores) > threshold
    correct = (said_same == pairs.same).float()
    mean, ci = mean_ci95(correct)
    same = pairs.same
    return {"accuracy": mean, "ci95": ci, "pairs": same.numel(), "threshold": float(threshold),
            "true_positive_rate": float(said_same[same].float().mean()) if same.any() else float("nan"),
            "true_negative_rate": float((~said_same[~same]).float().mean()) if (~same).any() else float("nan")}
