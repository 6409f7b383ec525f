"""The query pass's layout on CPU, measured: tasks per grouped call and memory format (``layout_for``).

    python benchmarks/query_layout.py --pool stride --rounds 4

One second-order MAML meta-iteration (Conv4 64 filters, 5-way 1-shot 28x28 random images, 15 queries
per class, meta-batch 32, 1 inner step, 1 thread) with each candidate layout of the query pass put in
place of :func:`metakit.algorithms.batched.layout_for`, interleaved in one process; process CPU time,
medians over the rounds after the first (a warm-up), and the ratio to the layout the library picks.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from maml_step import maml_step, time_alternately  # noqa: E402  (puts src/ on the path)

import metakit.algorithms.maml as maml_module  # noqa: E402
from metakit.algorithms.batched import layout_for  # noqa: E402

# the query pass's candidates; the support pass as the library has it (layout_for's support_chunk)
CANDIDATES = {"1 task, channels-last": {"query_chunk": 1, "channels_last": True},
              "1 task, NCHW": {"query_chunk": 1, "channels_last": False},
              "4 tasks, channels-last": {"query_chunk": 4, "channels_last": True},
              "4 tasks, NCHW": {"query_chunk": 4, "channels_last": False},
              "whole meta-batch, NCHW": {"query_chunk": None, "channels_last": False}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool", choices=["max", "stride"], default="max")
    parser.add_argument("--rounds", type=int, default=4, help="rounds, the first untimed")
    parser.add_argument("--meta-batch", type=int, default=32)
    args = parser.parse_args()
    learner, batch = maml_step(args.pool, args.meta_batch)
    chosen = layout_for(batch.query_x)
    support = {k: v for k, v in chosen.items() if k not in ("query_chunk", "channels_last")}
    candidates = {name: {**support, **layout} for name, layout in CANDIDATES.items()}

    def install(layout):
        maml_module.layout_for = lambda x: dict(layout)

    def restore():
        maml_module.layout_for = layout_for

    times, _ = time_alternately(learner, batch, candidates, install, restore, args.rounds)
    base = next(t for name, t in times.items() if candidates[name] == chosen)
    print(f"pool={args.pool}, meta-batch {args.meta_batch}, medians of {args.rounds - 1} rounds; "
          f"layout_for picks {chosen}")
    print("| query layout | CPU s | × the chosen |\n|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {t:.3f} | {t / base:.2f}× |")


if __name__ == "__main__":
    main()
