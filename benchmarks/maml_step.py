"""What the step benchmarks share: ``benchmarks/speed.py``'s MAML meta-iteration, and candidates timed
alternately in one process.

The step: second-order MAML, Conv4 64 filters, 5-way 1-shot 28x28 random images, 15 queries per class,
1 inner step, speed.py's weights and tasks. Process CPU time per step, on 1 thread; the first round is
a warm-up and is not timed.
"""
from __future__ import annotations

import importlib.util
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import torch  # noqa: E402

from metakit.algorithms import MAML  # noqa: E402
from metakit.engine.fit import meta_backward  # noqa: E402
from metakit.tasks import TaskBatch  # noqa: E402


def maml_step(pool: str, meta_batch: int = 32) -> tuple[MAML, TaskBatch]:
    """speed.py's learner (in training mode) and meta-batch, on 1 thread."""
    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location("bench_speed", HERE / "speed.py")
    speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speed)
    state, _ = speed.task_state(0, pool=pool, meta_batch=meta_batch)
    learner = MAML(MAML.Options(hidden=64, pool=pool, inner_lr=state["inner_lr"]), ways=5)
    learner.model.load_state_dict(state["weights"])
    learner.train()
    return learner, TaskBatch(state["support_x"], state["support_y"], state["query_x"], state["query_y"], ways=5)


def time_alternately(learner: MAML, batch: TaskBatch, candidates: dict, install: Callable[[object], None],
                     restore: Callable[[], None], rounds: int) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Each round runs one step per candidate, ``install(candidate)`` before it; ``restore()`` at the end.
    Returns each candidate's median CPU seconds over rounds 2.. and its flat meta-gradient of round 1."""
    times: dict[str, list[float]] = {name: [] for name in candidates}
    grads = {}
    try:
        for r in range(rounds):
            for name, candidate in candidates.items():
                install(candidate)
                learner.zero_grad(set_to_none=True)
                start = time.process_time()
                meta_backward(learner, batch, 0)
                if r:
                    times[name].append(time.process_time() - start)
                else:
                    grads[name] = torch.cat([p.grad.flatten() for p in learner.parameters()])
    finally:
        restore()
    return {name: statistics.median(t) for name, t in times.items()}, grads
