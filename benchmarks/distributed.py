"""Distributed meta-training speed: 1 process x T threads against P processes x 1 thread (gloo, 127.0.0.1).

    python benchmarks/distributed.py --procs 2 --threads 2 --meta-batch 32 --steps 12
    python benchmarks/distributed.py --root ../shared/data     # Omniglot instead of random images

MAML 5-way 1-shot, second order, the max-pool Conv4 with 64 filters (configs/omniglot/maml_5w1s.yaml with
``model.pool=max``, ``model.adapt=all``: 1 support and
1 query per class, one inner step of 0.4, Adam). Each measured step is the engine's (see
``metakit.engine.fit``): sample the meta-batch, ``meta_loss`` on this process's share, backward, the
all-reduce of :mod:`metakit.engine.distributed`, the optimizer step. Prints, as one JSON line each:

- meta-iterations per second (median step time after ``--warmup`` steps) of both set-ups;
- the bytes all-reduced per step: computed (meta-parameters x 4 bytes) and measured (the sizes of the
  tensors handed to ``all_reduce`` in a step: the gradients plus a few flags and metrics);
- the time of the step's all-reduce as seen by rank 0 (includes waiting for the slower rank) and of a
  bare all-reduce of the same size after a barrier (the communication alone);
- the compute time per task, wall clock and CPU time (all threads; with 1 thread, the CPU time hardly
  depends on what else runs on the machine): the figure the scaling estimate of the README starts from.

Random images by default (the speed of a step does not depend on what the pixels show).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
from pathlib import Path

import torch


def config(args):
    from metakit.config import load_config

    root = args.root
    overrides = [f"train.meta_batch_size={args.meta_batch}", f"model.hidden={args.hidden}", "train.threads=0",
                 "model.pool=max", "model.adapt=all"]  # the max-pool Conv4 the results were measured with
    if root:
        overrides += [f"data.root={root}", "data.download=false"]
    return load_config(Path(__file__).parents[1] / "configs" / "omniglot" / "maml_5w1s.yaml", overrides)


def dataset(args, config):
    from metakit.data import ClassDataset, load_split

    if args.root:
        return load_split(config.data, "train", config.seed)
    g = torch.Generator().manual_seed(0)
    classes, per_class = 400, 20
    images = (torch.rand(classes * per_class, 1, 28, 28, generator=g) < 0.15).to(torch.uint8) * 255
    return ClassDataset(images, torch.arange(classes).repeat_interleave(per_class), [f"c{i}" for i in range(classes)],
                        name="random 28x28")


def measure(args, ctx) -> dict:
    """Median step time and all-reduce figures of ``args.steps`` engine steps on this process."""
    import torch.distributed as dist

    from metakit.data import EpisodeSampler
    from metakit.engine.checkpoint import build_from_config
    from metakit.engine.fit import make_optimizer

    cfg = config(args)
    data = dataset(args, cfg)
    t = cfg.train
    sampler = EpisodeSampler(data, t.ways, t.shots, t.queries, t.meta_batch_size, cfg.seed)
    torch.manual_seed(cfg.seed)
    learner = build_from_config(cfg).to(ctx.device).train()
    optimizer = make_optimizer(learner, t)
    ctx.broadcast_module(learner)
    sent = []
    if ctx.distributed:
        reduce = dist.all_reduce

        def counting(tensor, *a, **k):
            sent.append(tensor.numel() * tensor.element_size())
            return reduce(tensor, *a, **k)
        dist.all_reduce = counting
    steps, waits, compute, cpu = [], [], [], []
    for i in range(args.warmup + args.steps):
        sent.clear()
        start, start_cpu = time.perf_counter(), time.process_time()
        batch = sampler.sample()
        before = ctx.begin_step(learner, i)
        local = ctx.shard_batch(batch)
        out = learner.meta_loss(local)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        mid, mid_cpu = time.perf_counter(), time.process_time()
        ctx.finish_step(learner, out.metrics, batch.meta_batch_size, before)
        reduced = time.perf_counter()
        optimizer.step()
        if i >= args.warmup:
            steps.append(time.perf_counter() - start)
            waits.append(reduced - mid)
            compute.append((mid - start) / local.meta_batch_size)
            cpu.append((mid_cpu - start_cpu) / local.meta_batch_size)
    params = sum(p.numel() for p in learner.parameters() if p.requires_grad)
    result = {"step_s": statistics.median(steps), "iterations_per_s": 1 / statistics.median(steps),
              "compute_per_task_s": statistics.median(compute),
              "compute_per_task_cpu_s": statistics.median(cpu), "meta_parameters": params,
              "meta_parameter_bytes": params * 4}
    if ctx.distributed:
        dist.all_reduce = reduce
        result["allreduce_bytes_measured"] = sum(sent)
        result["step_allreduce_s"] = statistics.median(waits)
        buf = torch.zeros(sum(sent) // 4, device=ctx.device)
        bare = []
        for _ in range(args.steps + 3):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(buf)
            bare.append(time.perf_counter() - start)
        result["bare_allreduce_s"] = statistics.median(bare[3:])
    return result


def worker(rank: int, procs: int, port: int, args, queue) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(procs), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from metakit.engine import distributed

    ctx = distributed.setup()
    try:
        result = measure(args, ctx)
        if ctx.is_main:
            queue.put(result)
    finally:
        distributed.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, default=2, help="processes of 1 thread each")
    parser.add_argument("--threads", type=int, default=2, help="threads of the single process")
    parser.add_argument("--meta-batch", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--steps", type=int, default=12, help="measured steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--root", help="data root holding omniglot/ (default: random images)")
    args = parser.parse_args()

    from metakit.engine import distributed

    torch.set_num_threads(args.threads)
    one = measure(args, distributed.Context())
    single = f"1 process x {args.threads} thread{'s' if args.threads > 1 else ''}"
    print(json.dumps({"setup": single, "meta_batch": args.meta_batch, **one}))

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = torch.multiprocessing.get_context("spawn").SimpleQueue()
    torch.multiprocessing.start_processes(worker, args=(args.procs, port, args, queue), nprocs=args.procs,
                                          start_method="spawn")
    many = queue.get()
    print(json.dumps({"setup": f"{args.procs} processes x 1 thread", "meta_batch": args.meta_batch, **many}))
    print(f"speed-up of {args.procs} processes x 1 thread over {single}: "
          f"{many['iterations_per_s'] / one['iterations_per_s']:.2f}x; all-reduce of "
          f"{many['allreduce_bytes_measured'] / 1e3:.0f} kB per step ({one['meta_parameter_bytes'] / 1e3:.0f} kB of "
          f"meta-gradients): {1e3 * many['bare_allreduce_s']:.2f} ms bare, {1e3 * many['step_allreduce_s']:.2f} ms "
          f"in the step (waiting for the slower rank included), of a {1e3 * many['step_s']:.0f} ms step")


if __name__ == "__main__":
    main()
