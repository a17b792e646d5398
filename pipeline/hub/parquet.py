"""`pipeline export-features`: a cache's rows as Parquet files that pandas, DuckDB, Spark and Hugging Face
`datasets` read without this package (to be written: issue 27)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.hub.config import ExportConfig


@dataclass(frozen=True)
class ExportSummary:
    out: Path  # the folder
    files: tuple[Path, ...]  # the Parquet parts, in order
    rows: int
    dim: int
    bytes: int  # on disk, all parts together
    seconds: float


def export_features(cfg: ExportConfig) -> ExportSummary:
    raise NotImplementedError
