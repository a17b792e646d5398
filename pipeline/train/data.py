"""What a run trains and scores on (`Data`): the splits in memory or streamed from the cache, as the loading
plan says, validation held out of train by image when the cache has none, every class checked to train.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from pipeline.cache.record import shown
from pipeline.cache.store import Cache
from pipeline.cache.stream import SplitRows
from pipeline.errors import UserError
from pipeline.train.config import TrainConfig
from pipeline.train.loading import LoadPlan

log = logging.getLogger(__name__)


@dataclass
class Data:
    """What a run trains and scores on: arrays in memory, or (`plan.streamed`) `SplitRows` read from the cache as
    needed."""

    X_train: np.ndarray | SplitRows
    y_train: np.ndarray
    X_val: np.ndarray | SplitRows
    y_val: np.ndarray
    X_test: np.ndarray | SplitRows | None
    y_test: np.ndarray | None
    val_source: str  # the validation split's name, or how it was held out of train
    plan: LoadPlan
    V_train: np.ndarray | None = None  # augmented views of X_train's rows, (rows, K, D): trained on, never scored
    val_held: np.ndarray | None = None  # validation held out of train: its rows' positions there (None: a split)

    @property
    def streamed(self) -> bool:
        return self.plan.streamed


def load_data(cfg: TrainConfig, cache: Cache, plan: LoadPlan, pool: str | None = None) -> Data:
    """Train and validation rows (validation held out of train when the file has none), test when present, as
    `plan` says; `pool` pools a map cache's rows as they are read."""
    read = _rows if plan.streamed else _split
    split = lambda name, need_classes=True: read(cache, name, need_classes, pool)
    (X, y), k = split(cfg.train_split), plan.views_per_image
    _check_every_class_trains(cfg, cache, y)
    views = cache.read_views(cfg.train_split, pool).reshape(len(y), k, -1) if k else None
    held = None
    if cfg.val_split in cache.splits:
        (X_val, y_val), source = split(cfg.val_split), cfg.val_split
    else:
        X, y, X_val, y_val, views, held = _hold_out(cfg, X, y, views)
        source = f"{cfg.val_fraction:g} of {cfg.train_split!r}, stratified, seed {cfg.head.seed}"
        log.info("no %r split: validating on %s", cfg.val_split, source)
    X_test, y_test = split(cfg.test_split, need_classes=False) if cfg.test_split in cache.splits else (None, None)
    return Data(X_train=X, y_train=y, X_val=X_val, y_val=y_val, X_test=X_test, y_test=y_test, val_source=source,
                plan=plan, V_train=views, val_held=held)


def val_paths(cfg: TrainConfig, cache: Cache, data: Data) -> list[str]:
    """The images of the validation rows: its split's, or those held out of train (read once, for the choice)."""
    if data.val_held is None:
        return cache.read_paths(cfg.val_split)
    train_paths = cache.read_paths(cfg.train_split)
    return [train_paths[i] for i in data.val_held]


def _hold_out(cfg: TrainConfig, X, y: np.ndarray, views: np.ndarray | None):
    """(X, y of train, X, y of validation, the views of train, the held-out rows' positions): validation held out
    of train by image, so an image's views go with it and none of a validation image is trained on."""
    from sklearn.model_selection import train_test_split  # here: a cache with a validation split never needs it

    try:
        fit, held = train_test_split(np.arange(len(y)), test_size=cfg.val_fraction, stratify=y,
                                     random_state=cfg.head.seed)
    except ValueError as e:
        raise UserError(f"cannot hold out a stratified validation set from {cfg.train_split!r}: {e}") from None
    if isinstance(X, SplitRows):  # streamed: rows stay in file order
        fit, held = np.sort(fit), np.sort(held)
        return X.subset(fit), y[fit], X.subset(held), y[held], None, held
    return X[fit], y[fit], X[held], y[held], None if views is None else views[fit], held


def _check_rows(cache: Cache, name: str, labels: np.ndarray, need_classes: bool) -> None:
    if len(labels) == 0:
        raise UserError(f"split {name!r} of {cache.path} has no rows")
    if need_classes and len(np.unique(labels)) < 2:
        only = cache.header.class_names[int(labels[0])]
        raise UserError(f"split {name!r} of {cache.path} has one class only ({only!r}): a classifier needs at least two")


def _check_every_class_trains(cfg: TrainConfig, cache: Cache, labels: np.ndarray) -> None:
    """A class without a training row cannot be learned (and would be scored with recall 0): refused, naming its
    failed training files, which are the usual cause (every image of a class folder unreadable)."""
    names = cache.header.class_names
    missing = [names[i] for i in sorted(set(range(len(names))) - set(np.unique(labels).tolist()))]
    if not missing:
        return
    failed = [r for r in cache.records() if r.split == cfg.train_split and not r.ok and r.view is None]
    listed = "; ".join(f"{shown(r.path)}: {r.reason}" for r in failed[:3]) + ("; ..." if len(failed) > 3 else "")
    because = f" ({len(failed)} images of {cfg.train_split!r} failed: {listed})" if failed else ""
    raise UserError(f"class {missing[0]!r} has no row in {cfg.train_split!r} of {cache.path}{because}: a head cannot "
                    "learn it; fix or remove its images and extract again" + (
                        f" (classes without rows: {', '.join(map(repr, missing))})" if len(missing) > 1 else ""))


def _split(cache: Cache, name: str, need_classes: bool, pool: str | None) -> tuple[np.ndarray, np.ndarray]:
    data = cache.read_split(name, pool)
    _check_rows(cache, name, data.labels, need_classes)
    return data.features, data.labels


def _rows(cache: Cache, name: str, need_classes: bool, pool: str | None) -> tuple[SplitRows, np.ndarray]:
    rows = SplitRows(cache, name, pool=pool)
    _check_rows(cache, name, rows.labels, need_classes)
    return rows, rows.labels
