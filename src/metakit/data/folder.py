"""A user's own images: one sub-folder per class, any image size, colour or grey.

``root/<class>/<image>`` -> :class:`ClassDataset` with every image converted by the
transform (grey or RGB, optional inversion, resized to the backbone's input). Unreadable
files are skipped with a warning that names them; an empty class is an error.
"""
from __future__ import annotations

import random
import warnings
from pathlib import Path

import torch

from .base import ClassDataset
from .download import DataError
from .transforms import load_image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def list_classes(root: str | Path) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} not found; it must hold one sub-folder per class")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class sub-folders; put each class's images in {root}/<class name>/")
    return classes


def load_folder(root: str | Path, transform: dict, classes: list[str] | None = None, name: str | None = None,
                min_per_class: int = 1) -> ClassDataset:
    """Load ``classes`` (default: all sub-folders) of ``root`` into memory."""
    root = Path(root)
    classes = list_classes(root) if classes is None else classes
    images, targets = [], []
    for c, cls in enumerate(classes):
        folder = root / cls
        if not folder.is_dir():
            raise DataError(f"class folder {folder} not found; {root} must hold one sub-folder per class")
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        loaded = 0
        for path in files:
            try:
                images.append(load_image(path, transform))
            except Exception as exc:  # PIL raises several types for non-images and damaged files
                warnings.warn(f"skipping {path}: not a readable image ({type(exc).__name__})", stacklevel=2)
                continue
            targets.append(c)
            loaded += 1
        if loaded < min_per_class:
            raise DataError(f"class folder {folder} has {loaded} readable images; "
                            f"it needs at least {min_per_class}")
    return ClassDataset(torch.stack(images), torch.tensor(targets), list(classes), transform,
                        name=name or root.name)


def split_classes(classes: list[str], fractions: list[float], seed: int = 0) -> list[list[str]]:
    """Shuffle class names with ``seed`` and cut them by ``fractions`` (e.g. [0.6, 0.2, 0.2])."""
    if any(f < 0 for f in fractions) or not 0.99 <= sum(fractions) <= 1.01:
        raise DataError(f"split fractions must be non-negative and sum to 1, got {fractions}")
    order = sorted(classes)
    random.Random(seed).shuffle(order)
    total = sum(fractions)  # within 1 +- 0.01: scale to exactly 1 so that every class is placed
    cuts = [round(sum(fractions[:i]) / total * len(order)) for i in range(len(fractions) + 1)]
    return [order[cuts[i]:cuts[i + 1]] for i in range(len(fractions))]
