"""One MAML meta-iteration, side by side: metakit (batched, loop), a plain loop, learn2learn, higher.

    python benchmarks/speed.py --threads 1 --repeats 7

The step (issue 3, "Speed, measured side by side"): Conv4 with 64 filters and BatchNorm on batch
statistics, 5-way 1-shot Omniglot shapes (28x28), meta-batch 32, 1 inner step (alpha = 0.4 on the
mean support cross-entropy), 15 queries per class; second order (MAML, Finn et al. 2017, eq. 1-3)
and first order (sec. 5.2). Implementations:

- ``metakit-batched`` (the default path, the one the ratios are to: each task's query pass is
  back-propagated as soon as it has run, so the graph that waits for ``backward`` holds the support
  passes only), ``metakit-one-backward`` (the same path as before session 18: one backward for the
  whole graph, every task's query activations held until then), ``metakit-chunked`` (the default,
  back-propagated every ``--chunk`` tasks as with ``train.tasks_per_backward``: one chunk's graph
  in memory at a time), ``metakit-recompute`` (the
  same with ``recompute_queries``: less memory, one more query forward pass), ``metakit-loop``
  (``batched=False``): :class:`metakit.algorithms.MAML`, whose ``meta_loss`` returns one loss for
  the whole meta-batch, so its graph holds every task until ``backward``;
- ``plain``: a Python loop over tasks with ``torch.autograd.grad``, written here (NCHW,
  ``torch.nn.functional``), one backward per task: the floor to beat;
- ``learn2learn`` (0.2.0) and ``higher`` (0.2.1), as their own MAML Omniglot examples use them (one
  backward per task), from their own virtual environment (default ``~/.cache/metakit/bench-venv``,
  never metakit's), which this script creates and fills when they are missing, the way
  ``shared/peers/INSTALL.md`` found to work (plus pillow, which torchvision needs to import);
  each is skipped with a message when it cannot be had (``--no-install``: never install).

Each implementation runs in its own process on the same weights and tasks. Every one is first
run in float64 on a few of the tasks and its meta-gradient compared with the plain loop's in
float64 (equal gradients agree to rounding, about 1e-14); the float32 meta-gradients on all tasks
are compared with metakit's too, for information (see the note the table ends with). The
processes then take turns, one meta-iteration each per round, so that the load of a shared
machine hits all alike, and the medians over rounds are printed: wall time and process CPU time
(on a busy machine the CPU time is the steadier), their ratios to ``metakit-batched``, and the
peak resident memory of each process (``VmHWM``) with its increase over the process after start-up.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_PEERS_VENV = Path(os.environ.get("METAKIT_BENCH_VENV", Path.home() / ".cache" / "metakit" / "bench-venv"))
TORCH = "2.13.0"

# ----------------------------------------------------------------------------------------------
# the peers' virtual environment (shared/peers/INSTALL.md)

TORCHVISION_SHIM = """
import torch
_tv_lib = torch.library.Library("torchvision", "DEF")
_tv_lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_tv_lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
"""


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _run(cmd: list, log, cwd=None, timeout=1800) -> bool:
    print("  $", " ".join(str(c) for c in cmd), file=log, flush=True)
    try:
        done = subprocess.run([str(c) for c in cmd], cwd=cwd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"  failed: {e}", file=log, flush=True)
        return False
    return done.returncode == 0


def peer_importable(venv: Path, peer: str) -> bool:
    py = venv_python(venv)
    if not py.exists():
        return False
    code = (TORCHVISION_SHIM if peer == "learn2learn" else "") + f"import {peer}"
    return subprocess.run([str(py), "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0


def install_peers(venv: Path, log_path: Path) -> dict[str, str]:
    """Create ``venv`` (never the project's) and install learn2learn 0.2.0 and higher 0.2.1 into it,
    the way ``shared/peers/INSTALL.md`` found to work. Returns ``{peer: "ok" | reason}``."""
    status = {}
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        py = venv_python(venv)
        if not py.exists() and not _run([sys.executable, "-m", "venv", venv], log):
            return {p: f"could not create {venv} (see {log_path})" for p in ("learn2learn", "higher")}
        pip = [py, "-m", "pip", "install", "--disable-pip-version-check"]
        if not _run(pip + [f"torch=={TORCH}", "cython", "numpy"], log):
            return {p: f"could not install torch=={TORCH} into {venv} (see {log_path})" for p in ("learn2learn", "higher")}
        # higher: pure Python, imports and runs as is
        if peer_importable(venv, "higher"):
            status["higher"] = "ok"
        else:
            ok = _run(pip + ["--no-deps", "higher==0.2.1"], log)
            status["higher"] = "ok" if ok and peer_importable(venv, "higher") else f"pip install higher failed (see {log_path})"
        if peer_importable(venv, "learn2learn"):
            status["learn2learn"] = "ok"
            return status
        # learn2learn: its sdist's C files were generated by an old Cython (they include longintrepr.h,
        # gone in Python 3.11): regenerate them, then build without isolation against our torch.
        with tempfile.TemporaryDirectory(prefix="l2l-") as tmp:
            tmp = Path(tmp)
            steps_ok = (_run([py, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "learn2learn==0.2.0",
                              "-d", tmp], log)
                        and _run(pip + ["--no-deps", "torchvision==0.28.0"], log)
                        and _run(pip + ["requests", "tqdm", "scipy", "gym", "pillow"], log))
            if steps_ok:
                archives = list(tmp.glob("learn2learn-0.2.0*.tar.gz"))
                if not archives:
                    steps_ok = False
                else:
                    with tarfile.open(archives[0]) as tf:
                        tf.extractall(tmp, filter="data")
                    src = tmp / "learn2learn-0.2.0"
                    cython = venv / "bin" / "cython"
                    for pyx in ("meta_dataset.pyx", "task_dataset.pyx", "transforms.pyx"):
                        steps_ok = steps_ok and _run([cython, "-3", src / "learn2learn" / "data" / pyx], log)
                    steps_ok = steps_ok and _run(pip + ["--no-deps", "--no-build-isolation", "."], log, cwd=src)
            status["learn2learn"] = ("ok" if steps_ok and peer_importable(venv, "learn2learn")
                                     else f"install failed (see {log_path})")
    return status


# ----------------------------------------------------------------------------------------------
# the implementations, each built in its own process from the same weights and tasks

IMPLS = ("metakit-batched", "metakit-one-backward", "metakit-chunked", "metakit-recompute", "metakit-loop", "plain",
         "learn2learn", "higher")
PEERS = ("learn2learn", "higher")
OURS = "metakit-batched"  # metakit's default path: the ratios are to it


def peer_model(state):
    """The same Conv4 as metakit's, the usual way round (conv -> BN -> ReLU -> max-pool, NCHW; or, with
    ``pool="stride"``, stride-2 conv -> BN -> ReLU and the mean over the last map), with metakit's
    parameter names so the weights load as they are: ``[M, 1, 28, 28] -> [M, ways]``."""
    from collections import OrderedDict

    from torch import nn

    class SpatialMean(nn.Module):  # [M, C, H, W] -> [M, C]
        def forward(self, x):
            return x.mean((2, 3))

    hidden, ways, strided = state["hidden"], state["ways"], state.get("pool", "max") == "stride"
    blocks = [nn.Sequential(OrderedDict([("0", nn.Conv2d(1 if i == 0 else hidden, hidden, 3, padding=1,
                                                         stride=2 if strided else 1)),
                                         ("1", nn.BatchNorm2d(hidden, track_running_stats=False)),
                                         ("relu", nn.ReLU())] + ([] if strided else [("pool", nn.MaxPool2d(2))])))
              for i in range(4)]
    model = nn.Sequential(OrderedDict([("features", nn.Sequential(*blocks)),
                                       ("flatten", SpatialMean() if strided else nn.Flatten()),
                                       ("head", nn.Linear(hidden, ways))]))
    model.to(next(iter(state["weights"].values())).dtype).load_state_dict(state["weights"])
    return model


def build(impl: str, state: dict, first_order: bool, chunk: int = 8):
    """``step()``: one meta-iteration (meta-gradients into ``.grad`` or returned); returns ``{name: grad}``."""
    import torch
    import torch.nn.functional as F
    sx, sy, qx, qy = state["support_x"], state["support_y"], state["query_x"], state["query_y"]
    B, lr = sx.shape[0], state["inner_lr"]

    if impl.startswith("metakit"):
        sys.path.insert(0, str(ROOT / "src"))
        from metakit.algorithms import MAML
        from metakit.engine.fit import meta_backward
        from metakit.tasks import TaskBatch
        import contextlib
        from unittest import mock

        import metakit.algorithms.maml as maml_module
        layout = maml_module.layout_for
        one_backward = (mock.patch.object(maml_module, "layout_for", lambda x: {**layout(x), "query_backward_now": False})
                        if impl == "metakit-one-backward" else contextlib.nullcontext())  # the query passes wait
        learner = MAML(MAML.Options(hidden=state["hidden"], pool=state.get("pool", "max"), inner_lr=lr,
                                    first_order=first_order,
                                    batched=impl != "metakit-loop", recompute_queries=impl == "metakit-recompute"),
                       ways=state["ways"])
        learner.to(next(iter(state["weights"].values())).dtype).model.load_state_dict(state["weights"])
        learner.train()
        batch = TaskBatch(sx, sy, qx, qy, ways=state["ways"])

        tasks_per_backward = chunk if impl == "metakit-chunked" else 0

        def step():  # as the engine's training step
            learner.zero_grad(set_to_none=True)
            with one_backward:
                meta_backward(learner, batch, tasks_per_backward)
            return {k: p.grad for k, p in learner.model.named_parameters()}
        return step

    if impl == "plain":
        params = {k: v.clone().requires_grad_() for k, v in state["weights"].items()}

        strided = state.get("pool", "max") == "stride"

        def net(p, x):  # [M, 1, 28, 28] -> [M, ways]
            for i in range(4):
                x = F.conv2d(x, p[f"features.{i}.0.weight"], p[f"features.{i}.0.bias"], padding=1,
                             stride=2 if strided else 1)
                x = F.batch_norm(x, None, None, p[f"features.{i}.1.weight"], p[f"features.{i}.1.bias"], training=True)
                x = F.relu(x) if strided else F.max_pool2d(F.relu(x), 2)
            x = x.mean((2, 3)) if strided else x.flatten(1)
            return F.linear(x, p["head.weight"], p["head.bias"])

        def step():
            total = {k: torch.zeros_like(v) for k, v in params.items()}
            for i in range(B):
                loss = F.cross_entropy(net(params, sx[i]), sy[i])
                grads = torch.autograd.grad(loss, list(params.values()), create_graph=not first_order)
                fast = {k: v - lr * g for (k, v), g in zip(params.items(), grads)}
                query = F.cross_entropy(net(fast, qx[i]), qy[i]) / B
                for k, g in zip(params, torch.autograd.grad(query, list(params.values()))):
                    total[k] += g
            return total
        return step

    if impl == "learn2learn":
        if not _KEEP:
            exec(TORCHVISION_SHIM, _KEEP)  # the schemas live as long as the Library object in _KEEP
        import learn2learn as l2l
        model = peer_model(state)
        maml = l2l.algorithms.MAML(model, lr=lr, first_order=first_order)

        def step():  # as learn2learn's own MAML Omniglot example: one backward per task
            maml.zero_grad(set_to_none=True)
            for i in range(B):
                learner = maml.clone()
                learner.adapt(F.cross_entropy(learner(sx[i]), sy[i]))
                (F.cross_entropy(learner(qx[i]), qy[i]) / B).backward()
            return {k: p.grad for k, p in model.named_parameters()}
        return step

    if impl == "higher":
        import higher
        model = peer_model(state)
        inner = torch.optim.SGD(model.parameters(), lr=lr)
        detach = (lambda grads: [g.detach() for g in grads]) if first_order else None

        def step():  # as higher's MAML Omniglot example: one backward per task
            model.zero_grad(set_to_none=True)
            for i in range(B):
                with higher.innerloop_ctx(model, inner, copy_initial_weights=False) as (fmodel, diffopt):
                    diffopt.step(F.cross_entropy(fmodel(sx[i]), sy[i]), grad_callback=detach)
                    (F.cross_entropy(fmodel(qx[i]), qy[i]) / B).backward()
            return {k: p.grad for k, p in model.named_parameters()}
        return step
    raise ValueError(impl)


_KEEP: dict = {}


def maxrss_mb() -> float:
    """Peak resident memory of this process's address space, MB: ``VmHWM`` (Linux). Not
    ``ru_maxrss``, which Linux carries across ``exec`` from the parent that spawned us."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; macOS: bytes (overstated)


ELEMENTWISE = {"mul", "add", "sub", "div", "neg", "pow", "sqrt", "rsqrt", "exp", "log", "where", "addcmul", "addcdiv",
               "clamp_min", "relu", "threshold_backward", "sign", "reciprocal", "square"}
FAMILIES = ("convolution forward", "convolution backward", "batch norm kernels", "elementwise",
            "other aten ops", "outside aten")


def op_family(name: str) -> str:
    """The family of a profiled op by its name (see ``FAMILIES``)."""
    if not name.startswith("aten::"):
        return "outside aten"  # the autograd engine's own bookkeeping, Python
    op = name[len("aten::"):].rstrip("_")
    if op == "convolution_backward":
        return "convolution backward"
    if "conv" in op:
        return "convolution forward"
    if "batch_norm" in op:
        return "batch norm kernels"
    return "elementwise" if op in ELEMENTWISE else "other aten ops"


def profile_step(step) -> dict:
    """Shares of one ``step()``'s CPU time by op family (self time of each op, ``torch.profiler``), and the
    share spent inside BatchNorm's double backward (the support pass of second order; inclusive)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    shares = {f: 0.0 for f in FAMILIES}
    for e in events:
        shares[op_family(e.key)] += e.self_cpu_time_total / total
    shares["BatchNorm double backward"] = sum(e.cpu_time_total for e in events
                                              if e.key.startswith("NativeBatchNormBackwardBackward")) / total
    return shares


def worker(args) -> None:
    """Build one implementation, write its meta-gradient, then time one meta-iteration per ``run`` line."""
    import torch
    torch.set_num_threads(args.threads)
    state = torch.load(args.state)
    step = build(args.worker, state, args.order == "first", args.chunk)
    rss_before = maxrss_mb()
    grads = step()  # also the warm-up
    torch.save({k: g.detach().clone() for k, g in grads.items()}, args.grads)
    print(json.dumps({"ready": True, "rss_before_mb": rss_before}), flush=True)
    for line in sys.stdin:
        if line.strip() == "run":
            wall, cpu = time.perf_counter(), time.process_time()
            step()
            print(json.dumps({"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}), flush=True)
        else:
            print(json.dumps({"maxrss_mb": maxrss_mb()}), flush=True)
            break
    if args.profile:  # after the memory reading, so the profiler's own memory is not counted
        print(json.dumps({"profile": profile_step(step)}), flush=True)
    if args.check_tasks:  # after the memory reading: the same code in float64 on the first tasks
        del step, grads
        grads = build(args.worker, float64_subset(state, args.check_tasks), args.order == "first",
                      max(1, args.chunk * args.check_tasks // args.meta_batch))()  # chunks there too
        torch.save({k: g.detach().clone() for k, g in grads.items()}, args.grads + ".float64")
        print(json.dumps({"checked": True}), flush=True)


def float64_subset(state: dict, tasks: int) -> dict:
    """``state`` in float64, its first ``tasks`` tasks only."""
    import torch
    out = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in state.items()}
    for k in ("support_x", "support_y", "query_x", "query_y"):
        out[k] = out[k][:tasks]
    out["weights"] = {k: v.double() for k, v in state["weights"].items()}
    return out


# ----------------------------------------------------------------------------------------------
# the driver

def task_state(seed: int = 0, hidden: int = 64, pool: str = "max", ways: int = 5, shots: int = 1, queries: int = 15,
               meta_batch: int = 32, data: str = "random", root=None) -> tuple[dict, str]:
    """Weights (metakit's Conv4 initialisation, seeded) and one meta-batch, as the dict every implementation
    reads; also where the tasks came from (Omniglot's train split unless ``data`` is "random" or it is missing)."""
    sys.path.insert(0, str(ROOT / "src"))
    import torch
    from metakit.algorithms import MAML
    torch.manual_seed(seed)
    learner = MAML(MAML.Options(hidden=hidden, pool=pool), ways=ways)
    source = "random images"
    batch = None
    if data != "random":
        try:
            from metakit.data import EpisodeSampler, load_omniglot
            omniglot = load_omniglot("train", root=root, download=False)
            batch = EpisodeSampler(omniglot, ways=ways, shots=shots, queries=queries,
                                   meta_batch_size=meta_batch, seed=seed).sample()
            source = "Omniglot (Vinyals train split)"
        except Exception as e:  # no data here: the shapes are what matters for speed
            print(f"Omniglot not available ({str(e).splitlines()[0][:120]}); using random images")
    if batch is None:
        from metakit.tasks import TaskBatch
        g = torch.Generator().manual_seed(seed)
        B, N = meta_batch, ways
        batch = TaskBatch(torch.rand(B, N * shots, 1, 28, 28, generator=g),
                          torch.arange(N).repeat_interleave(shots).repeat(B, 1),
                          torch.rand(B, N * queries, 1, 28, 28, generator=g),
                          torch.arange(N).repeat_interleave(queries).repeat(B, 1), ways=N)
    state = {"weights": {k: v.detach().clone().contiguous() for k, v in learner.model.state_dict().items()},
             "support_x": batch.support_x.contiguous(), "support_y": batch.support_y,
             "query_x": batch.query_x.contiguous(), "query_y": batch.query_y, "ways": ways,
             "hidden": hidden, "pool": pool, "inner_lr": 0.4}
    return state, source


def make_state(args, path: Path) -> str:
    """:func:`task_state` for the command line's ``args``, saved at ``path`` for the worker processes."""
    import torch
    state, source = task_state(args.seed, args.hidden, args.pool, args.ways, args.shots, args.queries,
                               args.meta_batch, args.data, args.root)
    torch.save(state, path)
    return source


class Worker:
    def __init__(self, impl: str, python: Path, args, state: Path, tmp: Path) -> None:
        self.impl, self.grads = impl, tmp / f"{impl}-{args.order}.grads.pt"
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        if args.malloc == "kept":  # metakit's setting (metakit.engine.malloc), given to every implementation alike
            from metakit.engine.malloc import MMAP_THRESHOLD, TRIM_THRESHOLD
            env.update(MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD), MALLOC_TRIM_THRESHOLD_=str(TRIM_THRESHOLD))
        self.stderr = tmp / f"{impl}-{args.order}.stderr"
        self.proc = subprocess.Popen([str(python), str(Path(__file__).resolve()), "--worker", impl, "--order", args.order,
                                      "--state", str(state), "--grads", str(self.grads), "--threads", str(args.threads),
                                      "--check-tasks", str(args.check_tasks), "--chunk", str(args.chunk),
                                      "--meta-batch", str(args.meta_batch)] + (["--profile"] if args.profile else []),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(self.stderr, "w"), text=True,
                                     env=env, cwd=str(ROOT))
        self.times: list[dict] = []
        self.info: dict = {}
        self.error: str | None = None

    def ask(self, line: str) -> dict | None:
        if self.error:
            return None
        try:
            if line:
                self.proc.stdin.write(line + "\n")
                self.proc.stdin.flush()
            out = self.proc.stdout.readline()
            while out and not out.startswith("{"):  # a library's own print
                out = self.proc.stdout.readline()
            if not out:
                raise RuntimeError(self.stderr.read_text()[-2000:] or "the process ended")
            return json.loads(out)
        except Exception as e:  # the worker died: say why, keep the others going
            self.error = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            return None


def agreement(grads, reference) -> float:
    """max |g - g_ref| / max |g_ref| over every parameter (one scale for all: conv biases before
    BatchNorm have a zero meta-gradient, so a per-tensor ratio would divide rounding by rounding)."""
    scale = max(r.abs().max().item() for r in reference.values())
    return max((grads[k] - reference[k]).abs().max().item() for k in reference) / scale


def float64_reference(state_path: Path, first_order: bool, tasks: int) -> dict:
    """The meta-gradient of the plain loop in float64 on the first ``tasks`` tasks."""
    import torch
    return build("plain", float64_subset(torch.load(state_path), tasks), first_order)()


def run_order(args, impls: list[str], pythons: dict, state: Path, tmp: Path) -> list[dict]:
    import torch
    exact = float64_reference(state, args.order == "first", args.check_tasks) if args.check_tasks else None
    workers = [Worker(i, pythons[i], args, state, tmp) for i in impls]
    for w in workers:
        w.info = w.ask("") or {}
    reference = torch.load(next(w.grads for w in workers if w.impl == OURS and not w.error)) \
        if any(w.impl == OURS and not w.error for w in workers) else None
    for r in range(args.repeats + args.warmup):
        order = workers[r % len(workers):] + workers[:r % len(workers)]  # rotate who goes first
        for w in order:
            t = w.ask("run")
            if t and r >= args.warmup:
                w.times.append(t)
        print(f"  [{args.order} order] round {r + 1}/{args.repeats + args.warmup} done", flush=True)
    rows = []
    for w in workers:
        end = w.ask("quit") or {}
        shares = (w.ask("") or {}).get("profile") if args.profile else None
        checked = (w.ask("") or {}).get("checked") if args.check_tasks else None
        w.proc.wait(timeout=600)
        row = {"impl": w.impl, "order": args.order, "error": w.error}
        if not w.error and w.times:
            row.update(wall=statistics.median(t["wall"] for t in w.times), cpu=statistics.median(t["cpu"] for t in w.times),
                       maxrss_mb=end.get("maxrss_mb"), rss_before_mb=w.info.get("rss_before_mb"),
                       grad_agreement=agreement(torch.load(w.grads), reference) if reference is not None else None,
                       grad_error=agreement(torch.load(str(w.grads) + ".float64"), exact) if checked else None,
                       profile=shares)
        rows.append(row)
    return rows


def report(rows: list[dict], args, source: str, skipped: dict) -> str:
    net = "max-pool" if args.pool == "max" else "stride-2 convolutions, mean over the last map"
    lines = [f"MAML meta-iteration, Conv4 {args.hidden} filters ({net}) + BatchNorm (batch statistics), {args.ways}-way "
             f"{args.shots}-shot 28x28 ({source}), {args.queries} queries per class, meta-batch {args.meta_batch}, "
             f"1 inner step; {args.threads} thread(s); malloc: {args.malloc}; medians of {args.repeats} interleaved rounds.", "",
             "| order | implementation | wall s | CPU s | wall / ours | CPU / ours | peak RSS MB (+ over start) "
             f"| float64 meta-gradient vs reference "
             f"({f'{min(args.check_tasks, args.meta_batch)} tasks' if args.check_tasks else 'not run'}) "
             "| float32 vs ours (all tasks) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for order in args.orders:
        ours = next((r for r in rows if r["order"] == order and r["impl"] == OURS and "cpu" in r), None)
        for r in (r for r in rows if r["order"] == order):
            if "cpu" not in r:
                lines.append(f"| {order} | {r['impl']} | failed: {r['error']} | | | | | | |")
                continue
            ratio = (lambda k: f"{r[k] / ours[k]:.2f}x" if ours else "-")
            agree = " | ".join("-" if r[k] is None else f"{r[k]:.1e}" for k in ("grad_error", "grad_agreement"))
            lines.append(f"| {order} | {r['impl']} | {r['wall']:.2f} | {r['cpu']:.2f} | {ratio('wall')} | {ratio('cpu')} "
                         f"| {r['maxrss_mb']:.0f} (+{r['maxrss_mb'] - r['rss_before_mb']:.0f}) | {agree} |")
    lines.append("\nMeta-gradients: max |g - g_ref| / max |g_ref| over all parameters, on the same weights and "
                 "tasks. float64: each implementation run in float64, against the plain loop in float64: equal "
                 "gradients show as rounding (1e-12 and below). float32: informative only; a max-pool window "
                 "whose two largest values lie within float32 rounding of each other sends the gradient to one or "
                 "the other depending on summation order, so float32 meta-gradients of correct implementations "
                 "differ by up to 1e-3..1e-1 on some tasks (seen between the plain loop and learn2learn too).")
    profiled = [r for r in rows if r.get("profile")]
    if profiled:
        columns = FAMILIES + ("BatchNorm double backward",)
        lines += ["", "Where the time goes: one more meta-iteration of each under `torch.profiler`, each op's own CPU "
                  "time by family, as a share of the profiled step, times the median CPU s above. The last column "
                  "is inclusive (its ops are counted in the columns before it too).", "",
                  "| order | implementation | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
        for r in profiled:
            lines.append(f"| {r['order']} | {r['impl']} | " + " | ".join(
                f"{r['profile'][c] * r['cpu']:.2f} s ({r['profile'][c]:.0%})" for c in columns) + " |")
    for peer, why in skipped.items():
        lines.append(f"\n{peer}: skipped ({why})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (each implementation once per round)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--orders", nargs="+", default=["second", "first"], choices=["second", "first"])
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--peers-venv", type=Path, default=DEFAULT_PEERS_VENV,
                        help="learn2learn and higher live here, never in metakit's environment")
    parser.add_argument("--no-install", action="store_true", help="skip peers that are missing instead of installing them")
    parser.add_argument("--data", choices=["random", "omniglot"], default="random",
                        help="random: tie-free images, so meta-gradients compare to rounding (Omniglot's flat "
                             "backgrounds tie in max-pool windows, where rounding picks the subgradient)")
    shared = ROOT.parent / "shared" / "data"
    parser.add_argument("--root", default=os.environ.get("METAKIT_DATA") or (str(shared) if shared.is_dir() else None),
                        help="data root holding omniglot/ (default: $METAKIT_DATA, else ../shared/data)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--pool", choices=["max", "stride"], default="max",
                        help="max: Vinyals et al.'s Conv4 (learn2learn's and torchmeta's); stride: the MAML "
                             "reference code's Omniglot network (model.pool)")
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--meta-batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk", type=int, default=8,
                        help="metakit-chunked: tasks per backward (train.tasks_per_backward)")
    parser.add_argument("--check-tasks", type=int, default=4,
                        help="tasks in the float64 meta-gradient check of every implementation (0: no check)")
    parser.add_argument("--malloc", choices=["system", "kept"], default="system",
                        help="glibc's defaults in every process, or metakit's setting (freed memory kept for reuse, "
                             "as the metakit command runs) in every process, the peers' included")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one meta-iteration of each and print where its CPU time goes, by op family")
    parser.add_argument("--out", type=Path, default=None, help="also write the table (markdown) here")
    # internal: one implementation's process
    parser.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--order", choices=["second", "first"], default="second", help=argparse.SUPPRESS)
    parser.add_argument("--state", help=argparse.SUPPRESS)
    parser.add_argument("--grads", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    pythons = {impl: Path(sys.executable) for impl in args.impls}
    skipped = {}
    wanted = [p for p in PEERS if p in args.impls]
    missing = [p for p in wanted if not peer_importable(args.peers_venv, p)]
    if missing and not args.no_install:
        log = args.peers_venv.parent / "bench-venv-install.log"
        print(f"installing {', '.join(missing)} into {args.peers_venv} (log: {log}); this takes minutes", flush=True)
        status = install_peers(args.peers_venv, log)
        missing = [p for p in missing if status.get(p) != "ok"]
        skipped.update({p: status.get(p, "not installed") for p in missing})
    for p in wanted:
        if p in missing:
            skipped.setdefault(p, f"not importable from {args.peers_venv} (run without --no-install to install it)")
            print(f"{p}: skipped ({skipped[p]})", flush=True)
        else:
            pythons[p] = venv_python(args.peers_venv)
    impls = [i for i in args.impls if i not in skipped]

    rows = []
    with tempfile.TemporaryDirectory(prefix="metakit-speed-") as tmp:
        tmp = Path(tmp)
        source = make_state(args, tmp / "state.pt")
        for order in args.orders:
            args.order = order
            print(f"{order} order: {', '.join(impls)} (one process each)", flush=True)
            rows += run_order(args, impls, pythons, tmp / "state.pt", tmp)
    text = report(rows, args, source, skipped)
    print("\n" + text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
