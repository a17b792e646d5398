"""The train-head stage: read a feature cache once, choose hyperparameters on validation, score test once, save a run."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from pipeline import runs, store, stream
from pipeline.config import HeadConfig, TrainConfig
from pipeline.errors import UserError
from pipeline.files import human_bytes
from pipeline.heads import HEADS, full_proba, make_head
from pipeline.stream import Loading, SplitRows
from pipeline.metrics import classification_metrics

log = logging.getLogger(__name__)


@dataclass
class Data:
    """What a run trains and scores on: arrays in memory, or `SplitRows` read from the cache as needed."""

    X_train: np.ndarray | SplitRows
    y_train: np.ndarray
    X_val: np.ndarray | SplitRows
    y_val: np.ndarray
    X_test: np.ndarray | SplitRows | None
    y_test: np.ndarray | None
    val_source: str
    loading: Loading


def plan_loading(cfg: TrainConfig, cache: store.Cache) -> Loading:
    """In memory when the splits fit the budget; streamed from the file otherwise, or when asked (--stream)."""
    cache.split_shape(cfg.train_split)  # a missing train split is the first thing to say
    splits = [s for s in (cfg.train_split, cfg.val_split, cfg.test_split) if s in cache.splits]
    needed = stream.in_memory_bytes(cache, splits, HEADS[cfg.head.kind].memory_copies)
    budget = cfg.budget_bytes or stream.default_budget()
    loading = stream.Loading("stream" if cfg.stream or needed > budget else "memory", budget, needed)
    if loading.mode == "stream" and not HEADS[cfg.head.kind].streams:
        streaming = ", ".join(h.name for h in HEADS.values() if h.streams)
        why = "--stream was asked for" if cfg.stream else f"the splits need {human_bytes(needed)} in memory, over " \
              f"the {human_bytes(budget)} budget (--memory-budget)"
        raise UserError(f"--head {cfg.head.kind} needs its data in memory and {why}: use --head {streaming}, which "
                        "streams from the file, or raise --memory-budget")
    return loading


def load_data(cfg: TrainConfig, cache: store.Cache, loading: Loading) -> Data:
    """Train and validation rows (validation held out of train when the file has none), test when present."""
    split = _split if loading.mode == "memory" else _rows
    train = split(cache, cfg.train_split)
    if cfg.val_split in cache.splits:
        val, source = split(cache, cfg.val_split), cfg.val_split
    else:
        train, val = _hold_out(cfg, train)
        source = f"{cfg.val_fraction:g} of {cfg.train_split!r}, stratified, seed {cfg.head.seed}"
        log.info("no %r split: validating on %s", cfg.val_split, source)
    test = split(cache, cfg.test_split, need_classes=False) if cfg.test_split in cache.splits else None
    return Data(*train, *val, *(test or (None, None)), source, loading)


def _hold_out(cfg: TrainConfig, train: tuple) -> tuple[tuple, tuple]:
    X, y = train
    try:
        fit, held = train_test_split(np.arange(len(y)), test_size=cfg.val_fraction, stratify=y,
                                     random_state=cfg.head.seed)
    except ValueError as e:
        raise UserError(f"cannot hold out a stratified validation set from {cfg.train_split!r}: {e}") from None
    if isinstance(X, SplitRows):
        fit, held = np.sort(fit), np.sort(held)
        return (X.subset(fit), y[fit]), (X.subset(held), y[held])
    return (X[fit], y[fit]), (X[held], y[held])


def _check_rows(cache: store.Cache, name: str, labels: np.ndarray, need_classes: bool) -> None:
    if len(labels) == 0:
        raise UserError(f"split {name!r} of {cache.path} has no rows")
    if need_classes and len(np.unique(labels)) < 2:
        only = cache.header.class_names[int(labels[0])]
        raise UserError(f"split {name!r} of {cache.path} has one class only ({only!r}): a classifier needs at least two")


def _split(cache: store.Cache, name: str, need_classes: bool = True) -> tuple[np.ndarray, np.ndarray]:
    data = cache.read_split(name)
    _check_rows(cache, name, data.labels, need_classes)
    return data.features, data.labels


def _rows(cache: store.Cache, name: str, need_classes: bool = True) -> tuple[SplitRows, np.ndarray]:
    rows = SplitRows(cache, name)
    _check_rows(cache, name, rows.labels, need_classes)
    return rows, rows.labels


def _fit(head, X, y):
    return head.fit_rows(X) if isinstance(X, SplitRows) else head.fit(X, y)


def sweep(cfg: HeadConfig, data: Data) -> tuple[object, dict, list[dict]]:
    """Fit every candidate on train, pick the best validation accuracy (ties: lower log loss)."""
    table, best = [], None
    n_classes = int(max(data.y_train.max(), data.y_val.max())) + 1
    for params in cfg.candidates():
        start = time.perf_counter()
        head = _fit(make_head(cfg.kind, **params), data.X_train, data.y_train)
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
    with store.open_cache(cfg.features) as cache:  # open to the end: a streamed split reads from it
        out = out or cfg.models_dir / _default_name(cfg.features, cfg.head.kind)
        runs.ensure_free(out)  # before the fit, not after it
        header, data = cache.header, load_data(cfg, cache, plan_loading(cfg, cache))
        loaded = time.perf_counter()
        head, chosen, table = sweep(cfg.head, data)
        fitted = time.perf_counter()
        names = header.class_names
        metrics = {"val": classification_metrics(data.y_val, full_proba(head, data.X_val, len(names)), names)}
        if data.X_test is not None:
            metrics["test"] = classification_metrics(data.y_test, full_proba(head, data.X_test, len(names)), names)
    record = {
        "head": runs.HeadRecord(kind=cfg.head.kind, config=asdict(cfg.head), params=chosen,
                                chosen={cfg.head.swept: chosen[cfg.head.swept]},
                                converged=bool(getattr(head, "converged_", True))),
        "sweep": table,
        "splits": runs.SplitsRecord(train=cfg.train_split, val=data.val_source,
                                    test=cfg.test_split if data.X_test is not None else None,
                                    n_train=int(len(data.y_train)), n_val=int(len(data.y_val))),
        "timings": runs.Timings(load_seconds=round(loaded - start, 3), fit_seconds=round(fitted - loaded, 3)),
        "loading": runs.LoadingRecord(mode=data.loading.mode, budget_bytes=data.loading.budget_bytes,
                                      needed_bytes=data.loading.needed_bytes),
        "features": runs.FeatureSource(path=str(Path(cfg.features).resolve()), fingerprint=header.fingerprint,
                                       config=header.config, class_names=names,
                                       weights_file=header.extraction.get("weights_file"),
                                       precision=header.extraction.get("precision")),
    }
    return runs.save_run(out, head, record, metrics)


def _default_name(features: Path, kind: str) -> str:
    return f"{Path(features).stem}-{kind}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"
