"""Every picture readable at real names and sizes: rendered with a 60-character run name and 20 classes (names of
20 characters), no text leaves the figure and no two texts overlap (matplotlib gives each text's extent)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pipeline.heads.registry import LOGREG_C
from pipeline.look import plots
from pipeline.look.drift import figure
from pipeline.look.gallery import sheet_figure
from pipeline.look.projection import points_figure
from pipeline.runs.mistakes import Mistake
from pipeline.runs.reference import CONFIDENCE_BINS, DISTANCE_BINS

NAME = "flowers-of-the-world-2026-map-logreg-20261203-101500-pool-auto"  # 60 characters
assert len(NAME) >= 60
CLASSES = [f"class-number-{i:02d}-long" for i in range(20)]  # 20 names of 21 characters


def _confusion():
    rng = np.random.default_rng(0)
    return plots.confusion_figure((rng.integers(0, 40, (20, 20)) + np.eye(20, dtype=int) * 200).tolist(), CLASSES,
                                  f"{NAME} (test)")


def _logreg_sweep():  # --pool auto --norm auto: 15 lines of 45 points
    rng = np.random.default_rng(1)
    lines = {f"pool={p}, norm={n}": [(c, float(rng.uniform(0.5, 1))) for c in LOGREG_C]
             for p in ("avg", "max", "avgmax", "flatten", "spp") for n in ("standard", "l2", "power")}
    return plots.sweep_figure(lines, "C", (LOGREG_C[20], 0.99), f"{NAME}: logreg on validation")


def _knn_sweep():
    return plots.sweep_figure({"pool=avg, norm=l2": [(k, 0.8 + k / 1000) for k in (1, 3, 5, 10, 20, 50)]}, "k",
                              (10, 0.81), f"{NAME}: knn on validation")


def _drift():
    ref = {"distance_hist": np.histogram(np.random.default_rng(2).uniform(0.3, 0.6, 500), DISTANCE_BINS)[0],
           "confidence_hist": np.histogram(np.random.default_rng(3).uniform(0.6, 1, 500), CONFIDENCE_BINS)[0],
           "distance_q95": np.array(0.57)}
    line = ("15 new images do NOT look like the training data: against the 153 validation images, their distance to "
            "the training images differs by KS D = 0.52, the head's confidence by D = 0.73 (drift above 0.42); "
            "47% lie beyond 95% of validation's distances; median confidence 0.73 (validation 0.94)")
    return figure(ref, np.linspace(0.5, 0.9, 15), np.linspace(0.5, 0.9, 15), f"{NAME}: {line}")


def _sheet():
    found = [Mistake("test", f"test/{CLASSES[i % 20]}/a-very-long-file-name-{i:04d}.jpeg", CLASSES[i % 20],
                     CLASSES[(i + 1) % 20], 0.9) for i in range(32)]
    return sheet_figure(found, None, f"{NAME} (val + test): 32 mistakes")


def _projection():
    rng = np.random.default_rng(4)
    n = 400
    return points_figure(rng.standard_normal((n, 2)), rng.integers(0, 20, n), np.array(["train", "val", "test"] * 133 + ["val"]),
                      rng.random(n) < 0.1, CLASSES, f"{NAME}.h5: PCA of {n} images")


FIGURES = {"confusion": _confusion, "logreg-sweep": _logreg_sweep, "knn-sweep": _knn_sweep, "drift": _drift,
           "mistakes": _sheet, "projection": _projection}


def _texts(fig):
    """Every text drawn: titles, labels, legends, annotations, and the tick labels of ticks in view (an axis keeps
    label objects for ticks outside its limits, which are not drawn)."""
    import matplotlib.text

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    axes = [(ax, axis) for ax in fig.axes for axis in (ax.xaxis, ax.yaxis)]
    tick_labels = {id(t) for _, axis in axes for tick in [*axis.majorTicks, *axis.minorTicks]
                   for t in (tick.label1, tick.label2)}
    drawn = {id(t) for ax, axis in axes if ax.axison for tick in axis.get_major_ticks() + axis.get_minor_ticks()
             if _in_view(axis, tick.get_loc()) for t in (tick.label1, tick.label2)}
    found = [t for t in fig.findobj(matplotlib.text.Text) if t.get_visible() and t.get_text().strip()
             and (id(t) not in tick_labels or id(t) in drawn)]
    return [(t.get_text(), t.get_window_extent(renderer)) for t in found], fig.bbox


def _in_view(axis, location) -> bool:
    lo, hi = sorted(axis.get_view_interval())
    return location is not None and (lo <= location <= hi or bool(np.isclose(location, [lo, hi], rtol=1e-9).any()))


@pytest.mark.parametrize("name", list(FIGURES))
def test_no_text_leaves_the_figure_or_overlaps_another(name):
    import matplotlib.pyplot as plt

    fig = FIGURES[name]()
    try:
        texts, frame = _texts(fig)
        outside = [text for text, box in texts if box.x0 < frame.x0 - 1 or box.y0 < frame.y0 - 1 or
                   box.x1 > frame.x1 + 1 or box.y1 > frame.y1 + 1]
        assert not outside, f"outside the figure: {outside[:3]}"
        overlapping = [(a, b) for (a, box_a), (b, box_b) in itertools.combinations(texts, 2)
                       if box_a.overlaps(box_b) and box_a.intersection(box_a, box_b).width > 1
                       and box_a.intersection(box_a, box_b).height > 1]
        assert not overlapping, f"{len(overlapping)} overlapping pairs, e.g. {overlapping[:3]}"
    finally:
        plt.close(fig)


def test_a_few_values_tried_are_the_axis(tmp_path):
    fig = _knn_sweep()
    try:
        labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
        assert labels == ["1", "3", "5", "10", "20", "50"]
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
