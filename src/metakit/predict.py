"""Few-shot prediction on a user's own images with any trained checkpoint, through ``adapt``.

Support: a folder with one sub-folder per class, one or a few images each. Queries: image files or
folders of them. Every image goes through the checkpoint's input transform (grey or RGB, inversion,
size), so any size or colour works. Works for every learner that meets the contract, metric-based
(embeds the support set) and gradient-based (a few inner steps) alike.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from .data import DataError, load_folder
from .data.folder import IMAGE_SUFFIXES
from .data.transforms import load_image


@contextmanager
def one_query_at_a_time(learner):
    """Predictions that do not depend on which other queries come along.

    A user's queries arrive alone or in arbitrary groups. Learners whose BatchNorm uses the
    statistics of the current batch (the MAML family, as in the MAML reference) are evaluated
    transductively in the papers' protocol; here they are switched to their non-transductive mode,
    each query normalised together with the support set, for the duration of the block.
    """
    options = getattr(learner, "options", None)
    if options is None or not hasattr(options, "transductive"):
        yield learner
        return
    before = options.transductive
    options.transductive = False
    try:
        yield learner
    finally:
        options.transductive = before


def check_channels(x: torch.Tensor, transform: dict, what: str) -> None:
    """``x [M, C, H, W]`` must have the channel count and size the checkpoint was trained on."""
    want_c, size = transform.get("channels", x.shape[1]), transform.get("size", x.shape[-1])
    if x.dim() != 4 or x.shape[1] != want_c or tuple(x.shape[-2:]) != (size, size):
        raise DataError(f"{what} has shape {tuple(x.shape)} but the checkpoint takes [M, {want_c}, {size}, {size}] "
                        f"({'grey' if want_c == 1 else 'RGB'} {size}x{size}); convert it with "
                        f"metakit.data.load_image(path, learner.transform)")


def query_files(paths: list[str | Path]) -> list[Path]:
    """Image files named, or found in named folders (sorted), in the given order."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise DataError(f"query folder {p} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"query {p} not found")
    return files


def load_support(learner, support_dir: str | Path, shots: int | None = None):
    """``(support_x float [N*K, C, S, S], support_y [N*K], class_names)`` from a folder per class."""
    transform = learner.transform
    if not transform:
        raise DataError("this checkpoint was not trained on images (no input transform); predict needs an image model")
    dataset = load_folder(support_dir, transform, min_per_class=shots or 1)
    rows = torch.cat([dataset.class_indices(c)[:shots] if shots else dataset.class_indices(c)
                      for c in range(dataset.num_classes)])
    if dataset.num_classes < 2:
        raise DataError(f"{support_dir} has {dataset.num_classes} class; few-shot prediction needs at least 2")
    return dataset.images[rows].float() / 255, dataset.targets[rows], dataset.class_names


def predict_images(learner, support_dir: str | Path, queries: list[str | Path], shots: int | None = None) -> list[dict]:
    """One record per readable query: ``{"query", "predicted", "probabilities": {class: p}}``.

    Unreadable queries are skipped with a warning that names them.
    """
    support_x, support_y, names = load_support(learner, support_dir, shots)
    files = query_files(queries)
    images, kept = [], []
    for f in files:
        try:
            images.append(load_image(f, learner.transform))
            kept.append(f)
        except Exception as exc:
            warnings.warn(f"skipping query {f}: not a readable image ({type(exc).__name__})", stacklevel=2)
    if not images:
        raise DataError("no readable query image among " + ", ".join(map(str, files)))
    query_x = torch.stack(images).float() / 255  # [M, C, S, S]
    check_channels(support_x, learner.transform, "support")
    check_channels(query_x, learner.transform, "query")
    with one_query_at_a_time(learner):
        predict = learner.adapt(support_x, support_y)
        with torch.no_grad():
            probs = predict(query_x).softmax(-1)  # [M, N]
    return [{"query": str(f), "predicted": names[int(p.argmax())],
             "probabilities": {n: float(v) for n, v in zip(names, p)}} for f, p in zip(kept, probs)]


def format_table(records: list[dict], top: int = 3) -> str:
    width = max(len(r["query"]) for r in records)
    lines = [f"{'query':<{width}}  predicted      top probabilities"]
    for r in records:
        best = sorted(r["probabilities"].items(), key=lambda kv: -kv[1])[:top]
        lines.append(f"{r['query']:<{width}}  {r['predicted']:<13}  "
                     + ", ".join(f"{name} {100 * p:.1f}%" for name, p in best))
    return "\n".join(lines)
