"""The knn head: cosine k-nearest neighbours with similarity-weighted votes (no training: it keeps the
training rows).
"""

from __future__ import annotations

import numpy as np
from sklearn.utils.validation import check_is_fitted, validate_data

from pipeline.heads.base import Head, checked_array, fit_inputs
from pipeline.heads.holdout import with_views
from pipeline.heads.normalise import norm_statistics, prepared, row_normalised


class KnnHead(Head):
    """Cosine k-nearest neighbours: the `k` most similar training rows vote, each with weight exp(similarity / T).

    No training and nothing to tune but k, a baseline that shows what the features hold by themselves (the DINO
    k-NN evaluation uses T = 0.07). Rows are normalised by `norm`, then to unit length (cosine). The head keeps
    every training row: its file and memory grow with the training split.
    """

    STEP_BYTES = 128 << 20  # similarities computed a block of query rows at a time: at most this many bytes

    def __init__(self, k: int = 10, norm: str = "l2", temperature: float = 0.07):
        self.k, self.norm, self.temperature = k, norm, temperature

    def fit(self, X, y, views=None) -> "KnnHead":
        X, y = fit_inputs(self, *with_views(X, y, views))
        self.mean_, self.scale_ = norm_statistics(row_normalised(X, self.norm), self.norm)
        self.train_ = self._unit(X).astype(np.float32).astype(np.float64)  # saved as float32: rounded alike
        self.train_labels_ = np.searchsorted(self.classes_, y).astype(np.int64)
        return self

    def _unit(self, X) -> np.ndarray:
        Z = prepared(X, self.mean_, self.scale_, self.norm)
        return (Z / np.maximum(np.linalg.norm(Z, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    def predict_proba(self, X) -> np.ndarray:
        check_is_fitted(self)
        Q = self._unit(validate_data(self, X, reset=False, dtype=[np.float32, np.float64]))
        k = min(int(self.k), len(self.train_))
        proba = np.zeros((len(Q), len(self.classes_)))
        step = max(1, self.STEP_BYTES // (8 * len(self.train_)))
        for start in range(0, len(Q), step):  # float64 similarities: a row's votes do not depend on its batch
            sims = Q[start:start + step].astype(np.float64) @ self.train_.T
            top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
            weights = np.exp((np.take_along_axis(sims, top, 1) - 1) / self.temperature)  # -1: no overflow, same ratios
            block = proba[start:start + len(sims)]
            np.add.at(block, (np.arange(len(sims))[:, None], self.train_labels_[top]), weights)
        return proba / proba.sum(1, keepdims=True)

    def as_module(self):
        """predict_proba as a torch module, for `pipeline export`: it carries the training rows (float64, as here)."""
        check_is_fitted(self)
        from pipeline.heads.exported import KnnModule

        return KnnModule(self.norm, self.mean_, self.scale_, self.train_, self.train_labels_, len(self.classes_),
                         min(int(self.k), len(self.train_)), self.temperature)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean_, "scale": self.scale_, "train": self.train_.astype(np.float32),
                "train_labels": self.train_labels_}

    def set_arrays(self, a: dict[str, np.ndarray]) -> None:
        d, k = self.n_features_in_, len(self.classes_)
        self.mean_, self.scale_ = checked_array(a, "mean", (d,)), checked_array(a, "scale", (d,), positive=True)
        n = a["train"].shape[0] if "train" in a and a["train"].ndim == 2 else 0
        train = checked_array(a, "train", (n, d)).astype(np.float32)
        if not np.isfinite(train).all():
            raise ValueError("'train' holds values beyond float32")
        self.train_ = train.astype(np.float64)
        labels = checked_array(a, "train_labels", (n,))
        if n < 1 or labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() >= k:
            raise ValueError(f"'train_labels' are not {n} indices into the {k} classes")
        self.train_labels_ = labels.astype(np.int64)
