"""Where tasks come from: data sets held in memory and the samplers that draw episodes from them."""
from __future__ import annotations

from .base import ClassDataset
from .download import DataError, data_root
from .folder import list_classes, load_folder, split_classes
from .lake import LakeSampler, lake_sampler
from .omniglot import load_omniglot
from .pairs import PairSampler
from .sampler import EpisodeError, EpisodeSampler, check_episode
from .sinusoid import SinusoidSampler
from .transforms import apply_transform, load_image, make_transform

DATASETS = ("omniglot", "sinusoid", "folder")


def load_split(data, split: str, seed: int = 0) -> ClassDataset | None:
    """The class data set of ``split`` for a :class:`~metakit.config.DataConfig` (None for sinusoid)."""
    if data.dataset == "sinusoid":
        return None
    if data.dataset == "omniglot":
        return load_omniglot(split, scheme=data.scheme, image_size=data.image_size, rotations=data.rotations,
                             root=data.root, download=data.download)
    if data.dataset == "folder":
        if not data.path:
            raise DataError("data.path must name the image folder (one sub-folder per class) for dataset: folder")
        transform = make_transform(size=data.image_size, channels=data.channels, invert=data.invert)
        names = ("train", "val", "test")
        if split not in names:
            raise DataError(f"unknown split {split!r} for a folder data set; choose one of {list(names)}")
        available = list_classes(data.path)
        if data.split_classes:
            unknown = sorted(set(data.split_classes) - set(names))
            if unknown:
                raise DataError(f"data.split_classes has unknown split {unknown[0]!r}; use {list(names)}")
            classes = [str(c) for c in data.split_classes.get(split) or []]
            missing = [c for c in classes if c not in available]
            if missing:
                raise DataError(f"data.split_classes.{split} names {missing[0]!r}, not a class folder in "
                                f"{data.path} (classes there: {', '.join(available[:10])}"
                                f"{', ...' if len(available) > 10 else ''})")
            if not classes:
                raise DataError(f"data.split_classes gives no classes for the {split} split")
        else:
            classes = split_classes(available, data.split_fractions, seed)[names.index(split)]
        return load_folder(data.path, transform, classes=classes, name=f"{data.path}:{split}")
    raise DataError(f"unknown dataset {data.dataset!r}; choose one of {list(DATASETS)}")


def make_sampler(data, dataset: ClassDataset | None, ways: int, shots: int, queries: int,
                 meta_batch_size: int, seed: int, within_alphabet: float = 0.0):
    """An episode sampler for a class data set, or a sinusoid sampler (``queries`` points) for regression.

    ``within_alphabet``: the fraction of Omniglot tasks whose classes share one alphabet."""
    if data.dataset == "sinusoid":
        return SinusoidSampler(shots, queries, meta_batch_size, seed)
    if within_alphabet and data.dataset != "omniglot":
        raise DataError(f"within-alphabet episodes need Omniglot's alphabets; {data.dataset} has none "
                        f"(set train.within_alphabet: 0)")
    return EpisodeSampler(dataset, ways, shots, queries, meta_batch_size, seed, within_group=within_alphabet)


__all__ = ["ClassDataset", "DataError", "EpisodeError", "EpisodeSampler", "LakeSampler", "PairSampler",
           "SinusoidSampler", "apply_transform", "check_episode", "data_root", "lake_sampler", "load_folder",
           "load_image", "load_omniglot", "load_split", "make_sampler", "make_transform", "split_classes"]
