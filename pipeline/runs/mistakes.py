"""A run's mistakes (errors.csv): every misclassified validation and test image, most confident first.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import UserError
from pipeline.text import csv_cell, from_csv_cell

ERRORS_CSV = "errors.csv"
HEADER = ("split", "path", "true", "predicted", "probability")


@dataclass(frozen=True)
class Mistake:
    split: str
    path: str
    true: str
    predicted: str
    probability: float  # the head's probability of its (wrong) prediction


def find(split: str, paths: list[str], y: np.ndarray, proba: np.ndarray, class_names: list[str]) -> list[Mistake]:
    """Every row of a scored split whose prediction is wrong, most confident first."""
    predicted = proba.argmax(1)
    wrong = np.flatnonzero(predicted != y)
    found = [Mistake(split, paths[i], class_names[y[i]], class_names[predicted[i]], float(proba[i, predicted[i]]))
             for i in wrong]
    return sorted(found, key=lambda m: (-m.probability, m.split, m.path))


def write_csv(folder: Path, found: list[Mistake]) -> None:
    """errors.csv: every mistake, the splits mixed, most confident first."""
    found = sorted(found, key=lambda m: (-m.probability, m.split, m.path))
    with open(Path(folder) / ERRORS_CSV, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        w = csv.writer(f)
        w.writerow(HEADER)
        w.writerows((m.split, csv_cell(m.path), csv_cell(m.true), csv_cell(m.predicted), f"{m.probability:.4f}")
                    for m in found)


def read_csv(folder: Path) -> list[Mistake]:
    """The mistakes listed in a run's errors.csv; none for a run older than it. A damaged file is one line."""
    path = Path(folder) / ERRORS_CSV
    if not path.is_file():
        return []
    try:
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            return [Mistake(r["split"], from_csv_cell(r["path"]), from_csv_cell(r["true"]), from_csv_cell(r["predicted"]),
                            float(r["probability"]))
                    for r in csv.DictReader(f)]
    except (KeyError, ValueError, csv.Error) as e:
        raise UserError(f"{path} is damaged ({e}); retrain the run") from None
