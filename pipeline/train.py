"""The train-head stage: choose the pooling (of a map cache) and the hyperparameters on validation, refit on
train + val when there is a test split (the linear-probe protocol), score test once, save a run."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from pipeline import drift, gallery, runs, store
from pipeline.config import HeadConfig, TrainConfig, weights_spec
from pipeline.errors import UserError
from pipeline.heads import HEADS, full_proba, make_head
from pipeline.loading import LoadPlan, plan_loading
from pipeline.stream import SplitRows
from pipeline.metrics import classification_metrics

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


def load_data(cfg: TrainConfig, cache: store.Cache, plan: LoadPlan, pool: str | None = None) -> Data:
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


def val_paths(cfg: TrainConfig, cache: store.Cache, data: Data) -> list[str]:
    """The images of the validation rows: its split's, or those held out of train (read once, for the choice)."""
    if data.val_held is None:
        return cache.read_paths(cfg.val_split)
    train_paths = cache.read_paths(cfg.train_split)
    return [train_paths[i] for i in data.val_held]


def _hold_out(cfg: TrainConfig, X, y: np.ndarray, views: np.ndarray | None):
    """(X, y of train, X, y of validation, the views of train, the held-out rows' positions): validation held out
    of train by image, so an image's views go with it and none of a validation image is trained on."""
    try:
        fit, held = train_test_split(np.arange(len(y)), test_size=cfg.val_fraction, stratify=y,
                                     random_state=cfg.head.seed)
    except ValueError as e:
        raise UserError(f"cannot hold out a stratified validation set from {cfg.train_split!r}: {e}") from None
    if isinstance(X, SplitRows):  # streamed: rows stay in file order
        fit, held = np.sort(fit), np.sort(held)
        return X.subset(fit), y[fit], X.subset(held), y[held], None, held
    return X[fit], y[fit], X[held], y[held], None if views is None else views[fit], held


def _check_rows(cache: store.Cache, name: str, labels: np.ndarray, need_classes: bool) -> None:
    if len(labels) == 0:
        raise UserError(f"split {name!r} of {cache.path} has no rows")
    if need_classes and len(np.unique(labels)) < 2:
        only = cache.header.class_names[int(labels[0])]
        raise UserError(f"split {name!r} of {cache.path} has one class only ({only!r}): a classifier needs at least two")


def _check_every_class_trains(cfg: TrainConfig, cache: store.Cache, labels: np.ndarray) -> None:
    """A class without a training row cannot be learned (and would be scored with recall 0): refused, naming its
    failed training files, which are the usual cause (every image of a class folder unreadable)."""
    names = cache.header.class_names
    missing = [names[i] for i in sorted(set(range(len(names))) - set(np.unique(labels).tolist()))]
    if not missing:
        return
    failed = [r for r in cache.records() if r.split == cfg.train_split and not r.ok and r.view is None]
    shown = "; ".join(f"{store.shown(r.path)}: {r.reason}" for r in failed[:3]) + ("; ..." if len(failed) > 3 else "")
    because = f" ({len(failed)} images of {cfg.train_split!r} failed: {shown})" if failed else ""
    raise UserError(f"class {missing[0]!r} has no row in {cfg.train_split!r} of {cache.path}{because}: a head cannot "
                    "learn it; fix or remove its images and extract again" + (
                        f" (classes without rows: {', '.join(map(repr, missing))})" if len(missing) > 1 else ""))


def _split(cache: store.Cache, name: str, need_classes: bool, pool: str | None) -> tuple[np.ndarray, np.ndarray]:
    data = cache.read_split(name, pool)
    _check_rows(cache, name, data.labels, need_classes)
    return data.features, data.labels


def _rows(cache: store.Cache, name: str, need_classes: bool, pool: str | None) -> tuple[SplitRows, np.ndarray]:
    rows = SplitRows(cache, name, pool=pool)
    _check_rows(cache, name, rows.labels, need_classes)
    return rows, rows.labels


def _fit(head, data: Data):
    return head.fit_rows(data.X_train) if data.streamed else head.fit(data.X_train, data.y_train, views=data.V_train)


@dataclass
class Choice:
    """What the sweep found: the best head on validation, how it was made, and the whole validation curve."""

    head: object
    params: dict
    pool: str | None  # the head-time pooling of a map cache; None: the cache's rows as they are
    data: Data  # the chosen pooling's data
    table: list[dict]


def sweep(cfg: TrainConfig, cache: store.Cache, plan: LoadPlan) -> Choice:
    """Fit every pooling x candidate on train, keep the best validation accuracy (ties: lower log loss)."""
    from pipeline.progress import Progress

    spec, config = HEADS[cfg.head.kind], cache.header.feature_config(cfg.features)
    table, best = [], None
    total = len(plan.pools) * len(cfg.head.candidates())
    with Progress(total, f"train-head {cfg.head.kind}", unit="candidates") as progress:
        for pool in plan.pools:
            data = load_data(cfg, cache, plan, pool)
            name = config.pooled_name(pool)
            for score, head in sweep_candidates(cfg.head, data):
                table.append({"pool": name} | score)
                key = (score["val_accuracy"], -score["val_log_loss"])
                if best is None or key > best[0]:
                    best = (key, Choice(head, score["params"], pool, data, table))
                progress.advance(1)
    choice = best[1]
    chosen = chosen_values(spec, choice.params, config.pooled_name(choice.pool))
    log.info("chose %s on validation from %d candidates", runs.describe_chosen(chosen), len(table))
    return choice


def sweep_candidates(cfg: HeadConfig, data: Data):
    """(score, fitted head) for each candidate; the candidates that differ only in hyperparameters the head fits
    together (`HeadSpec.together`: logreg's C along its path, linear's settings as one wide module) in one call."""
    spec = HEADS[cfg.kind]
    n_classes = int(max(data.y_train.max(), data.y_val.max())) + 1
    for group in _groups(cfg.candidates(), spec.together):
        first = make_head(cfg.kind, **group[0])
        if spec.together and data.streamed:
            fitted = first.fit_rows_many(data.X_train, group)
        elif spec.together:
            fitted = first.fit_many(data.X_train, data.y_train, group, views=data.V_train)
        else:
            fitted = ((params, _fit(make_head(cfg.kind, **params), data)) for params in group)
        start = time.perf_counter()
        for params, head in fitted:  # each head is scored, then dropped unless it is the best so far
            seconds = time.perf_counter() - start
            yield _score(head, data, n_classes) | {"params": params, "fit_seconds": round(seconds, 4)}, head
            start = time.perf_counter()


def _groups(candidates: list[dict], together: tuple[str, ...]) -> list[list[dict]]:
    """Candidates grouped by everything but the hyperparameters fitted together, in order."""
    groups: dict[tuple, list[dict]] = {}
    for params in candidates:
        groups.setdefault(tuple((k, v) for k, v in params.items() if k not in together), []).append(params)
    return list(groups.values())


def _score(head, data: Data, n_classes: int) -> dict:
    proba = full_proba(head, data.X_val, n_classes)
    true = np.clip(proba[np.arange(len(data.y_val)), data.y_val], 1e-15, 1)
    return {"val_accuracy": float((proba.argmax(1) == data.y_val).mean()), "val_log_loss": float(-np.log(true).mean())}


def chosen_values(spec, params: dict, pool: str | None) -> dict:
    """What the sweep chose, as run.json records it: the swept hyperparameters, the norm (if the head takes one),
    the pooling."""
    norm = {"norm": params["norm"]} if "norm" in params else {}
    return {name: params[name] for name in spec.swept} | norm | {"pool": pool}


def refit(cfg: TrainConfig, choice: Choice):
    """The chosen configuration fitted again on train + val (the protocol's last step before test)."""
    d = choice.data
    X = np.concatenate([d.X_train, d.X_val])
    return make_head(cfg.head.kind, **choice.params).fit(X, np.concatenate([d.y_train, d.y_val]), views=d.V_train)


def train_head(cfg: TrainConfig) -> runs.Run:
    """Fit, choose, score and save one head on a feature cache (opened once); returns the saved run."""
    out = Path(cfg.out) if cfg.out else None
    if cfg.track:
        from pipeline import tracking

        tracking.load_mlflow()  # a missing extra is said now, not after the fit
    start = time.perf_counter()
    with store.open_cache(cfg.features) as cache:  # open to the end: a streamed split reads from it
        out = out or cfg.models_dir / _default_name(cfg.features, cfg.head.kind)
        runs.ensure_free(out)  # before the fit, not after it
        plan = plan_loading(cfg, cache)
        cfg = _with_weights(cfg, cache.header)
        if "device" in HEADS[cfg.head.kind].fixed:
            from pipeline.device import resolve_device  # a one-off ~3 s torch import: not in the fit time we report

            resolve_device(cfg.head.device)  # an absent --device is refused now, not after loading the data
        loaded = time.perf_counter()
        choice = sweep(cfg, cache, plan)
        d, names = choice.data, cache.header.class_names
        proba_val = full_proba(choice.head, d.X_val, len(names))
        metrics = {"val": classification_metrics(d.y_val, proba_val, names)}
        wrong = gallery.mistakes("val", val_paths(cfg, cache, d), d.y_val, proba_val, names)
        head = refit(cfg, choice) if plan.refit else choice.head
        fitted = time.perf_counter()
        if d.X_test is not None:
            proba_test = full_proba(head, d.X_test, len(names))
            metrics["test"] = classification_metrics(d.y_test, proba_test, names)
            wrong += gallery.mistakes("test", cache.read_paths(cfg.test_split), d.y_test, proba_test, names)
        trained = _trained(cfg, cache.header, choice, head, (start, loaded, fitted))
        _warn_of_copies_across_splits(cfg, cache)
        reference = drift.reference(d.X_train, d.y_train, d.X_val, proba_val.max(1), len(names))
    run = runs.save_run(out, head, trained, metrics, errors=(wrong, cache.header.source.root), reference=reference)
    if cfg.track:
        log.info("tracked in %s", tracking.track(cfg.track, run))
    return run


def _with_weights(cfg: TrainConfig, header: store.Header) -> TrainConfig:
    """A head that starts from the body's weights (block5) gets the weights the cache was made with."""
    if "weights" not in HEADS[cfg.head.kind].fixed:
        return cfg
    spec = weights_spec(header.feature_config(cfg.features).weights_id, header.weights_file, cfg.head.weights)
    return replace(cfg, head=replace(cfg.head, weights=spec))


def _warn_of_copies_across_splits(cfg: TrainConfig, cache: store.Cache) -> None:
    """Byte-identical images on both sides of train and val/test make the scores optimistic: say so, cheaply (the
    stored hashes only; `pipeline audit` finds near-duplicates too)."""
    from pipeline.audit import cross_split_copies

    scored = {cfg.val_split, cfg.test_split}
    for (a, b), n in cross_split_copies(cache.records(), cache.header.class_names).items():
        if cfg.train_split in (a, b) and {a, b} & scored:
            copies = "1 image of %r is a byte-identical copy" if n == 1 else f"{n} images of %r are byte-identical copies"
            log.warning(copies + " of images of %r: scores on them are optimistic (run `pipeline audit %s`)",
                        b if a == cfg.train_split else a, cfg.train_split, cfg.features)


def _trained(cfg: TrainConfig, header: store.Header, choice: Choice, head, times) -> runs.TrainedRun:
    spec, d, config = HEADS[cfg.head.kind], choice.data, header.feature_config(cfg.features)
    start, loaded, fitted = times
    return runs.TrainedRun(
        head=runs.HeadRecord(kind=cfg.head.kind, config=asdict(cfg.head), params=choice.params,
                             chosen=chosen_values(spec, choice.params, config.pooled_name(choice.pool)),
                             converged=bool(getattr(head, "converged_", True))),
        sweep=choice.table,
        splits=runs.SplitsRecord(train=cfg.train_split, val=d.val_source,
                                 test=cfg.test_split if d.X_test is not None else None,
                                 n_train=int(len(d.y_train)), n_val=int(len(d.y_val)),
                                 views_per_image=0 if d.V_train is None else int(d.V_train.shape[1])),
        # load: opening and planning; the splits are read inside the sweep, once per pooling tried
        timings=runs.Timings(load_seconds=round(loaded - start, 3), fit_seconds=round(fitted - loaded, 3)),
        loading=runs.LoadingRecord.of(d.plan),
        features=runs.FeatureSource(path=str(Path(cfg.features).resolve()), fingerprint=header.fingerprint,
                                    config=config.to_dict(), class_names=header.class_names,
                                    weights_file=header.weights_file, precision=header.precision),
        pool=choice.pool,
        refit=d.plan.refit,
    )


def _default_name(features: Path, kind: str) -> str:
    return f"{Path(features).stem}-{kind}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"
