"""`train-head --track mlflow`: log a saved run to an MLflow tracking store (an optional extra: `pip install -e
'.[track]'`, mlflow-skinny, which `make install` installs for the tests).

The store is MLFLOW_TRACKING_URI when it is set, else the local file store `mlruns/` in the current folder (MLflow 3
keeps file stores behind MLFLOW_ALLOW_FILE_STORE, which this module sets when the store asked for is one). Every
kind of store the MLflow docs name for a client is checked before the fit (`check_store`), so that a wrong URI is
one line in the first second, not a traceback after the fit: a file store's folder must be writable; a database
store (sqlite, postgresql, mysql, mssql) needs the full mlflow package (the track extra installs mlflow-skinny,
which has none); a tracking server (http, https) must answer its /health; databricks and uc stores are left to
MLflow. A failure while logging, after the fit, is one line too, saying that the run folder is saved. Logged: the head's
parameters and the chosen values (params), the sweep's validation accuracy as steps (one per candidate, in the
order fitted), every split's metrics, the cache's fingerprint and path (tags), and the run folder's files
(artifacts, under `run/`). The run folder stays the record; MLflow is a view of it.
"""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from pipeline import files
from pipeline.errors import UserError, first_line

log = logging.getLogger(__name__)
TRACKERS = ("mlflow",)
LOCAL_STORE = "file:./mlruns"
EXPERIMENT = "vggcache"


DATABASES = ("sqlite", "postgresql", "mysql", "mssql")
LEFT_TO_MLFLOW = ("databricks", "databricks-uc", "uc")
PROBE_SECONDS = 3.0


def store_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or LOCAL_STORE


def check_store() -> None:
    """Refuse, in one line, a tracking store that cannot work (see the module's docstring); before the fit."""
    load_mlflow()
    uri = store_uri()
    scheme = urllib.parse.urlparse(uri).scheme.split("+")[0].lower()
    where = f"MLFLOW_TRACKING_URI {uri}"
    if scheme in ("", "file"):
        path = urllib.parse.urlparse(uri).path if scheme == "file" and "://" in uri else uri.removeprefix("file:")
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses file stores unless asked
        files.ensure_writable_dir(Path(urllib.parse.unquote(path or ".")), where)
    elif scheme in DATABASES:
        try:
            import sqlalchemy  # noqa: F401
        except ImportError:
            raise UserError(f"{where} is a database store, which needs the full mlflow package (pip install mlflow): "
                            "the track extra installs mlflow-skinny, which has no database stores") from None
    elif scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=PROBE_SECONDS):
                pass
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            raise UserError(f"{where}: the tracking server does not answer ({first_line(reason)}); start it, or unset "
                            "MLFLOW_TRACKING_URI to log to ./mlruns") from None
    elif scheme not in LEFT_TO_MLFLOW:
        raise UserError(f"{where}: {scheme!r} is not a store MLflow knows (expected a folder, file:, sqlite:, "
                        "postgresql:, mysql:, mssql:, http(s): or databricks)")


def track(kind: str, run) -> str:
    """Log the saved run (runs.folder.Run) to the `kind` tracker (one of TRACKERS, as TrainConfig checks); returns where
    it went, in words. A failure is one line that says the run folder is saved."""
    try:
        return _log(run)
    except Exception as e:  # the tracker's errors are many and its own: one line, the run stays saved
        raise UserError(f"--track mlflow: logging to {store_uri()} failed ({first_line(e)[:300]}); the run is saved "
                        f"in {run.folder}") from None


def _log(run) -> str:
    mlflow = load_mlflow()
    mlflow.set_tracking_uri(store_uri())
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
