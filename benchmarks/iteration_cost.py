"""Cost of one meta-training iteration of shipped configs, and what their full schedules take here.

    python benchmarks/iteration_cost.py configs/omniglot/maml_5w1s.yaml configs/omniglot/maml_20w1s.yaml ...

For each config: the engine's step (sample the meta-batch, ``meta_backward``, optimizer step) on one
thread, ``--warmup`` untimed iterations then ``--iterations`` timed ones; prints one JSON line with the
median *process CPU time* per iteration (on one thread it hardly depends on what else the shared machine
runs, unlike wall time) and ``train.steps`` times it, the single-core estimate of the full schedule;
also the minor page faults per iteration and the peak resident memory (see ``page_faults.py``).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch

from metakit.config import load_config
from metakit.engine.fit import Experiment, make_optimizer, meta_backward
from metakit.engine.malloc import keep_freed_memory


def cost(path: str, warmup: int, iterations: int, overrides: list[str] | None = None) -> dict:
    config = load_config(path, overrides or [])
    exp = Experiment(config, need_val=False)
    learner, sampler = exp.learner, exp.train_sampler()
    optimizer = make_optimizer(learner, config.train)
    learner.train()
    times, faults = [], 0
    for i in range(warmup + iterations):
        if i == warmup:
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.process_time()
        optimizer.zero_grad(set_to_none=True)
        meta_backward(learner, sampler.sample(), config.train.tasks_per_backward)  # as fit's step
        optimizer.step()
        if i >= warmup:
            times.append(time.process_time() - start)
    per_iteration = statistics.median(times)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) // iterations
    return {"config": path, **({"set": overrides} if overrides else {}), "algorithm": config.algorithm, "meta_batch": config.train.meta_batch_size,
            "cpu_s_per_iteration": round(per_iteration, 3), "minor_page_faults_per_iteration": faults,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, "steps": config.train.steps,
            "full_schedule_h": round(per_iteration * config.train.steps / 3600, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value in every config (repeatable), as metakit train --set")
    args = parser.parse_args()
    torch.set_num_threads(1)
    keep_freed_memory()  # as the metakit command does (METAKIT_MALLOC=system: glibc's defaults)
    for path in args.configs:
        print(json.dumps(cost(path, args.warmup, args.iterations, args.set)), flush=True)


if __name__ == "__main__":
    main()
