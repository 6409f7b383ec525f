"""What a metric learner learned, as pictures: ``metakit embed CHECKPOINT``.

(a) ``embedding_pca.png``: the embeddings of test characters projected on their first two principal
components, one colour per class; (b) ``nearest_support.png``: for some queries, the support
examples the learner finds closest (its own comparison: ``learner.example_scores`` when it has one,
else minus the squared Euclidean distance of the embeddings, ProtoNet's metric), framed green when
of the query's class, red when not. For learners with an ``embed`` method (ProtoNet, Siamese, Matching).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .engine.checkpoint import CheckpointError


def pca_2d(z: Tensor) -> tuple[Tensor, Tensor]:
    """``z [M, D]`` -> coordinates on the first two principal components ``[M, 2]``, their variance shares ``[2]``."""
    centred = z.double() - z.double().mean(0)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    k = min(2, vh.shape[0])
    coords = centred @ vh[:k].T
    if k < 2:
        coords = torch.cat([coords, torch.zeros(z.shape[0], 2 - k, dtype=coords.dtype)], 1)
    var = s.pow(2)
    share = var[:2] / var.sum().clamp_min(1e-12)
    return coords.float(), torch.cat([share, torch.zeros(2 - share.numel(), dtype=share.dtype)]).float()


def scores(learner, query_x: Tensor, support_x: Tensor) -> Tensor:
    """The learner's similarity of each query to each support example: ``[M, S]``, higher is closer."""
    if hasattr(learner, "example_scores"):
        return learner.example_scores(query_x, support_x)
    zq, zs = learner.embed(query_x), learner.embed(support_x)
    return -(zq.unsqueeze(1) - zs.unsqueeze(0)).pow(2).sum(-1)


def _show(ax, image: Tensor, invert: bool) -> None:
    """uint8 ``[C, H, W]`` on an axis; stored ink is 255 when ``invert``, drawn dark on light paper."""
    if image.shape[0] == 1:
        ax.imshow(image[0].numpy(), cmap="gray_r" if invert else "gray", vmin=0, vmax=255)
    else:
        rgb = image.permute(1, 2, 0)
        ax.imshow((255 - rgb if invert else rgb).numpy())
    ax.set_xticks([])
    ax.set_yticks([])


def embedding_pictures(learner, out: str | Path, split: str | None = None, classes: int = 20, queries: int = 8,
                       neighbours: int = 5, seed: int = 0) -> list[Path]:
    """Write ``embedding_pca.png`` and ``nearest_support.png`` for ``learner`` (:func:`metakit.load`) into ``out``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .data import load_split

    config = learner.config
    if not hasattr(learner, "embed"):
        raise CheckpointError(f"metakit embed needs a metric learner with an embedding (protonet, siamese, matching); "
                              f"this checkpoint holds a {config.algorithm} learner")
    split = split or config.data.test_split
    dataset = load_split(config.data, split, config.seed)
    if dataset is None:
        raise CheckpointError(f"metakit embed draws images; a {config.data.dataset} checkpoint has none")
    g = torch.Generator().manual_seed(seed)
    eligible = torch.nonzero(dataset.counts >= 2).flatten()
    if eligible.numel() < 2:
        raise CheckpointError(f"{dataset.name} needs 2 classes with 2+ examples for these pictures")
    chosen = eligible[torch.randperm(eligible.numel(), generator=g)[:classes]]  # [N]
    rows = [dataset.class_indices(int(c)) for c in chosen]
    labels = torch.cat([torch.full((r.numel(),), i) for i, r in enumerate(rows)])  # [M]
    rows = torch.cat(rows)
    images = dataset.images[rows]  # uint8 [M, C, H, W]
    x = images.float() / 255
    invert = bool(dataset.transform.get("invert", True))
    was_training = learner.training
    learner.eval()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        with torch.no_grad():
            z = torch.cat([learner.embed(x[i:i + 256]) for i in range(0, x.shape[0], 256)])  # [M, D]
            coords, share = pca_2d(z)
            # support: the first example of each class; queries: other examples, drawn at random
            first = torch.tensor([int(torch.nonzero(labels == i)[0]) for i in range(len(chosen))])
            rest = torch.tensor([i for i in range(labels.numel()) if i not in set(first.tolist())])
            q = rest[torch.randperm(rest.numel(), generator=g)[:queries]]
            sim = scores(learner, x[q], x[first])  # [Q, N]
    finally:
        learner.train(was_training)
    names = [dataset.class_names[int(c)] for c in chosen]

    fig, ax = plt.subplots(figsize=(7, 6))
    cmap = plt.get_cmap("tab20")
    for i, name in enumerate(names):
        m = labels == i
        colour = cmap((2 * i) % 20 + (i // 10) % 2)  # dark shades first: neighbours differ
        ax.scatter(coords[m, 0].numpy(), coords[m, 1].numpy(), s=18, color=colour, label=name)
    ax.set(xlabel=f"PC 1 ({100 * share[0]:.0f}% of variance)", ylabel=f"PC 2 ({100 * share[1]:.0f}%)",
           title=f"{config.algorithm} embeddings of {len(names)} {split} classes (PCA)")
    if len(names) <= 20:
        ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    pca_path = out / "embedding_pca.png"
    fig.savefig(pca_path, dpi=110)
    plt.close(fig)

    k = min(neighbours, len(chosen))
    order = sim.argsort(dim=1, descending=True)[:, :k]  # [Q, k]
    fig, axes = plt.subplots(len(q), k + 1, figsize=(1.3 * (k + 1), 1.35 * len(q)), squeeze=False)
    for r, qi in enumerate(q.tolist()):
        _show(axes[r, 0], images[qi], invert)
        axes[r, 0].set_ylabel("query", fontsize=7)
        for j in range(k):
            s = int(order[r, j])
            ax = axes[r, j + 1]
            _show(ax, images[int(first[s])], invert)
            colour = "tab:green" if s == int(labels[qi]) else "tab:red"
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(3)
            ax.set_title(f"{float(sim[r, s]):.2f}", fontsize=6)
    fig.suptitle(f"closest of {len(chosen)} support examples (green: the query's class)", fontsize=9)
    fig.tight_layout()
    grid_path = out / "nearest_support.png"
    fig.savefig(grid_path, dpi=110)
    plt.close(fig)
    return [pca_path, grid_path]
