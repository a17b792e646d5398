"""`pipeline runs`: one row per complete run under a folder, filtered and sorted.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.errors import UserError
from pipeline.runs.folder import RUN_FILE, Run, load_run
from pipeline.runs.record import file_params

log = logging.getLogger(__name__)


SORT_KEYS = {"test": lambda r: (r["test_accuracy"] is None, -(r["test_accuracy"] or 0), -r["val_accuracy"], r["name"]),
             "val": lambda r: (-r["val_accuracy"], -r["val_macro_f1"], r["name"]),
             "fit": lambda r: (r["fit_seconds"], r["name"]), "name": lambda r: r["name"]}


def list_runs(models_dir: Path, features: str | None = None, head: str | None = None, sort: str = "test") -> list[dict]:
    """One row per complete run under `models_dir` (of cache file name `features`, of head kind `head`): by
    default the best test accuracy first (a score no choice saw), then runs without a test split by validation."""
    models_dir = Path(models_dir)
    if not models_dir.is_dir():
        raise UserError(f"models folder not found: {models_dir}")
    if sort not in SORT_KEYS:
        raise UserError(f"--sort {sort!r} is not valid (expected one of {', '.join(SORT_KEYS)})")
    rows = []
    for path in sorted(models_dir.glob(f"*/{RUN_FILE}")):
        try:
            rows.append(_row(load_run(path.parent)))
        except UserError as e:
            log.warning("skipping %s", e)
    rows = [r for r in rows if (features is None or features in r["features"]) and (head is None or r["head"] == head)]
    return sorted(rows, key=SORT_KEYS[sort])


def _row(run: Run) -> dict:
    val, test = run.metrics.get("val", {}), run.metrics.get("test", {})
    r = run.record
    return {"name": r.name, "head": r.head.kind, "chosen": r.head.chosen, "params": file_params(r.head.params),
            "features": Path(r.features.path).name, "fingerprint": run.fingerprint,
            "val_accuracy": val.get("accuracy", float("nan")), "val_macro_f1": val.get("macro_f1", float("nan")),
            "test_accuracy": test.get("accuracy"), "test_macro_f1": test.get("macro_f1"),
            "fit_seconds": r.timings.fit_seconds, "candidates": len(r.sweep),
            "selection_score": "test" not in run.metrics}
