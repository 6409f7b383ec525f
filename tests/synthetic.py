"""Small data made by the tests themselves."""
from pathlib import Path

import numpy as np
from PIL import Image


def make_image_folder(root: Path, classes: int = 12, per_class: int = 8, size: int = 28, seed: int = 0) -> Path:
    """``root/class_XX/img_YY.png``: dark strokes on white paper, a different pattern per class."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class_{c:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        template = rng.random((size, size)) < 0.15
        for i in range(per_class):
            noise = rng.random((size, size)) < 0.05
            ink = template ^ noise
            Image.fromarray(np.where(ink, 0, 255).astype(np.uint8)).save(folder / f"img_{i:02d}.png")
    return root


def folder_config(path: Path, **train) -> dict:
    """A tiny ProtoNet config over an image folder (6 / 3 / 3 classes)."""
    t = {"ways": 3, "shots": 1, "queries": 2, "steps": 12, "lr": 1e-2, "lr_step": 4, "lr_gamma": 0.5,
         "log_every": 2, "val_every": 4, "val_episodes": 6, "checkpoint_every": 3}
    t.update(train)
    return {"name": "tiny", "algorithm": "protonet", "seed": 3, "model": {"hidden": 8},
            "data": {"dataset": "folder", "path": str(path), "split_fractions": [0.5, 0.25, 0.25]},
            "train": t, "eval": {"ways": 3, "shots": 1, "queries": 2, "episodes": 20}}
