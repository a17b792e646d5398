"""Do new images look like the data a head was trained on? (`predict --report`)

At training time the run keeps a reference (reference.npz, arrays only): the mean of the head's training inputs,
one centroid per class, and, for the validation rows (images the head did not train on, like new ones), the
histogram of their distance to the nearest centroid and of the head's confidence, plus the distance that 95% of
them stay within. Distances are cosine distances of inputs centred on the training mean (see audit.py for why
centred). At predict time the new images are measured the same way, and compared with validation: when their
distances, or the head's confidence on them, are distributed otherwise (a two-sample Kolmogorov-Smirnov test on
the stored histograms), they do not look like the training data. Both ways matter: images far from every class
(another domain) move the distances up; washed-out images (blur, no colour) move them down, towards the mean, and
the confidence with them.
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import numpy as np

from pipeline.errors import UserError, first_line

log = logging.getLogger(__name__)

REFERENCE_FILE, DRIFT_PNG = "reference.npz", "drift.png"
DISTANCE_BINS = np.linspace(0.0, 2.0, 51)  # cosine distance lives in [0, 2]
CONFIDENCE_BINS = np.linspace(0.0, 1.0, 21)
QUANTILE = 0.95
KS_CRITICAL = 1.63  # two-sample Kolmogorov-Smirnov, 1% level: D > 1.63 sqrt((n + m) / (n m))
MIN_SHIFT = 0.15  # and a shift a person would call one: D above this
MAX_DIM = 32_768  # heads on wider inputs (block5 on pool4 maps, flatten) keep no reference
UNUSUAL_PERCENTILE = 99.0  # an image farther from every class than 99% of validation's is flagged `unusual`


def _blocks(X, step: int = 8192):
    """(rows, their positions) of an array, or of rows streamed from the cache (stream.SplitRows), a block at a time."""
    if hasattr(X, "blocks"):
        yield from X.blocks()
    else:
        for start in range(0, len(X), step):
            yield np.asarray(X[start:start + step], np.float32), np.arange(start, min(start + step, len(X)))


def _unit(X: np.ndarray, mean: np.ndarray) -> np.ndarray:
    Z = np.asarray(X, np.float64) - mean
    return Z / np.maximum(np.linalg.norm(Z, axis=1, keepdims=True), 1e-12)


def distances(X, mean: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Cosine distance of each centred row to the nearest centred class centroid."""
    C = _unit(centroids, mean)
    out = np.zeros(len(X))
    for block, rows in _blocks(X):
        out[rows] = 1 - (_unit(block, mean) @ C.T).max(1)
    return out


def percentiles(ref: dict, d_new: np.ndarray) -> np.ndarray:
    """Each new image's distance to the nearest class centroid as a percentile of validation's (0-100, read off
    the stored histogram, linear within a bin)."""
    hist = ref["distance_hist"].astype(np.float64)
    cdf = np.concatenate([[0.0], np.cumsum(hist) / max(hist.sum(), 1)])
    return np.interp(np.clip(d_new, DISTANCE_BINS[0], DISTANCE_BINS[-1]), DISTANCE_BINS, cdf) * 100


def reference(X_train, y_train: np.ndarray, X_val, confidence_val: np.ndarray, n_classes: int) -> dict | None:
    """The arrays of reference.npz, from the head's training and validation inputs; None for too wide inputs."""
    dim = X_train.dim if hasattr(X_train, "dim") else X_train.shape[1]
    if dim > MAX_DIM:
        return None
    sums, counts = np.zeros((n_classes, dim)), np.zeros(n_classes)
    for block, rows in _blocks(X_train):
        np.add.at(sums, y_train[rows], block)
        counts += np.bincount(y_train[rows], minlength=n_classes)
    mean = sums.sum(0) / max(counts.sum(), 1)
    centroids = sums / np.maximum(counts, 1)[:, None]
    d_val = distances(X_val, mean, centroids)
    return {"mean": mean, "centroids": centroids, "distance_hist": np.histogram(d_val, DISTANCE_BINS)[0],
            "confidence_hist": np.histogram(confidence_val, CONFIDENCE_BINS)[0],
            "distance_q95": np.array(np.quantile(d_val, QUANTILE)), "confidence_median": np.array(np.median(confidence_val))}


def save(folder: Path, arrays: dict) -> None:
    np.savez(Path(folder) / REFERENCE_FILE, **arrays)


def load(folder: Path) -> dict | None:
    """The run's reference, or None when it keeps none (wide inputs, or a run older than this check)."""
    path = Path(folder) / REFERENCE_FILE
    if path.is_symlink():  # as head.npz: a run's files are its own, never links to elsewhere
        raise UserError(f"{path} is a symbolic link; a run's reference is a plain file in its folder: retrain the run")
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            ref = {k: f[k] for k in f.files}
        k, d = ref["centroids"].shape
        shapes = {"mean": (d,), "distance_hist": (len(DISTANCE_BINS) - 1,),
                  "confidence_hist": (len(CONFIDENCE_BINS) - 1,), "distance_q95": (), "confidence_median": ()}
        bad = [name for name, shape in shapes.items() if ref[name].shape != shape or not np.isfinite(ref[name]).all()]
        if bad or not np.isfinite(ref["centroids"]).all():
            raise ValueError(f"{', '.join(bad) or 'centroids'} not as written")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"{path} is damaged ({_why(e)}); retrain the run") from None
    return ref


def _why(e: Exception) -> str:
    """One short reason, never numpy's advice to load a file with allow_pickle (a run's file holds no objects)."""
    text = first_line(e)
    if "pickle" in text:
        return "it is not a numpy archive of plain arrays"
    return text if len(text) <= 120 else text[:text.rfind(" ", 0, 120)] + " ..."


def _ks(reference_hist: np.ndarray, values: np.ndarray, bins: np.ndarray) -> float:
    """Kolmogorov-Smirnov distance between the reference's histogram and `values` on the same bins."""
    new_hist = np.histogram(np.clip(values, bins[0], bins[-1]), bins)[0]
    cdf = lambda h: np.cumsum(h) / max(h.sum(), 1)
    return float(np.abs(cdf(reference_hist) - cdf(new_hist)).max())


def verdict(ref: dict, d_new: np.ndarray, confidence_new: np.ndarray) -> tuple[bool, str]:
    """(drifted, one line saying why): the new images drift when their distances to the class centroids, or the
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
                     f"nearest class centroid differs by KS D = {d_dist:.2f}, the head's confidence by D = {d_conf:.2f} "
                     f"(drift above {limit:.2f}); {beyond:.0%} lie beyond 95% of validation's distances; median "
                     f"confidence {float(np.median(confidence_new)):.2f} (validation {float(ref['confidence_median']):.2f})")


def _limit(n_val: int, n_new: int) -> float:
    return max(MIN_SHIFT, KS_CRITICAL * np.sqrt((n_val + n_new) / max(n_val * n_new, 1)))


def fewest_images(n_val: int) -> int | None:
    """The fewest new images on which the test can say "drift": its critical value must be under 1, the largest
    Kolmogorov-Smirnov distance (3 against 153 validation images); None when no number would do (n_val <= 2)."""
    return next((m for m in range(1, 10_000) if _limit(n_val, m) < 1), None)


def figure(ref: dict, d_new: np.ndarray, confidence_new: np.ndarray, title: str):
    """Distance to the nearest centroid and confidence: validation against the new images, as densities; the
    verdict above, wrapped; each axis spans the values present."""
    from pipeline.plots import pyplot, wrapped

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.0), constrained_layout=True)
    panels = ((axes[0], DISTANCE_BINS, ref["distance_hist"], d_new, "cosine distance to the nearest class centroid"),
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
    from pipeline.plots import save

    return save(figure(ref, d_new, confidence_new, title), path, 100)
