"""The evaluate stage: score a saved run on one split of a feature cache made by the same extractor config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.cache.store import open_cache
from pipeline.cache.stream import SplitRows
from pipeline.errors import UserError
from pipeline.heads.metrics import classification_metrics
from pipeline.heads.registry import full_proba
from pipeline.runs.folder import load_run
from pipeline.train.config import EvaluateConfig


@dataclass(frozen=True)
class Evaluation:
    metrics: dict
    split: str
    features: Path


def evaluate_run(cfg: EvaluateConfig) -> Evaluation:
    """Score a saved head on one split of a feature file made by the same extractor config."""
    run = load_run(cfg.run)
    head = run.load_head()
    features = Path(cfg.features) if cfg.features else Path(run.record.features.path)
    with open_cache(features) as cache:
        run.check_features(cache.header, features)
        cache.header.feature_config(features)  # an edited cache (its config does not hash to its fingerprint)
        split = cfg.split or next((s for s in ("test", "val") if s in cache.splits), cache.splits[0] if cache.splits else "")
        rows = SplitRows(cache, split, pool=run.record.pool)  # block by block: any split size, bounded memory
        y = _relabel(rows.labels, cache.header.class_names, run.class_names, features)
        proba = full_proba(head, rows, len(run.class_names))
    return Evaluation(classification_metrics(y, proba, run.class_names), split, features)


def _relabel(labels: np.ndarray, file_names: list[str], run_names: list[str], features: Path) -> np.ndarray:
    """Labels of the file as indices into the run's classes, matched by name."""
    unknown = sorted(set(file_names[i] for i in np.unique(labels)) - set(run_names))
    if unknown:
        raise UserError(f"{features} has classes the run never saw: {', '.join(unknown)} (run classes: {', '.join(run_names)})")
    mapping = np.array([run_names.index(n) if n in run_names else -1 for n in file_names])
    return mapping[labels]
