"""What a run keeps of its training data (reference.npz, arrays only), for `predict`'s per-image columns
`distance_percentile` and `unusual`, and for `predict --report`.

**The distance** of an image is the cosine distance from its head input to its K-th nearest training row (K = 5;
Sun et al., "Out-of-distribution detection with deep nearest neighbors", ICML 2022). The run keeps up to
REFERENCE_BYTES of its training rows, L2-normalised, as float16 (all 245 of hymenoptera; 8,192 rows of 512, 8 MB,
an even sample with a fixed seed, when there are more): one image's distance is under a millisecond. On hymenoptera
with ImageNet weights this distance puts six of seven plainly foreign pictures (stripes, checks, a drawn circle, flat
grey, a gradient, a page of text) beyond every validation image; uniform noise is the one it misses (98.7th
percentile). The distance to the nearest class centroid, kept before, left all seven between the 67th and the 90th
percentile of validation's.

**The calibration** (split conformal prediction; Angelopoulos and Bates, "A gentle introduction to conformal
prediction", 2021): the validation rows (images the head did not train on, so distributed as new images of the same
source are) are measured the same way, and an image is `unusual` when its distance is above the
ceil((n + 1)(1 - ALPHA))-th smallest of the n validation distances. For a new image exchangeable with the validation
images the chance of that is at most ALPHA (1%), whatever the distribution of distances: that is the stated
false-positive rate. Below (1 - ALPHA) / ALPHA = 99 validation images no threshold has that guarantee, and nothing
is flagged (train-head logs it). Up to MAX_CALIBRATION validation rows are measured (an even sample beyond), and
their sorted distances kept: `distance_percentile` is the share of them closer than the image.
"""

from __future__ import annotations

import logging
import math
import zipfile
from pathlib import Path

import numpy as np

from pipeline.errors import UserError, first_line

log = logging.getLogger(__name__)
REFERENCE_FILE, DRIFT_PNG = "reference.npz", "drift.png"
VERSION = 2  # 1: class centroids (vggcache before k-NN distances)
DISTANCE_BINS = np.linspace(0.0, 2.0, 51)  # cosine distance lives in [0, 2]
CONFIDENCE_BINS = np.linspace(0.0, 1.0, 21)
QUANTILE = 0.95
MAX_DIM = 32_768  # heads on wider inputs (block5 on pool4 maps, flatten) keep no reference
K = 5  # the K-th nearest training row: one odd training image (a placeholder GIF) does not hide a foreign one
ALPHA = 0.01  # `unusual`'s false-positive rate on images like the validation images
REFERENCE_BYTES = 8 << 20  # training rows kept, as float16: 8,192 rows of 512, 128 of 32,768
MAX_CALIBRATION = 10_000  # validation rows measured (an even sample beyond): 10,000 x 8,192 x 512 is about a second
SEED = 0


def _blocks(X, step: int = 8192):
    """(rows, their positions) of an array, or of rows streamed from the cache (stream.SplitRows), a block at a time."""
    if hasattr(X, "blocks"):
        yield from X.blocks()
    else:
        for start in range(0, len(X), step):
            yield np.asarray(X[start:start + step], np.float32), np.arange(start, min(start + step, len(X)))


def _unit(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, np.float32)
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def distances(ref: dict, X) -> np.ndarray:
    """Cosine distance of each row of X (the head's inputs) to its K-th nearest training row kept in `ref`."""
    kept = np.asarray(ref["neighbours"], np.float32)  # load() converts once: a server measures image after image
    k = min(int(ref["k"]), len(kept))
    out = np.zeros(len(X))
    for block, rows in _blocks(X, step=max(1, (64 << 20) // max(1, 4 * len(kept)))):
        similarity = _unit(block) @ kept.T
        out[rows] = 1 - np.partition(similarity, len(kept) - k, axis=1)[:, len(kept) - k]
    return np.clip(out, 0.0, 2.0)


def percentiles(ref: dict, d_new: np.ndarray) -> np.ndarray:
    """Each new image's distance as a percentile of validation's: the share of validation images closer (0-100)."""
    ordered = ref["val_distances"]
    return np.searchsorted(ordered, d_new, side="left") / max(len(ordered), 1) * 100


def unusual(ref: dict, d_new: np.ndarray) -> np.ndarray:
    """Whether each new image is farther than the conformal threshold (never, when validation was too small)."""
    return np.asarray(d_new) > float(ref["threshold"])


def conformal_threshold(d_val: np.ndarray, alpha: float = ALPHA) -> float:
    """The ceil((n + 1)(1 - alpha))-th smallest validation distance; inf when n is too small for that rank."""
    rank = math.ceil((len(d_val) + 1) * (1 - alpha))
    return float(np.sort(d_val)[rank - 1]) if rank <= len(d_val) else math.inf


def _sample(X, dim: int, most: int) -> np.ndarray:
    """Up to `most` rows of X (an array or streamed rows), L2-normalised float32: every row, or an even sample with
    a fixed seed (the same run, the same reference)."""
    n = len(X)
    chosen = np.arange(n) if n <= most else np.sort(np.random.default_rng(SEED).choice(n, most, replace=False))
    wanted = np.zeros(n, bool)
    wanted[chosen] = True
    parts = [_unit(block[wanted[rows]]) for block, rows in _blocks(X)]
    return np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)


def compute(X_train, y_train: np.ndarray, X_val, confidence_val: np.ndarray, n_classes: int) -> dict | None:
    """The arrays of reference.npz, from the head's training and validation inputs; None for too wide inputs."""
    dim = X_train.dim if hasattr(X_train, "dim") else X_train.shape[1]
    if dim > MAX_DIM or len(X_train) == 0:
        return None
    kept = _sample(X_train, dim, max(K, REFERENCE_BYTES // (2 * dim))).astype(np.float16)
    ref = {"version": np.array(VERSION), "k": np.array(K), "neighbours": kept}
    d_val = np.sort(distances(ref, _sample(X_val, dim, MAX_CALIBRATION)))
    threshold = conformal_threshold(d_val)
    if math.isinf(threshold):
        log.info("%d validation images are too few to flag unusual images at a %g%% false-positive rate (it takes "
                    "%d): predict's unusual column will say no for every image", len(d_val), ALPHA * 100,
                    math.ceil((1 - ALPHA) / ALPHA))
    return ref | {"val_distances": d_val.astype(np.float32), "threshold": np.array(threshold),
                  "alpha": np.array(ALPHA), "distance_hist": np.histogram(d_val, DISTANCE_BINS)[0],
                  "confidence_hist": np.histogram(confidence_val, CONFIDENCE_BINS)[0],
                  "distance_q95": np.array(np.quantile(d_val, QUANTILE) if len(d_val) else 0.0),
                  "confidence_median": np.array(np.median(confidence_val) if len(confidence_val) else 0.0)}


def save(folder: Path, arrays: dict) -> None:
    np.savez(Path(folder) / REFERENCE_FILE, **arrays)


def load(folder: Path) -> dict | None:
    """The run's reference, or None when it keeps none (wide inputs) or one of an older kind (said once, in a log
    line: retrain for the per-image columns)."""
    path = Path(folder) / REFERENCE_FILE
    if path.is_symlink():  # as head.npz: a run's files are its own, never links to elsewhere
        raise UserError(f"{path} is a symbolic link; a run's reference is a plain file in its folder: retrain the run")
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            ref = {k: f[k] for k in f.files}
        if "version" not in ref and "centroids" in ref:
            log.warning("%s holds class centroids, as vggcache wrote before k-NN distances: retrain the run for the "
                        "distance_percentile and unusual columns", path)
            return None
        _check(ref)
        ref["neighbours"] = ref["neighbours"].astype(np.float32)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"{path} is damaged ({_why(e)}); retrain the run") from None
    return ref


def _check(ref: dict) -> None:
    """Raise ValueError unless every array is as `compute` writes it."""
    if int(ref["version"]) != VERSION:
        raise ValueError(f"version {ref['version']} is not {VERSION}")
    n, _ = ref["neighbours"].shape
    shapes = {"k": (), "distance_hist": (len(DISTANCE_BINS) - 1,), "confidence_hist": (len(CONFIDENCE_BINS) - 1,),
              "distance_q95": (), "confidence_median": (), "threshold": (), "alpha": ()}
    bad = [name for name, shape in shapes.items() if ref[name].shape != shape]
    bad += [name for name in ("neighbours", "val_distances", "distance_q95", "confidence_median", "alpha")
            if not np.isfinite(ref[name]).all()]
    ordered = ref["val_distances"]
    if ref["val_distances"].ndim != 1 or (len(ordered) > 1 and (np.diff(ordered) < 0).any()):
        bad.append("val_distances")
    if n < 1 or int(ref["k"]) < 1 or np.isnan(ref["threshold"]):
        bad.append("neighbours" if n < 1 else "k" if int(ref["k"]) < 1 else "threshold")
    if bad:
        raise ValueError(f"{', '.join(dict.fromkeys(bad))} not as written")


def _why(e: Exception) -> str:
    """One short reason, never numpy's advice to load a file with allow_pickle (a run's file holds no objects)."""
    text = first_line(e)
    if "pickle" in text:
        return "it is not a numpy archive of plain arrays"
    return text if len(text) <= 120 else text[:text.rfind(" ", 0, 120)] + " ..."
