"""Siamese networks: one embedding network applied twice (shared weights) to a pair, and a rule on the pair.

Two objectives, ``model.loss``:

- ``"contrastive"`` (after Hadsell, Chopra & LeCun, CVPR 2006, eq. 4), over pairs ``(a_i, b_i)``
  with ``y_i = 1`` for the same class and Euclidean ``d_i = ||f(a_i) - f(b_i)||_2``:

  - default (``squared: false``), the form of our issue, linear in ``d``:
    ``L = 1/P sum_i [ y_i d_i + (1 - y_i) max(0, m - d_i) ]``;
  - ``squared: true``, Hadsell et al.'s own form:
    ``L = 1/P sum_i [ 1/2 y_i d_i^2 + 1/2 (1 - y_i) max(0, m - d_i)^2 ]``
    (their eq. 4 writes ``Y = 0`` for a similar pair; here ``y = 1`` means same class).

  Both are averaged over the ``P`` pairs (the sum divided by ``P``: the step size does not depend
  on how many pairs a batch holds). The linear form is the default because metakit's issue #4
  specifies it: its gradient on a positive pair does not fade as the pair closes in (pulls keep a
  unit-size gradient), and a negative pair inside the margin is pushed with a constant force
  rather than one that vanishes at the margin.

- ``"koch"`` (Koch, Zemel & Salakhutdinov, ICML DL Workshop 2015, sec. 3.1-3.2): the weighted L1
  distance of the twin embeddings, a linear unit and a sigmoid,
  ``p = sigma(sum_j alpha_j |h1_j - h2_j| + b)``, trained with binary cross-entropy on
  same / different (their "regularized cross-entropy"; the L2 term is ``train.weight_decay``), on
  images distorted by their random affine transforms (sec. 3.2, :func:`affine_distort`). Each
  image of an episode is distorted once per step, before the pairs are formed, so the two members
  of a pair are distorted independently, at the cost of one encoder pass per image, not per pair.

Defaults: Koch's objective and distortions (the published Siamese setting on Omniglot) on the Conv4
backbone at 28x28, the field's common one; ``backbone: koch`` gives Koch's network at 105x105.

Pairs come from the episodes every learner trains on: ``meta_loss`` pools a task's support and
query examples and draws ``model.pairs`` pairs, ``model.positive_fraction`` of them same-class
(:func:`metakit.data.pairs.episode_pairs`, seeded by torch's generator, which ``fit`` seeds and
checkpoints). N-way K-shot classification (Koch sec. 4.3): each query goes to the class of its most
similar support example (``shots_rule: nearest``) or of the highest mean similarity over the
class's K examples (``mean``); the similarity is ``-d`` (contrastive) or the log-odds of "same"
(Koch).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.pairs import episode_pairs
from ..nn import Conv4
from ..nn.koch import KochNet, koch_init_
from ..tasks import MetaOutput, TaskBatch, accuracy
from .base import Learner, register
from .metric import check_test_shift, embed_tasks, encode, metric_adapt

# Koch et al. sec. 3.2, the affine distortions: rotation (degrees), shear, scale, translation
# (pixels at 105x105; the same fraction of the image at other sizes), each component applied with
# probability 0.5.
KOCH_ROTATION, KOCH_SHEAR, KOCH_SCALE, KOCH_SHIFT, KOCH_SIZE = 10.0, 0.3, (0.8, 1.2), 2.0, 105


def contrastive_loss(distance: Tensor, same: Tensor, margin: float = 1.0, squared: bool = False,
                     reduction: str = "mean") -> Tensor:
    """Contrastive loss of pair distances ``[...]`` with ``same [...]`` (1 same class, 0 not).

    Linear: ``y d + (1 - y) max(0, m - d)``; squared (Hadsell et al. 2006, eq. 4):
    ``1/2 y d^2 + 1/2 (1 - y) max(0, m - d)^2``. ``reduction``: ``"mean"``, ``"sum"`` or ``"none"``.
    """
    y = same.to(distance.dtype)
    hinge = F.relu(margin - distance)
    if squared:
        per_pair = 0.5 * y * distance.pow(2) + 0.5 * (1 - y) * hinge.pow(2)
    else:
        per_pair = y * distance + (1 - y) * hinge
    if reduction == "none":
        return per_pair
    return per_pair.sum() if reduction == "sum" else per_pair.mean()


def affine_distort(x: Tensor, generator: torch.Generator | None = None, probability: float = 0.5) -> Tensor:
    """Koch et al.'s random affine distortion of each image: ``x [M, C, H, W]`` -> ``[M, C, H, W]``.

    Rotation in +-10 degrees, shears in +-0.3, scales in [0.8, 1.2], translations in +-2 px (of 105),
    each of the 7 components drawn independently and kept with ``probability`` (else the identity
    value). Bilinear resampling; outside the image is paper (0).
    """
    M = x.shape[0]

    def draw(low: float, high: float, identity: float, n: int = 1) -> Tensor:
        value = low + (high - low) * torch.rand(M, n, generator=generator, device=x.device)
        keep = torch.rand(M, n, generator=generator, device=x.device) < probability
        return torch.where(keep, value, torch.full_like(value, identity))

    theta = draw(-KOCH_ROTATION, KOCH_ROTATION, 0.0)[:, 0] * math.pi / 180  # [M]
    shear = draw(-KOCH_SHEAR, KOCH_SHEAR, 0.0, 2)  # [M, 2]
    scale = draw(*KOCH_SCALE, 1.0, 2)  # [M, 2]
    shift = draw(-KOCH_SHIFT, KOCH_SHIFT, 0.0, 2) * 2 / KOCH_SIZE  # [M, 2], in [-1, 1] image coordinates
    cos, sin = torch.cos(theta), torch.sin(theta)
    rotation = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # [M, 2, 2]
    one = torch.ones(M, device=x.device)
    shearing = torch.stack([torch.stack([one, shear[:, 0]], -1), torch.stack([shear[:, 1], one], -1)], -2)
    A = rotation @ shearing @ torch.diag_embed(scale)  # [M, 2, 2]
    grid = F.affine_grid(torch.cat([A, shift.unsqueeze(-1)], -1).to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@register("siamese")
class Siamese(Learner):
    """Twin embedding network trained on same / different pairs; nearest-support classification at test."""

    @dataclass
    class Options:
        loss: str = "koch"                 # koch (Koch et al. 2015) | contrastive (Hadsell et al. 2006)
        margin: float = 1.0                # contrastive: m
        squared: bool = False              # contrastive: Hadsell's squared form instead of the linear one
        backbone: str = "conv4"            # conv4 (28x28) | koch (Koch et al.'s network, 105x105)
        hidden: int = 64                   # conv4 filters per block
        blocks: int = 4                    # conv4 blocks; 5 at 56x56 pools to a 64-d embedding again
        init: str = "paper"                # koch backbone: paper (Koch sec. 3.2) | torch (PyTorch default)
        pairs: int = 128                   # pairs per task (Koch: minibatches of 128)
        positive_fraction: float = 0.5     # share of same-class pairs
        augment: bool = True               # Koch's affine distortions on training images
        shots_rule: str = "nearest"        # K-shot classification: nearest support example | mean similarity
        test_shift: int = 0                # at test: mean embedding over translations by -n..n px (metric.encode)

    def __init__(self, options: "Siamese.Options | None" = None, in_channels: int = 1, image_size: int = 28,
                 **_) -> None:
        super().__init__()
        o = self.options = options or Siamese.Options()
        for key, allowed in (("loss", ("koch", "contrastive")), ("backbone", ("conv4", "koch")),
                             ("shots_rule", ("nearest", "mean"))):
            if getattr(o, key) not in allowed:
                raise ValueError(f"model.{key} must be one of {list(allowed)}, got {getattr(o, key)!r}")
        if o.backbone == "koch":
            self.encoder = KochNet(in_channels, image_size, init=o.init)
        else:
            self.encoder = Conv4(in_channels, o.hidden, image_size=image_size, blocks=o.blocks)
        self.head = nn.Linear(self.encoder.embedding_dim, 1) if o.loss == "koch" else None  # alpha_j, b
        if self.head is not None and o.backbone == "koch" and o.init == "paper":
            koch_init_(self.head)
        check_test_shift(o.test_shift)

    @property
    def same_threshold(self) -> float:
        """Scores above this mean "same class": p > 0.5 (Koch), or d < m / 2 (contrastive)."""
        return 0.0 if self.options.loss == "koch" else -self.options.margin / 2

    def embed(self, x: Tensor) -> Tensor:
        """x [..., C, H, W] -> [..., D]; averaged over ``test_shift`` translations at test."""
        return encode(self.encoder, x, 0 if self.training else self.options.test_shift)

    def pair_scores(self, z1: Tensor, z2: Tensor) -> Tensor:
        """Similarity of matched embeddings ``[..., D]`` -> ``[...]``: log-odds of same (Koch) or -d."""
        if self.head is not None:
            return self.head((z1 - z2).abs()).squeeze(-1)
        return -torch.linalg.vector_norm(z1 - z2, dim=-1)

    def all_scores(self, zq: Tensor, zs: Tensor) -> Tensor:
        """Similarity of every query to every support example: ``[B, M, D], [B, S, D] -> [B, M, S]``."""
        if self.head is None:
            return -torch.cdist(zq, zs, compute_mode="donot_use_mm_for_euclid_dist")
        # [B, m, S, D] at a time: the weighted L1 distance has no matrix-product form
        chunk = max(1, (1 << 24) // max(1, zs.shape[1] * zs.shape[2] * zs.shape[0]))
        return torch.cat([self.pair_scores(zq[:, i:i + chunk, None], zs[:, None])
                          for i in range(0, zq.shape[1], chunk)], dim=1)

    def class_logits(self, scores: Tensor, support_y: Tensor, ways: int) -> Tensor:
        """Per-class score ``[B, M, N]`` from ``scores [B, M, S]``: best (nearest) or mean over the class's shots."""
        onehot = F.one_hot(support_y, ways).to(scores.dtype)  # [B, S, N]
        if self.options.shots_rule == "mean":
            return scores @ onehot / onehot.sum(1, keepdim=True)
        masked = scores.unsqueeze(-1).masked_fill(onehot.unsqueeze(1) == 0, float("-inf"))  # [B, M, S, N]
        return masked.amax(2)

    def pair_loss(self, scores: Tensor, same: Tensor) -> Tensor:
        if self.head is not None:
            return F.binary_cross_entropy_with_logits(scores, same.to(scores.dtype))
        o = self.options
        return contrastive_loss(-scores, same, o.margin, o.squared)

    def meta_loss(self, batch: TaskBatch) -> MetaOutput:
        B, S = batch.support_x.shape[:2]
        x = torch.cat([batch.support_x, batch.query_x], dim=1)  # [B, T, C, H, W]
        if self.training and self.options.augment:
            x = affine_distort(x.flatten(0, 1)).view_as(x)
        z = embed_tasks(self.embed, self.encoder, x)  # [B, T, D]
        scores = self.all_scores(z[:, S:], z[:, :S])  # [B, M, S]
        logits = self.class_logits(scores, batch.support_y, batch.ways)  # [B, M, N]
        if self.training:  # sampled pairs in the set ratio
            labels = torch.cat([batch.support_y, batch.query_y], dim=1)  # [B, T]
            first, second, same = episode_pairs(labels, self.options.pairs, self.options.positive_fraction)
            D = z.shape[-1]
            z1 = z.gather(1, first.unsqueeze(-1).expand(-1, -1, D))  # [B, P, D]
            z2 = z.gather(1, second.unsqueeze(-1).expand(-1, -1, D))
            pair_scores = self.pair_scores(z1, z2)  # [B, P]
        else:  # every (query, support) pair: deterministic
            pair_scores = scores
            same = batch.query_y.unsqueeze(-1) == batch.support_y.unsqueeze(1)  # [B, M, S]
        loss = self.pair_loss(pair_scores, same)
        verified = ((pair_scores > self.same_threshold) == same).float().mean()
        acc = accuracy(logits, batch.query_y).mean()
        return MetaOutput(loss, logits, {"loss": loss.item(), "accuracy": acc.item(),
                                         "pair_accuracy": verified.item()})

    def adapt(self, support_x: Tensor, support_y: Tensor):
        return metric_adapt(self.embed, support_x, support_y,
                            lambda zq, zs, ys, ways: self.class_logits(self.all_scores(zq, zs), ys, ways))

    def similarity(self, x1: Tensor, x2: Tensor) -> Tensor:
        """Verification scores of pairs ``x1, x2 [P, C, H, W]`` -> ``[P]``, higher for "same class".

        Koch: the log-odds of "same" (``sigmoid`` of it is the paper's ``p``); contrastive: ``-d``.
        Compare with :attr:`same_threshold`.
        """
        z = self.embed(torch.cat([x1, x2]))  # one encoder pass: [2P, D]
        return self.pair_scores(z[:x1.shape[0]], z[x1.shape[0]:])

    def example_scores(self, query_x: Tensor, support_x: Tensor) -> Tensor:
        """Similarity of each query to each support example: ``[M, ...], [S, ...] -> [M, S]``."""
        return self.all_scores(self.embed(query_x)[None], self.embed(support_x)[None])[0]
