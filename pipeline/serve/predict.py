"""The predict stage: rebuild the run's exact extractor, embed new images, apply the head, write one row per image."""

from __future__ import annotations

import csv
import io
import logging
import sys
from pathlib import Path

import numpy as np

from pipeline import files
from pipeline.errors import UserError
from pipeline.extraction.dataset import is_image_name
from pipeline.heads.registry import full_proba
from pipeline.look import drift
from pipeline.runs import reference
from pipeline.runs.folder import Run, load_run
from pipeline.serve.config import PredictConfig
from pipeline.text import csv_cell, printable

log = logging.getLogger(__name__)

# distance_percentile: the image's distance to its 5th nearest training image as a percentile of the validation
# images'; unusual: "yes" beyond the run's conformal threshold (runs/reference.py; both empty: the run keeps no ref)
COLUMNS = ("path", "predicted", "probability", "top_k", "distance_percentile", "unusual", "error")


def collect_images(paths: tuple[Path, ...]) -> list[str]:
    """Files as given (whatever they hold: one that is not an image, or not a regular file, gets its error row);
    folders searched recursively for image extensions."""
    if not paths:
        raise UserError("no image paths given (expected image files or folders)")
    found = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(str(f) for f in p.rglob("*") if not f.is_dir() and is_image_name(f.name))
        elif p.exists():
            found.append(str(p))
        else:
            raise UserError(f"image path not found: {p}")
    if not found:
        raise UserError(f"no images found in {', '.join(map(str, paths))}")
    return found


class Predictor:
    """A run ready to predict: its extractor rebuilt (same weights, checked by hash), its head loaded; loaded once
    by `predict`, the server and the Python API."""

    def __init__(self, run: Run | Path, weights: str | None = None, device: str = "auto", precision: str = "auto"):
        from pipeline.backbone.vgg16 import rebuilt_extractor

        self.run = run if isinstance(run, Run) else load_run(run)
        self.head, self.fcfg = self.run.load_head(), self.run.feature_config
        source = self.run.record.features
        self.extractor = rebuilt_extractor(self.fcfg, source.weights_file, weights, source.precision, device, precision)
        self.pooled = self.run.head_pooling()  # a head trained on a map cache pools the map as it did
        self.reference = reference.load(self.run.folder)  # None: the run keeps none (too wide inputs)

    @property
    def class_names(self) -> list[str]:
        return self.run.class_names

    def features(self, images) -> np.ndarray:
        """uint8 images (B, 3, S, S) -> the head's input rows, rounded through the cache's storage dtype (the head
        was trained on exactly such values) and pooled as the run's head pools a map."""
        from pipeline.backbone.vgg16 import as_stored

        rows = as_stored(self.extractor(images), self.fcfg)
        return self.pooled(rows) if self.pooled else rows

    def proba(self, rows: np.ndarray) -> np.ndarray:
        """Probabilities over every class of the run (0 for a class the head never saw), from its input rows."""
        return full_proba(self.head, rows, len(self.class_names))

    def far(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """How far each row is from the training data (runs/reference.py): (its distance as a percentile of the
        validation images', whether it is unusual); None when the run keeps no reference."""
        if self.reference is None:
            return None
        d = reference.distances(self.reference, rows)
        return reference.percentiles(self.reference, d), reference.unusual(self.reference, d)

    def batches(self, paths: list[str], batch_size: int = 32, workers: int = 0):
        """(batch, features) for image files, decoded and preprocessed as extract does."""
        from pipeline.extraction.embed import image_batches
        from pipeline.extraction.reader import decoded_images

        for batch in image_batches("cpu", Path(""), paths, self.fcfg, batch_size, workers, self.extractor.device):
            ok, images = decoded_images(batch)
            yield batch, ok, (self.features(images) if ok else None)


def predict(cfg: PredictConfig, quiet: bool = False) -> list[dict]:
    """One row per image (predicted class, its probability, the top-k, or the error), written as CSV to cfg.out
    (without --out: to standard output, unless `quiet`, as the Python API asks)."""
    run = load_run(cfg.run)
    paths = collect_images(cfg.images)
    if cfg.out:
        # before the forward pass, not after it; never over the run or an image it reads
        files.ensure_writable_file(cfg.out, "--out", inputs=(run.folder, *cfg.images),
                                   output=files.csv_output("predictions CSV", COLUMNS), force=cfg.force)
    ref = _reference(run, cfg)
    predictor = Predictor(run, cfg.weights, cfg.device, cfg.precision)
    rows, d_new = [], []
    for batch, ok, features in predictor.batches(paths, cfg.batch_size, cfg.workers):
        by_k, far = {}, {}
        if ok:
            by_k = dict(zip(ok, predictor.proba(features)))
            if ref is not None:
                d_new.append(reference.distances(ref, features))
                far = dict(zip(ok, zip(reference.percentiles(ref, d_new[-1]), reference.unusual(ref, d_new[-1]))))
        rows += [_row(paths[i], by_k.get(k), batch["error"][k], run.class_names, cfg.top_k, far.get(k))
                 for k, i in enumerate(batch["index"].tolist())]
    unusual = sum(r["unusual"] == "yes" for r in rows)
    if unusual:
        log.warning("%d of %d images are unusual: farther from the training images than the run's threshold, which "
                    "flags at most %g%% of images like its validation images (column unusual)", unusual, len(rows),
                    float(ref["alpha"]) * 100)
    if cfg.out or not quiet:
        write_csv(rows, cfg.out)
    if cfg.report:
        _report(ref, np.concatenate(d_new or [np.zeros(0)]), rows, cfg, run)
    return rows


def _reference(run: Run, cfg: PredictConfig) -> dict | None:
    """The run's drift reference (for the per-image columns, and --report); --report is refused up front when the
    run keeps none."""
    ref = reference.load(run.folder)
    if not cfg.report:
        return ref
    if ref is None:
        raise UserError(f"--report: {run.folder} keeps no reference of its training data ({reference.REFERENCE_FILE}): "
                        f"its head takes inputs wider than {reference.MAX_DIM:,}, or an older vggcache trained it")
    files.ensure_writable_file(cfg.report_path, "--report", inputs=(run.folder, *cfg.images), output=files.IMAGE,
                               force=cfg.force)
    return ref


def _report(ref: dict, d_new: np.ndarray, rows: list[dict], cfg: PredictConfig, run: Run) -> None:
    confidence = np.array([r["proba"].max() for r in rows if r["proba"] is not None])
    drifted, line = drift.verdict(ref, d_new, confidence)
    drift.plot(ref, d_new, confidence, cfg.report_path, f"{run.folder.name}: {line}")
    (log.warning if drifted else log.info)("%s (%s)", line, cfg.report_path)


def _row(path: str, proba, error: str, names: list[str], k: int, far: tuple | None = None) -> dict:
    far = {"distance_percentile": "" if far is None else f"{far[0]:.1f}",
           "unusual": "" if far is None else ("yes" if far[1] else "no")}
    if proba is None:
        return {"path": path, "predicted": "", "probability": "", "top_k": "", "error": error, "proba": None} | far
    order = np.argsort(-proba, kind="stable")[:k]
    return {"path": path, "predicted": names[order[0]], "probability": f"{proba[order[0]]:.6f}",
            "top_k": ";".join(f"{names[j]}:{proba[j]:.4f}" for j in order), "error": "", "proba": proba} | far


def write_csv(rows: list[dict], out: Path | None) -> None:
    """UTF-8 CSV; a file name that is not UTF-8 is written as its own bytes (surrogateescape), as the cache keeps it."""
    if out:
        with open(out, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
            _write_rows(f, rows)
        return
    stdout = io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8", errors="surrogateescape", newline="", write_through=True)
    if sys.stdout.isatty():  # a person reads it: a name's escape sequences must not reach the terminal
        rows = [{k: printable(v) if isinstance(v, str) else v for k, v in row.items()} for row in rows]
    try:
        _write_rows(stdout, rows)
        stdout.flush()
    finally:
        stdout.detach()  # sys.stdout keeps its buffer


def _write_rows(f, rows: list[dict]) -> None:
    writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows({k: csv_cell(v) for k, v in row.items()} for row in rows)
