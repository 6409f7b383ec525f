"""Lake's within-alphabet 20-way one-shot error of several checkpoints, alone and as an ensemble.

    python benchmarks/lake_ensemble.py checkpoints/omniglot/protonet_lake_56px_5blocks.pt \
        checkpoints/omniglot/protonet_lake.pt --episodes 400

Every checkpoint sees the same episodes (the Lake sampler's draws do not depend on the image size,
checked here), each at its own image size; the ensemble sums the members' log-softmax outputs
(``learner.adapt``, so any classifier learner) and takes the arg-max. Error rate and its 95% CI
over episodes, as ``metakit eval --protocol lake-within-alphabet`` reports it. ``--test-shift N`` sets
every metric member's ``model.test_shift`` (test-time translations by up to N px at its own size).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import torch  # noqa: E402

import metakit  # noqa: E402
from metakit.data.lake import lake_sampler  # noqa: E402
from metakit.engine.evaluate import mean_ci95  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--episodes", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-root", help="data root (default $METAKIT_DATA or ~/.cache/metakit)")
    parser.add_argument("--test-shift", type=int, nargs="+", default=[0],
                        help="model.test_shift of each checkpoint (one value: all of them)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shifts = args.test_shift * len(args.checkpoints) if len(args.test_shift) == 1 else args.test_shift
    if len(shifts) != len(args.checkpoints):
        parser.error(f"--test-shift takes one value or one per checkpoint ({len(args.checkpoints)}), got {len(shifts)}")
    learners = [metakit.load(path, [f"model.test_shift={n}"] if n else None) for path, n in zip(args.checkpoints, shifts)]
    samplers = [lake_sampler(learner.config.data.image_size, root=args.data_root, ways=20, shots=1,
                             queries=1, seed=args.seed) for learner in learners]
    names = [Path(p).name for p in args.checkpoints] + ["ensemble (sum of log-softmax)"]
    correct: list[list[float]] = [[] for _ in names]
    for _ in range(args.episodes):
        batches = [sampler.sample() for sampler in samplers]
        y = batches[0].query_y[0]  # [20]
        assert all(torch.equal(b.query_y, batches[0].query_y) for b in batches), "the samplers drew different episodes"
        total = 0
        for i, (learner, b) in enumerate(zip(learners, batches)):
            logp = learner.adapt(b.support_x[0], b.support_y[0])(b.query_x[0]).log_softmax(-1)  # [20, 20]
            correct[i].append((logp.argmax(-1) == y).float().mean().item())
            total = total + logp
        correct[-1].append((total.argmax(-1) == y).float().mean().item())
    print(f"Lake within-alphabet 20-way 1-shot, {args.episodes} episodes (seed {args.seed}), test_shift {shifts}")
    print("| model | error % (95% CI) |\n|---|---|")
    for name, scores in zip(names, correct):
        mean, ci = mean_ci95(scores)
        print(f"| {name} | {100 * (1 - mean):.2f} ± {100 * ci:.2f} |")


if __name__ == "__main__":
    main()
