"""Metrics of a head's probabilities against true labels: the numbers, and a readable table. Pure: no files.

Computed with numpy from the confusion matrix, with scikit-learn's definitions (a test compares every number with
sklearn.metrics): importing scikit-learn costs about a second, which no command that fits no scikit-learn model
should pay.
"""

from __future__ import annotations

import numpy as np

from pipeline.text import printable

EPS = np.finfo(np.float64).eps


def classification_metrics(y_true: np.ndarray, proba: np.ndarray, class_names: list[str]) -> dict:
    """Accuracy, balanced accuracy, macro-F1, log loss, top-5 (more than 5 classes), per-class report, confusion."""
    k = len(class_names)
    y_true, proba = np.asarray(y_true, np.int64), np.asarray(proba, np.float64)
    y_pred = proba.argmax(1)
    confusion = np.bincount(y_true * k + y_pred, minlength=k * k).reshape(k, k)
    tp, support, predicted = np.diag(confusion), confusion.sum(1), confusion.sum(0)
    precision, recall = _ratio(tp, predicted), _ratio(tp, support)
    f1 = _ratio(2 * tp, support + predicted)  # sklearn's F-score: (1 + b^2) tp / (b^2 true + predicted), b = 1
    out = {
        "n": int(len(y_true)),
        "accuracy": float(np.mean(y_pred == y_true)) if len(y_true) else 0.0,
        "balanced_accuracy": float(recall[support > 0].mean()) if support.any() else 0.0,  # classes present
        "macro_f1": float(f1.mean()),
        "log_loss": log_loss(y_true, proba),
        "per_class": {name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                      for name, p, r, f, s in zip(class_names, precision, recall, f1, support)},
        "confusion_matrix": confusion.tolist(),
    }
    if k > 5:
        out["top5_accuracy"] = top_k_accuracy(y_true, proba, 5)
    return out


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0 (scikit-learn's zero_division=0)."""
    out = np.zeros(len(numerator))
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def log_loss(y_true: np.ndarray, proba: np.ndarray) -> float:
    """Mean cross-entropy of the true class, probabilities clipped to [1e-15, 1 - eps] (scikit-learn's clipping of
    what train-head has always passed it)."""
    true = proba[np.arange(len(y_true)), y_true]
    return float(-np.log(np.clip(np.clip(true, 1e-15, 1), EPS, 1 - EPS)).mean())


def top_k_accuracy(y_true: np.ndarray, proba: np.ndarray, k: int) -> float:
    """Fraction of rows whose true class is among the k most probable (a tie at the k-th place counts for the
    class that sorts first, as scikit-learn's argsort does)."""
    top = np.argsort(proba, axis=1, kind="stable")[:, ::-1][:, :k]
    return float((top == y_true[:, None]).any(1).mean())


def format_metrics(m: dict, title: str) -> str:
    """A plain-text report: the headline numbers, then precision/recall/F1/support per class."""
    names = {name: printable(name) for name in m["per_class"]}  # a newline in a class name must not break the table
    width = max([len(name) for name in names.values()] + [9])
    lines = [f"{title}  (n={m['n']})",
             f"  accuracy {m['accuracy']:.4f}   balanced accuracy {m['balanced_accuracy']:.4f}   "
             f"macro-F1 {m['macro_f1']:.4f}   log loss {m['log_loss']:.4f}"
             + (f"   top-5 {m['top5_accuracy']:.4f}" if "top5_accuracy" in m else ""),
             f"  {'class':<{width}}  precision  recall     f1  support"]
    for name, c in m["per_class"].items():
        lines.append(f"  {names[name]:<{width}}  {c['precision']:9.3f}  {c['recall']:6.3f}  {c['f1']:5.3f}  {c['support']:7d}")
    return "\n".join(lines)
