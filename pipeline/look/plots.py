"""The charts of a run folder (the confusion matrix, the sweep) and what every picture shares (matplotlib on Agg,
text shortened or wrapped to fit): each `*_figure` function takes plain numbers and returns a matplotlib figure
(the tests measure its text), and `plot_*` saves it.

Readable at real names and sizes: a long run name is shortened in the middle to the figure's width, never clipped
or overlapping; tick labels turn and shrink with the number of classes; an axis shows the values tried; many lines
get distinct colours and dash styles, with the legend beside the plot.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

from pipeline.text import shortened_to

CHAR_WIDTH = 0.62  # a character's width in font sizes: what fits a figure, before it is drawn


def shortened(text: str, width_inches: float, fontsize: float) -> str:
    """`text` shortened in the middle (`abc...xyz`) to fit `width_inches` at `fontsize` points."""
    return shortened_to(text, max(12, int(width_inches * 72 / (fontsize * CHAR_WIDTH))))


def wrapped(text: str, width_inches: float, fontsize: float, lines: int = 3) -> str:
    """`text` on at most `lines` lines that fit `width_inches` (the last one shortened if it must)."""
    room = max(20, int(width_inches * 72 / (fontsize * CHAR_WIDTH)))
    parts = textwrap.wrap(text, room)
    if len(parts) > lines:
        parts = parts[:lines - 1] + [shortened(" ".join(parts[lines - 1:]), width_inches, fontsize)]
    return "\n".join(parts)


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path, dpi: int) -> Path:
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return Path(path)


def confusion_figure(confusion: list[list[int]], class_names: list[str], title: str):
    """Counts and row-normalised (recall) side by side, the run's name above both; sized so that 20 class names
    stay readable (cell values are written up to 20 classes)."""
    plt = pyplot()
    cm = np.asarray(confusion)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    k = len(class_names)
    side = max(4.0, 0.42 * k + 2.4)
    font = 9 if k <= 10 else 7 if k <= 20 else 5
    names = [shortened(n, 1.4, font) for n in class_names]
    fig, axes = plt.subplots(1, 2, figsize=(2 * side + 1.2, side + 0.8), constrained_layout=True)
    for ax, data, name, fmt in ((axes[0], cm, "counts", "d"),
                                (axes[1], norm, "row-normalised (recall)", ".2f" if k <= 10 else ".1f")):
        im = ax.imshow(data, cmap="Blues", vmin=0)
        ax.set_xticks(range(k), names, rotation=90 if k > 4 else 0, fontsize=font)
        ax.set_yticks(range(k), names, fontsize=font)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(name, fontsize=10)
        if k <= 20:
            threshold = data.max() / 2 if data.max() else 1
            cell_font = font if k <= 10 else 5
            for i in range(k):
                for j in range(k):
                    ax.text(j, i, format(data[i, j], fmt), ha="center", va="center", fontsize=cell_font,
                            color="white" if data[i, j] > threshold else "black")
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(shortened(title, 2 * side + 0.8, 11), fontsize=11)
    return fig


def plot_confusion(confusion: list[list[int]], class_names: list[str], path: Path, title: str) -> Path:
    return save(confusion_figure(confusion, class_names, title), path, 120)


STYLES = ("-", "--", ":", "-.")


def sweep_figure(lines: dict[str, list[tuple[float, float]]], x_name: str, chosen: tuple[float, float], title: str):
    """Validation accuracy against `x_name`: a log axis for a wide grid (C, weight decay), the values themselves
    for a few (k); `lines` maps a label (the other settings) to its (x, accuracy) points, each line a colour and a
    dash style of its own; the `chosen` point is ringed; the legend sits beside the plot."""
    plt = pyplot()
    xs = sorted({x for points in lines.values() for x, _ in points})
    categorical = len(xs) <= 12 and all(float(x).is_integer() for x in xs)  # k: the values tried, evenly spaced
    place = (lambda x: xs.index(x)) if categorical else (lambda x: x)
    fig, ax = plt.subplots(figsize=(8.0 if len(lines) > 1 else 6.4, 4.2), constrained_layout=True)
    colours = plt.get_cmap("tab10").colors
    for n, (label, points) in enumerate(sorted(lines.items())):
        points = sorted(points)
        ax.plot([place(x) for x, _ in points], [a for _, a in points], marker=".", linewidth=1.2, label=label,
                color=colours[n % 10], linestyle=STYLES[(n // 10) % len(STYLES)])
    ax.scatter([place(chosen[0])], [chosen[1]], s=160, facecolors="none", edgecolors="red", linewidths=2, zorder=5,
               label=f"chosen: {x_name}={chosen[0]:g}")
    if categorical:
        ax.set_xticks(range(len(xs)), [f"{x:g}" for x in xs])
    else:
        ax.set_xscale("log")
    ax.set_xlabel(x_name)
    ax.set_ylabel("validation accuracy")
    ax.set_title(shortened(title, 5.0, 9), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, ncol=1 + len(lines) // 24)
    return fig


def plot_sweep(lines: dict[str, list[tuple[float, float]]], x_name: str, chosen: tuple[float, float], path: Path,
               title: str) -> Path:
    return save(sweep_figure(lines, x_name, chosen, title), path, 100)
