"""Do new images look like the data a head was trained on? (`predict --report`)

The new images are measured as the run's reference measured its validation images (runs/reference.py), and
compared with them: when their distances to the training images (each to its 5th nearest), or the head's confidence
on them, are distributed otherwise (a two-sample Kolmogorov-Smirnov test on the stored histograms), they do not look
like the training data. Both ways matter: images of another domain move the distances up; a batch of near-copies of
training images moves them down, and a harder or blurred batch moves the confidence down.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.runs.reference import CONFIDENCE_BINS, DISTANCE_BINS

REFERENCE_FILE, DRIFT_PNG = "reference.npz", "drift.png"
KS_CRITICAL = 1.63  # two-sample Kolmogorov-Smirnov, 1% level: D > 1.63 sqrt((n + m) / (n m))
MIN_SHIFT = 0.15  # and a shift a person would call one: D above this


def _ks(reference_hist: np.ndarray, values: np.ndarray, bins: np.ndarray) -> float:
    """Kolmogorov-Smirnov distance between the reference's histogram and `values` on the same bins."""
    new_hist = np.histogram(np.clip(values, bins[0], bins[-1]), bins)[0]
    cdf = lambda h: np.cumsum(h) / max(h.sum(), 1)
    return float(np.abs(cdf(reference_hist) - cdf(new_hist)).max())


def verdict(ref: dict, d_new: np.ndarray, confidence_new: np.ndarray) -> tuple[bool, str]:
    """(drifted, one line saying why): the new images drift when their distances to the training images, or the
    head's confidence on them, are distributed unlike the validation images' (two-sample Kolmogorov-Smirnov
    distance over both the 1% critical value and MIN_SHIFT, so that a huge batch is not flagged for a tiny shift)."""
    n_val, n_new = int(ref["distance_hist"].sum()), len(d_new)
    if not n_new:
        return False, "no new image could be read: nothing to compare"
    needed = fewest_images(n_val)
    if needed is None:
        return False, f"the run's {n_val} validation images are too few to tell"
    if n_new < needed:  # the critical value is above the largest KS distance (1): the verdict would be fixed
        return False, f"too few images to tell ({n_new}; need at least {needed} against {n_val} validation images)"
    limit = _limit(n_val, n_new)
    d_dist = _ks(ref["distance_hist"], d_new, DISTANCE_BINS)
    d_conf = _ks(ref["confidence_hist"], confidence_new, CONFIDENCE_BINS)
    drifted = max(d_dist, d_conf) > limit
    beyond = float((d_new > ref["distance_q95"]).mean())
    look = "do NOT look like the training data" if drifted else "look like the training data"
    return drifted, (f"{n_new} new images {look}: against the {n_val} validation images, their distance to the "
                     f"training images differs by KS D = {d_dist:.2f}, the head's confidence by D = {d_conf:.2f} "
                     f"(drift above {limit:.2f}); {beyond:.0%} lie beyond 95% of validation's distances; median "
                     f"confidence {float(np.median(confidence_new)):.2f} (validation {float(ref['confidence_median']):.2f})")


def _limit(n_val: int, n_new: int) -> float:
    return max(MIN_SHIFT, KS_CRITICAL * np.sqrt((n_val + n_new) / max(n_val * n_new, 1)))


def fewest_images(n_val: int) -> int | None:
    """The fewest new images on which the test can say "drift": its critical value must be under 1, the largest
    Kolmogorov-Smirnov distance (3 against 153 validation images); None when no number would do (n_val <= 2)."""
    return next((m for m in range(1, 10_000) if _limit(n_val, m) < 1), None)


def figure(ref: dict, d_new: np.ndarray, confidence_new: np.ndarray, title: str):
    """Distance to the training images and confidence: validation against the new images, as densities; the
    verdict above, wrapped; each axis spans the values present."""
    from pipeline.look.plots import pyplot, wrapped

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.0), constrained_layout=True)
    panels = ((axes[0], DISTANCE_BINS, ref["distance_hist"], d_new, "cosine distance to the 5th nearest training image"),
              (axes[1], CONFIDENCE_BINS, ref["confidence_hist"], confidence_new, "confidence (top probability)"))
    for ax, bins, val_hist, new, xlabel in panels:
        width = np.diff(bins)
        ax.bar(bins[:-1], val_hist / max(val_hist.sum(), 1) / width, width, align="edge", alpha=0.5, label="validation")
        if len(new):  # every new image unreadable: validation alone
            ax.hist(new, bins, density=True, histtype="step", linewidth=2, color="crimson", label="new images")
        ax.set_xlim(*_span(bins, val_hist, new))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("density")
        ax.legend(fontsize=8, loc="upper right")
    q95 = float(ref["distance_q95"])
    axes[0].axvline(q95, color="k", linestyle="--", linewidth=1)
    axes[0].annotate("95% of validation", (q95, 0.97), xycoords=("data", "axes fraction"), xytext=(-4, 0),
                     textcoords="offset points", ha="right", va="top", fontsize=7,
                     bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8})
    fig.suptitle(wrapped(title, 9.6, 9), fontsize=9)
    return fig


def _span(bins: np.ndarray, hist: np.ndarray, new: np.ndarray) -> tuple[float, float]:
    """The part of the axis where validation or the new images have values, a bin of margin each side."""
    filled = np.flatnonzero(hist)
    lo = min(bins[filled[0]] if len(filled) else bins[0], float(np.min(new)) if len(new) else bins[-1])
    hi = max(bins[filled[-1] + 1] if len(filled) else bins[-1], float(np.max(new)) if len(new) else bins[0])
    step = bins[1] - bins[0]
    return max(bins[0], lo - step), min(bins[-1], hi + step)


def plot(ref: dict, d_new: np.ndarray, confidence_new: np.ndarray, path: Path, title: str) -> Path:
    from pipeline.look.plots import save

    return save(figure(ref, d_new, confidence_new, title), path, 100)
