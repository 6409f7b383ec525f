"""Evaluate checkpoints on fixed test episodes and print a Markdown table of mean ± 95% CI.

    python benchmarks/eval_table.py checkpoints/omniglot/protonet_1shot.pt:5:1 \
        checkpoints/omniglot/protonet_1shot.pt:20:1 --episodes 1000 --paper 98.8 96.0

Each row is one ``metakit eval --json`` run (the exact command is printed under the table).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("specs", nargs="+", help="CHECKPOINT:WAYS:SHOTS")
    parser.add_argument("--episodes", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--paper", nargs="*", type=float, default=[], help="published accuracy per spec, in %")
    args = parser.parse_args()
    rows, commands = [], []
    for i, spec in enumerate(args.specs):
        checkpoint, ways, shots = spec.rsplit(":", 2)
        cmd = ["metakit", "eval", checkpoint, "--ways", ways, "--shots", shots, "--queries", str(args.queries),
               "--episodes", str(args.episodes), "--seed", str(args.seed), "--json"]
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "metakit", *cmd[1:]], capture_output=True, text=True)
        if out.returncode:
            print(out.stderr, file=sys.stderr)
            return out.returncode
        r = json.loads(out.stdout)
        took = time.perf_counter() - start
        paper = f"{args.paper[i]:.1f}" if i < len(args.paper) else "—"
        rows.append(f"| {r['algorithm']} | {checkpoint} | {ways}-way {shots}-shot | {r['episodes']} | "
                    f"{100 * r['accuracy']:.2f} ± {100 * r['ci95']:.2f} | {paper} | {took:.0f} s |")
        commands.append(" ".join(cmd))
        print(rows[-1], file=sys.stderr)
    print("| algorithm | checkpoint | test episodes | n | accuracy % (95% CI) | paper % | eval time |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("\nCommands:\n```\n" + "\n".join(commands) + "\n```")
    return 0


if __name__ == "__main__":
    sys.exit(main())
