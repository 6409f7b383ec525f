"""Distributed meta-training on ``torch.distributed``, launched by ``torchrun``: one meta-batch, many processes.

    torchrun --nproc_per_node=4 -m metakit train configs/omniglot/maml_5w1s.yaml     # 4 processes here
    metakit train configs/omniglot/maml_5w1s.yaml --nproc 4                          # the same, launched for you

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`setup` sees them and joins the process group: NCCL with one GPU per process
(``cuda:LOCAL_RANK``) when CUDA is available, gloo on the CPU otherwise (``METAKIT_DIST_BACKEND``
overrides; ``METAKIT_DIST_TIMEOUT`` sets the collective timeout in seconds, torch's default otherwise).
Without those variables everything here is the single-process identity, so :func:`metakit.fit`
runs the same code either way.

One step, on ``W`` processes, for a meta-batch of ``B >= W`` tasks:

1. Every rank draws the *whole* meta-batch from the same seeded sampler (tensor indexing: about
   10 ms for 32 Omniglot tasks, cheap next to a MAML step on CPUs, not on GPUs) and keeps its
   contiguous slice, tasks ``B*r//W .. B*(r+1)//W - 1``. The slices are disjoint, their union is exactly the
   single-process meta-batch for the seed, and every rank's sampler is in the single-process
   state after the step, so a checkpoint holds the single-process state and a run resumes on any
   number of processes.
2. Each rank computes ``meta_loss`` (the mean over its ``n_r`` tasks) and its gradient.
3. One all-reduce (sum) of one flat buffer per step carries the gradients weighted by
   ``n_r / B``, so the sum is the single-process gradient of the mean over the ``B`` tasks
   (slices may be uneven), plus the logged metrics weighted the same way, and the BatchNorm
   running statistics (below). Every rank then takes the same optimizer step on the same
   gradient, so the weights, broadcast from rank 0 once at the start, stay equal on all ranks.

Why an explicit all-reduce and not ``DistributedDataParallel``: DDP reduces gradients from
hooks that fire as autograd accumulates into ``.grad`` during a ``forward`` of the wrapped
module. A meta-learner's loss is not one ``forward``: MAML calls ``torch.autograd.grad`` with
``create_graph=True`` inside its inner loop and runs the network through
``torch.func.functional_call``; DDP also broadcasts buffers at each forward and needs
``find_unused_parameters`` for learners (ANIL, Reptile) whose parameters are not all reached.
Reducing once, after ``backward`` has produced the full meta-gradient (second-order terms
included), is correct for every learner by construction and costs one collective per step (and
a 4-byte one that agrees on stopping); the overlap of communication with the backward pass that
DDP offers matters little for the small networks of meta-learning (``benchmarks/distributed.py``
measures both parts).

BatchNorm. Each task must see the statistics of its own examples only, as in one process: MAML's
loop adapts one task at a time, and ProtoNet embeds each task in its own encoder pass in training.
Running statistics (``track_running_stats``) are combined exactly: with momentum ``m`` a rank's
``u`` updates (``num_batches_tracked`` counts them) turn ``r0`` into
``q^u r0 + s_r`` (``q = 1 - m``), and the single-process value after all ranks' updates in task
order is ``q^U r0 + sum_r q^(a_r) s_r``, where ``a_r`` is the number of updates made by the tasks
after rank ``r``'s slice (every task of a meta-batch makes the same number of forward passes);
with ``momentum=None`` (cumulative average) the counts weight the means. Per-step sets
(``bn="per_step"``, ``[slots, C]`` with a counter per slot) combine row by row. Other floating buffers
are averaged with the task weights, integer ones add their increments.

Validation and ``metakit eval`` are sharded the same way: every rank draws the same seeded
episodes, scores a contiguous part, and one all-reduce assembles the per-episode scores, so the
mean and the 95% interval are those of one process.

Rank 0 alone reads and writes the run folder: it reads ``last.pt`` and broadcasts it (no shared
file system needed), and writes checkpoints (atomically, at step boundaries), ``metrics.jsonl``,
TensorBoard logs and the progress bar. A Ctrl-C or SIGTERM on any rank is agreed on by all
ranks through an all-reduce at the end of the step, so all stop after the same step and rank 0
writes ``last.pt`` for it. If a rank dies, ``torchrun`` stops the others; a rank blocked in a
collective with a dead peer raises :class:`DistributedError`; ``last.pt`` keeps the last
checkpoint, and the same command resumes from it.

Not exact across process counts: learners that draw from the global torch RNG inside
``meta_loss`` (Reptile's support minibatches, random augmentation) draw a different stream on
each rank; training is valid, but not the same numbers as one process.

``METAKIT_FAULT=RANK:STEP[:raise|kill]`` makes rank ``RANK`` raise an error (default) or kill itself
(SIGKILL) before step ``STEP``: a hook for the tests of failure and resume.
"""
from __future__ import annotations

import atexit
import datetime
import os
import re
import signal
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..config import ConfigError
from ..tasks import TaskBatch
from .evaluate import episode_scores, evaluate, summarize

ENV_BACKEND = "METAKIT_DIST_BACKEND"
ENV_TIMEOUT = "METAKIT_DIST_TIMEOUT"
ENV_FAULT = "METAKIT_FAULT"


class DistributedError(RuntimeError):
    """Another process of the job failed or cannot be reached."""


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (or set up by hand with the same variables)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def shard(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous part ``[lo, hi)`` of ``range(total)`` for ``rank``; parts differ by at most one."""
    return total * rank // world_size, total * (rank + 1) // world_size


@dataclass
class Context:
    """Where this process stands in the job; the defaults are a single process (every method the identity)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None  # None: not distributed

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---- collectives, with one clear error when a peer is gone
    def _collective(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RuntimeError as exc:  # gloo / NCCL / store errors when a peer died or hung
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            first = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". ")[0][:200]  # gloo: "[file.cc:537] Read error..."
            raise DistributedError(
                f"rank {self.rank} of {self.world_size}: lost contact with the other processes of the job "
                f"({first}); another process failed or was stopped, so this one stops too") from exc

    def check_meta_batch(self, meta_batch_size: int) -> None:
        if meta_batch_size < self.world_size:
            raise ConfigError(f"train.meta_batch_size = {meta_batch_size} is smaller than the {self.world_size} "
                              f"processes: each process needs at least one task; use train.meta_batch_size >= "
                              f"{self.world_size} or fewer processes")

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        self._collective(dist.broadcast_object_list, box, src=0)
        return box[0]

    def broadcast_module(self, module: nn.Module) -> None:
        """Rank 0's parameters and buffers on every rank."""
        if not self.distributed:
            return
        with torch.no_grad():
            for tensor in module.state_dict().values():
                self._collective(dist.broadcast, tensor, src=0)

    def barrier(self) -> None:
        if self.distributed:
            self._collective(dist.barrier)

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any rank."""
        if not self.distributed:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        self._collective(dist.all_reduce, t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    # ---- one training step
    def shard_batch(self, batch: TaskBatch) -> TaskBatch:
        """This rank's contiguous slice of the meta-batch, on its device."""
        if not self.distributed:
            return batch
        lo, hi = shard(batch.meta_batch_size, self.rank, self.world_size)
        return batch.tasks(lo, hi).to(self.device)

    def begin_step(self, learner: nn.Module, step: int) -> dict | None:
        """Before the step numbered ``step + 1``: the buffers as they are (to combine their updates)."""
        if not self.distributed:
            return None
        _maybe_fail(self.rank, step + 1)
        return {name: b.detach().clone() for name, b in learner.named_buffers()}

    def finish_step(self, learner: nn.Module, metrics: dict[str, float], meta_batch_size: int,
                    before: dict | None) -> dict[str, float]:
        """After ``backward``: the single-process gradient in every ``.grad``, the single-process
        BatchNorm running statistics in the buffers; returns the metrics of the whole meta-batch."""
        if not self.distributed:
            return metrics
        lo, hi = shard(meta_batch_size, self.rank, self.world_size)
        weight = (hi - lo) / meta_batch_size
        params = [p for p in learner.parameters() if p.requires_grad]
        dtype = params[0].dtype if params else torch.float32
        dev = self.device
        pieces = [(p.grad.detach().reshape(-1).to(dtype) * weight if p.grad is not None
                   else torch.zeros(p.numel(), dtype=dtype, device=dev)) for p in params]
        pieces.append(torch.tensor([float(p.grad is not None) for p in params], dtype=dtype, device=dev))
        keys = sorted(metrics)
        pieces.append(torch.tensor([metrics[k] * weight for k in keys], dtype=dtype, device=dev))
        plan = _buffer_plan(learner, before, hi - lo, meta_batch_size - hi, weight)
        pieces += [contribution.reshape(-1).to(dtype) for _, contribution, _ in plan]
        flat = torch.cat(pieces)
        self._collective(dist.all_reduce, flat)  # sum
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).to(p.dtype).clone()
            offset += n
        has_grad = flat[offset:offset + len(params)]
        offset += len(params)
        for p, h in zip(params, has_grad.tolist()):
            if h == 0:
                p.grad = None  # no task reached it: as in one process, the optimizer skips it
        reduced = dict(zip(keys, flat[offset:offset + len(keys)].tolist()))
        offset += len(keys)
        with torch.no_grad():
            for name, contribution, finish in plan:
                n = contribution.numel()
                total = flat[offset:offset + n].view_as(contribution).to(torch.float64)
                offset += n
                finish(total)
        return {k: reduced.get(k, v) for k, v in metrics.items()}

    # ---- evaluation
    def evaluate(self, learner: nn.Module, sampler, episodes: int, batch: int | None = None,
                 progress: bool = False, desc: str = "evaluating") -> dict:
        """:func:`~metakit.engine.evaluate.evaluate`, each rank scoring a contiguous part of the episodes."""
        if not self.distributed:
            return evaluate(learner, sampler, episodes, batch, progress, desc)
        lo, hi = shard(episodes, self.rank, self.world_size)
        part = episode_scores(learner, sampler, episodes, batch, progress and self.is_main, desc, part=(lo, hi))
        scores = torch.zeros(episodes, dtype=torch.float64, device=self.device)
        scores[lo:hi] = part.to(scores)
        self._collective(dist.all_reduce, scores)
        return summarize(scores.cpu(), getattr(sampler, "ways", None))


def _buffer_plan(learner: nn.Module, before: dict, tasks: int, tasks_after: int, weight: float):
    """``(name, contribution, finish)`` for each changed-or-not buffer: ``finish(summed contribution)``
    writes the single-process value of the buffer."""
    plan = []
    current = dict(learner.named_buffers())
    handled = set()
    for prefix, m in learner.named_modules():
        if not (isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None
                and m.num_batches_tracked is not None):
            continue
        dot = f"{prefix}." if prefix else ""
        names = [f"{dot}running_mean", f"{dot}running_var", f"{dot}num_batches_tracked"]
        handled.update(names)
        # One counter per set of statistics: a scalar, or [slots] for per-step sets (rows of [slots, C])
        c0 = before[names[2]].to(torch.float64)
        updates = m.num_batches_tracked.detach().to(torch.float64) - c0
        plan.append((names[2], updates.reshape(-1).clone(), _set_counter(m, c0)))
        for name, buf in ((names[0], m.running_mean), (names[1], m.running_var)):
            r0, r = before[name].to(torch.float64), buf.detach().to(torch.float64)
            if m.momentum is None:  # cumulative average: r = (c0 r0 + sum of batch statistics) / (c0 + u)
                plan.append((name, _rows(c0 + updates, r) * r - _rows(c0, r) * r0, _cumulative(buf, r0, c0, m)))
            else:
                q = 1.0 - m.momentum
                per_task = updates / tasks if tasks else torch.zeros_like(updates)
                plan.append((name, q ** _rows(per_task * tasks_after, r) * (r - q ** _rows(updates, r) * r0),
                             _exponential(buf, r0, q, m, c0)))
    for name, buf in current.items():
        if name in handled or name not in before:
            continue
        delta = buf.detach().to(torch.float64) - before[name].to(torch.float64)
        if buf.is_floating_point():  # averaged with the task weights
            plan.append((name, delta * weight, _add(buf, before[name])))
        else:  # counters: the increments add up
            plan.append((name, delta, _add(buf, before[name])))
    return plan


def _rows(counts: Tensor, stats: Tensor) -> Tensor:
    """Counters ``[]`` or ``[slots]`` shaped to multiply statistics ``[C]`` or ``[slots, C]`` row by row."""
    return counts.reshape(counts.shape + (1,) * (stats.dim() - counts.dim()))


def _set_counter(m: _BatchNorm, c0: Tensor):
    def finish(total: Tensor) -> None:
        m.num_batches_tracked.copy_((c0 + total.reshape(c0.shape)).round().to(m.num_batches_tracked.dtype))
    return finish


def _exponential(buf: Tensor, r0: Tensor, q: float, m: _BatchNorm, c0: Tensor):
    def finish(total: Tensor) -> None:
        updates = m.num_batches_tracked.to(torch.float64) - c0  # all ranks' (the counter is finished first)
        buf.copy_(total + q ** _rows(updates, r0) * r0)
    return finish


def _cumulative(buf: Tensor, r0: Tensor, c0: Tensor, m: _BatchNorm):
    def finish(total: Tensor) -> None:
        count = _rows(m.num_batches_tracked.to(torch.float64), r0)
        buf.copy_(torch.where(count > 0, (_rows(c0, r0) * r0 + total) / count.clamp(min=1), buf.to(torch.float64)))
    return finish


def _add(buf: Tensor, start: Tensor):
    def finish(total: Tensor) -> None:
        value = start.to(torch.float64) + total
        buf.copy_(value.round() if not buf.is_floating_point() else value)
    return finish


# ---- joining and leaving the job
_context: Context | None = None
_owned = False


def setup() -> Context:
    """This process's :class:`Context`: joins the process group when launched by ``torchrun``
    (once; later calls return the same context), or a single process otherwise."""
    global _context, _owned
    if _context is not None and (not _context.distributed or dist.is_initialized()):
        return _context
    if not (dist.is_available() and (dist.is_initialized() or launched())):
        return Context()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if dist.is_initialized():  # the caller's own process group
        backend = dist.get_backend()
    else:
        backend = os.environ.get(ENV_BACKEND) or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend not in ("gloo", "nccl"):
            raise ConfigError(f"{ENV_BACKEND}={backend!r}: use gloo (CPU) or nccl (GPU)")
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        kwargs = {}
        if os.environ.get(ENV_TIMEOUT):
            kwargs["timeout"] = datetime.timedelta(seconds=float(os.environ[ENV_TIMEOUT]))
        dist.init_process_group(backend, **kwargs)
        _owned = True
        atexit.register(shutdown)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    _context = Context(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)
    return _context


def shutdown() -> None:
    """Leave the process group this module joined (a caller's own group is left alone)."""
    global _context, _owned
    if _owned and dist.is_initialized():
        dist.destroy_process_group()
    _context, _owned = None, False


def _maybe_fail(rank: int, step: int) -> None:
    spec = os.environ.get(ENV_FAULT)
    if not spec:
        return
    parts = spec.split(":")
    if int(parts[0]) != rank or int(parts[1]) != step:
        return
    if (parts[2] if len(parts) > 2 else "raise") == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"fault injected by {ENV_FAULT}={spec}: rank {rank} fails before step {step}")


# ---- `metakit train --nproc N`
def launch(nproc: int, argv: list[str], run_dir) -> int:
    """Run ``python -m metakit <argv>`` in ``nproc`` processes on this machine through
    ``torch.distributed.run`` (torchrun), rendezvous on 127.0.0.1; returns the exit status."""
    import uuid
    from pathlib import Path

    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    last = Path(run_dir) / "last.pt"
    args = ["--nnodes", "1", "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d",
            "--rdzv-endpoint", "127.0.0.1:0", "--rdzv-id", uuid.uuid4().hex, "--local-addr", "127.0.0.1",
            "-m", "metakit", *argv]
    try:
        torchrun(args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        if failure.exitcode < 0:
            why = f"was killed by {failure.signal_name()}"
        else:
            why = f"exited with status {failure.exitcode}"
            if isinstance(failure.message, dict) and failure.message.get("message"):
                why += f" ({failure.message['message']})"
        print(f"metakit train: process {rank} of {nproc} {why}; the job stopped. {resume_hint(last)}",
              file=sys.stderr)
        return 1
    except SignalException as exc:
        print(f"metakit train: interrupted ({exc.sigval.name}). {resume_hint(last)}", file=sys.stderr)
        return 130
    return 0


def resume_hint(last) -> str:
    """Where the run stands, for a stopped job: the step of its last checkpoint and how to resume."""
    if not last.exists():
        return "No checkpoint was written yet; the same command starts afresh."
    from .checkpoint import CheckpointError, read

    try:
        state = read(last)
    except CheckpointError as exc:
        return str(exc)
    return (f"{last} holds the last checkpoint (step {state['step']} of {state['config']['train']['steps']}): "
            f"run the same command to resume.")
