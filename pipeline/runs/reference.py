"""What a run keeps of its training data (reference.npz, arrays only), for `predict`'s per-image columns and
`predict --report`: the mean of the head's training inputs, one centroid per class, and for the validation rows
(images the head did not train on, like new ones) the histogram of their distance to the nearest centroid and of
the head's confidence, plus the distance that 95% of them stay within. Distances are cosine distances of inputs
centred on the training mean (see look/audit.py for why centred).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from pipeline.errors import UserError, first_line

REFERENCE_FILE, DRIFT_PNG = "reference.npz", "drift.png"
DISTANCE_BINS = np.linspace(0.0, 2.0, 51)  # cosine distance lives in [0, 2]
CONFIDENCE_BINS = np.linspace(0.0, 1.0, 21)
QUANTILE = 0.95
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


def compute(X_train, y_train: np.ndarray, X_val, confidence_val: np.ndarray, n_classes: int) -> dict | None:
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
