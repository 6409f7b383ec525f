"""Conv4 memory layout, side by side: one ProtoNet meta-training step (60-way, 5 queries, Omniglot 28x28).

    python benchmarks/conv4_layout.py --threads 2 --repeats 15

Compares the plain layout (NCHW, conv -> BN -> ReLU -> pool) with metakit's Conv4 (channels-last,
conv -> BN -> pool -> ReLU); the two compute the same function. Prints the median step time of each,
interleaved so that machine noise hits both alike, and the ratio.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from metakit.algorithms import ProtoNet
from metakit.data import EpisodeSampler, load_omniglot
from metakit.tasks import TaskBatch


def plain_copy(learner: ProtoNet) -> ProtoNet:
    """The same weights in NCHW with ReLU before max-pool."""
    other = ProtoNet(learner.options)
    other.load_state_dict(learner.state_dict())
    other.encoder.features = other.encoder.features.to(memory_format=torch.contiguous_format)
    for block in other.encoder.features:
        block[2], block[3] = block[3], block[2]  # ReLU, then MaxPool
    other.encoder.forward = lambda x: other.encoder.features(x.contiguous()).flatten(1)
    return other


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--root", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_omniglot("train", root=args.root)
    sampler = EpisodeSampler(data, ways=60, shots=args.shots, queries=5, seed=0)
    torch.manual_seed(0)
    ours = ProtoNet()
    plain = plain_copy(ours)
    batch = sampler.sample()
    # the same function: equal in float64 (float32 differs in summation order, ~1e-4 of a loss of 8)
    double = TaskBatch(batch.support_x.double(), batch.support_y, batch.query_x.double(), batch.query_y, batch.ways)
    a, b = ours.double().meta_loss(double).loss, plain.double().meta_loss(double).loss
    assert torch.allclose(a, b, rtol=1e-10), (a, b)
    ours.float(), plain.float()
    times = {"plain NCHW": [], "metakit channels-last": []}
    models = {"plain NCHW": plain, "metakit channels-last": ours}
    for _ in range(args.repeats + 2):
        for name, model in models.items():
            start = time.perf_counter()
            model.meta_loss(batch).loss.backward()
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v[2:]) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:>24}: median {v * 1000:.0f} ms per 60-way {args.shots}-shot step "
              f"({args.repeats} repeats, {args.threads} threads)")
    print(f"speed-up: {med['plain NCHW'] / med['metakit channels-last']:.2f}x")


if __name__ == "__main__":
    main()
