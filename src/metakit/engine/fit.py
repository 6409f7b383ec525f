"""Meta-training of any learner that meets the contract: episodes in, ``meta_loss`` out, an optimizer step.

A run folder holds ``config.yaml``, ``metrics.jsonl`` (one JSON line per logged step and per
validation), ``last.pt`` (everything needed to resume: weights, optimizer, schedule, sampler
and RNG states) and ``best.pt`` (the weights with the best validation score). Checkpoints
are written atomically; starting the same command on a run folder that has ``last.pt``
resumes where it stopped and gives the same result as an uninterrupted run. Launched by
``torchrun``, the same loop runs on every process, each on its share of the meta-batch
(:mod:`.distributed`); rank 0 alone writes the run folder.
"""
from __future__ import annotations

import json
import signal
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..algorithms import Learner
from ..config import Config, dump_config, from_dict
from ..data import EpisodeError, check_episode, load_split, make_sampler
from ..tasks import TaskBatch
from . import checkpoint, distributed


@dataclass
class FitResult:
    learner: Learner
    run_dir: Path
    step: int
    best: dict | None
    elapsed: float


def meta_backward(learner: Learner, batch: TaskBatch, tasks_per_backward: int = 0) -> dict[str, float]:
    """``learner.meta_loss(batch).loss.backward()``, the meta-gradient into ``.grad``; returns the metrics.

    With ``tasks_per_backward = c`` (``0 < c < B``) the meta-batch goes in chunks of ``c`` tasks, each
    chunk's loss weighted by its share ``c / B`` and back-propagated before the next chunk is built:
    the meta-loss is the mean over tasks, so the gradient is the same sum, while only one chunk's
    graph (for second-order MAML, every inner step's activations of its tasks) is alive at a time.
    Metrics are the same task-weighted means."""
    B = batch.meta_batch_size
    if tasks_per_backward <= 0 or tasks_per_backward >= B:
        out = learner.meta_loss(batch)
        out.loss.backward()
        return out.metrics
    metrics: dict[str, float] = {}
    for lo in range(0, B, tasks_per_backward):
        part = batch.tasks(lo, min(lo + tasks_per_backward, B))
        share = part.meta_batch_size / B
        out = learner.meta_loss(part)
        (out.loss * share).backward()
        for key, value in out.metrics.items():
            metrics[key] = metrics.get(key, 0.0) + value * share
    return metrics


def check_ways(learner: Learner, ways: int | None, what: str = "eval.ways") -> None:
    """A learner with a fixed classifier head (the MAML family) takes tasks of its own number of ways only."""
    fixed = getattr(learner, "ways", None)
    if isinstance(fixed, int) and ways is not None and ways != fixed:
        raise EpisodeError(f"{what} = {ways}, but this {learner.name} learner has a {fixed}-way classifier head "
                           f"(train.ways); evaluate with {fixed} ways or train a {ways}-way model")


class Experiment:
    """The data, samplers and learner of a config, built once and checked before any work."""

    def __init__(self, config: Config, need_val: bool = True) -> None:
        self.config = config
        d, t, e = config.data, config.train, config.eval
        self.train_set = load_split(d, d.train_split, config.seed)
        self.val_set = load_split(d, d.val_split, config.seed) if need_val and t.val_every > 0 else None
        if self.train_set is not None:
            check_episode(self.train_set, t.ways, t.shots, t.queries, t.meta_batch_size)
            if t.within_alphabet:
                self.train_sampler()  # its alphabets must hold train.ways classes: say so before any work
        if self.val_set is not None:
            check_episode(self.val_set, e.ways, e.shots, e.queries)
        self.transform = self.train_set.transform if self.train_set is not None else {}
        torch.manual_seed(config.seed)
        self.learner = checkpoint.build_from_config(config)
        if self.val_set is not None or self.train_set is None:
            check_ways(self.learner, e.ways if self.train_set is not None else None)

    def train_sampler(self):
        t = self.config.train
        return make_sampler(self.config.data, self.train_set, t.ways, t.shots, t.queries, t.meta_batch_size,
                            self.config.seed, within_alphabet=t.within_alphabet)

    def val_sampler(self, seed: int = 0):
        e = self.config.eval
        return make_sampler(self.config.data, self.val_set, e.ways, e.shots, e.queries, 1, seed)


def make_optimizer(learner: Learner, t) -> torch.optim.Optimizer:
    params = [p for p in learner.parameters() if p.requires_grad]
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    raise ValueError(f"unknown optimizer {t.optimizer!r}; choose adam or sgd")


def make_scheduler(optimizer, t):
    """``step``: lr x lr_gamma every lr_step iterations (0: constant); ``linear``: lr x (1 - i / steps),
    Reptile's annealed outer step (Nichol et al. 2018, alg. 1 and appendix A)."""
    if t.lr_schedule == "linear":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: max(0.0, 1.0 - i / t.steps))
    if t.lr_schedule != "step":
        raise ValueError(f"unknown train.lr_schedule {t.lr_schedule!r}; choose step or linear")
    if t.lr_step > 0:
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=t.lr_step, gamma=t.lr_gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


class GracefulStop:
    """Turns Ctrl-C / SIGTERM into a flag checked between steps, so the checkpoint written on the
    way out is consistent (a second Ctrl-C stops at once, losing only the steps since the last one)."""

    def __init__(self, grace: float = 0.0) -> None:
        self.requested = False
        self._previous = {}
        self._grace = grace  # seconds after the first signal during which a second one is ignored
        self._first = 0.0

    def _handler(self, signum, frame):
        if self.requested and time.monotonic() - self._first >= self._grace:
            raise KeyboardInterrupt
        if not self.requested:
            self._first = time.monotonic()
        self.requested = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _trim_metrics(path: Path, step: int) -> None:
    """Drop lines logged after ``step`` (written after the checkpoint an interrupted run resumes from)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


def summary_writer(run_dir: Path):
    """A TensorBoard writer for ``run_dir/tensorboard``; tensorboard is optional, not a dependency."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ImportError("--tensorboard needs the optional tensorboard package: pip install tensorboard") from None
    return SummaryWriter(str(run_dir / "tensorboard"))


def warm_start(init: str | Path, learner: Learner, config: Config, scheduler, sampler,
               continue_schedule: bool = False) -> dict:
    """Start a new run from the weights of a checkpoint (``metakit train --init``): fine-tuning a
    shipped model, or carrying on with a run whose ``last.pt`` is gone.

    Only weights travel: the optimizer's moments start afresh, and BatchNorm running statistics the
    checkpoint lacks (weights trained with ``bn="batch"``) start fresh, named in ``init.json``. With
    ``continue_schedule`` the run starts at the checkpoint's step, the learning-rate schedule moved on to
    it, and the task sampler reseeded from (seed, step) so that it does not replay the episodes the
    checkpoint was trained on.
    Returns what ``init.json`` records.
    """
    state = checkpoint.read(init)
    fresh = checkpoint.load_weights(learner, state, init, config.algorithm, fresh_statistics=True)
    step = int(state.get("step") or 0) if continue_schedule else 0
    if step >= config.train.steps:
        raise checkpoint.CheckpointError(
            f"{init} was saved at step {step}, and train.steps is {config.train.steps}: nothing left to train "
            "(raise train.steps, or leave out --init-step to start its schedule afresh)")
    if step:
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": moving the schedule on
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(step):
                scheduler.step()
        sampler.generator.manual_seed(config.seed * 1_000_003 + step)  # every sampler draws from its generator
    started = {"checkpoint": str(init), "algorithm": state["config"].get("algorithm"),
               "checkpoint_step": state.get("step"), "start_step": step}
    if fresh:  # e.g. bn=batch weights into a model with per-step statistics
        started["fresh_statistics"] = fresh
    return started


def fit(config: Config, run_dir: str | Path, resume: bool = True, progress: bool = True,
        experiment: Experiment | None = None, tensorboard: bool = False, init: str | Path | None = None,
        init_step: bool = False) -> FitResult:
    """Meta-train ``config`` in ``run_dir``; resume from ``run_dir/last.pt`` when present.

    A run folder without ``last.pt`` starts from ``init``'s weights when given (:func:`warm_start`);
    once the run has a ``last.pt``, the same command resumes from it and ``init`` is not read again.
    With ``tensorboard``, every line of ``metrics.jsonl`` is also written as TensorBoard scalars.
    Under ``torchrun`` the processes share each meta-batch (:mod:`.distributed`).
    """
    run_dir = Path(run_dir)
    t = config.train
    if t.threads > 0:
        torch.set_num_threads(t.threads)
    ctx = distributed.setup()
    ctx.check_meta_batch(t.meta_batch_size)
    main = ctx.is_main
    exp = experiment or Experiment(config)
    learner = exp.learner.to(ctx.device)
    sampler = exp.train_sampler()
    optimizer = make_optimizer(learner, t)
    scheduler = make_scheduler(optimizer, t)
    trainable = [p for p in learner.parameters() if p.requires_grad]
    higher_is_better = exp.train_set is not None
    score_key = "accuracy" if higher_is_better else "mse"
    step, best, elapsed = 0, None, 0.0
    running = {"n": 0, "loss": 0.0, "score": 0.0, "tasks": 0, "time": 0.0}

    last = run_dir / "last.pt"
    # rank 0 reads the run folder and sends what it found to the others
    state = ctx.broadcast_object(checkpoint.read(last) if main and resume and last.exists() else None)
    if state is not None:
        saved = state["config"]
        try:  # through from_dict, so options added to metakit since the run started take their defaults
            saved = from_dict(saved).to_dict()
        except ValueError:  # ConfigError included: compared as stored
            pass
        if saved != config.to_dict():
            changed = sorted(f"{section}.{key}" for section, values in config.to_dict().items()
                             if isinstance(values, dict)
                             for key in values if (saved.get(section) or {}).get(key, object()) != values[key])
            raise checkpoint.CheckpointError(
                f"{run_dir} holds a run with another config"
                + (f" ({', '.join(changed[:3])} differ)" if changed else "")
                + "; use another --out folder, or the same config to resume")
        learner.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["rng"])
        step, best, elapsed, running = state["step"], state["best"], state["elapsed"], state["running"]
        if main:
            _trim_metrics(run_dir / "metrics.jsonl", step)
    else:
        if init is not None:  # every process reads it: the same weights, schedule and sampler
            started = warm_start(init, learner, config, scheduler, sampler, init_step)
            step = started["start_step"]
        if main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "metrics.jsonl").write_text("")
            if init is not None:
                (run_dir / "init.json").write_text(json.dumps(started, indent=1) + "\n")
    if main:
        (run_dir / "config.yaml").write_text(dump_config(config))
    ctx.broadcast_module(learner)  # the same weights everywhere, whatever each process built

    def save_last():
        if not main:
            return
        checkpoint.save(last, learner, config, exp.transform, step=step, best=best, elapsed=elapsed,
                        running=running, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                        sampler=sampler.state_dict(), rng=torch.get_rng_state())

    writer = summary_writer(run_dir) if tensorboard and main else None

    def log(record: dict):
        if not main:
            return
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if writer is not None:
            for key, value in record.items():
                if key != "step":
                    writer.add_scalar(key, value, record["step"])

    learner.train()
    bar = tqdm(total=t.steps, initial=step, desc=f"meta-training {config.algorithm}",
               disable=not (progress and main), dynamic_ncols=True)
    # several processes: the terminal's Ctrl-C and torchrun's forwarded one arrive together, count as one
    with GracefulStop(grace=2.0 if ctx.distributed else 0.0) as stop:
        while step < t.steps:
            start = time.perf_counter()
            batch = sampler.sample()  # the whole meta-batch, on every process
            before = ctx.begin_step(learner, step)
            optimizer.zero_grad(set_to_none=True)
            metrics = meta_backward(learner, ctx.shard_batch(batch), t.tasks_per_backward)  # this process's tasks
            metrics = ctx.finish_step(learner, metrics, batch.meta_batch_size, before)  # all-reduce
            if t.max_grad_norm > 0:  # on the averaged meta-gradient, so every process clips alike
                torch.nn.utils.clip_grad_norm_(trainable, t.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            took = time.perf_counter() - start
            elapsed += took
            running["n"] += 1
            running["loss"] += metrics["loss"]
            running["score"] += metrics.get(score_key, 0.0)
            running["tasks"] += batch.meta_batch_size
            running["time"] += took
            if (t.log_every and step % t.log_every == 0) or step == t.steps:
                n = running["n"]
                record = {"step": step, "loss": running["loss"] / n, score_key: running["score"] / n,
                          "lr": optimizer.param_groups[0]["lr"], "tasks_per_s": running["tasks"] / running["time"],
                          "elapsed_s": round(elapsed, 2)}
                log(record)
                bar.set_postfix({"loss": f"{record['loss']:.3f}", score_key[:3]: f"{record[score_key]:.3f}",
                                 "tasks/s": f"{record['tasks_per_s']:.1f}"})
                running = {"n": 0, "loss": 0.0, "score": 0.0, "tasks": 0, "time": 0.0}
            if exp.val_set is not None or (exp.train_set is None and t.val_every > 0):
                if step % t.val_every == 0 or step == t.steps:
                    result = ctx.evaluate(learner, exp.val_sampler(), t.val_episodes)
                    record = {"step": step, f"val_{score_key}": result[score_key], "val_ci95": result["ci95"]}
                    log(record)
                    better = best is None or (result[score_key] > best[score_key] if higher_is_better
                                              else result[score_key] < best[score_key])
                    if better:
                        best = {"step": step, score_key: result[score_key], "ci95": result["ci95"]}
                        if main:
                            checkpoint.save(run_dir / "best.pt", learner, config, exp.transform, step=step,
                                            best=best)
                    if main:
                        bar.write(f"step {step}: val {score_key} {result[score_key]:.4f} ± {result['ci95']:.4f}"
                                  f" (best {best[score_key]:.4f} at step {best['step']})")
            if (t.checkpoint_every and step % t.checkpoint_every == 0) or step == t.steps:
                save_last()
            bar.update(1)
            if ctx.any(stop.requested):  # every process stops after the same step
                save_last()
                bar.close()
                raise KeyboardInterrupt
    bar.close()
    if writer is not None:
        writer.close()
    if best is None and main:
        checkpoint.save(run_dir / "best.pt", learner, config, exp.transform, step=step, best=best)
    ctx.barrier()  # every process leaves once rank 0 has written the run folder
    return FitResult(learner, run_dir, step, best, elapsed)
