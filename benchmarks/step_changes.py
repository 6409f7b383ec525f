"""The changes to the batched MAML step since session 8, each measured against the step without it.

    python benchmarks/step_changes.py --pool stride --rounds 7

One second-order MAML meta-iteration (Conv4 64 filters, 5-way 1-shot 28x28 random images, 15 queries
per class, meta-batch 32, 1 inner step, 1 thread: ``benchmarks/speed.py``'s step and weights), five
ways, alternately in one process: as in session 8 (the support pass over the whole meta-batch in one
grouped call, ReLU out of place, every convolution with its bias), with the support pass 8 tasks per
call (``layout_for``, session 9), with in-place ReLU as well (session 9), and with the biases that
BatchNorm cancels left out (``cancelled_biases``, session 17), then with each task's query pass
back-propagated as soon as it has run (``query_grads_now``, session 18: the library now). Process CPU time,
medians over the rounds after the first (a warm-up), and each one's speed-up over session 8's and over
the step before it. Run it through ``metakit``'s malloc setting, as the ``metakit`` command does:
``--malloc kept`` (the default) sets glibc's thresholds and re-runs itself.
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
    now, followed_by_bn = batched.layout_for, batched._followed_by_bn
    at_end = (lambda x: {**now(x), "query_backward_now": False})  # one backward for the whole graph
    before = {k: v for k, v in at_end(batch.query_x).items() if k != "support_chunk"}
    every_bias = (lambda layers, i: False)  # every convolution keeps its bias
    candidates = {"session 8's step": (lambda x: dict(before), out_of_place_functional(), every_bias),
                  "support pass 8 tasks per call": (at_end, out_of_place_functional(), every_bias),
                  "and in-place ReLU": (at_end, F, every_bias),
                  "and no bias before BatchNorm": (at_end, F, followed_by_bn),
                  "and each task's query backward at once (the library)": (now, F, followed_by_bn)}

    def install(candidate):
        maml_module.layout_for, batched.F, batched._followed_by_bn = candidate

    def restore():
        maml_module.layout_for, batched.F, batched._followed_by_bn = now, F, followed_by_bn

    times, grads = time_alternately(learner, batch, candidates, install, restore, args.rounds)
    ref = next(iter(grads.values()))
    base = next(iter(times.values()))
    print(f"pool={args.pool}, meta-batch {args.meta_batch}, malloc {args.malloc}, medians of {args.rounds - 1} rounds, process CPU time")
    print("| step | CPU s | speed-up over session 8's | over the step before | float32 meta-gradient vs session 8's |")
    print("|---|---|---|---|---|")
    previous = base
    for name, t in times.items():
        diff = ((grads[name] - ref).abs().max() / ref.abs().max()).item()
        print(f"| {name} | {t:.3f} | {base / t:.3f}× | {previous / t:.3f}× | {diff:.1e} |")
        previous = t


if __name__ == "__main__":
    main()
