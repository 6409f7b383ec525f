"""Non-transductive MAML evaluation (``model.transductive=false``): the query outputs of an adapted task, each query
normalised with the support set, one forward pass per query against the grouped layout, ``chunk`` queries per pass.

    python benchmarks/each_with_support.py checkpoints/omniglot/maml_5w1s.pt --episodes 20 --chunks 1 4 8 16 32 75

For each of ``--episodes`` test episodes (seed 0, the checkpoint's eval setting): adapt once, then time every way of
computing the query outputs alternately, median over the episodes after the first; 1 thread. Prints the time per
episode's outputs and the largest difference from the per-query loop.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import torch  # noqa: E402

from metakit.algorithms.inner_loop import forward  # noqa: E402
from metakit.data import load_split, make_sampler  # noqa: E402
from metakit.engine import load  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    args = parser.parse_args()
    torch.set_num_threads(1)
    learner = load(args.checkpoint, ["model.transductive=false"])
    c, e = learner.config, learner.config.eval
    sampler = make_sampler(c.data, load_split(c.data, c.data.test_split, c.seed), e.ways, e.shots, e.queries, 1, 0)
    steps = learner.inner_steps(False)
    ways = {"one pass per query": None, **{f"{k} queries per pass": k for k in args.chunks}}
    times: dict[str, list[float]] = {name: [] for name in ways}
    worst = {name: 0.0 for name in ways}
    with torch.no_grad():
        for episode in range(args.episodes):
            b = sampler.sample(1)
            sx, sy, qx = b.support_x[0], b.support_y[0], b.query_x[0]
            params = learner.adapt_params(sx, sy, training=False, create_graph=False)
            ref = None
            for name, chunk in ways.items():
                start = time.perf_counter()
                if chunk is None:
                    out = torch.cat([forward(learner.model, params, torch.cat([sx, q[None]]), steps)[-1:] for q in qx])
                else:
                    out = learner.each_with_support(params, qx, sx, steps, chunk=chunk)
                if episode:
                    times[name].append(time.perf_counter() - start)
                ref = out if ref is None else ref
                worst[name] = max(worst[name], float((out - ref).abs().max()))
    loop = statistics.median(times["one pass per query"])
    print(f"{args.checkpoint}: {e.ways}-way {e.shots}-shot, {e.queries} queries per class, "
          f"medians over {args.episodes - 1} episodes, 1 thread")
    print("| query outputs | ms per episode | speed-up over one pass per query | max difference |\n|---|---|---|---|")
    for name in ways:
        t = statistics.median(times[name])
        print(f"| {name} | {1000 * t:.1f} | {loop / t:.2f}× | {worst[name]:.1e} |")


if __name__ == "__main__":
    main()
