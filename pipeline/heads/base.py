"""What every head shares: scikit-learn's classifier contract (`Head`), the checks of what it is fitted on
and of the arrays it is loaded from, and the softmax its probabilities come from.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import validate_data


def softmax_rows(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def fit_inputs(head, X, y) -> tuple[np.ndarray, np.ndarray]:
    """Validated float32 features and labels; sets n_features_in_ and classes_ (two classes at least)."""
    X, y = validate_data(head, X, y, dtype=[np.float32, np.float64])
    check_classification_targets(y)
    head.classes_ = np.unique(y)
    if len(head.classes_) < 2:
        raise ValueError(f"{type(head).__name__} needs samples of at least 2 classes, got one class: {head.classes_[0]!r}")
    return np.asarray(X, np.float32), y


class Head(ClassifierMixin, BaseEstimator):
    """What every head shares: scikit-learn's classifier contract, `predict` the class of highest probability.
    A head defines `fit`, `predict_proba`, its learned state as arrays (`to_arrays`, `set_arrays`: what head.npz
    holds) and `as_module` (its predict_proba as a torch module, for `pipeline export`)."""

    def predict(self, X) -> np.ndarray:
        best = self.predict_proba(X).argmax(1)  # checks that the head is fitted before classes_ is read
        return self.classes_[best]

    def predict_proba(self, X) -> np.ndarray:
        raise NotImplementedError

    def to_arrays(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def set_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        raise NotImplementedError

    def as_module(self):
        raise NotImplementedError


def checked_array(arrays: dict, name: str, shape: tuple, positive: bool = False, finite: bool = True) -> np.ndarray:
    """A saved array, checked: present, real numbers of the expected shape, finite (and > 0 where asked)."""
    if name not in arrays:
        raise ValueError(f"it has no {name!r} array")
    a = arrays[name]
    if a.dtype.kind not in "fiub" or a.shape != shape:
        raise ValueError(f"{name!r} is {a.dtype} {a.shape}, expected numbers of shape {shape}")
    if (finite and not np.isfinite(a).all()) or (positive and not (a > 0).all()):
        raise ValueError(f"{name!r} holds {'non-positive' if positive else 'non-finite'} values")
    return a.astype(np.float64) if np.issubdtype(a.dtype, np.floating) else a
