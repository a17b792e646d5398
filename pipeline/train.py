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

from pipeline import drift, gallery, pools, runs, store, stream
from pipeline.config import FeatureConfig, HeadConfig, TrainConfig, weights_spec
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
    V_train: np.ndarray | None = None  # augmented views of X_train's rows, (rows, K, D): trained on, never scored
    val_held: np.ndarray | None = None  # validation held out of train: its rows' positions there (None: a split)


def pools_to_try(cfg: TrainConfig, header: store.Header) -> list[str | None]:
    """The head-time poolings to sweep: every one of a map cache for --pool auto, the one asked for, or [None] for
    a pooled cache (its rows are used as they are; --pool may only name what it holds)."""
    held = header.config.get("pool")
    if HEADS[cfg.head.kind].takes_map:
        layer = header.config.get("layer", "pool5")
        if held != "map" or layer != "pool4":
            raise UserError(f"--head {cfg.head.kind} trains VGG16's block 5 on pool4 maps, and {cfg.features} holds "
                            f"{layer} {held} features: extract --layer pool4 --pool map")
        if cfg.pool not in ("auto",):
            raise UserError(f"--head {cfg.head.kind} takes the pool4 map as it is: leave --pool out")
        return [None]
    if held == "map":
        return list(pools.HEAD_POOLS) if cfg.pool == "auto" else [cfg.pool]
    if cfg.pool not in ("auto", held):
        raise UserError(f"{cfg.features} holds {held}-pooled features, so --pool {cfg.pool} cannot be computed from it: "
                        f"use --pool {held} (or auto), or extract a map cache (extract --pool map) to choose at head time")
    return [None]


def _map_config(header: store.Header) -> FeatureConfig:
    """The config of a map cache (only a map cache's rows are pooled here, so only its config is parsed)."""
    return FeatureConfig.parse(header.config, "the cache's config")


def _pooled_dim(header: store.Header, pool: str | None) -> int:
    return header.feature_dim if pool is None else _map_config(header).pooled_dim(pool)


def _transform(header: store.Header, pool: str | None):
    return None if pool is None else _map_config(header).head_pooling(pool)


def plan_loading(cfg: TrainConfig, cache: store.Cache, tried: list[str | None]) -> Loading:
    """In memory when the splits fit the budget; streamed from the file otherwise, or when asked (--stream)."""
    cache.split_shape(cfg.train_split)  # a missing train split is the first thing to say
    splits = [s for s in (cfg.train_split, cfg.val_split, cfg.test_split) if s in cache.splits]
    dim = max(_pooled_dim(cache.header, p) for p in tried)
    copies = HEADS[cfg.head.kind].memory_copies
    needed = stream.in_memory_bytes(cache, splits, copies, dim)
    budget = cfg.budget_bytes or stream.default_budget()
    loading = stream.Loading("stream" if cfg.stream or needed > budget else "memory", budget, needed)
    if loading.mode == "stream" and not HEADS[cfg.head.kind].streams:
        pool4_map = cache.header.config.get("layer") == "pool4" and cache.header.config.get("pool") == "map"
        streaming = " or ".join(h.name for h in HEADS.values() if h.streams and (pool4_map or not h.takes_map))
        why = "--stream was asked for" if cfg.stream else f"the splits need {human_bytes(needed)} in memory, over " \
              f"the {human_bytes(budget)} budget (--memory-budget)"
        other = "" if cfg.stream else ", or raise --memory-budget" + (" or choose one --pool" if len(tried) > 1 else "")
        raise UserError(f"--head {cfg.head.kind} needs its data in memory and {why}: use --head {streaming}, which "
                        f"streams from the file{other}")
    if loading.mode == "stream" and cfg.refit:
        raise UserError("--refit needs the splits in memory, and they are streamed from the file: use --no-refit, "
                        "or raise --memory-budget")
    views = stream.views_bytes(cache, cfg.train_split, copies, dim) if cfg.views is not False else 0
    if views and loading.mode == "memory" and needed + views > budget:  # the views go first: rows matter more
        return _without_views(cfg, cache, loading, f"{human_bytes(needed + views)} with the views, over the "
                              f"{human_bytes(budget)} --memory-budget", "raise --memory-budget")
    if views and loading.mode == "stream":
        return _without_views(cfg, cache, loading, "--stream was asked for" if cfg.stream else "the rows are streamed "
                              f"from the file (over the {human_bytes(budget)} --memory-budget)",
                              "leave out --stream" if cfg.stream else "raise --memory-budget")
    if views:
        return replace(loading, needed_bytes=needed + views)
    return loading


def _without_views(cfg: TrainConfig, cache: store.Cache, loading: Loading, why: str, fix: str) -> Loading:
    """Views are trained on in memory only: refused when asked for (--views), else left out with a warning."""
    if cfg.views:
        raise UserError(f"--views trains on the augmented views in memory, and {why}: use --no-views, or {fix}")
    log.warning("%s holds augmented views, left out of training: %s", cache.path, why)
    return replace(loading, views=False)


def views_per_image(cfg: TrainConfig, cache: store.Cache, loading: Loading) -> int:
    """K, the augmented views of each training image the head trains on: the cache's, unless --no-views or they
    do not fit memory (plan_loading); --views on a cache without views is refused."""
    k = cache.views_per_row(cfg.train_split)
    if cfg.views and not k:
        raise UserError(f"--views: {cfg.features} holds no augmented views of {cfg.train_split!r} "
                        "(extract --augment K makes them)")
    return k if cfg.views is not False and loading.views else 0


def load_data(cfg: TrainConfig, cache: store.Cache, loading: Loading, transform=None) -> Data:
    """Train and validation rows (validation held out of train when the file has none), test when present;
    `transform` pools a map cache's rows as they are read."""
    read = _split if loading.mode == "memory" else _rows
    split = lambda name, need_classes=True: read(cache, name, need_classes, transform)
    train, k = split(cfg.train_split), views_per_image(cfg, cache, loading)
    views = cache.read_views(cfg.train_split, transform).reshape(len(train[1]), k, -1) if k else None
    held = None
    if cfg.val_split in cache.splits:
        val, source = split(cfg.val_split), cfg.val_split
    else:
        train, val, views, held = _hold_out(cfg, train, views)
        source = f"{cfg.val_fraction:g} of {cfg.train_split!r}, stratified, seed {cfg.head.seed}"
        log.info("no %r split: validating on %s", cfg.val_split, source)
    test = split(cfg.test_split, need_classes=False) if cfg.test_split in cache.splits else None
    return Data(*train, *val, *(test or (None, None)), source, loading, views, held)


def val_paths(cfg: TrainConfig, cache: store.Cache, data: Data) -> list[str]:
    """The images of the validation rows: its split's, or those held out of train (read once, for the choice)."""
    if data.val_held is None:
        return cache.read_paths(cfg.val_split)
    train_paths = cache.read_paths(cfg.train_split)
    return [train_paths[i] for i in data.val_held]


def _hold_out(cfg: TrainConfig, train: tuple, views: np.ndarray | None):
    """(train, validation, the views of train, the held-out rows' positions): validation held out of train by
    image, so an image's views go with it and none of a validation image is trained on."""
    X, y = train
    try:
        fit, held = train_test_split(np.arange(len(y)), test_size=cfg.val_fraction, stratify=y,
                                     random_state=cfg.head.seed)
    except ValueError as e:
        raise UserError(f"cannot hold out a stratified validation set from {cfg.train_split!r}: {e}") from None
    if isinstance(X, SplitRows):
        fit, held = np.sort(fit), np.sort(held)
        return (X.subset(fit), y[fit]), (X.subset(held), y[held]), None, held
    return (X[fit], y[fit]), (X[held], y[held]), None if views is None else views[fit], held


def _check_rows(cache: store.Cache, name: str, labels: np.ndarray, need_classes: bool) -> None:
    if len(labels) == 0:
        raise UserError(f"split {name!r} of {cache.path} has no rows")
    if need_classes and len(np.unique(labels)) < 2:
        only = cache.header.class_names[int(labels[0])]
        raise UserError(f"split {name!r} of {cache.path} has one class only ({only!r}): a classifier needs at least two")


def _split(cache: store.Cache, name: str, need_classes: bool, transform) -> tuple[np.ndarray, np.ndarray]:
    data = cache.read_split(name, transform)
    _check_rows(cache, name, data.labels, need_classes)
    return data.features, data.labels


def _rows(cache: store.Cache, name: str, need_classes: bool, transform) -> tuple[SplitRows, np.ndarray]:
    rows = SplitRows(cache, name, transform=transform)
    _check_rows(cache, name, rows.labels, need_classes)
    return rows, rows.labels


def _fit(head, X, y, views=None):
    return head.fit_rows(X) if isinstance(X, SplitRows) else head.fit(X, y, views=views)


@dataclass
class Choice:
    """What the sweep found: the best head on validation, how it was made, and the whole validation curve."""

    head: object
    params: dict
    pool: str | None  # the head-time pooling of a map cache; None: the cache's rows as they are
    data: Data  # the chosen pooling's data
    table: list[dict]


def sweep(cfg: TrainConfig, cache: store.Cache, loading: Loading, tried: list[str | None]) -> Choice:
    """Fit every pooling x candidate on train, keep the best validation accuracy (ties: lower log loss)."""
    spec = HEADS[cfg.head.kind]
    table, best = [], None
    for pool in tried:
        data = load_data(cfg, cache, loading, _transform(cache.header, pool))
        name = pool or cache.header.config.get("pool")
        for score, head in sweep_candidates(cfg.head, data):
            table.append({"pool": name} | score)
            key = (score["val_accuracy"], -score["val_log_loss"])
            if best is None or key > best[0]:
                best = (key, Choice(head, score["params"], pool, data, table))
    choice = best[1]
    chosen = chosen_values(spec, choice.params, choice.pool or cache.header.config.get("pool"))
    log.info("chose %s on validation from %d candidates", runs.describe_chosen(chosen), len(table))
    return choice


def sweep_candidates(cfg: HeadConfig, data: Data):
    """(score, fitted head) for each candidate; a head with a path hyperparameter (logreg's C) fits each group of
    candidates that differ only in it along the path, in one call."""
    spec = HEADS[cfg.kind]
    n_classes = int(max(data.y_train.max(), data.y_val.max())) + 1
    for group in _path_groups(cfg.candidates(), spec.path):
        if spec.path and len(group) > 1 and not isinstance(data.X_train, SplitRows):
            first = make_head(cfg.kind, **group[0])
            by_value = {p[spec.path]: p for p in group}
            heads = first.iter_path(data.X_train, data.y_train, list(by_value), views=data.V_train)  # increasing
            fitted = ((by_value[getattr(h, spec.path)], h) for h in heads)
        else:
            fitted = ((params, _fit(make_head(cfg.kind, **params), data.X_train, data.y_train, data.V_train))
                      for params in group)
        start = time.perf_counter()
        for params, head in fitted:  # each head is scored, then dropped unless it is the best so far
            seconds = time.perf_counter() - start
            yield _score(head, data, n_classes) | {"params": params, "fit_seconds": round(seconds, 4)}, head
            start = time.perf_counter()


def _path_groups(candidates: list[dict], path: str | None) -> list[list[dict]]:
    """Candidates grouped by everything but the path hyperparameter, in order."""
    groups: dict[tuple, list[dict]] = {}
    for params in candidates:
        groups.setdefault(tuple((k, v) for k, v in params.items() if k != path), []).append(params)
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
    if cfg.head.kind == "linear":
        from pipeline.device import resolve_device  # a one-off ~3 s torch import: not part of the fit time we report

        resolve_device(cfg.head.device)  # an absent --device is refused now, not after loading the data
    start = time.perf_counter()
    with store.open_cache(cfg.features) as cache:  # open to the end: a streamed split reads from it
        out = out or cfg.models_dir / _default_name(cfg.features, cfg.head.kind)
        runs.ensure_free(out)  # before the fit, not after it
        tried = pools_to_try(cfg, cache.header)
        if "weights" in HEADS[cfg.head.kind].fixed:  # block5 starts from the weights the cache was made with
            spec = weights_spec(cache.header.config.get("weights", ""), cache.header.extraction.get("weights_file"),
                                cfg.head.weights)
            cfg = replace(cfg, head=replace(cfg.head, weights=spec))
        loading = plan_loading(cfg, cache, tried)
        loaded = time.perf_counter()
        choice = sweep(cfg, cache, loading, tried)
        d, names = choice.data, cache.header.class_names
        proba_val = full_proba(choice.head, d.X_val, len(names))
        metrics = {"val": classification_metrics(d.y_val, proba_val, names)}
        wrong = gallery.mistakes("val", val_paths(cfg, cache, d), d.y_val, proba_val, names)
        refitted = cfg.refit if cfg.refit is not None else (d.X_test is not None and loading.mode == "memory")
        head = refit(cfg, choice) if refitted else choice.head
        fitted = time.perf_counter()
        if d.X_test is not None:
            proba_test = full_proba(head, d.X_test, len(names))
            metrics["test"] = classification_metrics(d.y_test, proba_test, names)
            wrong += gallery.mistakes("test", cache.read_paths(cfg.test_split), d.y_test, proba_test, names)
        record = _record(cfg, cache.header, choice, head, refitted, (start, loaded, fitted))
        _warn_of_copies_across_splits(cfg, cache)
        reference = drift.reference(d.X_train, d.y_train, d.X_val, proba_val.max(1), len(names))
    return runs.save_run(out, head, record, metrics, errors=(wrong, cache.header.source.get("root")), reference=reference)


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


def _record(cfg: TrainConfig, header: store.Header, choice: Choice, head, refitted: bool, times) -> dict:
    spec, d = HEADS[cfg.head.kind], choice.data
    chosen = chosen_values(spec, choice.params, choice.pool or header.config.get("pool"))
    start, loaded, fitted = times
    return {
        "head": runs.HeadRecord(kind=cfg.head.kind, config=asdict(cfg.head), params=choice.params, chosen=chosen,
                                converged=bool(getattr(head, "converged_", True))),
        "sweep": choice.table,
        "splits": runs.SplitsRecord(train=cfg.train_split, val=d.val_source,
                                    test=cfg.test_split if d.X_test is not None else None,
                                    n_train=int(len(d.y_train)), n_val=int(len(d.y_val)),
                                    views_per_image=0 if d.V_train is None else int(d.V_train.shape[1])),
        # load: opening and planning; the splits are read inside the sweep, once per pooling tried
        "timings": runs.Timings(load_seconds=round(loaded - start, 3), fit_seconds=round(fitted - loaded, 3)),
        "loading": runs.LoadingRecord(mode=d.loading.mode, budget_bytes=d.loading.budget_bytes,
                                      needed_bytes=d.loading.needed_bytes),
        "features": runs.FeatureSource(path=str(Path(cfg.features).resolve()), fingerprint=header.fingerprint,
                                       config=header.config, class_names=header.class_names,
                                       weights_file=header.extraction.get("weights_file"),
                                       precision=header.extraction.get("precision")),
        "pool": choice.pool,
        "refit": refitted,
    }


def _default_name(features: Path, kind: str) -> str:
    return f"{Path(features).stem}-{kind}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"
