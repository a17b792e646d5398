"""The train-head stage: plan the loading, sweep, score validation and test once, save the run folder, draw its
pictures and page, and track it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

from pipeline.backbone.weights import weights_spec
from pipeline.cache.header import Header
from pipeline.cache.store import Cache, open_cache
from pipeline.cache.summary import copies_across_splits
from pipeline.errors import EXIT_CTRL_C, EXIT_SIGTERM, Interrupted, Terminated, interruption_in
from pipeline.heads.metrics import classification_metrics
from pipeline.heads.registry import HEADS, full_proba
from pipeline.look import pictures
from pipeline.runs import mistakes, reference
from pipeline.runs.folder import Run, RunWriter, ensure_free, selection_note
from pipeline.runs.record import FeatureSource, HeadRecord, LoadingRecord, SplitsRecord, Timings
from pipeline.train.config import TrainConfig
from pipeline.train.data import val_paths
from pipeline.train.loading import LoadPlan, plan_loading
from pipeline.train.sweep import Choice, chosen_values, refit, sweep

log = logging.getLogger(__name__)


def train_head(cfg: TrainConfig) -> Run:
    """Fit, choose, score and save one head on a feature cache (opened once); returns the saved run. Ctrl-C or
    SIGTERM ends in one line that says what is saved (errors.Interrupted)."""
    stage = {"now": "fit", "out": cfg.out}
    try:
        return _train_head(cfg, stage)
    except (KeyboardInterrupt, RuntimeError) as e:
        stop = interruption_in(e)
        if stop is None:
            raise
        code = EXIT_SIGTERM if isinstance(stop, Terminated) else EXIT_CTRL_C
        raise Interrupted(_what_is_saved(cfg, stage), code) from None


def _what_is_saved(cfg: TrainConfig, stage: dict) -> str:
    """The one line of a stopped train-head: the run folder is complete or absent (RunWriter), never half-written."""
    if stage["now"] == "track":
        return f"stopped while logging to MLflow: the run is saved in {stage['out']}, not tracked"
    kept = f"the cache {cfg.features} is unchanged"
    if stage["now"] == "save":
        return f"stopped while saving the run: no run saved, its files in {stage['out']} removed; {kept}"
    where = f"; {stage['out']} is as it was" if stage["out"] and Path(stage["out"]).exists() else ""
    return f"stopped during the fit, before anything was written: no run saved{where}; {kept}"


def _train_head(cfg: TrainConfig, stage: dict) -> Run:
    out = Path(cfg.out) if cfg.out else None
    if cfg.track:
        from pipeline.train import tracking

        tracking.check_store()  # a missing extra or a store that cannot work is said now, not after the fit
    start = time.perf_counter()
    with open_cache(cfg.features) as cache:  # open to the end: a streamed split reads from it
        out = stage["out"] = out or cfg.models_dir / _default_name(cfg.features, cfg.head.kind)
        ensure_free(out, cfg.force)  # before the fit, not after it
        plan = plan_loading(cfg, cache)
        cfg = _with_weights(cfg, cache.header)
        if "device" in HEADS[cfg.head.kind].fixed and cfg.head.device != "auto":
            from pipeline.device import resolve_device  # imports torch (seconds): not for auto, which cannot fail

            resolve_device(cfg.head.device)  # an absent --device is refused now, not after loading the data
        HEADS[cfg.head.kind].estimator  # its module imported (scikit-learn, a second): loading time, not the fit's
        loaded = time.perf_counter()
        choice = sweep(cfg, cache, plan)
        d, names = choice.data, cache.header.class_names
        proba_val = full_proba(choice.head, d.X_val, len(names))
        metrics = {"val": classification_metrics(d.y_val, proba_val, names)}
        wrong = mistakes.find("val", val_paths(cfg, cache, d), d.y_val, proba_val, names)
        head = refit(cfg, choice) if plan.refit else choice.head
        fitted = time.perf_counter()
        if d.X_test is not None:
            proba_test = full_proba(head, d.X_test, len(names))
            metrics["test"] = classification_metrics(d.y_test, proba_test, names)
            wrong += mistakes.find("test", cache.read_paths(cfg.test_split), d.y_test, proba_test, names)
        _warn_of_copies_across_splits(cfg, cache)
        arrays = reference.compute(d.X_train, d.y_train, d.X_val, proba_val.max(1), len(names))
        fields = _record_fields(cfg, cache.header, choice, head, (start, loaded, fitted, time.perf_counter()))
    stage["now"] = "save"
    run = _save(out, head, fields, metrics, wrong, arrays, cache.header.source.root, cfg.force)
    stage["now"] = "track"
    if cfg.track:
        log.info("tracked in %s", tracking.track(cfg.track, run))
    return run


def _save(out: Path, head, fields: dict, metrics: dict, wrong: list[mistakes.Mistake], arrays: dict | None,
          image_root: str | None, force: bool = False) -> Run:
    """The run folder: the head, metrics and reports, the mistakes, the reference, the pictures and page, run.json."""
    note = selection_note(len(fields["sweep"]), metrics)
    start = time.perf_counter()
    with RunWriter(out, force) as writer:
        writer.write_head(head)
        writer.write_metrics(metrics, note)
        writer.write_mistakes(wrong)
        if arrays is not None:
            writer.write_reference(arrays)
        record = writer.record(**fields)
        pictures.draw(Run(writer.folder, record, metrics), wrong, image_root, note)
        saved = replace(record.timings, save_seconds=round(time.perf_counter() - start, 3))  # run.json itself aside
        return writer.commit(replace(record, timings=saved), metrics)


def _with_weights(cfg: TrainConfig, header: Header) -> TrainConfig:
    """A head that starts from the body's weights (block5) gets the weights the cache was made with."""
    if "weights" not in HEADS[cfg.head.kind].fixed:
        return cfg
    spec = weights_spec(header.feature_config(cfg.features).weights_id, header.weights_file, cfg.head.weights)
    return replace(cfg, head=replace(cfg.head, weights=spec))


def _warn_of_copies_across_splits(cfg: TrainConfig, cache: Cache) -> None:
    """Byte-identical images on both sides of train and val/test make the scores optimistic: say so, cheaply (the
    stored hashes only; `pipeline audit` finds near-duplicates too)."""
    scored = {cfg.val_split, cfg.test_split}
    for (a, b), n in copies_across_splits(cache.records()).items():
        if cfg.train_split in (a, b) and {a, b} & scored:
            copies = "1 image of %r is a byte-identical copy" if n == 1 else f"{n} images of %r are byte-identical copies"
            log.warning(copies + " of images of %r: scores on them are optimistic (run `pipeline audit %s`)",
                        b if a == cfg.train_split else a, cfg.train_split, cfg.features)


def _record_fields(cfg: TrainConfig, header: Header, choice: Choice, head, times) -> dict:
    """What run.json records of this training (`RunWriter.record` adds the name, time, versions and head file)."""
    spec, d, config = HEADS[cfg.head.kind], choice.data, header.feature_config(cfg.features)
    start, loaded, fitted, scored = times
    return dict(
        head=HeadRecord(kind=cfg.head.kind, config=asdict(cfg.head), params=choice.params,
                        chosen=chosen_values(spec, choice.params, config.pooled_name(choice.pool)),
                        converged=bool(getattr(head, "converged_", True)), methods=choice.methods),
        sweep=choice.table,
        splits=SplitsRecord(train=cfg.train_split, val=d.val_source,
                            test=cfg.test_split if d.X_test is not None else None,
                            n_train=int(len(d.y_train)), n_val=int(len(d.y_val)),
                            views_per_image=0 if d.V_train is None else int(d.V_train.shape[1])),
        # load: opening and planning; the splits are read inside the sweep, once per pooling tried
        timings=Timings(load_seconds=round(loaded - start, 3), fit_seconds=round(fitted - loaded, 3),
                        score_seconds=round(scored - fitted, 3)),
        loading=_loading_record(d.plan),
        features=FeatureSource(path=str(Path(cfg.features).resolve()), fingerprint=header.fingerprint,
                               config=config.to_dict(), class_names=header.class_names,
                               weights_file=header.weights_file, precision=header.precision),
        pool=choice.pool,
        refit=d.plan.refit,
    )


def _loading_record(plan: LoadPlan) -> LoadingRecord:
    """The loading plan as run.json records it, with the reason of each decision."""
    return LoadingRecord(mode=plan.mode, budget_bytes=plan.budget_bytes, needed_bytes=plan.needed_bytes,
                         pools=list(plan.pools), views_per_image=plan.views_per_image, refit=plan.refit,
                         reasons=dict(plan.reasons))


def _default_name(features: Path, kind: str) -> str:
    return f"{Path(features).stem}-{kind}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"
