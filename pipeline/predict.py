"""The predict stage: rebuild the run's exact extractor, embed new images, apply the head, write one row per image."""

from __future__ import annotations

import csv
import io
import logging
import sys
from pathlib import Path

import numpy as np

from pipeline import drift, files
from pipeline.config import PredictConfig, weights_spec
from pipeline.data import is_image_name
from pipeline.errors import UserError
from pipeline.heads import full_proba
from pipeline.runs import Run, load_run

log = logging.getLogger(__name__)

COLUMNS = ("path", "predicted", "probability", "top_k", "error")


def collect_images(paths: tuple[Path, ...]) -> list[str]:
    """Files as given; folders searched recursively for image extensions."""
    found = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(str(f) for f in p.rglob("*") if f.is_file() and is_image_name(f.name))
        elif p.is_file():
            found.append(str(p))
        else:
            raise UserError(f"image path not found: {p}")
    if not found:
        raise UserError(f"no images found in {', '.join(map(str, paths))}")
    return found


def weights_for(run: Run, override: str | None) -> str:
    """The --weights spec that rebuilds the run's extractor; build_body then checks it is the very same."""
    return weights_spec(run.feature_config.weights_id, run.record.features.weights_file, override)


def precision_for(run: Run, asked: str) -> str:
    """By default, the precision the training features were extracted with, so a cached image predicts the same."""
    recorded = run.record.features.precision
    return recorded if asked == "auto" and recorded in ("fp32", "bf16") else asked


def predict(cfg: PredictConfig) -> list[dict]:
    """One row per image (predicted class, its probability, the top-k, or the error), written as CSV to cfg.out."""
    from pipeline.backbone import Extractor, build_body
    from pipeline.embed import image_batches
    from pipeline.reader import decoded_images

    run = load_run(cfg.run)
    head = run.load_head()
    fcfg = run.feature_config
    paths = collect_images(cfg.images)
    if cfg.out:
        # before the forward pass, not after it; never over the run or an image it reads
        files.ensure_writable_file(cfg.out, "--out", inputs=(run.folder, *cfg.images),
                                   output=files.csv_output("predictions CSV", COLUMNS), force=cfg.force)
    reference = _reference(run, cfg)
    extractor = Extractor(build_body(fcfg, weights_for(run, cfg.weights)), cfg.device, precision_for(run, cfg.precision))
    loader = image_batches("cpu", Path(""), paths, fcfg, cfg.batch_size, cfg.workers, extractor.device)
    pooled = run.head_pooling()  # a head trained on a map cache pools the map as it did
    rows, d_new = [], []
    for batch in loader:
        ok, images = decoded_images(batch)
        by_k = {}
        if ok:
            # round through the cache's storage dtype: the head was trained on exactly such values
            features = extractor(images).astype(fcfg.dtype).astype(np.float32)
            features = pooled(features) if pooled else features
            by_k = dict(zip(ok, full_proba(head, features, len(run.class_names))))
            if reference is not None:
                d_new.append(drift.distances(features, reference["mean"], reference["centroids"]))
        rows += [_row(paths[i], by_k.get(k), batch["error"][k], run.class_names, cfg.top_k)
                 for k, i in enumerate(batch["index"].tolist())]
    write_csv(rows, cfg.out)
    if reference is not None:
        _report(reference, np.concatenate(d_new or [np.zeros(0)]), rows, cfg, run)
    return rows


def _reference(run: Run, cfg: PredictConfig) -> dict | None:
    """The run's drift reference when --report asks for one; refused up front when the run keeps none."""
    if not cfg.report:
        return None
    reference = drift.load(run.folder)
    if reference is None:
        raise UserError(f"--report: {run.folder} keeps no reference of its training data ({drift.REFERENCE_FILE}): "
                        f"its head takes inputs wider than {drift.MAX_DIM:,}, or an older vggcache trained it")
    files.ensure_writable_file(cfg.report_path, "--report", inputs=(run.folder, *cfg.images), output=files.IMAGE,
                               force=cfg.force)
    return reference


def _report(reference: dict, d_new: np.ndarray, rows: list[dict], cfg: PredictConfig, run: Run) -> None:
    confidence = np.array([r["proba"].max() for r in rows if r["proba"] is not None])
    drifted, line = drift.verdict(reference, d_new, confidence)
    drift.plot(reference, d_new, confidence, cfg.report_path, f"{run.folder.name}: {line}")
    (log.warning if drifted else log.info)("%s (%s)", line, cfg.report_path)


def _row(path: str, proba, error: str, names: list[str], k: int) -> dict:
    if proba is None:
        return {"path": path, "predicted": "", "probability": "", "top_k": "", "error": error, "proba": None}
    order = np.argsort(-proba, kind="stable")[:k]
    return {"path": path, "predicted": names[order[0]], "probability": f"{proba[order[0]]:.6f}",
            "top_k": ";".join(f"{names[j]}:{proba[j]:.4f}" for j in order), "error": "", "proba": proba}


def write_csv(rows: list[dict], out: Path | None) -> None:
    """UTF-8 CSV; a file name that is not UTF-8 is written as its own bytes (surrogateescape), as the cache keeps it."""
    if out:
        with open(out, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
            _write_rows(f, rows)
        return
    stdout = io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8", errors="surrogateescape", newline="", write_through=True)
    try:
        _write_rows(stdout, rows)
        stdout.flush()
    finally:
        stdout.detach()  # sys.stdout keeps its buffer


def _write_rows(f, rows: list[dict]) -> None:
    writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
