"""The HDF5 feature cache: its schema, defined once here, and the only code that touches h5py.

    / attrs   schema_version, fingerprint, config (JSON), class_names (JSON), versions (JSON),
              source (JSON), extraction (JSON), feature_dim, created, updated
    /<split>/features   (N, D) float16|float32, chunked by rows
    /<split>/labels     (N,) int64, index into class_names
    /<split>/paths      (N,) UTF-8, relative to the dataset root
    /<split>/sizes      (N,) int64 bytes      \
    /<split>/mtimes_ns  (N,) int64            }  what the next run compares to spot changed files
    /<split>/sha256     (N,) ASCII hex digest /
    /<split>/failed     (F,) records of (path, reason, size, mtime_ns)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import h5py
import numpy as np

from pipeline.errors import UserError

SCHEMA_VERSION = 1
CHUNK_BYTES = 1 << 20  # ~1 MiB row chunks: large contiguous reads, small enough for partial reads
STR = h5py.string_dtype("utf-8")
FAILED_DTYPE = np.dtype([("path", STR), ("reason", STR), ("size", "<i8"), ("mtime_ns", "<i8")])


@dataclass(frozen=True, slots=True)  # slots: one per image in memory, ~40% smaller
class Record:
    """One image as the cache knows it: a feature row when `reason` is empty, else a recorded failure."""

    split: str
    path: str
    label: int
    size: int
    mtime_ns: int
    sha256: str = ""
    reason: str = ""

    @property
    def ok(self) -> bool:
        return not self.reason


@dataclass
class Header:
    """The root attributes: what a reader needs to trust and reuse the features."""

    fingerprint: str
    config: dict
    class_names: list[str]
    feature_dim: int
    source: dict = field(default_factory=dict)
    extraction: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    created: str = ""
    updated: str = ""


@dataclass
class SplitFeatures:
    features: np.ndarray
    labels: np.ndarray
    paths: list[str]


_JSON_ATTRS = ("config", "class_names", "source", "extraction", "versions")


def _open(path: Path, mode: str = "r") -> h5py.File:
    if not Path(path).is_file():
        raise UserError(f"feature file not found: {path}")
    try:
        f = h5py.File(path, mode)
    except OSError as e:
        raise UserError(f"{path} is not a readable HDF5 file ({e})") from None
    version = f.attrs.get("schema_version")
    if version is None:
        f.close()
        raise UserError(f"{path} is not a vggcache feature file (no schema_version attribute)")
    if int(version) > SCHEMA_VERSION:
        f.close()
        raise UserError(f"{path} has schema_version {int(version)}; this vggcache reads up to {SCHEMA_VERSION}: upgrade it")
    return f


def read_header(path: Path) -> Header:
    with _open(path) as f:
        return _header_of(f)


def _header_of(f: h5py.File) -> Header:
    a = f.attrs
    values = {k: json.loads(a[k]) for k in _JSON_ATTRS}
    return Header(fingerprint=str(a["fingerprint"]), feature_dim=int(a["feature_dim"]),
                  created=str(a["created"]), updated=str(a["updated"]), **values)


def splits_of(path: Path) -> list[str]:
    with _open(path) as f:
        return sorted(k for k in f.keys() if isinstance(f[k], h5py.Group))


def read_records(path: Path) -> tuple[Header, list[Record]]:
    """Header and every record (rows, then failures, per split) without reading any features."""
    with _open(path) as f:
        records = []
        for split in sorted(f.keys()):
            g = f[split]
            columns = zip(g["paths"].asstr()[:], g["labels"][:], g["sizes"][:], g["mtimes_ns"][:], g["sha256"].asstr()[:])
            records += [Record(split, p, int(lab), int(s), int(m), h) for p, lab, s, m, h in columns]
            records += [Record(split, _text(r["path"]), -1, int(r["size"]), int(r["mtime_ns"]), "", _text(r["reason"]))
                        for r in g["failed"][:]]
        return _header_of(f), records


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def read_split(path: Path, split: str) -> SplitFeatures:
    """Features, labels and paths of one split, read in one contiguous slice each."""
    with _open(path) as f:
        if split not in f:
            raise UserError(f"{path} has no split {split!r} (splits: {', '.join(sorted(f.keys())) or 'none'})")
        g = f[split]
        return SplitFeatures(g["features"][:], g["labels"][:], list(g["paths"].asstr()[:]))


class RowReader:
    """Reads feature rows of an existing cache by (split, row) positions, for copying them into a new one."""

    def __init__(self, path: Path):
        self._file = _open(path)

    def rows(self, split: str, positions: np.ndarray) -> np.ndarray:
        ds = self._file[split]["features"]
        lo, hi = int(positions.min()), int(positions.max()) + 1
        if hi - lo <= 4 * len(positions) + 1024:  # a nearly contiguous run: one slice beats a point selection
            return ds[lo:hi][positions - lo]
        order = np.argsort(positions)
        out = np.empty((len(positions), ds.shape[1]), ds.dtype)
        out[order] = ds[positions[order]]
        return out

    def close(self) -> None:
        self._file.close()


def row_positions(records: Iterable[Record]) -> dict[str, tuple[str, int]]:
    """Map path -> (split, row) for the rows of a cache, in the order `read_records` returns them."""
    positions, counters = {}, {}
    for r in records:
        if r.ok:
            positions[r.path] = (r.split, counters.get(r.split, 0))
            counters[r.split] = counters.get(r.split, 0) + 1
    return positions


def write_atomic(path: Path, header: Header, records: list[Record],
                 fetch: Callable[[list[Record]], np.ndarray], dtype: str) -> None:
    """Write a complete cache to a temporary name, then rename it over `path`: readers never see half a file."""
    tmp = Path(f"{path}.tmp")
    with h5py.File(tmp, "w") as f:
        _write_header(f, header)
        for split in sorted({r.split for r in records}):
            _write_split(f.create_group(split), [r for r in records if r.split == split], header.feature_dim, fetch, dtype)
    with open(tmp, "rb+") as fd:
        os.fsync(fd.fileno())
    os.replace(tmp, path)


def _write_header(f: h5py.File, header: Header) -> None:
    f.attrs["schema_version"] = SCHEMA_VERSION
    f.attrs["fingerprint"] = header.fingerprint
    f.attrs["feature_dim"] = header.feature_dim
    f.attrs["created"], f.attrs["updated"] = header.created, header.updated
    for key in _JSON_ATTRS:
        f.attrs[key] = json.dumps(getattr(header, key), sort_keys=True)


def _write_split(g: h5py.Group, records: list[Record], dim: int, fetch, dtype: str) -> None:
    rows = sorted((r for r in records if r.ok), key=lambda r: r.path)
    failed = sorted((r for r in records if not r.ok), key=lambda r: r.path)
    chunk_rows = max(1, CHUNK_BYTES // (dim * np.dtype(dtype).itemsize))
    features = g.create_dataset("features", (len(rows), dim), dtype=dtype,
                                chunks=(min(chunk_rows, max(1, len(rows))), dim))
    for start in range(0, len(rows), chunk_rows):
        features[start:start + chunk_rows] = fetch(rows[start:start + chunk_rows])
    g.create_dataset("labels", data=np.array([r.label for r in rows], dtype="<i8"))
    g.create_dataset("paths", data=np.array([r.path for r in rows], dtype=object), dtype=STR)
    g.create_dataset("sizes", data=np.array([r.size for r in rows], dtype="<i8"))
    g.create_dataset("mtimes_ns", data=np.array([r.mtime_ns for r in rows], dtype="<i8"))
    g.create_dataset("sha256", data=np.array([r.sha256 for r in rows], dtype="S64"))
    g.create_dataset("failed", data=np.array([(r.path, r.reason, r.size, r.mtime_ns) for r in failed], dtype=FAILED_DTYPE))


def describe(path: Path) -> dict:
    """A JSON-able summary of a cache: header, rows per split and class, and every failed file."""
    header, records = read_records(path)
    splits: dict[str, dict] = {}
    for r in records:
        s = splits.setdefault(r.split, {"rows": 0, "per_class": {name: 0 for name in header.class_names}, "failed": []})
        if r.ok:
            s["rows"] += 1
            s["per_class"][header.class_names[r.label]] += 1
        else:
            s["failed"].append({"path": r.path, "reason": r.reason})
    return {"path": str(path), "file_bytes": Path(path).stat().st_size, "fingerprint": header.fingerprint,
            "feature_dim": header.feature_dim, "class_names": header.class_names, "config": header.config,
            "source": header.source, "extraction": header.extraction, "versions": header.versions,
            "created": header.created, "updated": header.updated, "splits": splits}
