"""Metrics of a head's probabilities against true labels: the numbers, a readable table, a confusion-matrix picture."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from sklearn import metrics as skm

from pipeline import runs, store
from pipeline.errors import UserError
from pipeline.heads import full_proba


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


def plot_confusion(confusion: list[list[int]], class_names: list[str], path: Path, title: str) -> Path:
    """Counts and row-normalised (recall) side by side; sized so that 20 class names stay readable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(confusion)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    k = len(class_names)
    side = max(4.0, 0.45 * k + 2)
    fig, axes = plt.subplots(1, 2, figsize=(2 * side + 1, side), constrained_layout=True)
    font = 9 if k <= 10 else 7 if k <= 20 else 5
    for ax, data, name, fmt in ((axes[0], cm, "counts", "d"), (axes[1], norm, "row-normalised", ".2f")):
        im = ax.imshow(data, cmap="Blues", vmin=0)
        ax.set_xticks(range(k), class_names, rotation=60 if k > 4 else 0, ha="right" if k > 4 else "center", fontsize=font)
        ax.set_yticks(range(k), class_names, fontsize=font)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{title}: {name}")
        if k <= 30:
            threshold = data.max() / 2 if data.max() else 1
            for i in range(k):
                for j in range(k):
                    ax.text(j, i, format(data[i, j], fmt), ha="center", va="center", fontsize=font,
                            color="white" if data[i, j] > threshold else "black")
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def write_reports(folder: Path, metrics: dict, class_names: list[str]) -> None:
    """report.txt for every split scored, confusion_matrix.png for test (or val when there is no test)."""
    folder = Path(folder)
    text = "\n\n".join(format_metrics(m, f"{folder.name} on {split}") for split, m in metrics.items())
    (folder / "report.txt").write_text(text + "\n")
    shown = "test" if "test" in metrics else "val"
    plot_confusion(metrics[shown]["confusion_matrix"], class_names, folder / "confusion_matrix.png", f"{folder.name} ({shown})")


def evaluate_run(run_folder: Path, features: Path | None = None, split: str | None = None) -> tuple[dict, str, Path]:
    """Score a saved head on one split of a feature file made by the same extractor config."""
    run = runs.load_run(run_folder)
    head = run.load_head()
    features = Path(features) if features else Path(run.info["features"]["path"])
    header = store.read_header(features)
    if header.fingerprint != run.fingerprint:
        raise UserError(f"{features} was made by extractor config {header.fingerprint} {json.dumps(header.config, sort_keys=True)}, "
                        f"but run {run.folder.name} was trained on {run.fingerprint} "
                        f"{json.dumps(run.info['features']['config'], sort_keys=True)}; extract with the run's config")
    splits = store.splits_of(features)
    split = split or ("test" if "test" in splits else "val" if "val" in splits else splits[0])
    data = store.read_split(features, split)
    y = _relabel(data.labels, header.class_names, run.class_names, features)
    proba = full_proba(head, data.features, len(run.class_names))
    return classification_metrics(y, proba, run.class_names), split, features


def _relabel(labels: np.ndarray, file_names: list[str], run_names: list[str], features: Path) -> np.ndarray:
    """Labels of the file as indices into the run's classes, matched by name."""
    unknown = sorted(set(file_names[i] for i in np.unique(labels)) - set(run_names))
    if unknown:
        raise UserError(f"{features} has classes the run never saw: {', '.join(unknown)} (run classes: {', '.join(run_names)})")
    mapping = np.array([run_names.index(n) if n in run_names else -1 for n in file_names])
    return mapping[labels]
