"""PNG plots for `mta eval` (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402


def metric_plot(rows: list[dict], metric: str, title: str, out: Path) -> None:
    """One point per method with its 95% bootstrap interval."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    names = [r["method"] for r in rows]
    vals = np.array([r["metrics"][metric]["value"] for r in rows])
    lo = vals - np.array([r["metrics"][metric]["ci"][0] for r in rows])
    hi = np.array([r["metrics"][metric]["ci"][1] for r in rows]) - vals
    ax.errorbar(range(len(rows)), vals, yerr=[lo, hi], fmt="o", capsize=4)
    ax.set_xticks(range(len(rows)), names, rotation=30, ha="right")
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def cost_plot(rows: list[dict], metric: str, title: str, out: Path) -> None:
    """Quality against bytes stored per user (log scale; prompt-only methods at 1 byte)."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for r in rows:
        x = max(1.0, r["bytes_per_user"])
        ax.scatter(x, r["metrics"][metric]["value"])
        ax.annotate(r["method"], (x, r["metrics"][metric]["value"]), fontsize=8, xytext=(4, 3),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("bytes stored per user (prompt-only methods plotted at 1)")
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def anchor_map(emb: np.ndarray, labels: list[str], anchors: list[int], links: list[tuple[int, list[int]]],
               title: str, out: Path) -> None:
    """2-D PCA of user embeddings; anchors as stars; lines from some targets to their anchors."""
    xy = PCA(n_components=2, random_state=0).fit_transform(emb) if len(emb) > 2 else np.c_[emb[:, 0], emb[:, 1]]
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.scatter(xy[:, 0], xy[:, 1], s=14, c="lightgray", label="users")
    ax.scatter(xy[anchors, 0], xy[anchors, 1], s=120, marker="*", c="tab:red", label="anchors")
    for t, chosen in links:
        for a in chosen:
            ax.plot([xy[t, 0], xy[a, 0]], [xy[t, 1], xy[a, 1]], lw=0.8, c="tab:blue", alpha=0.7)
        ax.scatter(xy[t, 0], xy[t, 1], s=30, c="tab:blue")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
