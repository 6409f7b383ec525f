"""Session 9's two changes to the batched MAML step, each measured against the step without it.

    python benchmarks/step_changes.py --pool stride --rounds 7

One second-order MAML meta-iteration (Conv4 64 filters, 5-way 1-shot 28x28 random images, 15 queries
per class, meta-batch 32, 1 inner step, 1 thread: ``benchmarks/speed.py``'s step and weights), three
ways, alternately in one process: as in session 8 (the support pass over the whole meta-batch in one
grouped call, ReLU out of place), with the support pass 8 tasks per call (``layout_for``), and with
in-place ReLU as well (the library now). Process CPU time, medians over the rounds after the first (a
warm-up), and each one's speed-up over session 8's. Run it through ``metakit``'s malloc setting, as
the ``metakit`` command does: ``--malloc kept`` (the default) sets glibc's thresholds and re-runs itself.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import metakit.algorithms.batched as batched  # noqa: E402
import metakit.algorithms.maml as maml_module  # noqa: E402
from metakit.algorithms import MAML  # noqa: E402
from metakit.engine.fit import meta_backward  # noqa: E402
from metakit.engine.malloc import MMAP_THRESHOLD, TRIM_THRESHOLD  # noqa: E402
from metakit.tasks import TaskBatch  # noqa: E402


def out_of_place_functional():
    """``torch.nn.functional`` with a ReLU that ignores ``inplace`` (session 8's step)."""
    f = types.SimpleNamespace(**{k: getattr(F, k) for k in dir(F) if not k.startswith("__")})
    f.relu = lambda x, inplace=False: F.relu(x)
    return f


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool", choices=["max", "stride"], default="stride")
    parser.add_argument("--rounds", type=int, default=7, help="rounds, the first untimed")
    parser.add_argument("--malloc", choices=["system", "kept"], default="kept")
    args = parser.parse_args()
    if args.malloc == "kept" and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD), MALLOC_TRIM_THRESHOLD_=str(TRIM_THRESHOLD))
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location("bench_speed", Path(__file__).resolve().parent / "speed.py")
    speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speed)
    state, _ = speed.task_state(0, pool=args.pool, meta_batch=32)
    learner = MAML(MAML.Options(hidden=64, pool=args.pool, inner_lr=state["inner_lr"]), ways=5)
    learner.model.load_state_dict(state["weights"])
    learner.train()
    batch = TaskBatch(state["support_x"], state["support_y"], state["query_x"], state["query_y"], ways=5)
    now = batched.layout_for
    before = {k: v for k, v in now(batch.query_x).items() if k != "support_chunk"}
    candidates = {"session 8's step": (lambda x: dict(before), out_of_place_functional()),
                  "support pass 8 tasks per call": (now, out_of_place_functional()),
                  "and in-place ReLU (the library)": (now, F)}
    times: dict[str, list[float]] = {k: [] for k in candidates}
    grads = {}
    try:
        for r in range(args.rounds):
            for name, (layout, functional) in candidates.items():
                maml_module.layout_for, batched.F = layout, functional
                learner.zero_grad(set_to_none=True)
                start = time.process_time()
                meta_backward(learner, batch, 0)
                if r:
                    times[name].append(time.process_time() - start)
                else:
                    grads[name] = torch.cat([p.grad.flatten() for p in learner.parameters()])
    finally:
        maml_module.layout_for, batched.F = now, F
    ref = next(iter(grads.values()))
    base = statistics.median(next(iter(times.values())))
    print(f"pool={args.pool}, malloc {args.malloc}, medians of {args.rounds - 1} rounds, process CPU time")
    print("| step | CPU s | speed-up | float32 meta-gradient vs session 8's |\n|---|---|---|---|")
    for name, t in times.items():
        diff = ((grads[name] - ref).abs().max() / ref.abs().max()).item()
        print(f"| {name} | {statistics.median(t):.3f} | {base / statistics.median(t):.3f}× | {diff:.1e} |")


if __name__ == "__main__":
    main()
