"""Metrics of a head's probabilities against true labels: the numbers, and a readable table. Pure: no files."""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm


def classification_metrics(y_true: np.ndarray, proba: np.ndarray, class_names: list[str]) -> dict:
    """Accuracy, balanced accuracy, macro-F1, log loss, top-5 (more than 5 classes), per-class report, confusion."""
    labels = np.arange(len(class_names))
    y_pred = proba.argmax(1)
    precision, recall, f1, support = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    out = {
        "n": int(len(y_true)),
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(skm.f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "log_loss": float(skm.log_loss(y_true, np.clip(proba, 1e-15, 1), labels=labels)),
        "per_class": {name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                      for name, p, r, f, s in zip(class_names, precision, recall, f1, support)},
        "confusion_matrix": skm.confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }
    if len(class_names) > 5:
        out["top5_accuracy"] = float(skm.top_k_accuracy_score(y_true, proba, k=5, labels=labels))
    return out


def format_metrics(m: dict, title: str) -> str:
    """A plain-text report: the headline numbers, then precision/recall/F1/support per class."""
    width = max([len(name) for name in m["per_class"]] + [9])
    lines = [f"{title}  (n={m['n']})",
             f"  accuracy {m['accuracy']:.4f}   balanced accuracy {m['balanced_accuracy']:.4f}   "
             f"macro-F1 {m['macro_f1']:.4f}   log loss {m['log_loss']:.4f}"
             + (f"   top-5 {m['top5_accuracy']:.4f}" if "top5_accuracy" in m else ""),
             f"  {'class':<{width}}  precision  recall     f1  support"]
    for name, c in m["per_class"].items():
        lines.append(f"  {name:<{width}}  {c['precision']:9.3f}  {c['recall']:6.3f}  {c['f1']:5.3f}  {c['support']:7d}")
    return "\n".join(lines)
