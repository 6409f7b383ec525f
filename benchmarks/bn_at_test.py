"""Which passes of a test episode can take per-step running statistics (``bn="per_step"``) in place of the
episode's own batch statistics: the support passes of the inner loop, the query pass after it, both, or neither.

    python benchmarks/bn_at_test.py runs/omniglot/maml_5w1s_per_step --episodes 1000 --queries 1 --steps 1 3

A ``bn="per_step"`` learner normalises every pass of a test episode with the running statistics of its inner
step (MAML++, Antoniou et al. 2019); the MAML reference normalises every pass with the batch it is given. This
script evaluates the same weights and statistics the four ways (support passes x query pass), for each number
of test steps, on ``metakit eval``'s fixed episodes (seed 0): mean accuracy and 95% interval. Batch statistics
are read with momentum 0, so the evaluation leaves the running sets as they were.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import torch  # noqa: E402

from metakit.data import load_split, make_sampler  # noqa: E402
from metakit.engine import load  # noqa: E402
from metakit.engine.evaluate import evaluate  # noqa: E402
from metakit.nn import PerStepBatchNorm2d  # noqa: E402


def with_statistics(fn, layers: list[PerStepBatchNorm2d], batch: bool):
    """``fn`` with ``layers`` normalising by the batch's statistics (``batch``) or by their running sets."""
    def run(*args, **kwargs):
        for m in layers:
            m.train(batch)
        try:
            return fn(*args, **kwargs)
        finally:
            for m in layers:
                m.train(False)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a bn=per_step checkpoint or run folder")
    parser.add_argument("--episodes", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=None, help="per class (default: the checkpoint's eval.queries)")
    parser.add_argument("--steps", type=int, nargs="+", default=[1], help="inner steps at test")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.checkpoint}, {args.episodes} episodes (seed 0)")
    print("| inner steps at test | support passes | query pass | accuracy % |\n|---|---|---|---|")
    for steps in args.steps:
        for support in ("batch", "per-step"):
            for query in ("batch", "per-step"):
                learner = load(args.checkpoint, [f"model.inner_steps_test={steps}"])
                layers = [m for m in learner.modules() if isinstance(m, PerStepBatchNorm2d)]
                if not layers:
                    raise SystemExit(f"{args.checkpoint} has no per-step statistics (train it with model.bn=per_step)")
                for m in layers:
                    m.momentum = 0.0  # batch statistics without moving the sets
                learner.adapt_params = with_statistics(learner.adapt_params, layers, support == "batch")
                learner.outputs = with_statistics(learner.outputs, layers, query == "batch")
                c, e = learner.config, learner.config.eval
                queries = args.queries or e.queries
                sampler = make_sampler(c.data, load_split(c.data, c.data.test_split, c.seed), e.ways, e.shots,
                                       queries, 1, 0)
                r = evaluate(learner, sampler, args.episodes)
                print(f"| {steps} | {support} | {query} | {100 * r['accuracy']:.2f} ± {100 * r['ci95']:.2f} |",
                      flush=True)


if __name__ == "__main__":
    main()
