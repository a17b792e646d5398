"""A run folder (models/NAME): the head, run.json, metrics.json, report.txt, confusion_matrix.png; save, load, list."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from pipeline import store
from pipeline.config import library_versions, sha256_file
from pipeline.errors import UserError
from pipeline.heads import load_head, save_head

log = logging.getLogger(__name__)

RUN_SCHEMA_VERSION = 1


@dataclass
class Run:
    folder: Path
    info: dict  # run.json
    metrics: dict  # metrics.json: split -> metrics

    @property
    def class_names(self) -> list[str]:
        return self.info["features"]["class_names"]

    @property
    def fingerprint(self) -> str:
        return self.info["features"]["fingerprint"]

    def load_head(self):
        """The head, after checking its file against the sha256 recorded in run.json."""
        path = self.folder / self.info["head_file"]
        if not path.is_file():
            raise UserError(f"run {self.folder} is missing its head file {path.name}")
        if sha256_file(path) != self.info["head_sha256"]:
            raise UserError(f"{path} does not match the sha256 in {self.folder / 'run.json'}: the file was changed or damaged")
        return load_head(self.info["head"]["kind"], self.info["head"]["params"], path)


def ensure_free(folder: Path) -> None:
    if (Path(folder) / "run.json").exists():
        raise UserError(f"{folder} already holds a run; choose another --out")


def new_run_folder(folder: Path) -> Path:
    ensure_free(folder)
    Path(folder).mkdir(parents=True, exist_ok=True)
    return Path(folder)


def save_run(folder: Path, head, info: dict, metrics: dict, header: store.Header, features: Path) -> Run:
    """Write the head, metrics.json and, last, run.json into a folder made by `new_run_folder`."""
    head_path = save_head(head, folder)
    folder = Path(folder)
    info = {"schema_version": RUN_SCHEMA_VERSION, "name": folder.name,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **info,
            "features": {"path": str(Path(features).resolve()), "fingerprint": header.fingerprint,
                         "config": header.config, "class_names": header.class_names,
                         "weights_file": header.extraction.get("weights_file"),
                         "precision": header.extraction.get("precision")},
            "versions": library_versions(), "head_file": head_path.name, "head_sha256": sha256_file(head_path)}
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (folder / "run.json").write_text(json.dumps(info, indent=2))  # written last: a folder with run.json is complete
    return Run(folder, info, metrics)


def load_run(folder: Path) -> Run:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"run folder not found: {folder}")
    files = {}
    for name in ("run.json", "metrics.json"):
        path = folder / name
        if not path.is_file():
            raise UserError(f"run {folder} is missing {name}")
        try:
            files[name] = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON ({e})") from None
    if files["run.json"].get("schema_version") != RUN_SCHEMA_VERSION:
        raise UserError(f"{folder / 'run.json'} is not a vggcache run (schema_version {files['run.json'].get('schema_version')})")
    return Run(folder, files["run.json"], files["metrics.json"])


def list_runs(models_dir: Path) -> list[dict]:
    """One row per complete run under `models_dir`, best validation accuracy first."""
    models_dir = Path(models_dir)
    if not models_dir.is_dir():
        raise UserError(f"models folder not found: {models_dir}")
    rows = []
    for path in sorted(models_dir.glob("*/run.json")):
        try:
            run = load_run(path.parent)
        except UserError as e:
            log.warning("skipping %s", e)
            continue
        rows.append(_row(run))
    return sorted(rows, key=lambda r: (-r["val_accuracy"], -r["val_macro_f1"], r["name"]))


def _row(run: Run) -> dict:
    val, test = run.metrics.get("val", {}), run.metrics.get("test", {})
    return {"name": run.info["name"], "head": run.info["head"]["kind"], "chosen": run.info["head"]["chosen"],
            "params": run.info["head"]["params"],
            "features": Path(run.info["features"]["path"]).name, "fingerprint": run.fingerprint,
            "val_accuracy": val.get("accuracy", float("nan")), "val_macro_f1": val.get("macro_f1", float("nan")),
            "test_accuracy": test.get("accuracy"), "test_macro_f1": test.get("macro_f1"),
            "fit_seconds": run.info["timings"]["fit_seconds"]}
