"""Backbones: feature extractors and small networks, no algorithm logic."""
from .conv4 import Conv4, conv_block
from .koch import KochNet
from .mlp import MLP

__all__ = ["Conv4", "KochNet", "MLP", "conv_block"]
