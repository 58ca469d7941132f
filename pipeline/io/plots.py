"""PNG figures (matplotlib, Agg backend), written atomically."""
from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.io.checkpoints import atomic_write  # noqa: E402


def _save(fig, path: str | Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    atomic_write(path, buf.getvalue())


def partition_heatmap(hist: np.ndarray, classes: list[str], title: str, path: str | Path) -> None:
    k, c = hist.shape
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * c + 2), max(2.5, 0.45 * k + 1.5)))
    im = ax.imshow(hist, cmap="viridis", aspect="auto")
    for i in range(k):
        for j in range(c):
            ax.text(j, i, int(hist[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if hist[i, j] < hist.max() / 2 else "black")
    ax.set_xticks(range(c), classes, fontsize=8)
    ax.set_yticks(range(k), [f"shard {i} (n={hist[i].sum()})" for i in range(k)], fontsize=8)
    ax.set_xlabel("class")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="samples")
    _save(fig, path)


def comparison_chart(rows: list[dict], path: str | Path) -> None:
    """Test accuracy and ECE per model, coloured by kind."""
    colours = {"pretrained": "grey", "expert": "tab:blue", "merged": "tab:orange", "ensemble": "tab:green",
               "federated": "tab:purple"}
    names = [r["model"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(max(7, 0.6 * len(rows) + 3), 3.5))
    for ax, key in zip(axes, ("accuracy", "ece")):
        ax.bar(range(len(rows)), [r[key] for r in rows], color=[colours[r["kind"]] for r in rows])
        ax.set_xticks(range(len(rows)), names, rotation=60, ha="right", fontsize=8)
        ax.set_title(f"test {key}", fontsize=9)
    axes[0].set_ylim(0, 1)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    axes[1].legend(handles, list(colours), fontsize=7)
    _save(fig, path)


def reliability_diagram(curves: dict[str, dict[str, np.ndarray]], path: str | Path) -> None:
    """Accuracy against confidence per bin for each model, with the diagonal of perfect calibration."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect")
    for name, b in curves.items():
        mask = b["count"] > 0
        ax.plot(b["confidence"][mask], b["accuracy"][mask], marker="o", ms=3, lw=1, label=name)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    _save(fig, path)


def interpolation_chart(rows: list[dict], path: str | Path) -> None:
    """Test loss and accuracy along the straight line between each pair of experts."""
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.5))
    for pair in dict.fromkeys(r["pair"] for r in rows):
        pts = [r for r in rows if r["pair"] == pair]
        for ax, key in zip(axes, ("loss", "accuracy")):
            ax.plot([r["t"] for r in pts], [r[key] for r in pts], marker="o", ms=3, lw=1, label=pair)
    for ax, key in zip(axes, ("test loss", "test accuracy")):
        ax.set_xlabel("interpolation t (0 = first expert, 1 = second)")
        ax.set_title(key, fontsize=9)
    axes[1].legend(fontsize=6)
    _save(fig, path)


def accuracy_heatmap(rows: list[str], columns: list[str], values: np.ndarray, title: str, path: str | Path) -> None:
    """A table of mean accuracies as a heatmap, each cell annotated (sweep summaries)."""
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * len(columns), 1.0 + 0.4 * len(rows)))
    im = ax.imshow(values, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(columns)), columns, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    for i in range(len(rows)):
        for j in range(len(columns)):
            if np.isfinite(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.3f}", ha="center", va="center", fontsize=6,
                        color="white" if values[i, j] < np.nanmean(values) else "black")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03)
    _save(fig, path)
