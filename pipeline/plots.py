"""Pictures written into run folders: each function takes plain numbers and a path, and returns the path."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_confusion(confusion: list[list[int]], class_names: list[str], path: Path, title: str) -> Path:
    """Counts and row-normalised (recall) side by side; sized so that 20 class names stay readable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(confusion)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    k = len(class_names)
    side = max(4.0, 0.45 * k + 2)
    fig, axes = plt.subplots(1, 2, figsize=(2 * side + 1, side), constrained_layout=True)
    font = 9 if k <= 10 else 7 if k <= 20 else 5
    for ax, data, name, fmt in ((axes[0], cm, "counts", "d"), (axes[1], norm, "row-normalised", ".2f")):
        im = ax.imshow(data, cmap="Blues", vmin=0)
        ax.set_xticks(range(k), class_names, rotation=60 if k > 4 else 0, ha="right" if k > 4 else "center", fontsize=font)
        ax.set_yticks(range(k), class_names, fontsize=font)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{title}: {name}")
        if k <= 30:
            threshold = data.max() / 2 if data.max() else 1
            for i in range(k):
                for j in range(k):
                    ax.text(j, i, format(data[i, j], fmt), ha="center", va="center", fontsize=font,
                            color="white" if data[i, j] > threshold else "black")
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_sweep(lines: dict[str, list[tuple[float, float]]], x_name: str, chosen: tuple[float, float], path: Path,
               title: str) -> Path:
    """Validation accuracy against `x_name` (log axis): `lines` maps a label (the other settings) to its (x, accuracy)
    points; the `chosen` point is ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), constrained_layout=True)
    for label, points in lines.items():
        points.sort()
        ax.plot(*zip(*points), marker=".", label=label, linewidth=1)
    ax.scatter([chosen[0]], [chosen[1]], s=160, facecolors="none", edgecolors="red",
               linewidths=2, zorder=5, label=f"chosen: {x_name}={chosen[0]:g}")
    ax.set_xscale("log")
    ax.set_xlabel(x_name)
    ax.set_ylabel("validation accuracy")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=1 + len(lines) // 8)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
