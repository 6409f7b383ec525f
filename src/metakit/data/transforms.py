"""How a picture becomes a model input; stored in data sets and checkpoints as a plain dict.

``{"size": 28, "channels": 1, "invert": True, "resample": "lanczos"}`` reads: convert to grey
(``channels=1``) or RGB (``3``), invert so that dark ink on light paper becomes ink 255 /
paper 0 (Omniglot's convention in metakit: ink is 1, paper is 0 after scaling to [0, 1]),
then resize to ``size x size``.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

OMNIGLOT_TRANSFORM = {"size": 28, "channels": 1, "invert": True, "resample": "lanczos"}
_RESAMPLE = {"lanczos": Image.LANCZOS, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
             "nearest": Image.NEAREST, "box": Image.BOX}


def make_transform(size: int = 28, channels: int = 1, invert: bool = True, resample: str = "lanczos") -> dict:
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
    if resample not in _RESAMPLE:
        raise ValueError(f"resample must be one of {sorted(_RESAMPLE)}, got {resample!r}")
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    return {"size": int(size), "channels": int(channels), "invert": bool(invert), "resample": resample}


def apply_transform(image: Image.Image, transform: dict) -> Tensor:
    """PIL image (any size, mode) -> uint8 ``[C, size, size]``."""
    if image.mode in ("RGBA", "LA", "P"):
        # Transparent pixels become white paper, as on a drawing canvas.
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    image = image.convert("L" if transform["channels"] == 1 else "RGB")
    if transform.get("invert", False):
        image = ImageOps.invert(image)
    size = transform["size"]
    if image.size != (size, size):
        image = image.resize((size, size), resample=_RESAMPLE[transform.get("resample", "lanczos")])
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[None]  # [1, H, W]
    else:
        array = array.transpose(2, 0, 1)  # [3, H, W]
    return torch.from_numpy(array.copy())


def load_image(path, transform: dict) -> Tensor:
    """Read an image file -> uint8 ``[C, size, size]``; raises ``OSError`` for unreadable files."""
    with Image.open(path) as image:
        image.load()
        return apply_transform(image, transform)
