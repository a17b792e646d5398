"""`train-head --track mlflow`: log a saved run to an MLflow tracking store (an optional extra: `pip install -e
'.[track]'`, mlflow-skinny, which `make install` installs for the tests).

The store is MLFLOW_TRACKING_URI when it is set, else the local file store `mlruns/` in the current folder (MLflow 3
keeps that backend for local use behind MLFLOW_ALLOW_FILE_STORE, which this module sets for it). Logged: the head's
parameters and the chosen values (params), the sweep's validation accuracy as steps (one per candidate, in the
order fitted), every split's metrics, the cache's fingerprint and path (tags), and the run folder's files
(artifacts, under `run/`). The run folder stays the record; MLflow is a view of it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from pipeline.errors import UserError

log = logging.getLogger(__name__)
TRACKERS = ("mlflow",)
LOCAL_STORE = "file:./mlruns"
EXPERIMENT = "vggcache"


def track(kind: str, run) -> str:
    """Log the saved run (runs.folder.Run) to the `kind` tracker (one of TRACKERS, as TrainConfig checks); returns where
    it went, in words."""
    mlflow = load_mlflow()
    if "MLFLOW_TRACKING_URI" not in os.environ:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri(LOCAL_STORE)
    experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
    mlflow.set_experiment(experiment)
    r = run.record
    with mlflow.start_run(run_name=r.name) as active:
        mlflow.log_params({f"head.{k}": _text(v) for k, v in r.head.params.items()} | {"head.kind": r.head.kind}
                          | {f"chosen.{k}": _text(v) for k, v in r.head.chosen.items()})
        mlflow.set_tags({"vggcache.fingerprint": r.features.fingerprint, "vggcache.features": r.features.path,
                         "vggcache.refit": str(r.refit)})
        for step, row in enumerate(r.sweep):
            mlflow.log_metric("sweep.val_accuracy", row["val_accuracy"], step=step)
        for split, m in run.metrics.items():
            mlflow.log_metrics({f"{split}.{k}": float(m[k]) for k in ("accuracy", "balanced_accuracy", "macro_f1",
                                                                        "log_loss", "top5_accuracy") if k in m})
        mlflow.log_artifacts(str(Path(run.folder)), artifact_path="run")
        where = f"{mlflow.get_tracking_uri()} (experiment {experiment!r}, run {active.info.run_id})"
    return where


def load_mlflow():
    """The mlflow module, or one line saying how to install it (train-head asks before the fit)."""
    try:
        import mlflow
    except ImportError:
        raise UserError("--track mlflow needs MLflow: pip install -e '.[track]' (make install does)") from None
    return mlflow


def _text(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)
