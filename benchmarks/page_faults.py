"""What ``metakit.engine.malloc`` (glibc keeping freed memory for reuse) saves per meta-iteration.

    python benchmarks/page_faults.py configs/omniglot/maml_5w1s.yaml --pairs 4

A meta-iteration allocates and frees activations of tens of MB; with glibc's defaults each is served
by ``mmap``, handed back by ``munmap`` and faulted in again, page by page, the next time (see
``metakit/engine/malloc.py``). This script runs ``iteration_cost.py`` for one config in fresh
processes, alternately with glibc's defaults (``METAKIT_MALLOC=system``) and with metakit's setting,
``--pairs`` times, and prints the median CPU time, minor page faults per iteration and peak resident
memory of each, and the median of the paired ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path


def measure(config: str, env: dict, warmup: int, iterations: int, overrides: list[str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).with_name("iteration_cost.py")), config,
           "--warmup", str(warmup), "--iterations", str(iterations)] + [a for kv in overrides for a in ("--set", kv)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    rows: dict[str, list[dict]] = {"glibc's defaults (METAKIT_MALLOC=system)": [], "metakit's (freed memory kept)": []}
    for _ in range(args.pairs):
        for name, value in zip(rows, ("system", "")):
            rows[name].append(measure(args.config, {**os.environ, "METAKIT_MALLOC": value}, args.warmup, args.iterations, args.set))
    print(f"{args.config}: {args.pairs} pairs of processes, {args.iterations} timed iterations each, 1 thread")
    print("| malloc | CPU s / iteration (median) | minor page faults / iteration (median) | peak RSS MB (median) |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {statistics.median(x['cpu_s_per_iteration'] for x in r):.3f} | "
              f"{statistics.median(x['minor_page_faults_per_iteration'] for x in r):,.0f} | "
              f"{statistics.median(x['peak_rss_mb'] for x in r):,.0f} |")
    ratios = [a["cpu_s_per_iteration"] / b["cpu_s_per_iteration"] for a, b in zip(*rows.values())]
    print(f"median paired CPU-time ratio, defaults / metakit's: {statistics.median(ratios):.3f} ({', '.join(f'{x:.3f}' for x in ratios)})")


if __name__ == "__main__":
    main()
