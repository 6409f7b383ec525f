"""The Meta-Learner LSTM (Ravi & Larochelle, ICLR 2017, "Optimization as a Model for Few-Shot Learning").

Gradient descent on the learner's parameters, ``theta_t = theta_{t-1} - alpha_t grad_t`` (eq. 1),
has the form of an LSTM cell-state update (eq. 2)::

    c_t = f_t (.) c_{t-1} + i_t (.) c~_t,    c~_t = -grad_{theta_{t-1}} L_t,    c_t = theta_t

so an LSTM whose cell state *is* the learner's parameters, with learned gates, is a learned
optimizer (sec. 3.2): the input gate ``i_t`` is a learning rate per coordinate and step, the
forget gate ``f_t`` shrinks the parameters (1 for plain SGD), and the initial cell state ``c_0``
is the learned initialisation of the learner. The LSTM is shared by all coordinates (sec. 3.3),
so its size does not depend on the learner's, and it is one more
:class:`~metakit.algorithms.inner_loop.UpdateRule` of the shared inner loop.

What is implemented, against the paper and its reference code (github.com/twitter-research/meta-learning-lstm):

- Two layers per coordinate: an ordinary LSTM of 20 units over the preprocessed gradient and
  loss (Andrychowicz et al. 2016, appendix A, p = 10: :func:`preprocess`), then the gating
  layer, whose input is the first layer's output ``h_t`` (standing in for ``[grad, L]`` in the
  paper's gate equations, as in the reference), the coordinate's current value
  ``theta_{t-1}`` and the gate's own previous value.
- Initialisation (sec. 3.4; the reference): every weight and bias uniform in ``[-0.01, 0.01]``,
  then the forget-gate bias uniform in ``[4, 5]`` and the input-gate bias in ``[-5, -4]``: the
  rule starts close to gradient descent with a small step (``f ~ 0.99``, ``i ~ 0.01``). The
  previous gate values start at ``i_0 = f_0 = 0`` and the first layer's state at 0, as in the
  reference. The gate equations take the previous gate *values* ``i_{t-1}, f_{t-1}``, as the
  paper writes them; the reference code feeds back the pre-activations instead.
- ``c_0`` is the learner model's own parameters, so the meta-gradient reaches them through
  ``f_T (.) ... (.) f_1 (.) c_0`` (and through the gates, which see ``theta_{t-1}``).
- The learner's gradient and loss are inputs treated as constants in the meta-gradient (sec. 3.2:
  "we ignore the second derivatives"): ``second_order=False``, the inner loop's first-order
  mode. ``second_order=True`` keeps them (the inner gradients are differentiated too), for
  comparison. The loss input is always a constant.
- Inner updates: ``inner_steps`` updates in training and ``inner_steps_test`` at test, each on
  a minibatch of ``inner_batch`` support examples (0: the whole support set), drawn by
  successive shuffles. The paper's miniImageNet setting is the whole support set: 12 updates
  for 1-shot, 8 for 5-shot (reference: batch 5, 12 epochs; batch 25, 8 epochs).
- BatchNorm, ``bn="batch"`` (default): the statistics of the current batch in meta-training, as
  the paper, and also at test: a query set is normalised with its own statistics (transductive,
  as MAML's reference; ``transductive=False`` normalises each query with the support set).
  The reference evaluates with running statistics gathered over the episode's support passes;
  that is not reproduced (``bn="running"`` keeps running statistics across all training
  episodes instead; ``bn="per_step"`` one set per inner step, as MAML++).
- The reference clips the meta-gradient norm at 0.25; the shipped configs do too
  (``train.max_grad_norm``, applied by the engine to the averaged meta-gradient).

The batched path of the inner loop does not know this rule: meta-batches run as a loop over
tasks (:meth:`MetaLSTM.batched_unsupported` says so).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .base import register
from .inner_loop import Params, UpdateRule, inner_step, parameters_of
from .maml import MAML, check_options
from .reptile import minibatches


def preprocess(x: Tensor, p: float = 10.0) -> Tensor:
    """Gradient/loss preprocessing of Andrychowicz et al. (2016, appendix A): ``[...] -> [..., 2]``::

        x -> (log|x| / p, sign(x))    if |x| >= e^-p
             (-1,         e^p x)      otherwise

    The first channel carries the magnitude on a log scale, the second the sign (or, for tiny
    values, the value itself, scaled up); both stay in about ``[-1, 1]`` whatever the scale of ``x``.
    """
    big = x.abs() >= math.exp(-p)
    magnitude = torch.where(big, x.abs().clamp_min(math.exp(-p)).log() / p, torch.full_like(x, -1.0))
    sign = torch.where(big, torch.sign(x), x * math.exp(p))
    return torch.stack([magnitude, sign], dim=-1)


class MetaLSTMRule(nn.Module, UpdateRule):
    """The coordinate-wise two-layer meta-learner of Ravi & Larochelle (2017, sec. 3.2-3.4).

    Per coordinate ``k`` of the adapted parameters, at inner step ``t``::

        x_t      = [preprocess(grad_k), preprocess(L_t)]                  # [4]
        h_t, s_t = LSTMCell(x_t, (h_{t-1}, s_{t-1}))                      # [H] each, H = 20
        i_t      = sigmoid(W_I . [h_t, theta_{t-1,k}, i_{t-1}] + b_I)     # input gate: the step
        f_t      = sigmoid(W_F . [h_t, theta_{t-1,k}, f_{t-1}] + b_F)     # forget gate: 1 for SGD
        theta_t  = f_t * theta_{t-1,k} - i_t * grad_k                    # c_t = f c_{t-1} + i (-grad)

    All coordinates of all adapted parameters go through as one batch, coordinates last
    (:func:`coordinate_step`: ``h``, ``s`` are ``[H, P]``). The state
    (``h``, ``s`` of the first layer, the previous ``i`` and ``f``) lives in the adaptation's
    ``state`` dict, never on ``self``. With ``state["gates"]`` a list, each step appends its
    gate values ``(i [P], f [P])`` there (detached), in the order of the parameters given.

    ``weight_input`` and ``weight_forget`` (``[H + 2]``: the ``h``, ``theta`` and previous-gate
    parts of ``W_I``, ``W_F``) at zero, ``bias_forget`` large and ``bias_input = logit(alpha)``
    pin the gates at ``f = 1``, ``i = alpha``: the rule is then SGD with step ``alpha``.
    """

    def __init__(self, hidden: int = 20, p: float = 10.0) -> None:
        super().__init__()
        self.hidden, self.p = hidden, p
        self.step_fn = coordinate_step  # torch.compile'd by compile_step()
        self.lstm = nn.LSTMCell(4, hidden)
        self.weight_input = nn.Parameter(torch.empty(hidden + 2))   # W_I
        self.bias_input = nn.Parameter(torch.empty(()))              # b_I
        self.weight_forget = nn.Parameter(torch.empty(hidden + 2))  # W_F
        self.bias_forget = nn.Parameter(torch.empty(()))             # b_F
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Small weights, forget gate near 1, input gate near 0 (sec. 3.4; the reference's ranges)."""
        with torch.no_grad():
            for w in self.parameters():
                w.uniform_(-0.01, 0.01)
            self.bias_forget.uniform_(4.0, 5.0)
            self.bias_input.uniform_(-5.0, -4.0)

    def update(self, params: Params, grads: Params, step: int, state: dict) -> Params:
        names = list(grads)
        theta = torch.cat([params[k].reshape(-1) for k in names])  # [P], c_{t-1}
        grad = torch.cat([grads[k].reshape(-1) for k in names])    # [P]
        loss = torch.as_tensor(state["loss"], dtype=grad.dtype, device=grad.device)
        if loss.dim() != 0:
            raise ValueError("MetaLSTMRule adapts one task at a time: state['loss'] must be a scalar")
        P = theta.numel()
        previous = state.get("meta_lstm")
        if previous is None:  # the reference's zero states and gates
            zeros, hidden = theta.new_zeros(P), theta.new_zeros(self.hidden, P)
            previous = {"hx": (hidden, hidden), "i": zeros, "f": zeros}
        lstm = self.lstm
        new, h, s, i, f = self.step_fn(grad, theta, loss, *previous["hx"], previous["i"], previous["f"],
                                       lstm.weight_ih, lstm.weight_hh, lstm.bias_ih + lstm.bias_hh,
                                       self.weight_input, self.bias_input, self.weight_forget, self.bias_forget,
                                       self.p)
        state["meta_lstm"] = {"hx": (h, s), "i": i, "f": f}
        if isinstance(state.get("gates"), list):
            state["gates"].append((i.detach(), f.detach()))
        sizes = [params[k].numel() for k in names]
        return {k: v.view_as(params[k]) for k, v in zip(names, new.split(sizes))}

    def compile_step(self) -> None:
        """Fuse :func:`coordinate_step` with ``torch.compile``: its dozen elementwise passes over ``[H, P]``
        become one (a 5-way 1-shot Omniglot episode: 1.47 against 2.15 CPU s, ``benchmarks/RESULTS.md``);
        the numbers are equal to rounding (tested)."""
        check_compiler()
        self.step_fn = torch.compile(coordinate_step, dynamic=False)


def check_compiler() -> None:
    """``torch.compile`` on CPU builds C++: say so before any work starts rather than at the first step."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # another torch layout: let torch.compile speak for itself
        return
    try:
        get_cpp_compiler()
    except Exception as e:
        raise ValueError(f"meta_lstm: model.compile needs a C++ compiler for torch.compile ({e}); install g++ "
                         "or set model.compile=false (the same numbers, about 1.5x slower)") from None


def coordinate_step(grad: Tensor, theta: Tensor, loss: Tensor, h: Tensor, s: Tensor, i_prev: Tensor, f_prev: Tensor,
                    weight_ih: Tensor, weight_hh: Tensor, bias: Tensor, w_i: Tensor, b_i: Tensor, w_f: Tensor,
                    b_f: Tensor, p: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One step of :class:`MetaLSTMRule` for all ``P`` coordinates, coordinates last (each gate a
    contiguous ``[H, P]`` block): grad, theta, i_prev, f_prev ``[P]``; loss ``[]``; h, s ``[H, P]``;
    ``nn.LSTMCell``'s weights ``[4H, 4]``, ``[4H, H]``, bias ``[4H]`` (gates in its order i, f, g, o).
    Returns ``theta_t, h_t, s_t, i_t, f_t``. The loss is the same for every coordinate, so its part
    of the LSTM's input product is one column ``[4H, 1]``."""
    H = h.shape[0]
    g_in = preprocess(grad, p).t()                                                   # [2, P]
    constant = weight_ih[:, 2:] @ preprocess(loss, p) + bias                         # [4H]
    z = torch.addmm(constant[:, None], weight_ih[:, :2], g_in) + weight_hh @ h       # [4H, P]
    z_i, z_f, z_g, z_o = z.chunk(4, 0)                                               # [H, P] each
    s = torch.sigmoid(z_f) * s + torch.sigmoid(z_i) * torch.tanh(z_g)
    h = torch.sigmoid(z_o) * torch.tanh(s)
    i = torch.sigmoid(w_i[:H] @ h + theta * w_i[H] + i_prev * w_i[H + 1] + b_i)       # [P], the step
    f = torch.sigmoid(w_f[:H] @ h + theta * w_f[H] + f_prev * w_f[H + 1] + b_f)       # [P], 1 for SGD
    return f * theta - i * grad, h, s, i, f                                          # c_t = f c_{t-1} + i (-grad)


def detach_state(state: dict) -> None:
    """Cut the rule's recurrent state from the graph (inference: memory for one step only)."""
    s = state.get("meta_lstm")
    if s is not None:
        h, c = s["hx"]
        state["meta_lstm"] = {"hx": (h.detach(), c.detach()), "i": s["i"].detach(), "f": s["f"].detach()}


def layer_of(name: str) -> str:
    """``features.0.0.weight`` -> ``features.0.0``: the module that owns a parameter."""
    return name.rsplit(".", 1)[0] if "." in name else name


@register("meta_lstm")
class MetaLSTM(MAML):
    """The Meta-Learner LSTM (Ravi & Larochelle 2017): MAML's functional inner loop with
    :class:`MetaLSTMRule` as the update rule; ``model``'s parameters are ``c_0``.

    Options are MAML's, less the step size (the rule learns it), plus the meta-learner's own.
    The meta-batch runs as a loop over tasks (the rule carries one task's state).
    """

    @dataclass
    class Options:
        inner_steps: int = 12             # updates per task in meta-training (paper: 12 for 1-shot, 8 for 5-shot)
        inner_steps_test: int = 12        # updates at evaluation and in adapt()
        inner_batch: int = 0              # support examples per update; 0: the whole support set (the paper)
        second_order: bool = False        # False: the learner's gradient is a constant in the meta-gradient (the paper)
        preprocess_p: float = 10.0        # p of the gradient and loss preprocessing (Andrychowicz et al. 2016)
        lstm_hidden: int = 20             # units of the meta-learner's first LSTM layer
        adapt: str = "all"                # which parameters adapt: all | head | no_bn (all but BatchNorm's)
        backbone: str = "conv4"           # classification: conv4 | mlp; regression: always mlp
        hidden: int = 64                  # conv4 filters per block (the paper's miniImageNet learner: 32)
        pool: str = "max"                 # conv4: max (2x2 max-pools, the paper's learner) | stride (stride-2 convs)
        mlp_hidden: list[int] = field(default_factory=lambda: [40, 40])
        bn: str = "batch"                 # batch: current-batch statistics, training and test | running | per_step
        inner_loss: str = "mean"          # mean | per_shot (summed / K)
        transductive: bool = True         # query examples share BatchNorm statistics; False: each with the support set
        compile: bool = False             # fuse the rule's per-coordinate step with torch.compile (needs a C++ compiler)

        batched = False                   # not an option: the batched path does not know the LSTM rule

        @property
        def first_order(self) -> bool:
            """The inner loop's name for ``not second_order``."""
            return not self.second_order

    def __init__(self, options=None, in_channels: int = 1, image_size: int = 28, ways: int = 5,
                 task: str = "classification", **_) -> None:
        options = options or type(self).Options()
        check_options(options, "meta_lstm")
        for key, value, ok, must in (("inner_batch", options.inner_batch, options.inner_batch >= 0, ">= 0"),
                                     ("preprocess_p", options.preprocess_p, options.preprocess_p > 0, "> 0"),
                                     ("lstm_hidden", options.lstm_hidden, options.lstm_hidden >= 1, ">= 1")):
            if not ok:
                raise ValueError(f"meta_lstm: model.{key} must be {must}, got {value}")
        super().__init__(options, in_channels=in_channels, image_size=image_size, ways=ways, task=task)
        self.rule = MetaLSTMRule(options.lstm_hidden, options.preprocess_p)
        if options.compile:
            self.rule.compile_step()

    def update_rule(self, training: bool) -> UpdateRule:
        return self.rule

    def adapt_params(self, support_x: Tensor, support_y: Tensor, training: bool, create_graph: bool,
                     gates: list | None = None) -> Params:
        """``theta_T`` of one task: support_x ``[N*K, C, H, W]``, support_y ``[N*K]``; ``inner_steps``
        updates from ``c_0`` (the model's parameters), each on a support minibatch. ``gates``: a
        list that receives each step's ``(i [P], f [P])``."""
        steps = self.inner_steps(training)
        state: dict = {} if gates is None else {"gates": gates}
        params = parameters_of(self.model)
        for step, idx in enumerate(minibatches(support_x.shape[0], self.options.inner_batch, steps)):
            x, y = (support_x, support_y) if idx is None else (support_x[idx], support_y[idx])
            params = inner_step(self.model, params, x, y, self.support_loss, self.rule, step, state, self.adapt_names,
                                first_order=not self.options.second_order, create_graph=create_graph)
            if not create_graph:
                detach_state(state)
        return params

    def gate_trace(self, support_x: Tensor, support_y: Tensor) -> dict[str, list[tuple[float, float]]]:
        """Mean input and forget gate of each layer at each inner step of one task (test schedule):
        ``{layer: [(mean i_t, mean f_t) for t = 1..inner_steps_test]}``, layers as in
        ``model.named_modules()`` (e.g. ``features.0.0``, a convolution; ``head``). Plain SGD with
        step ``alpha`` would read ``(alpha, 1.0)`` at every step."""
        gates: list = []
        self.adapt_params(support_x, support_y, training=False, create_graph=False, gates=gates)
        sizes = dict(self.model.named_parameters())
        counts = [sizes[k].numel() for k in self.adapt_names]
        layers: dict[str, list[int]] = {}
        for j, k in enumerate(self.adapt_names):
            layers.setdefault(layer_of(k), []).append(j)
        trace: dict[str, list[tuple[float, float]]] = {layer: [] for layer in layers}
        for i, f in gates:
            i_parts, f_parts = i.split(counts), f.split(counts)
            for layer, js in layers.items():
                trace[layer].append((torch.cat([i_parts[j] for j in js]).mean().item(),
                                     torch.cat([f_parts[j] for j in js]).mean().item()))
        return trace


def mean_gate_trace(learner: MetaLSTM, sampler, episodes: int) -> dict[str, list[tuple[float, float]]]:
    """:meth:`MetaLSTM.gate_trace` averaged over ``episodes`` tasks drawn one at a time from ``sampler``."""
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    learner.eval()
    device = next(learner.parameters()).device
    total: dict[str, Tensor] = {}
    for _ in range(episodes):
        batch = sampler.sample(1).to(device)
        for layer, steps in learner.gate_trace(batch.support_x[0], batch.support_y[0]).items():
            t = torch.tensor(steps, dtype=torch.float64)  # [T, 2]
            total[layer] = total[layer] + t if layer in total else t
    return {layer: [tuple(row) for row in (t / episodes).tolist()] for layer, t in total.items()}
