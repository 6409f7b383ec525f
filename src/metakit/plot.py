"""Learning curves from a run's ``metrics.jsonl``, drawn with matplotlib (no display needed)."""
from __future__ import annotations

import json
from pathlib import Path


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; is {run_dir} a metakit run folder?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Training loss, training score and validation score with its 95% CI band -> PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [r for r in records if "loss" in r]
    val = [r for r in records if any(k.startswith("val_") and k != "val_ci95" for k in r)]
    key = "accuracy" if any("accuracy" in r for r in train) else "mse"
    train_label, val_label = f"train {key}", f"validation {key} (95% CI)"
    config_path = Path(run_dir) / "config.yaml"
    if config_path.exists() and key == "accuracy":
        import yaml
        config = yaml.safe_load(config_path.read_text())
        t, e = config["train"], config["eval"]
        train_label = f"train {key}, {t['ways']}-way {t['shots']}-shot"
        val_label = f"validation {key}, {e['ways']}-way {e['shots']}-shot (95% CI)"
    fig, (ax_loss, ax_score) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], color="tab:blue")
    ax_loss.set(xlabel="meta-training step", ylabel="training loss", title="loss")
    ax_loss.set_yscale("log")
    ax_score.plot([r["step"] for r in train], [r[key] for r in train], color="tab:blue", label=train_label)
    if val:
        steps = [r["step"] for r in val]
        mean = [r[f"val_{key}"] for r in val]
        ci = [r["val_ci95"] for r in val]
        ax_score.plot(steps, mean, "o-", color="tab:orange", label=val_label)
        ax_score.fill_between(steps, [m - c for m, c in zip(mean, ci)], [m + c for m, c in zip(mean, ci)],
                              color="tab:orange", alpha=0.25)
    ax_score.set(xlabel="meta-training step", ylabel=key, title=key)
    ax_score.legend(loc="lower right" if key == "accuracy" else "upper right")
    for ax in (ax_loss, ax_score):
        ax.grid(alpha=0.3)
    fig.suptitle(Path(run_dir).name)
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "learning_curve.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def shots_ways_curve(learner, shots: list[int], ways: list[int], episodes: int = 200, split: str | None = None,
                     queries: int = 15, seed: int = 0, progress: bool = False) -> list[dict]:
    """Test accuracy of a checkpoint for every (ways, shots): ``[{"ways", "shots", "accuracy", "ci95"}]``."""
    from .data import load_split, make_sampler
    from .data.sampler import check_episode
    from .engine import evaluate

    config = learner.config
    dataset = load_split(config.data, split or config.data.test_split, config.seed)
    if dataset is None:
        raise ValueError("accuracy against shots and ways needs a classification checkpoint")
    from .engine.fit import check_ways

    for n in ways:  # every setting is checked before any is evaluated
        check_ways(learner, n, "--ways")
        for k in shots:
            check_episode(dataset, n, k, queries)
    rows = []
    for n in ways:
        for k in shots:
            sampler = make_sampler(config.data, dataset, n, k, queries, 1, seed)
            r = evaluate(learner, sampler, episodes, progress=progress, desc=f"{n}-way {k}-shot")
            rows.append({"ways": n, "shots": k, "accuracy": r["accuracy"], "ci95": r["ci95"], "episodes": episodes})
    return rows


def plot_shots_ways(rows: list[dict], out: str | Path, title: str = "") -> Path:
    """Accuracy (with 95% CI error bars) against shots, one line per number of ways -> PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for n in sorted({r["ways"] for r in rows}):
        sel = sorted((r for r in rows if r["ways"] == n), key=lambda r: r["shots"])
        ax.errorbar([r["shots"] for r in sel], [100 * r["accuracy"] for r in sel],
                    yerr=[100 * r["ci95"] for r in sel], marker="o", capsize=3, label=f"{n}-way")
    ax.set(xlabel="shots (support examples per class)", ylabel="test accuracy %", title=title)
    ax.set_xscale("log")
    shots = sorted({r["shots"] for r in rows})
    ax.set_xticks(shots, [str(s) for s in shots])
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_gates(trace: dict[str, list[tuple[float, float]]], out: str | Path, sgd_lr: float | None = None,
               title: str = "") -> Path:
    """What a Meta-Learner LSTM learned (as the gate pictures of Ravi & Larochelle 2017): the mean input gate
    ``i_t`` (its step size) and forget gate ``f_t`` of each layer at each inner step, next to plain
    SGD (``f = 1``, ``i = sgd_lr``) -> PNG. ``trace``: ``{layer: [(mean i, mean f) per step]}``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_i, ax_f) = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = plt.get_cmap("tab10")
    steps = 0
    for n, (layer, values) in enumerate(trace.items()):
        t = list(range(1, len(values) + 1))
        steps = max(steps, len(values))
        style = {"color": colours(n % 10), "marker": "o", "markersize": 3, "label": layer}
        ax_i.plot(t, [v[0] for v in values], **style)
        ax_f.plot(t, [v[1] for v in values], **style)
    ax_f.axhline(1.0, color="black", linestyle="--", linewidth=1, label="SGD (f = 1)")
    if sgd_lr:
        sgd = ax_i.axhline(sgd_lr, color="black", linestyle="--", linewidth=1, label=f"SGD (i = {sgd_lr:g})")
        ax_i.legend(handles=[sgd], fontsize=7, loc="best")
    ax_i.set_yscale("log")
    ax_i.set(xlabel="inner step t", ylabel="mean input gate i_t (step size)", title="input gate")
    ax_f.set(xlabel="inner step t", ylabel="mean forget gate f_t", title="forget gate")
    for ax in (ax_i, ax_f):
        ax.set_xticks(range(1, steps + 1))
        ax.grid(alpha=0.3)
    ax_f.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out
