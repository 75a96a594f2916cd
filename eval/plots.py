"""Static PNG plots (matplotlib, no display needed). Each function writes one file atomically."""

from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from core.files import atomic_file  # noqa: E402


def _save(fig, path: str | Path) -> Path:
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    finally:
        plt.close(fig)
    return Path(path)


def history(numbers: list[int], values: list[float], path, ylabel: str = "objective") -> Path:
    """Objective per trial and the best so far."""
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ax.scatter(numbers, values, s=14, alpha=0.6, label="trial")
    best, run = [], float("inf")
    for v in values:
        run = min(run, v)
        best.append(run)
    ax.step(numbers, best, where="post", color="C3", label="best so far")
    ax.set(xlabel="trial", ylabel=ylabel, title="Optimization history")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def loss_scatter(
    align: list[float],
    domain: list[float],
    path,
    front: list[int] = (),
    chosen: int | None = None,
    references: dict[str, tuple[float, float]] | None = None,
    title: str = "Alignment vs domain loss",
) -> Path:
    """Every trial in (domain loss, alignment loss); the Pareto front, the chosen point and
    reference models (base, sources) marked."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.scatter(domain, align, s=14, alpha=0.5, label="trials")
    if front:
        pts = sorted((domain[i], align[i]) for i in front)
        ax.plot(*zip(*pts), "o-", color="C1", ms=5, label="Pareto front")
    if chosen is not None:
        ax.scatter([domain[chosen]], [align[chosen]], s=160, marker="*", color="C3", zorder=5, label="chosen")
    for k, (name, (a, d)) in enumerate((references or {}).items()):
        ax.scatter([d], [a], marker="s", s=50, color=f"C{k + 4}", label=name, zorder=4)
    ax.set(
        xlabel="domain loss (lower: more expertise)",
        ylabel="alignment loss (lower: refusals more likely)",
        title=title,
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def coefficient_profile(groups: list[str], profiles: dict[str, dict[str, list[float]]], path) -> Path:
    """One panel per field (weight, density, t), one line per source, over depth."""
    return layer_profiles(groups, profiles, path, "Per-layer merge coefficients of the chosen model")


def layer_profiles(groups: list[str], panels: dict[str, dict[str, list[float]]], path, title: str) -> Path:
    """One panel per quantity (its y label), one line per label, over the layer groups in depth
    order. NaN values leave a gap."""
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.6 * len(panels)), squeeze=False, sharex=True)
    x = range(len(groups))
    for ax, (field, lines) in zip(axes[:, 0], panels.items()):
        for label, values in lines.items():
            ax.plot(x, values, marker="o", ms=3, label=label)
        ax.set_ylabel(field)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ticks = [i for i in x if i == 0 or i == len(groups) - 1 or i % 5 == 0]
    axes[-1, 0].set_xticks(ticks, [groups[i] for i in ticks], rotation=30, fontsize=8)
    axes[0, 0].set_title(title)
    return _save(fig, path)


def category_bars(shares: dict[str, float], counts: dict[str, int], path, xlabel: str, title: str) -> Path:
    """One horizontal bar per category (share in %, n in the label), the overall share dashed."""
    names = sorted(shares, key=lambda k: shares[k])
    fig, ax = plt.subplots(figsize=(7.5, 0.9 + 0.32 * len(names)))
    y = range(len(names))
    ax.barh(y, [100 * shares[k] for k in names], color="C0", alpha=0.8)
    ax.set_yticks(y, [f"{k} (n={counts[k]})" for k in names], fontsize=8)
    overall = 100 * sum(shares[k] * counts[k] for k in names) / max(1, sum(counts.values()))
    ax.axvline(overall, color="C3", ls="--", label=f"overall {overall:.0f}%")
    ax.set(xlabel=xlabel, title=title, xlim=(0, 100))
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3, axis="x")
    return _save(fig, path)


def labeled_points(
    points: dict[str, tuple[float, float]],
    path,
    xlabel: str,
    ylabel: str,
    title: str,
    highlight: str | None = None,
) -> Path:
    """One labelled marker per model (e.g. refusal rate vs domain loss of every contender): a
    colour and a marker shape of its own, so up to 20 models (some on the same spot) stay apart."""
    fig, ax = plt.subplots(figsize=(9.5, 5))
    colors = plt.get_cmap("tab20").colors
    for k, (name, (x, y)) in enumerate(points.items()):
        star = name == highlight
        ax.scatter(
            [x],
            [y],
            s=220 if star else 70,
            marker="*" if star else "osD^vP<>X"[k % 9],
            color=colors[(2 * k) % 20 + (k // 10) % 2],
            edgecolors="black" if star else "none",
            label=name,
            alpha=0.85,
            zorder=5 if star else 3,
        )
        # labelled on the plot too (the legend stays for points on the same spot)
        ax.annotate(name, (x, y), xytext=(6, 4), textcoords="offset points", fontsize=7, alpha=0.8)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return _save(fig, path)


def best_so_far(curves: dict[str, list[list[float]]], path, ylabel: str = "best objective so far") -> Path:
    """Per label (e.g. a sampler), the best value after each trial: the mean over its runs (seeds)
    and their min-max band. NaN (no value yet) is left out of the mean."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for k, (label, runs) in enumerate(curves.items()):
        n = max(len(r) for r in runs)
        arr = np.array([list(r) + [np.nan] * (n - len(r)) for r in runs], dtype=float)
        x = np.arange(1, n + 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column: no value yet
            mean, low, high = np.nanmean(arr, 0), np.nanmin(arr, 0), np.nanmax(arr, 0)
        ax.plot(x, mean, color=f"C{k}", label=f"{label} (mean of {len(runs)})")
        ax.fill_between(x, low, high, color=f"C{k}", alpha=0.15)
    ax.set(xlabel="trial", ylabel=ylabel, title="Best so far per sampler (band: min-max over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
