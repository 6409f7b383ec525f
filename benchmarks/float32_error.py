"""How far a correct float32 MAML meta-gradient lies from the float64 one, per network.

    python benchmarks/float32_error.py --tasks 8

The plain loop of ``benchmarks/speed.py`` (second and first order) run on the same weights and random
tasks in float32 and in float64; printed: max |g32 - g64| / max |g64| over all parameters (the
measure of the speed table). A difference here is the arithmetic's, not an implementation's: it
bounds how closely two correct float32 implementations can be expected to agree.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    spec = importlib.util.spec_from_file_location("bench_speed", HERE / "speed.py")
    speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speed)
    torch.set_num_threads(1)
    print("| network | order | float32 vs float64, plain loop |\n|---|---|---|")
    for pool in ("max", "stride"):
        # speed.py's weights and random tasks, as its table has them
        state, _ = speed.task_state(args.seed, pool=pool, meta_batch=args.tasks)
        for first_order in (False, True):
            g32 = speed.build("plain", state, first_order)()
            g64 = speed.build("plain", speed.float64_subset(state, args.tasks), first_order)()
            error = speed.agreement({k: v.double() for k, v in g32.items()}, g64)
            print(f"| {pool} | {'first' if first_order else 'second'} | {error:.1e} |")


if __name__ == "__main__":
    main()
