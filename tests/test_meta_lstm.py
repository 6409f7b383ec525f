"""The Meta-Learner LSTM (Ravi & Larochelle 2017): the preprocessing against hand computations, the rule
against SGD and a plain reference written from the paper's equations, coordinate-wise updates,
meta-gradients (finite differences, flow into the LSTM and c_0), a short run, the miniImageNet folder
config and the gate picture."""
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from metakit.algorithms import FOMAML, MetaLSTM, build_learner
from metakit.algorithms.meta_lstm import MetaLSTMRule, preprocess
from metakit.cli import main
from metakit.config import ConfigError, load_config
from metakit.data import ClassDataset, EpisodeSampler, load_split, make_sampler
from metakit.engine import evaluate, fit
from metakit.engine.checkpoint import build_from_config, save

from gradient_reference import conv4_forward, grads_of, learner_grads, tiny_batch, tiny_options
from synthetic import make_image_folder

CONFIGS = Path(__file__).parents[1] / "configs"


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(cls=MetaLSTM, **options):
    torch.manual_seed(0)
    return cls(tiny_options(cls, **options), image_size=16, ways=3).double()


def pin(rule: MetaLSTMRule, alpha: float) -> None:
    """Gates pinned at f = 1 (sigmoid(50) is 1.0 in float64) and i = alpha, whatever the inputs."""
    with torch.no_grad():
        rule.weight_input.zero_()
        rule.weight_forget.zero_()
        rule.bias_forget.fill_(50.0)
        rule.bias_input.fill_(math.log(alpha / (1 - alpha)))


# ---- preprocessing

def test_preprocessing_against_a_hand_computation_on_both_sides_of_e_to_the_minus_p():
    # e^-10 = 4.54e-5: 0.5, -3 and 5e-5 lie above it, 1e-5, -2e-5 and 0 below
    x = torch.tensor([[0.5, -3.0, 5e-5], [1e-5, -2e-5, 0.0]], dtype=torch.float64)
    expected = torch.tensor([[[-0.0693147181, 1.0], [0.1098612289, -1.0], [-0.9903487553, 1.0]],
                             [[-1.0, 0.2202646579], [-1.0, -0.4405293158], [-1.0, 0.0]]], dtype=torch.float64)
    torch.testing.assert_close(preprocess(x), expected, rtol=1e-9, atol=1e-10)
    # p = 1: e^-1 = 0.368, so 0.2 is small (-1, e * 0.2) and -0.5 large (log 0.5, -1)
    torch.testing.assert_close(preprocess(torch.tensor([0.2, -0.5], dtype=torch.float64), p=1.0),
                               torch.tensor([[-1.0, 0.5436563657], [-0.6931471806, -1.0]], dtype=torch.float64))
    # continuous at the threshold, and a finite derivative everywhere (second order differentiates it)
    edge = math.exp(-10.0)
    torch.testing.assert_close(preprocess(torch.tensor([edge * (1 + 1e-9), edge * (1 - 1e-9)], dtype=torch.float64)),
                               torch.tensor([[-1.0, 1.0], [-1.0, 1.0]], dtype=torch.float64), rtol=0, atol=1e-8)
    z = torch.tensor([0.0, 1e-6, -0.3], dtype=torch.float64, requires_grad=True)
    assert torch.isfinite(torch.autograd.grad(preprocess(z).sum(), z)[0]).all()


# ---- the rule

def test_with_gates_pinned_one_step_is_an_sgd_step_of_size_alpha():
    g = torch.Generator().manual_seed(0)
    rule = MetaLSTMRule().double()
    pin(rule, 0.125)
    params = {"w": torch.randn(4, 3, generator=g, dtype=torch.float64),
              "b": torch.randn(3, generator=g, dtype=torch.float64)}
    state = {"loss": torch.tensor(0.7, dtype=torch.float64), "gates": []}
    for _ in range(2):  # the second step has a recurrent state
        grads = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in params.items()}
        new = rule.update(params, grads, 0, state)
        for k in params:
            torch.testing.assert_close(new[k], params[k] - 0.125 * grads[k], rtol=1e-14, atol=1e-15)
        params = new
    i, f = state["gates"][-1]
    assert i.shape == f.shape == (15,) and (f == 1.0).all()


def test_with_gates_pinned_the_learner_is_first_order_maml():
    """The whole learner: loss and meta-gradient of c_0 equal first-order MAML's with step alpha."""
    batch = tiny_batch(B=2)
    meta_lstm = tiny(MetaLSTM, inner_steps=2)
    pin(meta_lstm.rule, 0.125)
    maml = tiny(FOMAML, inner_lr=0.125, inner_steps=2, batched=False)
    loss_a, grads_a = learner_grads(meta_lstm, batch)
    loss_b, grads_b = learner_grads(maml, batch)
    assert loss_a == pytest.approx(loss_b, rel=1e-12)
    for k, g in grads_b.items():
        torch.testing.assert_close(grads_a[k], g, rtol=1e-9, atol=1e-12)


def test_the_update_is_coordinate_wise():
    """The same coordinates in another order, across tensor boundaries, get the same updates in that order."""
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    rule = MetaLSTMRule(hidden=6).double()
    with torch.no_grad():  # weights large enough that every coordinate gets its own gates
        for w in rule.parameters():
            w.uniform_(-0.5, 0.5, generator=g)
    a = {"w": torch.randn(3, 4, generator=g, dtype=torch.float64),
         "b": torch.randn(5, generator=g, dtype=torch.float64)}
    perm = torch.randperm(17, generator=g)
    b = {"x": torch.cat([a["w"].flatten(), a["b"]])[perm]}
    state_a, state_b = {"gates": []}, {"gates": []}
    for step in range(3):
        grads_a = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in a.items()}
        grads_b = {"x": torch.cat([grads_a["w"].flatten(), grads_a["b"]])[perm]}
        state_a["loss"] = state_b["loss"] = torch.tensor(2.0 / (step + 1), dtype=torch.float64)
        a, b = rule.update(a, grads_a, step, state_a), rule.update(b, grads_b, step, state_b)
        torch.testing.assert_close(torch.cat([a["w"].flatten(), a["b"]])[perm], b["x"], rtol=1e-13, atol=1e-14)
    i, f = state_a["gates"][-1]
    assert i.std() > 1e-3 and f.std() > 1e-3  # not one step for all


# ---- meta-gradients

def plain_meta_lstm_loss(learner: MetaLSTM, batch, steps: int, second_order: bool) -> torch.Tensor:
    """The meta-loss written out from the paper's equations with torch ops: the learner's Conv4
    (``conv4_forward``), the first LSTM layer by hand (torch's gate order i, f, g, o), the gating layer."""
    p = dict(learner.model.named_parameters())
    rule = learner.rule
    names, H = list(p), rule.hidden
    total = 0
    for b in range(batch.meta_batch_size):
        sx, sy = batch.support_x[b], batch.support_y[b]
        theta = dict(p)
        P = sum(v.numel() for v in p.values())
        h = s = torch.zeros(P, H, dtype=torch.float64)
        i = f = torch.zeros(P, dtype=torch.float64)
        for _ in range(steps):
            loss = F.cross_entropy(conv4_forward(theta, sx), sy)
            grads = torch.autograd.grad(loss, [theta[k] for k in names], create_graph=second_order)
            g = torch.cat([x.reshape(-1) for x in grads])  # [P]
            g = g if second_order else g.detach()
            c = torch.cat([theta[k].reshape(-1) for k in names])  # [P]
            x = torch.cat([preprocess(g), preprocess(loss.detach()).expand(P, 2)], 1)  # [P, 4]
            z = x @ rule.lstm.weight_ih.T + rule.lstm.bias_ih + h @ rule.lstm.weight_hh.T + rule.lstm.bias_hh
            zi, zf, zg, zo = z.chunk(4, 1)
            s = torch.sigmoid(zf) * s + torch.sigmoid(zi) * torch.tanh(zg)
            h = torch.sigmoid(zo) * torch.tanh(s)  # [P, H]
            i = torch.sigmoid(torch.cat([h, c[:, None], i[:, None]], 1) @ rule.weight_input + rule.bias_input)
            f = torch.sigmoid(torch.cat([h, c[:, None], f[:, None]], 1) @ rule.weight_forget + rule.bias_forget)
            c = f * c - i * g  # c_t = f_t c_{t-1} + i_t (-grad)
            theta = dict(zip(names, (v.view_as(p[k]) for k, v in zip(names, c.split([p[k].numel() for k in names])))))
        total = total + F.cross_entropy(conv4_forward(theta, batch.query_x[b]), batch.query_y[b])
    return total / batch.meta_batch_size


@pytest.mark.parametrize("second_order", [False, True])
def test_meta_gradient_equals_a_plain_reference_with_detached_or_kept_inner_gradients(second_order):
    batch = tiny_batch(B=2)
    learner = tiny(inner_steps=2, second_order=second_order)
    loss, grads = learner_grads(learner, batch)
    ref = plain_meta_lstm_loss(learner, batch, 2, second_order)
    assert loss == pytest.approx(ref.item(), rel=1e-12)
    expected = grads_of(ref, dict(learner.named_parameters()))
    assert grads.keys() == expected.keys()
    for k in grads:
        torch.testing.assert_close(grads[k], expected[k], rtol=1e-8, atol=1e-12, msg=lambda m: f"{k}: {m}")
    if not second_order:  # and the two settings do differ
        other = grads_of(plain_meta_lstm_loss(learner, batch, 2, True), dict(learner.named_parameters()))
        assert not torch.allclose(grads["model.head.weight"], other["model.head.weight"], rtol=1e-4)


def test_compiled_step_gives_the_eager_meta_loss_and_meta_gradient():
    """``model.compile``: torch.compile of the per-coordinate step changes the time, not the numbers."""
    batch = tiny_batch(B=1)
    eager = tiny(inner_steps=2)
    compiled = tiny(inner_steps=2, compile=True)
    compiled.load_state_dict(eager.state_dict())
    assert compiled.rule.step_fn is not eager.rule.step_fn
    loss_e, grads_e = learner_grads(eager, batch)
    loss_c, grads_c = learner_grads(compiled, batch)
    assert loss_c == pytest.approx(loss_e, rel=1e-10)
    for k in grads_e:
        torch.testing.assert_close(grads_c[k], grads_e[k], rtol=1e-7, atol=1e-12, msg=lambda m: f"{k}: {m}")


def test_compile_without_a_cpp_compiler_fails_before_any_work(monkeypatch):
    from torch._inductor import cpp_builder

    def no_compiler():
        raise RuntimeError("no C++ compiler found")
    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)  # as on a machine without g++
    with pytest.raises(ValueError, match="model.compile needs a C.. compiler.*model.compile=false"):
        tiny(compile=True)


def test_meta_gradient_reaches_every_lstm_parameter_and_c0_and_matches_finite_differences():
    """Second order with the loss input cut off is the exact derivative of the meta-loss."""
    batch = tiny_batch(B=1)
    learner = tiny(inner_steps=2, second_order=True)
    with torch.no_grad():  # weights away from their small initial values: gradients well above rounding
        for w in [learner.rule.weight_input, learner.rule.weight_forget, *learner.rule.lstm.parameters()]:
            w.uniform_(-0.3, 0.3, generator=torch.Generator().manual_seed(2))
        learner.rule.lstm.weight_ih[:, 2:] = 0  # the loss input is a constant even in second order: cut it off
    _, grads = learner_grads(learner, batch)
    for k, g in grads.items():  # c_0 (model.*) and the meta-learner (rule.*, lstm weight_hh from step 2)
        assert g.abs().sum() > 0, k
    assert {k for k in grads if k.startswith("rule.")} == {
        "rule.weight_input", "rule.bias_input", "rule.weight_forget", "rule.bias_forget",
        "rule.lstm.weight_ih", "rule.lstm.weight_hh", "rule.lstm.bias_ih", "rule.lstm.bias_hh"}
    params = dict(learner.named_parameters())
    g = torch.Generator().manual_seed(3)

    def loss_at(name: str, shift: torch.Tensor) -> float:
        with torch.no_grad():
            params[name].add_(shift)
        value = learner.meta_loss(batch).loss.item()
        with torch.no_grad():
            params[name].sub_(shift)
        return value

    eps = 1e-6  # central differences along a random direction of each tensor; rounding ~1e-10
    for name in [k for k in params if k.startswith("rule.")] + ["model.features.0.0.weight", "model.head.weight"]:
        v = torch.randn(params[name].shape, generator=g, dtype=torch.float64)
        fd = (loss_at(name, eps * v) - loss_at(name, -eps * v)) / (2 * eps)
        assert fd == pytest.approx((grads[name] * v).sum().item(), rel=1e-5, abs=1e-9), name


# ---- the learner

def test_defaults_initialisation_options_and_the_loop_fallback():
    learner = build_learner("meta_lstm", None)
    o = learner.options
    assert (o.inner_steps, o.inner_steps_test, o.inner_batch, o.second_order, o.preprocess_p, o.lstm_hidden) == \
        (12, 12, 0, False, 10.0, 20)
    assert o.first_order and not o.batched
    assert learner.batched_unsupported(True) is not None  # the meta-batch runs as a loop over tasks
    rule = learner.rule
    assert 4.0 <= rule.bias_forget.item() <= 5.0 and -5.0 <= rule.bias_input.item() <= -4.0
    small = [rule.weight_input, rule.weight_forget, *rule.lstm.parameters()]
    assert all(w.abs().max() <= 0.01 for w in small)
    assert sum(w.numel() for w in rule.parameters()) == 4 * 20 * (4 + 20 + 2) + 2 * (20 + 2 + 1)
    for options, message in [(dict(inner_batch=-1), "meta_lstm: model.inner_batch must be >= 0"),
                             (dict(preprocess_p=0.0), "meta_lstm: model.preprocess_p must be > 0"),
                             (dict(lstm_hidden=0), "meta_lstm: model.lstm_hidden must be >= 1"),
                             (dict(bn="layer"), "meta_lstm: model.bn must be one of")]:
        with pytest.raises(ValueError, match=message):
            MetaLSTM(MetaLSTM.Options(**options))
    with pytest.raises(ConfigError, match="unknown key model.first_order"):
        load_config(None, ["algorithm=meta_lstm", "model.first_order=false"])


def test_gate_trace_per_layer_and_step():
    learner = tiny(inner_steps_test=3).eval()
    batch = tiny_batch(B=1)
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    trace = learner.gate_trace(batch.support_x[0], batch.support_y[0])
    assert list(trace) == [f"features.{b}.{m}" for b in range(4) for m in (0, 1)] + ["head"]
    for values in trace.values():
        assert len(values) == 3
        for i, f in values:  # the initialisation: close to SGD with a small step
            assert 1 / (1 + math.exp(5.1)) < i < 1 / (1 + math.exp(3.9)) and 1 / (1 + math.exp(-3.9)) < f < 1
    pin(learner.rule, 0.25)
    for values in learner.gate_trace(batch.support_x[0], batch.support_y[0]).values():
        assert values == [pytest.approx((0.25, 1.0), rel=1e-12)] * 3
    assert all(torch.equal(before[k], v) for k, v in learner.state_dict().items() if not k.startswith("rule."))


def test_a_short_run_beats_chance_on_a_synthetic_task():
    """3-way 1-shot on 16x16 random ink templates with 5% noise: 20 meta-iterations of 4 tasks lift the
    test accuracy on unseen classes from about 0.50 to about 0.89 (measured here); chance is 0.33."""
    g = torch.Generator().manual_seed(0)
    templates = torch.rand(30, 1, 1, 16, 16, generator=g) < 0.2
    noise = torch.rand(30, 10, 1, 16, 16, generator=g) < 0.05
    images = ((templates ^ noise) * 255).to(torch.uint8).reshape(300, 1, 16, 16)  # [C * M, 1, 16, 16]
    targets = torch.arange(30).repeat_interleave(10)
    train = ClassDataset(images[:200], targets[:200], [str(c) for c in range(20)])
    test = ClassDataset(images[200:], targets[200:] - 20, [str(c) for c in range(10)])
    torch.manual_seed(0)
    learner = MetaLSTM(MetaLSTM.Options(hidden=8, inner_steps=3, inner_steps_test=3), image_size=16, ways=3)
    before = evaluate(learner, EpisodeSampler(test, 3, 1, 5, 1, seed=1), episodes=40)["accuracy"]
    optimizer = torch.optim.Adam(learner.parameters(), lr=0.01)
    sampler = EpisodeSampler(train, 3, 1, 5, 4, seed=0)
    learner.train()
    for _ in range(20):
        out = learner.meta_loss(sampler.sample())
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    after = evaluate(learner, EpisodeSampler(test, 3, 1, 5, 1, seed=1), episodes=40)["accuracy"]
    assert after > 0.7 and after > before + 0.2, (before, after)


# ---- the miniImageNet folder config and the gate picture

@pytest.fixture(scope="module")
def mini_run(tmp_path_factory):
    """One training step of the shipped miniImageNet 5-way 1-shot config on a tiny 84x84 folder (25 classes)."""
    root = tmp_path_factory.mktemp("mini")
    images = make_image_folder(root / "images", classes=25, per_class=4, size=84)
    config = load_config(CONFIGS / "folder" / "meta_lstm_miniimagenet_5w1s.yaml", [
        f"data.path={images}", "train.steps=1", "train.queries=2", "train.val_every=0", "train.log_every=1",
        "train.checkpoint_every=1", "eval.queries=2"])
    torch.manual_seed(0)
    initial = build_from_config(config).state_dict()
    return fit(config, root / "run", progress=False), initial


def test_the_miniimagenet_folder_config_runs_a_training_step(mini_run):
    result, initial = mini_run
    learner = result.learner
    assert result.step == 1 and (result.run_dir / "last.pt").exists()
    assert isinstance(learner, MetaLSTM) and learner.options.inner_steps == 12 and learner.options.hidden == 32
    assert learner.model.features[0][0].in_channels == 3 and learner.model.embedding_dim == 32 * 5 * 5
    assert learner.model.head.out_features == 5
    for k, v in learner.state_dict().items():  # one Adam step moved c_0 and the meta-learner
        if k.startswith(("model.head", "rule.bias")):
            assert not torch.equal(v, initial[k]), k


def test_gates_command_writes_a_png(mini_run, tmp_path, capsys):
    result, _ = mini_run
    out = tmp_path / "gates.png"
    assert main(["gates", str(result.run_dir), "--out", str(out), "--episodes", "2"]) == 0
    printed = capsys.readouterr().out
    assert "inner steps 1..12" in printed and "features.0.0" in printed and "head" in printed
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    # another algorithm's checkpoint: one clear line, exit status 2
    config = load_config(None, ["algorithm=maml"])
    save(tmp_path / "maml.pt", build_from_config(config), config)
    assert main(["gates", str(tmp_path / "maml.pt"), "--out", str(tmp_path / "x.png")]) == 2
    assert "gates needs a meta_lstm checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


# ---- slow: Omniglot

def omniglot_root() -> Path | None:
    for root in (os.environ.get("METAKIT_DATA"), Path(__file__).parents[2] / "shared" / "data"):
        if root and (Path(root) / "omniglot" / "images_background.zip").exists():
            return Path(root)
    return None


@pytest.mark.slow
def test_above_chance_on_omniglot_after_a_short_run(tmp_path):
    """The shipped 5-way 1-shot config, Conv4 with 32 filters, 300 episodes; chance is 0.2."""
    root = omniglot_root()
    if root is None:
        pytest.skip("Omniglot archives not found: set METAKIT_DATA to a folder holding omniglot/")
    config = load_config(CONFIGS / "omniglot" / "meta_lstm_5w1s.yaml", [
        f"data.root={root}", "data.download=false", "model.hidden=32", "train.steps=300", "train.val_every=0",
        "train.log_every=50", "train.checkpoint_every=1000"])
    result = fit(config, tmp_path / "run", progress=False)
    e = config.eval
    sampler = make_sampler(config.data, load_split(config.data, "test"), e.ways, e.shots, e.queries, 1, seed=0)
    accuracy = evaluate(result.learner, sampler, episodes=60)["accuracy"]
    assert accuracy > 0.4, accuracy


def test_the_learner_takes_the_maml_family_network_options():
    """``pool`` and ``adapt=no_bn`` reach the Meta-LSTM's learner as they reach MAML's."""
    learner = MetaLSTM(MetaLSTM.Options(pool="stride", adapt="no_bn", hidden=4))
    convs = [m for m in learner.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 4 and all(c.stride == (2, 2) for c in convs)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in learner.model.modules())
    bn = {n for n, _ in learner.model.named_parameters() if n.endswith((".1.weight", ".1.bias")) and "features" in n}
    assert len(bn) == 8 and not bn & set(learner.adapt_names)
    assert MetaLSTM().model.features[0][2].__class__ is torch.nn.MaxPool2d  # the default: the paper's max-pool learner
    with pytest.raises(ValueError, match="model.pool"):
        MetaLSTM(MetaLSTM.Options(pool="avg"))
