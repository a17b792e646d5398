"""The train-head stage: read a feature cache once, choose hyperparameters on validation, score test once, save a run."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from pipeline import runs, store
from pipeline.config import HeadConfig, TrainConfig
from pipeline.errors import UserError
from pipeline.heads import full_proba, make_head
from pipeline.metrics import classification_metrics

log = logging.getLogger(__name__)

@dataclass
class Data:
    """The arrays a run trains and scores on, with where the validation rows came from."""

    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    test: store.SplitFeatures | None
    val_source: str


def load_data(cfg: TrainConfig, cache: store.Cache) -> Data:
    """Train and validation rows (validation held out of train when the file has none), test when present."""
    train = _split(cache, cfg.train_split)
    if cfg.val_split in cache.splits:
        val = _split(cache, cfg.val_split)
        X_tr, y_tr, X_va, y_va, source = train.features, train.labels, val.features, val.labels, cfg.val_split
    else:
        try:
            X_tr, X_va, y_tr, y_va = train_test_split(train.features, train.labels, test_size=cfg.val_fraction,
                                                      stratify=train.labels, random_state=cfg.head.seed)
        except ValueError as e:
            raise UserError(f"cannot hold out a stratified validation set from {cfg.train_split!r}: {e}") from None
        source = f"{cfg.val_fraction:g} of {cfg.train_split!r}, stratified, seed {cfg.head.seed}"
        log.info("no %r split: validating on %s", cfg.val_split, source)
    test = _split(cache, cfg.test_split, need_classes=False) if cfg.test_split in cache.splits else None
    return Data(X_tr, y_tr, X_va, y_va, test, source)


def _split(cache: store.Cache, name: str, need_classes: bool = True) -> store.SplitFeatures:
    data = cache.read_split(name)
    if len(data.labels) == 0:
        raise UserError(f"split {name!r} of {cache.path} has no rows")
    if need_classes and len(np.unique(data.labels)) < 2:
        only = cache.header.class_names[int(data.labels[0])]
        raise UserError(f"split {name!r} of {cache.path} has one class only ({only!r}): a classifier needs at least two")
    return data


def sweep(cfg: HeadConfig, data: Data) -> tuple[object, dict, list[dict]]:
    """Fit every candidate on train, pick the best validation accuracy (ties: lower log loss)."""
    table, best = [], None
    n_classes = int(max(data.y_train.max(), data.y_val.max())) + 1
    for params in cfg.candidates():
        start = time.perf_counter()
        head = make_head(cfg.kind, **params).fit(data.X_train, data.y_train)
        proba = full_proba(head, data.X_val, n_classes)
        score = {"params": params, "val_accuracy": float((proba.argmax(1) == data.y_val).mean()),
                 "val_log_loss": float(-np.log(np.clip(proba[np.arange(len(data.y_val)), data.y_val], 1e-15, 1)).mean()),
                 "fit_seconds": round(time.perf_counter() - start, 3)}
        table.append(score)
        key = (score["val_accuracy"], -score["val_log_loss"])
        if best is None or key > best[0]:
            best = (key, head, params)
    log.info("chose %s=%g on validation from %d candidates", cfg.swept, best[2][cfg.swept], len(table))
    return best[1], best[2], table


def train_head(cfg: TrainConfig) -> runs.Run:
    """Fit, choose, score and save one head on a feature cache (opened once); returns the saved run."""
    out = Path(cfg.out) if cfg.out else None
    if cfg.head.kind == "linear":
        from pipeline.device import resolve_device  # a one-off ~3 s torch import: not part of the fit time we report

        resolve_device(cfg.head.device)  # an absent --device is refused now, not after loading the data
    start = time.perf_counter()
    with store.open_cache(cfg.features) as cache:
        out = out or cfg.models_dir / _default_name(cfg.features, cfg.head.kind)
        runs.ensure_free(out)  # before the fit, not after it
        header, data = cache.header, load_data(cfg, cache)
    loaded = time.perf_counter()
    head, chosen, table = sweep(cfg.head, data)
    fitted = time.perf_counter()
    names = header.class_names
    metrics = {"val": classification_metrics(data.y_val, full_proba(head, data.X_val, len(names)), names)}
    if data.test is not None:
        metrics["test"] = classification_metrics(data.test.labels, full_proba(head, data.test.features, len(names)), names)
    record = {
        "head": runs.HeadRecord(kind=cfg.head.kind, config=asdict(cfg.head), params=chosen,
                                chosen={cfg.head.swept: chosen[cfg.head.swept]},
                                converged=bool(getattr(head, "converged_", True))),
        "sweep": table,
        "splits": runs.SplitsRecord(train=cfg.train_split, val=data.val_source,
                                    test=cfg.test_split if data.test is not None else None,
                                    n_train=int(len(data.y_train)), n_val=int(len(data.y_val))),
        "timings": runs.Timings(load_seconds=round(loaded - start, 3), fit_seconds=round(fitted - loaded, 3)),
        "features": runs.FeatureSource(path=str(Path(cfg.features).resolve()), fingerprint=header.fingerprint,
                                       config=header.config, class_names=names,
                                       weights_file=header.extraction.get("weights_file"),
                                       precision=header.extraction.get("precision")),
    }
    return runs.save_run(out, head, record, metrics)


def _default_name(features: Path, kind: str) -> str:
    return f"{Path(features).stem}-{kind}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"
