"""Distributed meta-training: 2 processes on 127.0.0.1 with gloo give the numbers of one process,
a killed process stops the job with the last checkpoint intact, and runs resume on any number of processes.

Every test here starts processes (torch.multiprocessing, or torchrun through ``metakit train --nproc``),
each of which imports torch: about 5-15 s apiece on a busy 2-core machine.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch

from metakit.config import from_dict
from metakit.engine import distributed, fit
from metakit.engine.fit import Experiment

from synthetic import folder_config, make_image_folder

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

ENV = {"METAKIT_DIST_TIMEOUT": "30", "OMP_NUM_THREADS": "1"}


# Launching processes: slow on 2 shared cores, and under heavy load a process was twice seen to abort
# at exit after finishing its work (SIGABRT, "terminate called without an active exception"; open, see
# the distributed issue). Kept out of the default run so CI is not flaky: `make test-slow` runs them.
MULTIPROCESS = pytest.mark.slow


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(autouse=True)
def one_thread():
    """Every process of these tests runs one thread (``train.threads=1``), the parent too."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def configs(folder) -> dict[str, dict]:
    """ProtoNet and second-order MAML (with BatchNorm on the batch, and with per-step running statistics) on tiny
    folder data; a meta-batch of 3 tasks splits 1 + 2 over 2 ranks.
    SGD with a small step: Adam's normalisation would turn float round-off in near-zero gradient
    coordinates into steps of the full learning rate."""
    train = {"meta_batch_size": 3, "optimizer": "sgd", "lr": 3e-3, "threads": 1}
    proto = folder_config(folder, **train)
    maml = folder_config(folder, **train)
    maml["algorithm"] = "maml"
    maml["model"] = {"hidden": 4, "inner_steps": 1, "inner_steps_test": 1, "first_order": False}
    per_step = folder_config(folder, **train)  # running statistics per inner step: [3, C] sets, a counter per set
    per_step["algorithm"] = "maml"
    per_step["model"] = {"hidden": 4, "inner_steps": 2, "inner_steps_test": 2, "bn": "per_step"}
    return {"protonet": proto, "maml": maml, "maml_per_step": per_step}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weights(path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=False)["model"]


def assert_close_weights(a: dict, b: dict, rtol: float = 1e-3) -> None:
    assert a.keys() == b.keys()
    for k in a:
        scale = float(a[k].double().abs().max()) + 1e-3
        diff = float((a[k].double() - b[k].double()).abs().max())
        assert diff <= rtol * scale, (k, diff, scale)


def records(run_dir) -> list[dict]:
    drop = {"tasks_per_s", "elapsed_s"}
    return [{k: v for k, v in json.loads(line).items() if k not in drop}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_records(a: list[dict], b: list[dict]) -> None:
    assert [sorted(r) for r in a] == [sorted(r) for r in b]
    for x, y in zip(a, b):
        for k in x:
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-4), (x["step"], k, x[k], y[k])


def float64_step(config, ctx):
    """One meta-gradient in float64, the meta-batch shared as ``ctx`` says: gradients, metrics, buffers."""
    exp = Experiment(config)
    learner = exp.learner.double()
    batch = exp.train_sampler().sample()
    batch.support_x, batch.query_x = batch.support_x.double(), batch.query_x.double()
    before = ctx.begin_step(learner, 0)
    out = learner.meta_loss(ctx.shard_batch(batch))
    out.loss.backward()
    metrics = ctx.finish_step(learner, out.metrics, batch.meta_batch_size, before)
    return {"grads": {n: p.grad.clone() for n, p in learner.named_parameters()}, "metrics": metrics,
            "buffers": {n: b.clone() for n, b in learner.named_buffers()}}


def rank_main(rank: int, world_size: int, port: int, out: str, cfgs: dict) -> None:
    """One process of the job started by torch.multiprocessing (the variables torchrun would set)."""
    os.environ.update(ENV, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ctx = distributed.setup()
    assert (ctx.rank, ctx.world_size, ctx.backend) == (rank, world_size, "gloo")
    try:
        for name, values in cfgs.items():
            step = float64_step(from_dict(values), ctx)
            if ctx.is_main:
                torch.save(step, os.path.join(out, f"{name}_step.pt"))
            fit(from_dict(values), os.path.join(out, name), progress=False)
    finally:
        distributed.shutdown()


@MULTIPROCESS
def test_two_processes_give_the_meta_gradient_and_weights_of_one(folder, tmp_path):
    cfgs = configs(folder)
    for values in cfgs.values():
        values["train"]["steps"] = 6  # validations at steps 4 and 6
    context = torch.multiprocessing.start_processes(rank_main, args=(2, free_port(), str(tmp_path), cfgs),
                                                    nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 240
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail("the 2-process run did not finish in 240 s")
    single = distributed.Context()
    for name, values in cfgs.items():
        # the meta-gradient of one step, in float64: equal to round-off
        one, two = float64_step(from_dict(values), single), torch.load(tmp_path / f"{name}_step.pt")
        scale = max(float(g.abs().max()) for g in one["grads"].values())  # conv biases before BatchNorm: ~0
        for k, g in one["grads"].items():
            assert torch.allclose(two["grads"][k], g, rtol=1e-9, atol=1e-12 * scale), k
        assert two["metrics"] == pytest.approx(one["metrics"], rel=1e-6)  # accuracy: float32
        for k, b in one["buffers"].items():  # BatchNorm running statistics, combined exactly
            assert torch.allclose(two["buffers"][k].double(), b.double(), rtol=1e-9, atol=1e-12), k
        # 6 steps of the engine in float32, validation included
        fit(from_dict(values), tmp_path / f"{name}_single", progress=False)
        assert_close_weights(weights(tmp_path / f"{name}_single" / "last.pt"), weights(tmp_path / name / "last.pt"))
        assert_same_records(records(tmp_path / f"{name}_single"), records(tmp_path / name))
        assert not (tmp_path / name / "tensorboard").exists()


def train_command(config_path, run_dir, *extra) -> list[str]:
    return [sys.executable, "-m", "metakit", "train", str(config_path), "--out", str(run_dir), "--quiet", *extra]


def run(cmd, cwd, **env) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env={**os.environ, **ENV, **env}, capture_output=True, text=True,
                          timeout=240)


def write_config(values, path):
    import yaml

    path.write_text(yaml.safe_dump(values))
    return path


@MULTIPROCESS
def test_a_killed_process_stops_the_job_and_the_same_command_resumes(folder, tmp_path):
    values = configs(folder)["protonet"]
    path = write_config(values, tmp_path / "tiny.yaml")
    run_dir = tmp_path / "run"
    command = train_command(path, run_dir, "--nproc", "2")
    # rank 1 kills itself (SIGKILL) before step 8; checkpoints every 3 steps
    failed = run(command, tmp_path, METAKIT_FAULT="1:8:kill")
    assert failed.returncode == 1, failed.stderr
    assert "process 1 of 2 was killed by SIGKILL; the job stopped" in failed.stderr
    assert "last.pt holds the last checkpoint (step 6 of 12): run the same command to resume" in failed.stderr
    # the survivor says why it stops, unless torchrun's closing signal reaches it first (a race: seen 1 run in 6)
    assert ("rank 0 of 2: lost contact with the other processes" in failed.stderr
            or "closing signal" in failed.stderr), failed.stderr
    state = torch.load(run_dir / "last.pt", weights_only=False)
    assert state["step"] == 6 and sorted(p.name for p in run_dir.iterdir()) == [
        "best.pt", "config.yaml", "last.pt", "metrics.jsonl"]  # no temporary file left
    assert max(r["step"] for r in records(run_dir)) <= 7

    stopped = tmp_path / "stopped_copy"
    shutil.copytree(run_dir, stopped)
    resumed = run(command, tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "trained protonet for 12 steps" in resumed.stdout

    straight = tmp_path / "straight"
    fit(from_dict(values), straight, progress=False)
    assert_close_weights(weights(straight / "last.pt"), weights(run_dir / "last.pt"))
    assert_same_records(records(straight), records(run_dir))

    # the same stopped run, resumed in one process (2 -> 1)
    fit(from_dict(values), stopped, progress=False)
    assert_close_weights(weights(straight / "last.pt"), weights(stopped / "last.pt"))
    assert_same_records(records(straight), records(stopped))


@MULTIPROCESS
def test_a_one_process_run_resumes_under_torchrun_on_two(folder, tmp_path, monkeypatch):
    values = configs(folder)["maml"]
    path = write_config(values, tmp_path / "tiny.yaml")
    straight = tmp_path / "straight"
    fit(from_dict(values), straight, progress=False)

    run_dir = tmp_path / "run"
    original = Experiment.train_sampler

    class Crash(RuntimeError):
        pass

    def crashing(self):
        sampler, calls = original(self), [0]
        draw = sampler.sample

        def sample(*a):
            calls[0] += 1
            if calls[0] == 8:
                raise Crash
            return draw(*a)
        sampler.sample = sample
        return sampler

    monkeypatch.setattr(Experiment, "train_sampler", crashing)
    with pytest.raises(Crash):
        fit(from_dict(values), run_dir, progress=False)
    monkeypatch.setattr(Experiment, "train_sampler", original)
    assert torch.load(run_dir / "last.pt", weights_only=False)["step"] == 6

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0", "--local-addr", "127.0.0.1",
                "-m", "metakit", "train", str(path), "--out", str(run_dir), "--quiet"]
    resumed = run(torchrun, tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.count("trained maml for 12 steps") == 1  # rank 0 alone prints
    assert_close_weights(weights(straight / "last.pt"), weights(run_dir / "last.pt"))
    assert_same_records(records(straight), records(run_dir))


def test_meta_batch_smaller_than_the_processes_fails_before_launching(folder, tmp_path, capsys):
    from metakit.cli import main

    path = write_config(configs(folder)["protonet"], tmp_path / "tiny.yaml")
    assert main(["train", str(path), "--out", str(tmp_path / "run"), "--nproc", "4"]) == 2
    err = capsys.readouterr().err
    assert "train.meta_batch_size = 3 is smaller than the 4 processes" in err and not (tmp_path / "run").exists()


def test_shards_are_contiguous_disjoint_and_cover_the_batch():
    for total in (3, 4, 7, 32):
        for world in range(1, total + 1):
            parts = [distributed.shard(total, r, world) for r in range(world)]
            assert parts[0][0] == 0 and parts[-1][1] == total
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            assert all(hi - lo in (total // world, -(-total // world)) for lo, hi in parts)
