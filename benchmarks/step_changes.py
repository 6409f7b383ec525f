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
import os
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from maml_step import maml_step, time_alternately  # noqa: E402  (puts src/ on the path)

import torch.nn.functional as F  # noqa: E402

import metakit.algorithms.batched as batched  # noqa: E402
import metakit.algorithms.maml as maml_module  # noqa: E402
from metakit.engine.malloc import MMAP_THRESHOLD, TRIM_THRESHOLD  # noqa: E402


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
    parser.add_argument("--meta-batch", type=int, default=32)
    args = parser.parse_args()
    if args.malloc == "kept" and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD), MALLOC_TRIM_THRESHOLD_=str(TRIM_THRESHOLD))
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    learner, batch = maml_step(args.pool, args.meta_batch)
    now = batched.layout_for
    before = {k: v for k, v in now(batch.query_x).items() if k != "support_chunk"}
    candidates = {"session 8's step": (lambda x: dict(before), out_of_place_functional()),
                  "support pass 8 tasks per call": (now, out_of_place_functional()),
                  "and in-place ReLU (the library)": (now, F)}

    def install(candidate):
        maml_module.layout_for, batched.F = candidate

    def restore():
        maml_module.layout_for, batched.F = now, F

    times, grads = time_alternately(learner, batch, candidates, install, restore, args.rounds)
    ref = next(iter(grads.values()))
    base = next(iter(times.values()))
    print(f"pool={args.pool}, meta-batch {args.meta_batch}, malloc {args.malloc}, medians of {args.rounds - 1} rounds, process CPU time")
    print("| step | CPU s | speed-up | float32 meta-gradient vs session 8's |\n|---|---|---|---|")
    for name, t in times.items():
        diff = ((grads[name] - ref).abs().max() / ref.abs().max()).item()
        print(f"| {name} | {t:.3f} | {base / t:.3f}× | {diff:.1e} |")


if __name__ == "__main__":
    main()
