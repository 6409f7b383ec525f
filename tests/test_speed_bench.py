"""benchmarks/speed.py compares like with like: the peers' network and the plain loop's are metakit's Conv4.

The speed table is only fair if learn2learn and higher run the network metakit runs. Their model is
built in the benchmark (``peer_model``) with metakit's parameter names; here it is checked to give
metakit's outputs on the same weights, for both pooling schemes, and the plain loop's meta-gradient
(the float64 reference every implementation is compared with) to equal metakit's loop path.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from metakit.algorithms import MAML

SPEED = Path(__file__).resolve().parent.parent / "benchmarks" / "speed.py"


@pytest.fixture(scope="module")
def speed():
    spec = importlib.util.spec_from_file_location("bench_speed", SPEED)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _state(speed, pool: str, tasks: int = 2):
    """speed.py's own weights and random tasks, small and in float64, and a MAML learner holding them."""
    state, _ = speed.task_state(0, hidden=8, pool=pool, ways=3, shots=1, queries=2, meta_batch=tasks)
    state = speed.float64_subset(state, tasks)
    learner = MAML(MAML.Options(hidden=8, pool=pool), ways=3).double()
    learner.model.load_state_dict(state["weights"])
    return state, learner


@pytest.mark.parametrize("pool", ["max", "stride"])
def test_peer_model_is_metakits_network(speed, pool):
    state, learner = _state(speed, pool)
    peer = speed.peer_model(state)
    x = state["query_x"][0]
    learner.train()
    torch.testing.assert_close(peer(x), learner.model(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("pool", ["max", "stride"])
def test_plain_loop_meta_gradient_is_metakits(speed, pool):
    state, _ = _state(speed, pool)
    plain = speed.build("plain", state, first_order=False)()
    for impl in ("metakit-loop", "metakit-batched", "metakit-one-backward"):
        ours = speed.build(impl, state, first_order=False)()
        for name, g in ours.items():
            torch.testing.assert_close(plain[name], g, rtol=1e-9, atol=1e-12, msg=lambda m: f"{impl}, {name}: {m}")


def test_profile_sorts_ops_into_families_and_shares_add_up(speed):
    """``--profile``'s table: each op in its family, and the families' shares of a profiled step sum to one."""
    assert speed.op_family("aten::convolution_backward") == "convolution backward"
    assert speed.op_family("aten::mkldnn_convolution") == "convolution forward"
    assert speed.op_family("aten::native_batch_norm_backward") == "batch norm kernels"
    assert speed.op_family("aten::mul_") == speed.op_family("aten::threshold_backward") == "elementwise"
    assert speed.op_family("aten::cat") == "other aten ops"
    assert speed.op_family("autograd::engine::evaluate_function: ReluBackward0") == "outside aten"
    state, _ = _state(speed, "max")
    shares = speed.profile_step(speed.build("plain", state, first_order=False))
    assert sum(shares[f] for f in speed.FAMILIES) == pytest.approx(1.0)
    assert shares["convolution forward"] > 0 and shares["convolution backward"] > 0
    assert 0 < shares["BatchNorm double backward"] < 1  # second order differentiates BatchNorm's backward


@pytest.mark.parametrize("script", ["query_layout.py", "step_changes.py"])
def test_step_benchmarks_run_and_find_their_baseline(script):
    """The step benchmarks run end to end on a small meta-batch; query_layout.py finds the layout the
    library picks among its candidates (its ratios are taken to that one, which shows 1.00x)."""
    import subprocess
    import sys

    path = SPEED.parent / script
    out = subprocess.run([sys.executable, str(path), "--pool", "stride", "--rounds", "2", "--meta-batch", "2"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 5
    if script == "query_layout.py":
        assert "| 1 task, channels-last | " in out.stdout and rows[0].endswith("| 1.00× |")
    else:  # the last column: the float32 meta-gradient relative to session 8's step
        diffs = [float(row.rstrip(" |").rsplit("| ", 1)[1]) for row in rows]
        assert all(d <= 1e-6 for d in diffs[:3]), rows  # chunks and in-place ReLU: the same arithmetic
        # the biases BatchNorm cancels, left out: the same function, other float32 roundings, which the second-order
        # step on these random weights magnifies (1.7e-2 here at meta-batch 2, 2.8e-3 at 32); tests/test_batched.py
        # checks the batched path against the loop in float64
        assert 0 < diffs[3] <= 5e-2, rows
        # each task's query backward at once: the gradient of each loss is the same, only the roundings move
        assert 0 < diffs[4] <= 5e-2 and abs(diffs[4] - diffs[3]) <= 1e-2, rows
