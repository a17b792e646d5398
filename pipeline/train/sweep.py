"""The sweep: every pooling x candidate fitted on train and scored on validation; the best kept (ties: lower
log loss), then refit on train + val when there is a test split (the linear-probe protocol).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from pipeline.cache.store import Cache
from pipeline.heads.config import HeadConfig
from pipeline.heads.normalise import row_normalised
from pipeline.heads.registry import HEADS, full_proba, make_head
from pipeline.runs.record import describe_chosen
from pipeline.train.config import TrainConfig
from pipeline.train.data import Data, load_data
from pipeline.train.loading import LoadPlan

log = logging.getLogger(__name__)


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
    methods: dict  # "pooling/norm" -> how its candidates were fitted, and why (a head's `method_`)


def sweep(cfg: TrainConfig, cache: Cache, plan: LoadPlan) -> Choice:
    """Fit every pooling x candidate on train, keep the best validation accuracy (ties: lower log loss)."""
    from pipeline.progress import Progress

    spec, config = HEADS[cfg.head.kind], cache.header.feature_config(cfg.features)
    table, best, methods = [], None, {}
    total = len(plan.pools) * len(cfg.head.candidates())
    with Progress(total, f"train-head {cfg.head.kind}", unit="candidates") as progress:
        for pool in plan.pools:
            data = load_data(cfg, cache, plan, pool)
            name = config.pooled_name(pool)
            for score, head in sweep_candidates(cfg.head, data):
                table.append({"pool": name} | score)
                if hasattr(head, "method_"):
                    methods.setdefault(f"{name}/{score['params'].get('norm')}", head.method_)
                key = (score["val_accuracy"], -score["val_log_loss"])
                if best is None or key > best[0]:
                    best = (key, Choice(head, score["params"], pool, data, table, methods))
                progress.advance(1)
    choice = best[1]
    chosen = chosen_values(spec, choice.params, config.pooled_name(choice.pool))
    log.info("chose %s on validation from %d candidates", describe_chosen(chosen), len(table))
    return choice


def sweep_candidates(cfg: HeadConfig, data: Data):
    """(score, fitted head) for each candidate; the candidates that differ only in hyperparameters the head fits
    together (`HeadSpec.together`: logreg's C along its path, linear's settings as one wide module) in one call."""
    spec = HEADS[cfg.kind]
    n_classes = int(max(data.y_train.max(), data.y_val.max())) + 1
    normalised = {}  # norm -> the validation rows row-normalised by it
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
            yield _score(head, data, n_classes, normalised) | {"params": params, "fit_seconds": round(seconds, 4)}, head
            start = time.perf_counter()


def _groups(candidates: list[dict], together: tuple[str, ...]) -> list[list[dict]]:
    """Candidates grouped by everything but the hyperparameters fitted together, in order."""
    groups: dict[tuple, list[dict]] = {}
    for params in candidates:
        groups.setdefault(tuple((k, v) for k, v in params.items() if k not in together), []).append(params)
    return list(groups.values())


def _score(head, data: Data, n_classes: int, normalised: dict) -> dict:
    """Validation accuracy and log loss of a head. In memory, the validation rows are row-normalised once per
    normalisation (`normalised`, filled here) for every candidate, not once per candidate."""
    if isinstance(data.X_val, np.ndarray) and hasattr(head, "proba_of_normalised"):
        if head.norm not in normalised:  # float64 once, as the heads' float64 weights would make it each time
            normalised[head.norm] = np.asarray(row_normalised(np.asarray(data.X_val, np.float32), head.norm), np.float64)
        proba = np.zeros((len(data.y_val), n_classes))
        proba[:, head.classes_] = head.proba_of_normalised(normalised[head.norm])
    else:
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
