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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import torch  # noqa: E402

from metakit.algorithms import MAML  # noqa: E402


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
        torch.manual_seed(args.seed)
        learner = MAML(MAML.Options(hidden=64, pool=pool), ways=5)
        g, B = torch.Generator().manual_seed(args.seed), args.tasks
        state = {"weights": {k: v.detach().clone() for k, v in learner.model.state_dict().items()},
                 "support_x": torch.rand(B, 5, 1, 28, 28, generator=g), "support_y": torch.arange(5).repeat(B, 1),
                 "query_x": torch.rand(B, 75, 1, 28, 28, generator=g),
                 "query_y": torch.arange(5).repeat_interleave(15).repeat(B, 1),
                 "ways": 5, "hidden": 64, "pool": pool, "inner_lr": 0.4}
        for first_order in (False, True):
            g32 = speed.build("plain", state, first_order)()
            g64 = speed.build("plain", speed.float64_subset(state, B), first_order)()
            error = speed.agreement({k: v.double() for k, v in g32.items()}, g64)
            print(f"| {pool} | {'first' if first_order else 'second'} | {error:.1e} |")


if __name__ == "__main__":
    main()
