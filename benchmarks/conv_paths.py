"""Which convolution code path is fastest for the query pass of MAML's Conv4, per layer, on one CPU thread.

    python benchmarks/conv_paths.py --rounds 7

For each layer shape of one task's query pass (75 images: 5-way, 15 queries; 64 filters, 3x3, padding 1),
a forward and the backward to the input, the weight and the bias, timed in process CPU time with the
paths interleaved in every round (so that a load on the machine falls on all of them alike):

- ``mkldnn``: ``F.conv2d`` as metakit calls it (oneDNN);
- ``native``: ``F.conv2d`` with ``torch.backends.mkldnn`` off (PyTorch's per-image im2col + GEMM);
- ``gemm``: one im2col of the whole batch (``F.unfold``) and one matrix product with the weights.

Printed: the median milliseconds per path and layer, and the largest difference of the ``gemm`` path's
gradients from ``mkldnn``'s relative to their size (float32 rounding, about 1e-6).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

# (input [N, C, H, W], stride): the reference's strided network, then the max-pool Conv4's first two layers
LAYERS = [((75, 1, 28, 28), 2), ((75, 64, 14, 14), 2), ((75, 64, 7, 7), 2), ((75, 64, 4, 4), 2),
          ((75, 64, 28, 28), 1), ((75, 64, 14, 14), 1)]


def conv_gemm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, stride: int) -> torch.Tensor:
    """A 3x3, padding-1 convolution as one im2col of the batch and one matrix product."""
    n, c, h, wd = x.shape
    o = w.shape[0]
    ho, wo = (h - 1) // stride + 1, (wd - 1) // stride + 1
    cols = F.unfold(x, 3, padding=1, stride=stride)                   # [N, C*9, L]
    cols = cols.transpose(0, 1).reshape(c * 9, n * ho * wo)           # [C*9, N*L]
    y = torch.addmm(b[:, None], w.reshape(o, -1), cols)               # [O, N*L]
    return y.reshape(o, n, ho, wo).transpose(0, 1)                    # [N, O, Ho, Wo]


def conv_aten(x, w, b, stride):
    return F.conv2d(x, w, b, stride, 1)


PATHS = {"mkldnn": (conv_aten, True), "native": (conv_aten, False), "gemm": (conv_gemm, True)}


def step(fn, x, w, b, stride):
    y = fn(x, w, b, stride)
    return torch.autograd.grad((y * y).sum(), (x, w, b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    print("| input | stride | " + " | ".join(f"{p} ms" for p in PATHS) + " | gemm vs mkldnn gradients |")
    print("|---|---|" + "---|" * len(PATHS) + "---|")
    for shape, stride in LAYERS:
        x = torch.randn(shape, generator=g).requires_grad_()
        w = torch.randn(64, shape[1], 3, 3, generator=g).requires_grad_()
        b = torch.randn(64, generator=g).requires_grad_()
        times: dict[str, list[float]] = {p: [] for p in PATHS}
        grads = {}
        try:
            for r in range(args.rounds + 1):  # round 0 warms up
                for name, (fn, mkldnn) in PATHS.items():
                    torch.backends.mkldnn.enabled = mkldnn
                    t = time.process_time()
                    grads[name] = step(fn, x, w, b, stride)
                    if r:
                        times[name].append(time.process_time() - t)
        finally:
            torch.backends.mkldnn.enabled = True
        err = max(((a - ref).abs().max() / ref.abs().max()).item() for a, ref in zip(grads["gemm"], grads["mkldnn"]))
        cells = " | ".join(f"{1000 * statistics.median(times[p]):.2f}" for p in PATHS)
        print(f"| {list(shape)} | {stride} | {cells} | {err:.1e} |")


if __name__ == "__main__":
    main()
