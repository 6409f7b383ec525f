"""Matching Networks (Vinyals, Blundell, Lillicrap, Kavukcuoglu & Wierstra, NeurIPS 2016).

A query ``x^`` is labelled by attention over the support set ``S = {(x_i, y_i)}`` (eq. 1),
``P(y^ | x^, S) = sum_i a(x^, x_i) y_i`` with one-hot ``y_i``, where the attention is a softmax over
cosine similarities of the embeddings (eq. 2),
``a(x^, x_i) = exp(c(f(x^), g(x_i))) / sum_j exp(c(f(x^), g(x_j)))``.
The loss is ``-log P(y^ | x^, S)`` averaged over queries and tasks; ``logits`` are ``log P``.

Without full-context embeddings (the default, as in the paper's Omniglot table) ``f = g`` is the
Conv4 embedding. With ``model.fce`` (sec. 2.1.2, appendix A):

- ``g(x_i, S) = h_i(forward) + h_i(backward) + g'(x_i)``: a bidirectional LSTM over the support
  embeddings, in the order the sampler gives them (A.2);
- ``f(x^, S) = attLSTM(f'(x^), g(S), K)`` (A.1): for ``k = 1..K``,
  ``h^_k, c_k = LSTM(f'(x^), [h_{k-1}, r_{k-1}], c_{k-1})``, ``h_k = h^_k + f'(x^)``,
  ``r_k = sum_i softmax_i(h_k^T g(x_i)) g(x_i)``, and ``f = h_K``; ``h_0, r_0, c_0 = 0``.
  Feeding ``r_{k-1}`` beside ``f'(x^)`` as the cell's input is the same map as carrying
  ``[h_{k-1}, r_{k-1}]`` as its hidden state: the gates are linear in all of them.

``model.scale`` multiplies the cosine before the softmax; 1 is the paper's eq. 2 (a learned or
larger scale is a common departure when cosines of ReLU features crowd into [0, 1]).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import Conv4
from ..tasks import MetaOutput, TaskBatch, accuracy
from .base import Learner, register
from .metric import check_test_shift, embed_tasks, encode, metric_adapt


def cosine_attention(zq: Tensor, zs: Tensor, scale: float = 1.0) -> Tensor:
    """Eq. 2: ``softmax_i(scale * cos(zq_m, zs_i))``: ``[B, M, D], [B, S, D] -> [B, M, S]`` (rows sum to 1)."""
    cos = F.normalize(zq, dim=-1, eps=1e-8) @ F.normalize(zs, dim=-1, eps=1e-8).transpose(1, 2)
    return torch.softmax(scale * cos, dim=-1)


def label_log_probs(attention: Tensor, support_y: Tensor, ways: int) -> Tensor:
    """Eq. 1: ``log sum_i a(x^, x_i) y_i``: attention ``[B, M, S]``, labels ``[B, S]`` -> ``[B, M, N]``."""
    onehot = F.one_hot(support_y, ways).to(attention.dtype)  # [B, S, N]
    return (attention @ onehot).clamp_min(1e-12).log()


class FullContext(nn.Module):
    """Full-context embeddings ``g`` (bidirectional LSTM) and ``f`` (attention LSTM, K steps), appendix A."""

    def __init__(self, dim: int, steps: int) -> None:
        super().__init__()
        self.support_lstm = nn.LSTM(dim, dim, batch_first=True, bidirectional=True)
        self.query_cell = nn.LSTMCell(2 * dim, dim)
        self.steps = steps

    def g(self, zs: Tensor) -> Tensor:
        """``[B, S, D] -> [B, S, D]``: forward + backward LSTM states + the embedding itself (A.2)."""
        out, _ = self.support_lstm(zs)  # [B, S, 2D]
        D = zs.shape[-1]
        return out[..., :D] + out[..., D:] + zs

    def f(self, zq: Tensor, gs: Tensor) -> Tensor:
        """``f'(x^) [B, M, D]``, ``g(S) [B, S, D]`` -> ``f(x^, S) [B, M, D]`` after K steps (A.1)."""
        B, M, D = zq.shape
        x = zq.reshape(B * M, D)
        h = torch.zeros_like(x)
        c = torch.zeros_like(x)
        r = torch.zeros_like(x)
        for _ in range(self.steps):
            h, c = self.query_cell(torch.cat([x, r], -1), (h, c))
            h = h + x  # [B*M, D]
            a = torch.softmax(h.view(B, M, D) @ gs.transpose(1, 2), dim=-1)  # [B, M, S], dot-product attention
            r = (a @ gs).reshape(B * M, D)
        return h.view(B, M, D)


@register("matching")
class MatchingNet(Learner):
    """Conv4 embedding, cosine attention over the support set; full-context embeddings with ``fce``."""

    @dataclass
    class Options:
        hidden: int = 64          # conv filters per block
        fce: bool = False         # full-context embeddings (sec. 2.1.2)
        fce_steps: int = 5        # K, processing steps of the attention LSTM (not reported in the paper)
        scale: float = 1.0        # multiplies the cosine in eq. 2 (1: the paper)
        blocks: int = 4           # conv blocks; 5 at 56x56 pools to a 64-d embedding again
        test_shift: int = 0       # at test: mean embedding over translations by -n..n px (metric.encode)

    def __init__(self, options: "MatchingNet.Options | None" = None, in_channels: int = 1, image_size: int = 28,
                 **_) -> None:
        super().__init__()
        self.options = options or MatchingNet.Options()
        self.encoder = Conv4(in_channels, self.options.hidden, image_size=image_size, blocks=self.options.blocks)
        if self.options.fce and self.options.fce_steps < 1:
            raise ValueError(f"model.fce_steps must be at least 1, got {self.options.fce_steps}")
        self.context = FullContext(self.encoder.embedding_dim, self.options.fce_steps) if self.options.fce else None
        check_test_shift(self.options.test_shift)

    def embed(self, x: Tensor) -> Tensor:
        """The context-free embedding ``f' = g'``: x [..., C, H, W] -> [..., D]; averaged over ``test_shift``
        translations at test."""
        return encode(self.encoder, x, 0 if self.training else self.options.test_shift)

    def contextual(self, zq: Tensor, zs: Tensor) -> tuple[Tensor, Tensor]:
        """``(f(x^, S) [B, M, D], g(S) [B, S, D])``; the plain embeddings without FCE."""
        if self.context is None:
            return zq, zs
        gs = self.context.g(zs)
        return self.context.f(zq, gs), gs

    def attention(self, zq: Tensor, zs: Tensor) -> Tensor:
        """Eq. 2 over the (contextual) embeddings: ``[B, M, S]``."""
        fq, gs = self.contextual(zq, zs)
        return cosine_attention(fq, gs, self.options.scale)

    def meta_loss(self, batch: TaskBatch) -> MetaOutput:
        S = batch.support_x.shape[1]
        z = embed_tasks(self.embed, self.encoder, torch.cat([batch.support_x, batch.query_x], dim=1))  # [B, S + M, D]
        logits = label_log_probs(self.attention(z[:, S:], z[:, :S]), batch.support_y, batch.ways)  # [B, M, N]
        loss = F.nll_loss(logits.flatten(0, 1), batch.query_y.flatten())
        acc = accuracy(logits, batch.query_y).mean()
        return MetaOutput(loss, logits, {"loss": loss.item(), "accuracy": acc.item()})

    def adapt(self, support_x: Tensor, support_y: Tensor):
        return metric_adapt(self.embed, support_x, support_y,
                            lambda zq, zs, ys, ways: label_log_probs(self.attention(zq, zs), ys, ways))

    def example_scores(self, query_x: Tensor, support_x: Tensor) -> Tensor:
        """Cosine of each query to each support example (eq. 2 before the softmax): ``[M, S]``."""
        fq, gs = self.contextual(self.embed(query_x)[None], self.embed(support_x)[None])
        return (F.normalize(fq, dim=-1, eps=1e-8) @ F.normalize(gs, dim=-1, eps=1e-8).transpose(1, 2))[0]
