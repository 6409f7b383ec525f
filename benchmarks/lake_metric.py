"""Does another distance on the same embedding lower Lake's within-alphabet error?

    python benchmarks/lake_metric.py checkpoints/omniglot/protonet_lake.pt --episodes 400

A trained metric learner's embeddings of Lake's 400 episodes (the same as ``metakit eval --protocol
lake-within-alphabet``), classified by the nearest support example under each of:

- Euclidean distance (what ProtoNet uses; at one shot the prototype is the support embedding);
- cosine similarity;
- cosine after centring on the mean of the episode's 20 support embeddings (the alphabet's shared
  part taken out, as SimpleShot's CL2N does with the training mean; Wang et al. 2019), on the mean of
  supports and queries, or on the mean of the background set's embeddings;
- Mahalanobis distance under the within-class covariance of the background set's embeddings
  (20 drawings per character), shrunk towards the identity by ``lam`` times its mean variance.

No training: everything is computed from one checkpoint. Needs a learner with ``embed``
(protonet, matching, siamese) whose BatchNorm keeps running statistics, so that an embedding does
not depend on the batch it is computed in.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import metakit  # noqa: E402
from metakit.algorithms.metric import uses_batch_statistics  # noqa: E402
from metakit.data.lake import lake_sampler  # noqa: E402
from metakit.data.omniglot import load_archive  # noqa: E402
from metakit.engine.evaluate import mean_ci95  # noqa: E402


def within_class_whitening(z: torch.Tensor, lam: float) -> torch.Tensor:
    """z [C, R, D] (R drawings of C classes) -> W [D, D] with W^T W = (S_w + lam * mean var * I)^-1."""
    centred = z - z.mean(1, keepdim=True)
    s_w = torch.einsum("crd,cre->de", centred, centred) / (z.shape[0] * (z.shape[1] - 1))  # [D, D]
    a = s_w + lam * s_w.diagonal().mean() * torch.eye(z.shape[-1], dtype=z.dtype)
    e, v = torch.linalg.eigh(a)
    return v @ torch.diag(e.rsqrt()) @ v.T


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--episodes", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-root", help="data root (default $METAKIT_DATA or ~/.cache/metakit)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    learner = metakit.load(args.checkpoint).eval()
    if not hasattr(learner, "embed") or uses_batch_statistics(learner.encoder):
        sys.exit(f"{args.checkpoint}: needs a metric learner whose BatchNorm keeps running statistics")
    size = learner.config.data.image_size

    background = load_archive("images_background", size, root=args.data_root)["images"]  # [C, 20, S, S] uint8
    x = background.float().div(255).reshape(-1, 1, size, size)
    with torch.no_grad():
        z_bg = torch.cat([learner.embed(x[i:i + 500]) for i in range(0, len(x), 500)])
    z_bg = z_bg.double().reshape(*background.shape[:2], -1)  # [C, 20, D]
    bg_mean = z_bg.mean((0, 1))
    whiten = {lam: within_class_whitening(z_bg, lam) for lam in (0.01, 0.1, 1.0)}

    def nearest(zq, zs):  # Euclidean
        return torch.cdist(zq, zs).argmin(-1)

    def most_similar(zq, zs):  # cosine
        return (F.normalize(zq, dim=-1) @ F.normalize(zs, dim=-1).T).argmax(-1)

    rules = {
        "Euclidean (ProtoNet's)": lambda zq, zs: nearest(zq, zs),
        "cosine": lambda zq, zs: most_similar(zq, zs),
        "cosine, centred on the support mean": lambda zq, zs: most_similar(zq - zs.mean(0), zs - zs.mean(0)),
        "cosine, centred on the support and query mean":
            lambda zq, zs: most_similar(zq - torch.cat([zs, zq]).mean(0), zs - torch.cat([zs, zq]).mean(0)),
        "cosine, centred on the background mean": lambda zq, zs: most_similar(zq - bg_mean, zs - bg_mean),
    }
    for lam, w in whiten.items():
        rules[f"Mahalanobis, background within-class covariance, lam {lam}"] = \
            lambda zq, zs, w=w: nearest(zq @ w, zs @ w)

    sampler = lake_sampler(size, root=args.data_root, ways=20, shots=1, queries=1, seed=args.seed)
    correct: dict[str, list[float]] = {name: [] for name in rules}
    for _ in range(args.episodes):
        batch = sampler.sample()
        with torch.no_grad():
            zs = learner.embed(batch.support_x[0]).double()  # [20, D], labels 0..19 in order
            zq = learner.embed(batch.query_x[0]).double()  # [20, D]
        y = batch.query_y[0]
        for name, rule in rules.items():
            correct[name].append((batch.support_y[0][rule(zq, zs)] == y).double().mean().item())
    print(f"Lake within-alphabet 20-way 1-shot, {args.episodes} episodes (seed {args.seed}), {args.checkpoint}")
    print("| distance | error % (95% CI) |\n|---|---|")
    for name, scores in correct.items():
        mean, ci = mean_ci95(scores)
        print(f"| {name} | {100 * (1 - mean):.2f} ± {100 * ci:.2f} |")


if __name__ == "__main__":
    main()
