"""Batched adaptation: a whole meta-batch of tasks through the inner loop at once, with the numbers of the loop.

MAML's meta-objective (Finn et al. 2017, eq. 2-3) is a sum over tasks of independent inner loops
(eq. 1), ``theta'_b = theta - alpha grad L_support_b(f_theta)``, so the tasks of a meta-batch can
run side by side as one computation, each with its own weights after the first step. The
layout that makes every layer one call for all ``B`` tasks, with each task seeing only its own
examples, is the *grouped* one:

- images ``[B, M, C, H, W]`` are laid out as ``[M, B*C, H, W]``: task ``b`` owns channels
  ``b*C .. (b+1)*C - 1``;
- a convolution with per-task weights ``[B, C_out, C_in, k, k]`` is one grouped convolution
  (weight ``[B*C_out, C_in, k, k]``, ``groups=B``): group ``b`` sees only task ``b``'s channels;
- BatchNorm on batch statistics is one ``batch_norm`` over ``B*C`` channels: the mean and
  variance of channel ``(b, c)`` are taken over ``(M, H, W)``, task ``b``'s own examples only,
  exactly the statistics of the loop's per-task batch; its scale and offset are ``[B*C]``;
- max-pool and ReLU act per channel, as they are;
- after ``Flatten`` features are ``[B, M, F]`` and a linear layer with per-task weights
  ``[B, O, F]`` is one ``torch.baddbmm``.

The first inner step starts every task from the same ``theta``: it is expanded to ``[B, ...]``
(a view), and the gradient of the summed support losses with respect to that view is the stack
of the per-task gradients, since task ``b``'s loss depends on block ``b`` only. Everything else
is :func:`metakit.algorithms.inner_loop.adapt`'s recipe (the same update rules, which act
coordinate-wise and so broadcast over the task dimension; first order; detached inference).
Parameters that do not adapt (ANIL's body, Raghu et al. 2020) stay shared, and the layers before
the first adapted one are computed once per support and query set instead of once per step.

What was measured (``benchmarks/speed.py``; second-order MAML, Conv4 64 filters, 5-way 1-shot
28x28, 15 queries per class, meta-batch 32, 1 thread, process CPU time per meta-iteration, the
loop at about 3.6-3.8 s) and what it decided, in :func:`layout_for`:

- support passes grouped over the whole meta-batch, NCHW: as fast as the loop's (about 0.96 s);
  in chunks of 4, 8 or 16 tasks: the same within noise then; grouped in channels-last: 2.5x slower
  (the double backward mixes layouts). Session 9, on the strided network with freed memory kept
  (``metakit.engine.malloc``): chunks of 8 tasks make the whole step 1.10x faster (1.18x on the
  max-pool network) beside two trainings, where BatchNorm's double backward over a ``[5, 2048, 14, 14]``
  activation had cost 18% of the step (a ``[5, 512, 14, 14]`` chunk stays in the caches); on the
  idle machine 0.99x and 1.03x, noise (``benchmarks/step_changes.py``). :func:`layout_for` takes 8;
- query passes grouped over the whole meta-batch: 5.7 s, far slower than the loop: a
  ``[75, 2048, 28, 28]`` activation (480 MB) falls out of the caches, and every BatchNorm,
  max-pool and ReLU pass then runs at memory speed (a ReLU 7x slower per element than on one
  task's 15 MB). Chunks of 4 or 8 tasks: 3.0-3.8 s (channels-last), 4.5 s (NCHW); one or two
  tasks per call in channels-last: the fastest, 2.6-2.7 s in all. So on CPU the query pass
  (95% of the FLOPs) runs task by task, channels-last, and the batch is what the support pass
  and the parameter updates share;
- channels-last with one input channel: every stride is both layouts', the convolution answers
  in NCHW and the max-pool after it is 10x slower: :func:`_in_format` sets the strides;
- ``torch.compile`` of the query pass (first order; second order would need a double backward
  through compiled code, which AOTAutograd does not give): 1.26x slower than eager here, plus a
  19 s compile;
- ``torch.func.vmap`` is not used: over ``nn.BatchNorm2d`` it gives a wrong second-order
  meta-gradient on torch 2.13, and it is slow on CPU (issue 3).

Tried in session 4 and not kept (same step, interleaved in one process, on a machine loaded by two
trainings, so only ratios):

- the first layer (a 3x3 convolution of one channel) as one matrix multiply of its ``unfold``
  patches, with a column of ones for the bias: alone, forward and weight gradient of 75 images
  took 7.2 ms against mkldnn's 14.9 ms, but the query pass with it took 1.04x the time and the
  whole step 1.00x: what it saved came back in the layers after it;
- the support pass one task at a time: in channels-last 1.10x the time of the grouped pass, in
  NCHW 1.08x (the same numbers in float64, 1e-14). The grouped support pass still costs about 30%
  of the step (the query pass alone: 0.70x), mostly BatchNorm's double backward and max-pooling on the 32 MB
  ``[5, 2048, 28, 28]`` layer-one activation;
- that BatchNorm written from basic ops (mean, mean of centred squares, ``addcmul``), so that its
  double backward is autograd's of those instead of ``native_batch_norm``'s: 0.99x, within noise.

Kept in session 9: a ReLU overwrites the output of the layer before it (``F.relu(inplace=True)``; no
layer here needs its output for its backward, and autograd raises if one did): with the chunks, 1.03x
(strided network) and 1.02x (max-pool) faster on the idle machine than session 8's step, the same numbers.

Kept in session 17: a convolution's bias is left out where BatchNorm on batch statistics follows it
(:func:`cancelled_biases`; float64 meta-gradients equal to the loop's): on the idle machine, 1 thread, the step
1.018x faster on the strided network and 1.033x on the max-pool one (``benchmarks/step_changes.py``).

Kept in session 18: in training each task's query pass is back-propagated to its adapted parameters as soon as it
has run (:func:`query_grads_now`), and the losses returned are surrogates with the same gradients
(:func:`with_query_gradients`), so the graph that waits for the meta-batch's backward holds the support passes
only. Idle machine, 1 thread, second order: peak memory 744 -> 463 MB (strided network; learn2learn 451) and
2379 -> 1259 MB (max-pool), the same speed (0.997x and 0.992x, ``benchmarks/step_changes.py``); first order
2-8% slower for 654 -> 562 MB and 2002 -> 1296 MB (``benchmarks/speed.py --impls metakit-batched metakit-one-backward``).

On a GPU the caches argument does not hold and :func:`layout_for` keeps the whole meta-batch in
one call (not measured here: no GPU on this machine).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .inner_loop import AdamRule, LossFn, MetaSGDRule, Params, SGDRule, UpdateRule

# Update rules that act coordinate-wise (each new value from the same coordinate of the params,
# grads and state), so that they broadcast over a leading task dimension unchanged.
COORDINATEWISE_RULES: tuple[type, ...] = (SGDRule, MetaSGDRule, AdamRule)


class Unsupported(ValueError):
    """The model has a layer (or a setting) the batched path does not know; the loop handles it."""


@dataclass(frozen=True)
class Layer:
    """One step of the network: ``kind`` in conv, bn, maxpool, relu, flatten, mean, linear; ``prefix``
    names its parameters in ``model.named_parameters()`` (``prefix.weight``, ``prefix.bias``)."""
    kind: str
    prefix: str = ""
    module: nn.Module | None = None

    @property
    def param_names(self) -> list[str]:
        if self.module is None:
            return []
        return [f"{self.prefix}.{n}" if self.prefix else n for n, _ in self.module.named_parameters(recurse=False)]


def _leaf(name: str, m: nn.Module) -> Layer:
    # exact types: a subclass may have its own forward
    if type(m) is nn.Conv2d:
        if m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str):
            raise Unsupported(f"{name}: only zero-padded, ungrouped Conv2d with numeric padding")
        return Layer("conv", name, m)
    if type(m) is nn.BatchNorm2d:
        if m.track_running_stats:
            raise Unsupported(f"{name}: BatchNorm with running statistics (bn=running) runs in the loop")
        return Layer("bn", name, m)
    if type(m) is nn.MaxPool2d:
        if m.return_indices:
            raise Unsupported(f"{name}: MaxPool2d(return_indices=True)")
        return Layer("maxpool", name, m)
    if type(m) is nn.ReLU:
        return Layer("relu", name)
    if type(m) is nn.Flatten:
        if m.start_dim != 1 or m.end_dim != -1:
            raise Unsupported(f"{name}: only Flatten(1, -1)")
        return Layer("flatten", name)
    if type(m) is nn.Linear:
        return Layer("linear", name, m)
    raise Unsupported(f"{name or 'the model'}: {type(m).__name__} is not a layer the batched path knows")


def plan(model: nn.Module) -> list[Layer]:
    """The layers of ``model`` in the order its ``forward`` runs them.

    Known containers: :class:`~metakit.nn.Conv4` (``features``, flatten or the mean over the map, optional ``head``),
    :class:`~metakit.nn.MLP` (``net``) and ``nn.Sequential``; leaves: ``Conv2d``, ``BatchNorm2d``
    on batch statistics, ``MaxPool2d``, ``ReLU``, ``Flatten``, ``Linear``. Anything else raises
    :class:`Unsupported`.
    """
    from ..nn import MLP, Conv4

    def walk(name: str, m: nn.Module) -> list[Layer]:
        join = (lambda child: f"{name}.{child}" if name else child)
        if type(m) is Conv4:
            end = Layer("mean", join("mean")) if m.pool == "stride" else Layer("flatten", join("flatten"))
            layers = walk(join("features"), m.features) + [end]
            return layers + (walk(join("head"), m.head) if m.head is not None else [])
        if type(m) is MLP:
            return walk(join("net"), m.net)
        if type(m) is nn.Sequential:
            return [layer for child, sub in m.named_children() for layer in walk(join(child), sub)]
        return [_leaf(name, m)]

    layers = walk("", model)
    covered = [n for layer in layers for n in layer.param_names]
    if sorted(covered) != sorted(n for n, _ in model.named_parameters()):
        raise Unsupported("the model's parameters are not all used by the layers the batched path found")
    return layers


# ----------------------------------------------------------------------------------------------
# the forward pass over a meta-batch

def _per_task(value: Tensor | None, module_param: Tensor | None, B: int) -> Tensor | None:
    """``[B, *shape]`` for a parameter that is either per task already or shared (``[*shape]``)."""
    if value is None:
        return None
    return value if value.dim() == module_param.dim() + 1 else value.expand(B, *value.shape)


def _conv(layer: Layer, p: Params, x: Tensor, B: int, bias: bool = True) -> Tensor:
    """x ``[M, B*C_in, H, W]`` -> ``[M, B*C_out, H', W']``, task ``b`` with its own weight.
    ``bias=False`` leaves the bias out (before BatchNorm, where it cancels: :func:`cancelled_biases`)."""
    m = layer.module
    w = _per_task(p[f"{layer.prefix}.weight"], m.weight, B)  # [B, C_out, C_in, k, k]
    b = _per_task(p.get(f"{layer.prefix}.bias"), m.bias, B) if bias else None  # [B, C_out]
    return F.conv2d(x, w.reshape(-1, *w.shape[2:]), None if b is None else b.reshape(-1),
                    m.stride, m.padding, m.dilation, groups=B)


def _bn(layer: Layer, p: Params, x: Tensor, B: int) -> Tensor:
    """Batch statistics per (task, channel) over ``(M, H, W)``: x ``[M, B*C, H, W]``."""
    m = layer.module
    w = _per_task(p.get(f"{layer.prefix}.weight"), m.weight, B)  # [B, C]
    b = _per_task(p.get(f"{layer.prefix}.bias"), m.bias, B)
    return F.batch_norm(x, None, None, None if w is None else w.reshape(-1), None if b is None else b.reshape(-1),
                        training=True, momentum=0.0, eps=m.eps)


def _linear(layer: Layer, p: Params, x: Tensor, B: int) -> Tensor:
    """x ``[B, M, F]`` -> ``[B, M, O]``."""
    m = layer.module
    w, b = p[f"{layer.prefix}.weight"], p.get(f"{layer.prefix}.bias")
    if w.dim() == 2 and (b is None or b.dim() == 1):  # shared by all tasks
        return F.linear(x, w, b)
    w = _per_task(w, m.weight, B)  # [B, O, F]
    if b is None:
        return torch.bmm(x, w.transpose(1, 2))
    return torch.baddbmm(_per_task(b, m.bias, B).unsqueeze(1), x, w.transpose(1, 2))


def to_grouped(x: Tensor) -> Tensor:
    """``[B, M, C, H, W]`` -> ``[M, B*C, H, W]``."""
    B, M = x.shape[:2]
    return x.transpose(0, 1).reshape(M, B * x.shape[2], *x.shape[3:])


def _in_format(x: Tensor, memory_format: torch.memory_format | None) -> Tensor:
    """``x`` in ``memory_format``. One channel is a special case: every stride is then both
    layouts' and ``contiguous`` keeps NCHW strides, so the convolution would answer in NCHW
    (a 10x slower max-pool after it here); the strides are set to say channels-last."""
    if memory_format is None or x.dim() != 4:
        return x
    x = x.contiguous(memory_format=memory_format)
    if memory_format == torch.channels_last and x.shape[1] == 1:
        x = x.as_strided(x.shape, (x.stride(0), 1, x.stride(3) * x.shape[3], x.stride(3)))
    return x


def _followed_by_bn(layers: list[Layer], i: int) -> bool:
    return layers[i].kind == "conv" and i + 1 < len(layers) and layers[i + 1].kind == "bn"


def cancelled_biases(layers: Iterable[Layer]) -> list[str]:
    """The biases of the convolutions that BatchNorm follows, which the batched path leaves out.

    BatchNorm on batch statistics (the only kind this path runs, :func:`_leaf`) subtracts each channel's
    mean over the batch, so a per-channel constant added before it cancels exactly:
    ``BN(conv(x) + b) = BN(conv(x))`` (Ioffe & Szegedy 2015, sec. 3.2), and the gradient of every loss with
    respect to ``b`` is zero. Leaving the addition out skips its sums in the backward and double backward
    passes; the loop's numbers are unchanged (its gradients for these biases are float rounding, about
    1e-8 of the others in float32).
    """
    layers = list(layers)
    return [f"{layers[i].prefix}.bias" for i in range(len(layers))
            if _followed_by_bn(layers, i) and layers[i].module.bias is not None]


def run_layers(layers: Iterable[Layer], params: Params, x: Tensor, B: int,
               memory_format: torch.memory_format | None = None) -> Tensor:
    """The layers on a meta-batch. ``x``: images in the grouped layout ``[M, B*C, H, W]`` or features
    ``[B, M, F]``; returns the same kinds. ``params[name]``: ``[B, *shape]`` per task or ``[*shape]`` shared.
    ``memory_format``: that of every convolution's output (None: what the convolution gives).
    A convolution's bias is left out where BatchNorm follows it (:func:`cancelled_biases`)."""
    layers = list(layers)
    x = _in_format(x, memory_format)
    own = False  # whether x is an output of this call (a ReLU may then overwrite it)
    for i, layer in enumerate(layers):
        if layer.kind == "conv":
            x = _conv(layer, params, x, B, bias=not _followed_by_bn(layers, i))
            if memory_format is not None:
                x = x.contiguous(memory_format=memory_format)
        elif layer.kind == "bn":
            x = _bn(layer, params, x, B)
        elif layer.kind == "maxpool":
            m = layer.module
            x = F.max_pool2d(x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
        elif layer.kind == "relu":
            # In place on an output of the layer before (its backward does not need it): 2-3% less time.
            x = F.relu(x, inplace=own)
        elif layer.kind == "flatten":
            if x.dim() == 4:  # [M, B*C, h, w] -> [B, M, C*h*w]
                x = x.reshape(x.shape[0], B, -1).transpose(0, 1)
            else:  # [B, M, ...]
                x = x.flatten(2)
        elif layer.kind == "mean":  # [M, B*C, h, w] -> [B, M, C], the mean over the map
            x = x.mean((2, 3)).reshape(x.shape[0], B, -1).transpose(0, 1)
        elif layer.kind == "linear":
            if x.dim() == 4:
                raise Unsupported("a Linear layer on images needs a Flatten before it")
            x = _linear(layer, params, x, B)
        own = layer.kind in ("conv", "bn", "maxpool", "relu", "linear")
    return x


def enter(x: Tensor) -> Tensor:
    """A meta-batch of inputs ``[B, M, ...]`` in the layout :func:`run_layers` takes: images
    ``[B, M, C, H, W]`` grouped, anything else ``[B, M, F...]`` as it is."""
    return to_grouped(x) if x.dim() == 5 else x


def leave(x: Tensor, B: int) -> Tensor:
    """Outputs back to ``[B, M, ...]``."""
    if x.dim() == 4:  # a network that ends on images
        return x.reshape(x.shape[0], B, -1, *x.shape[2:]).transpose(0, 1)
    return x


def each_with_support(layers: list[Layer], params: Params, query_x: Tensor, support_x: Tensor,
                      chunk: int = 16) -> Tensor:
    """Non-transductive outputs of one task: ``f([support; query_j])[-1]`` for every query ``j``, each query
    normalised with the support set alone. ``query_x [M, ...]``, ``support_x [S, ...]``, ``params`` the task's
    (``[*shape]``) -> ``[M, N]``. The ``[support; query_j]`` sets are laid out as tasks (BatchNorm statistics
    per set), ``chunk`` sets per pass: 1.52x faster than one pass per query on 5-way 1-shot Omniglot, where
    16 beat 1-8, 32 and 75 (``benchmarks/each_with_support.py``)."""
    outs = []
    for q in query_x.split(chunk):  # [c, ...]
        c = q.shape[0]
        sets = torch.cat([support_x.expand(c, *support_x.shape), q[:, None]], 1)  # [c, S + 1, ...]
        outs.append(leave(run_layers(layers, params, enter(sets), c), c)[:, -1])  # [c, N]
    return torch.cat(outs)


# ----------------------------------------------------------------------------------------------
# the inner loop over a meta-batch

def _split(layers: list[Layer], adapt_names: set[str]) -> int:
    """Index of the first layer with an adapted parameter: the layers before it are fixed during adaptation."""
    for i, layer in enumerate(layers):
        if any(n in adapt_names for n in layer.param_names):
            return i
    return len(layers)


def task_losses(loss_fn: LossFn, out: Tensor, y: Tensor) -> Tensor:
    """``[B]``: ``loss_fn`` of each task (the loop's own per-task loss, so its scale is the same)."""
    return torch.stack([loss_fn(out[b], y[b]) for b in range(out.shape[0])])


def _chunks(B: int, size: int | None) -> list[slice]:
    size = B if not size or size >= B else size
    return [slice(s, min(s + size, B)) for s in range(0, B, size)]


def _take(params: Params, theta: Params, parts: list[slice]) -> list[Params]:
    """The parameters of each part of the tasks (per-task ones split, shared ones as they are).
    One ``split`` per tensor: its backward is one concatenation, where a slice per part would
    add each part's gradient into its own zero-filled ``[B, ...]`` buffer."""
    sizes = [s.stop - s.start for s in parts]
    split = {k: v.split(sizes) for k, v in params.items() if v.dim() == theta[k].dim() + 1}
    return [{k: split[k][i] if k in split else v for k, v in params.items()} for i in range(len(parts))]


def query_grads_now(query_pass, p: Params, theta: Params, wanted: Iterable[str], x: Tensor, y: Tensor,
                    sx: Tensor) -> tuple[Tensor, Tensor, Params]:
    """``query_pass(p, x, y, sx)`` of ``c`` tasks -> (losses ``[c]``, outputs ``[c, M, N]``, ``{name: d loss_b / d p[name]
    [c, *shape]}`` for the ``wanted`` names), back-propagated at once, so that the query activations are freed
    before the next chunk's pass. ``p``: detached tensors, whose ``requires_grad`` is set here for the ``wanted``
    names. A parameter shared by the tasks (``[*shape]``, e.g. ANIL's
    body) enters the pass expanded to ``[c, *shape]``, so that its gradient comes per task. Nothing returned
    keeps a graph; :func:`with_query_gradients` joins the gradients to the parameters' own graph."""
    c = x.shape[0]
    leaves, inputs = {}, dict(p)
    for k in wanted:
        leaf = p[k].requires_grad_()
        inputs[k] = leaves[k] = leaf if leaf.dim() == theta[k].dim() + 1 else leaf.expand(c, *leaf.shape)
    loss, out = query_pass(inputs, x, y, sx)  # [c], [c, M, N]
    grads = torch.autograd.grad(loss.sum(), list(leaves.values()), materialize_grads=True)  # each [c, *shape]
    return loss.detach(), out.detach(), dict(zip(leaves, grads))


def with_query_gradients(losses: Tensor, params: Params, grads: Params) -> Tensor:
    """The surrogate ``l_b + <g_b, p_b> - stopgrad(<g_b, p_b>)`` of each task's query loss ``l_b`` (``losses [B]``,
    detached), ``g_b`` its gradient at the task's parameters ``p_b`` (``grads[name]`` ``[B, *shape]``, from
    :func:`query_grads_now`; ``params[name]`` ``[B, *shape]`` per task or ``[*shape]`` shared). Its value is
    ``l_b`` exactly and its gradient with respect to everything ``p_b`` came from (the inner loop, ``theta``,
    Meta-SGD's steps) is the query pass's own, whatever weights the outer loss gives the tasks."""
    dot = losses.new_zeros(losses.shape)  # [B]
    for k, g in grads.items():
        dot = dot + (g * params[k]).flatten(1).sum(1)  # a shared params[k] broadcasts
    return losses + (dot - dot.detach())


def layout_for(x: Tensor) -> dict:
    """The settings of :func:`batched_task_outputs` measured fastest for query inputs like ``x``
    ``[B, M, ...]`` (see the module's docstring): on CPU, images take the support pass 8 tasks per
    call and the query pass one task at a time in channels-last; everything else (GPU, vectors) takes
    the whole meta-batch at once."""
    if x.device.type == "cpu" and x.dim() == 5:
        return {"support_chunk": 8, "query_chunk": 1, "channels_last": True}
    return {}


def batched_task_outputs(layers: list[Layer], theta: Params, support_x: Tensor, support_y: Tensor,
                         query_x: Tensor, query_y: Tensor, support_loss: LossFn, query_loss: LossFn,
                         rule: UpdateRule, steps: int, adapt_names: Iterable[str], first_order: bool,
                         training: bool, support_chunk: int | None = None, query_chunk: int | None = None,
                         channels_last: bool = False, recompute_queries: bool = False,
                         transductive: bool = True, query_backward_now: bool = True) -> tuple[Tensor, Tensor]:
    """Query losses ``[B]`` and outputs ``[B, M, N]`` of every task after ``steps`` inner updates.

    The numbers of ``MAML.task_outputs``'s loop (eq. 1 per task, then the query loss, eq. 2):
    ``support_x [B, N*K, ...]``, ``support_y [B, N*K]``, ``query_x [B, M, ...]``, ``query_y [B, M]``;
    ``theta``: the meta-parameters ``{name: [*shape]}``. ``training``: the graph back to ``theta``
    (second order unless ``first_order``); otherwise inference, detached results.
    ``support_chunk`` / ``query_chunk``: tasks per grouped call in the support / query passes
    (None: all ``B``); ``channels_last``: the query pass in channels-last memory format.
    ``recompute_queries``: keep only each query chunk's inputs and recompute its activations in the
    backward pass (``torch.utils.checkpoint``): one more query forward pass, for a graph that no
    longer holds every task's query activations at once. ``transductive=False``: each query normalised with
    its task's support set alone (:func:`each_with_support`), as ``MAML.outputs`` does.
    ``query_backward_now`` (training, without ``recompute_queries``): each query chunk back-propagates to its
    parameters as soon as its forward pass ends (:func:`query_grads_now`, :func:`with_query_gradients`), so the graph
    returned holds the support passes only; the gradients of the losses are the same, the outputs come back detached.
    """
    names = [n for n in theta if n in set(adapt_names)]
    B = support_x.shape[0]
    grad_ctx = torch.enable_grad() if training else torch.no_grad()
    if not training:
        theta = {k: v.detach() for k, v in theta.items()}
    cut = _split(layers, set(names))
    fixed, adapted = layers[:cut], layers[cut:]
    support_parts = _chunks(B, support_chunk)
    with grad_ctx:  # the layers that do not adapt: once, not once per step
        support_h = [run_layers(fixed, theta, enter(support_x[s]), s.stop - s.start) for s in support_parts]
    params = dict(theta)
    state: dict = {}
    for step in range(steps):
        with torch.enable_grad():
            fast = {}
            for k in names:
                v = params[k]
                if not training or not v.requires_grad:  # inference: every step from detached leaves
                    v = v.detach().requires_grad_()
                fast[k] = v.expand(B, *v.shape) if v.dim() == theta[k].dim() else v  # [B, *shape]
            current = {**params, **fast}
            losses = torch.cat([task_losses(support_loss, leave(run_layers(
                adapted, p, h, s.stop - s.start), s.stop - s.start), support_y[s])
                for s, h, p in zip(support_parts, support_h, _take(current, theta, support_parts))])  # [B]
            state["loss"] = losses.detach()
            grads = torch.autograd.grad(losses.sum(), [fast[k] for k in names],
                                        create_graph=training and not first_order, materialize_grads=True)
            new = rule.update(fast, dict(zip(names, grads)), step, state)
        params.update(new if training else {k: v.detach() for k, v in new.items()})
    fmt = torch.channels_last if channels_last else None

    def query_pass(p: Params, x: Tensor, y: Tensor, sx: Tensor) -> tuple[Tensor, Tensor]:
        c = x.shape[0]
        if transductive:
            out = leave(run_layers(adapted, p, run_layers(fixed, p, enter(x), c, fmt), c, fmt), c)  # [c, M, N]
        else:  # every layer again: the support set's statistics now include one query
            out = torch.stack([each_with_support(layers, {k: v[i] if v.dim() == theta[k].dim() + 1 else v
                                                          for k, v in p.items()}, x[i], sx[i]) for i in range(c)])
        return task_losses(query_loss, out, y), out

    losses, outs, grads = [], [], {}  # grads: {name: [B, *shape]}, each task's query gradient
    now = training and query_backward_now and not recompute_queries
    wanted = [k for k, v in params.items() if v.requires_grad] if now else []
    with grad_ctx:
        query_parts = _chunks(B, query_chunk)
        source = {k: v.detach() for k, v in params.items()} if now else params
        for s, p in zip(query_parts, _take(source, theta, query_parts)):
            if recompute_queries and training:
                loss, out = checkpoint(query_pass, p, query_x[s], query_y[s], support_x[s], use_reentrant=False)
            elif now:
                loss, out, g = query_grads_now(query_pass, p, theta, wanted, query_x[s], query_y[s], support_x[s])
                for k, v in g.items():
                    grads.setdefault(k, v.new_empty(B, *v.shape[1:]))[s] = v
            else:
                loss, out = query_pass(p, query_x[s], query_y[s], support_x[s])
            losses.append(loss)  # [c]
            outs.append(out)  # [c, M, N]
        losses = torch.cat(losses)
        if now and wanted:
            losses = with_query_gradients(losses, params, grads)
        # The adapted biases the query pass left out enter the losses with weight zero, so that everything
        # they came from (theta's bias, Meta-SGD's step for it) gets its exact meta-gradient, a zero tensor.
        unused = [params[k] for k in cancelled_biases(layers) if k in params and params[k].requires_grad]
        if unused:
            losses = losses + 0 * sum(b.sum() for b in unused)
    return losses, torch.cat(outs)
