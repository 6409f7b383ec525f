"""The query pass's layout on CPU, measured: tasks per grouped call and memory format (``layout_for``).

    python benchmarks/query_layout.py --pool stride --rounds 4

One second-order MAML meta-iteration (Conv4 64 filters, 5-way 1-shot 28x28 random images, 15 queries
per class, meta-batch 32, 1 inner step, 1 thread) with each candidate layout of the query pass put in
place of :func:`metakit.algorithms.batched.layout_for`, interleaved in one process; process CPU time,
medians over the rounds after the first (a warm-up), and the ratio to the layout the library picks.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import torch  # noqa: E402

import metakit.algorithms.maml as maml_module  # noqa: E402
from metakit.algorithms import MAML  # noqa: E402
from metakit.algorithms.batched import layout_for  # noqa: E402
from metakit.engine.fit import meta_backward  # noqa: E402
from metakit.tasks import TaskBatch  # noqa: E402

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
    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location("bench_speed", Path(__file__).resolve().parent / "speed.py")
    speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speed)
    state, _ = speed.task_state(0, pool=args.pool, meta_batch=args.meta_batch)  # speed.py's weights and random tasks
    learner = MAML(MAML.Options(hidden=64, pool=args.pool, inner_lr=state["inner_lr"]), ways=5)
    learner.model.load_state_dict(state["weights"])
    learner.train()
    B = args.meta_batch
    batch = TaskBatch(state["support_x"], state["support_y"], state["query_x"], state["query_y"], ways=5)
    chosen = layout_for(batch.query_x)
    times: dict[str, list[float]] = {k: [] for k in CANDIDATES}
    try:
        for r in range(args.rounds):
            for name, layout in CANDIDATES.items():
                maml_module.layout_for = lambda x, layout=layout: dict(layout)
                learner.zero_grad(set_to_none=True)
                start = time.process_time()
                meta_backward(learner, batch, 0)
                if r:
                    times[name].append(time.process_time() - start)
    finally:
        maml_module.layout_for = layout_for
    base = statistics.median(next(t for k, t in times.items() if CANDIDATES[k] == chosen))
    print(f"pool={args.pool}, meta-batch {B}, medians of {args.rounds - 1} rounds; layout_for picks {chosen}")
    print("| query layout | CPU s | × the chosen |\n|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {statistics.median(t):.3f} | {statistics.median(t) / base:.2f}× |")


if __name__ == "__main__":
    main()
