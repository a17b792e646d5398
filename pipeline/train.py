"""The train-head stage: read a feature cache, choose hyperparameters on validation, score test once, save a run."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from pipeline import runs, store
from pipeline.errors import UserError
from pipeline.evaluate import classification_metrics, write_reports
from pipeline.heads import HEADS, full_proba, make_head

log = logging.getLogger(__name__)

LOGREG_C_GRID = tuple(float(c) for c in np.logspace(-4, 2, 7))  # one value per decade, 1e-4 .. 1e2
LINEAR_WD_GRID = (1e-4, 1e-3, 1e-2, 1e-1)


@dataclass(frozen=True)
class HeadConfig:
    """Which head, and the hyperparameters fixed by the user (None: chosen by the sweep on validation)."""

    kind: str = "logreg"
    C: float | None = None
    hidden: int = 0
    dropout: float = 0.5
    lr: float = 1e-3
    weight_decay: float | None = None
    epochs: int = 200
    batch_size: int = 256
    patience: int = 15
    seed: int = 0
    device: str = "auto"

    def __post_init__(self):
        if self.kind not in HEADS:
            raise UserError(f"--head {self.kind!r} is not one of {', '.join(HEADS)}")

    @property
    def swept(self) -> str:
        """The hyperparameter the sweep varies."""
        return "C" if self.kind == "logreg" else "weight_decay"

    def candidates(self) -> list[dict]:
        """The constructor arguments of every head the sweep fits."""
        if self.kind == "logreg":
            return [{"C": c} for c in ([self.C] if self.C is not None else LOGREG_C_GRID)]
        fixed = {"hidden": self.hidden, "dropout": self.dropout, "lr": self.lr, "epochs": self.epochs,
                 "batch_size": self.batch_size, "patience": self.patience, "seed": self.seed, "device": self.device}
        grid = [self.weight_decay] if self.weight_decay is not None else LINEAR_WD_GRID
        return [fixed | {"weight_decay": wd} for wd in grid]


@dataclass(frozen=True)
class TrainConfig:
    features: Path
    head: HeadConfig = field(default_factory=HeadConfig)
    out: Path | None = None
    models_dir: Path = Path("models")
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    val_fraction: float = 0.2  # held out of train, stratified, when the file has no validation split


@dataclass
class Data:
    """The arrays a run trains and scores on, with where the validation rows came from."""

    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    test: store.SplitFeatures | None
    val_source: str


def load_data(cfg: TrainConfig, header: store.Header) -> Data:
    """Train and validation rows (validation held out of train when the file has none), test when present."""
    splits = store.splits_of(cfg.features)
    train = _split(cfg.features, cfg.train_split, splits, header)
    if cfg.val_split in splits:
        val = _split(cfg.features, cfg.val_split, splits, header)
        X_tr, y_tr, X_va, y_va, source = train.features, train.labels, val.features, val.labels, cfg.val_split
    else:
        if not 0 < cfg.val_fraction < 1:
            raise UserError(f"--val-fraction {cfg.val_fraction} must be between 0 and 1")
        try:
            X_tr, X_va, y_tr, y_va = train_test_split(train.features, train.labels, test_size=cfg.val_fraction,
                                                      stratify=train.labels, random_state=cfg.head.seed)
        except ValueError as e:
            raise UserError(f"cannot hold out a stratified validation set from {cfg.train_split!r}: {e}") from None
        source = f"{cfg.val_fraction:g} of {cfg.train_split!r}, stratified, seed {cfg.head.seed}"
        log.info("no %r split: validating on %s", cfg.val_split, source)
    test = _split(cfg.features, cfg.test_split, splits, header) if cfg.test_split in splits else None
    return Data(X_tr, y_tr, X_va, y_va, test, source)


def _split(path: Path, name: str, splits: list[str], header: store.Header) -> store.SplitFeatures:
    if name not in splits:
        raise UserError(f"{path} has no split {name!r} (splits: {', '.join(splits)})")
    data = store.read_split(path, name)
    if len(data.labels) == 0:
        raise UserError(f"split {name!r} of {path} has no rows")
    if name != "test" and len(np.unique(data.labels)) < 2:
        only = header.class_names[int(data.labels[0])]
        raise UserError(f"split {name!r} of {path} has one class only ({only!r}): a classifier needs at least two")
    return data


def sweep(cfg: HeadConfig, data: Data) -> tuple[object, dict, list[dict]]:
    """Fit every candidate on train, pick the best validation accuracy (ties: lower log loss)."""
    table, best = [], None
    for params in cfg.candidates():
        start = time.perf_counter()
        head = make_head(cfg.kind, **params).fit(data.X_train, data.y_train, eval_set=(data.X_val, data.y_val))
        proba = full_proba(head, data.X_val, int(max(data.y_train.max(), data.y_val.max())) + 1)
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
    """Fit, choose, score and save one head on a feature cache; returns the saved run."""
    if cfg.head.kind == "linear":
        import torch  # noqa: F401  (a one-off ~3 s import: not part of the fit time we report)
    start = time.perf_counter()
    header = store.read_header(cfg.features)
    if cfg.out:
        runs.ensure_free(cfg.out)  # fail before the fit, not after it
    data = load_data(cfg, header)
    loaded = time.perf_counter()
    head, chosen, table = sweep(cfg.head, data)
    fitted = time.perf_counter()
    names = header.class_names
    metrics = {"val": classification_metrics(data.y_val, full_proba(head, data.X_val, len(names)), names)}
    if data.test is not None:
        metrics["test"] = classification_metrics(data.test.labels, full_proba(head, data.test.features, len(names)), names)
    info = {"head": {"kind": cfg.head.kind, "config": asdict(cfg.head), "params": chosen,
                     "chosen": {cfg.head.swept: chosen[cfg.head.swept]},
                     "converged": bool(getattr(head, "converged_", True))},
            "sweep": table, "splits": {"train": cfg.train_split, "val": data.val_source,
                                       "test": cfg.test_split if data.test is not None else None,
                                       "n_train": int(len(data.y_train)), "n_val": int(len(data.y_val))},
            "timings": {"load_seconds": round(loaded - start, 3), "fit_seconds": round(fitted - loaded, 3)}}
    out = runs.new_run_folder(Path(cfg.out) if cfg.out else cfg.models_dir / _default_name(cfg.features, cfg.head.kind))
    write_reports(out, metrics, names)
    return runs.save_run(out, head, info, metrics, header, cfg.features)


def _default_name(features: Path, kind: str) -> str:
    return f"{Path(features).stem}-{kind}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"
