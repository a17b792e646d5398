"""An open, validated feature cache (`Cache`): the one reader of the HDF5 file. Whole splits, pooled at head
time for a map cache, blocks of rows for streaming, records without features; every damaged read one line.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable

import h5py
import numpy as np

from pipeline.cache import pools
from pipeline.cache.record import Record, view_key
from pipeline.cache.schema import Damaged, decode_path
from pipeline.cache.validate import open_validated
from pipeline.errors import UserError, first_line

# A map split is pooled this many bytes of float32 raw rows at a time: below glibc's 32 MB limit for memory it gives
# back to the system, so that each block reuses the last one's memory instead of faulting in fresh pages (64 MB
# blocks made the float16 -> float32 conversion 2.5x slower), and memory holds one block, not the split.
POOLING_BYTES = 16 << 20


@dataclass
class SplitFeatures:
    features: np.ndarray
    labels: np.ndarray
    paths: list[str]

    def __iter__(self):  # X, y, paths = cache.load("train")
        return iter((self.features, self.labels, self.paths))


@dataclass
class AllRows:
    """Every split's rows together (`Cache.all_rows`): what the audit and the map look at."""

    features: np.ndarray  # float32
    labels: np.ndarray
    splits: np.ndarray  # the split of each row
    paths: list[str]


class Cache:
    """An open, validated cache: the header, its splits, and reads of whole splits. Open once per command."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file, self.header = open_validated(self.path)
        self.splits = sorted(self._file.keys())

    def __enter__(self) -> "Cache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    @property
    def _h5(self) -> h5py.File:
        """The open file; reading a closed cache says so, as a closed Python file does (h5py would only say
        'invalid identifier type')."""
        if not self._file:
            raise ValueError(f"the cache {self.path} is closed: read it inside `with open_cache(...) as cache:`, or "
                             "open it again")
        return self._file

    def _group(self, split: str) -> h5py.Group:
        if split not in self.splits:
            raise UserError(f"{self.path} has no split {split!r} (splits: {', '.join(self.splits) or 'none'})")
        return self._h5[split]

    @property
    def class_names(self) -> list[str]:
        return self.header.class_names

    @property
    def config(self):
        """The FeatureConfig (None for a config this version cannot read: header.config_problem says why)."""
        return self.header.config

    def load(self, split: str, pool: str | None = None) -> "SplitFeatures":
        """Features (as stored, or pooled by `pool` for a map cache), labels and paths of a split: `read_split`."""
        return self.read_split(split, pool)

    def pooling(self, pool: str | None) -> Callable[[np.ndarray], np.ndarray] | None:
        """What turns this cache's rows into rows pooled by `pool` at head time (a pools.HEAD_POOLS name, only for a
        map cache); None for `pool=None`: the rows as they are."""
        return None if pool is None else self.header.feature_config(self.path).head_pooling(pool)

    def pooled_dim(self, pool: str | None) -> int:
        """The size of this cache's rows once pooled by `pool` at head time (None: as stored)."""
        return self.header.feature_dim if pool is None else self.header.feature_config(self.path).pooled_dim(pool)

    def read_split(self, split: str, pool: str | None = None) -> "SplitFeatures":
        """Features, labels and paths of one split, read in one contiguous slice each; non-finite features (a
        damaged file: extraction never writes them) are refused.

        `pool` (a map cache pooled at head time): applied to the rows a few storage chunks at a time, so that memory
        holds the pooled split and one block of raw rows, never the whole raw split.
        """
        g, transform = self._group(split), self.pooling(pool)
        with self._reading(split):
            labels, paths = g["labels"][:], list(g["paths"].asstr(errors="surrogateescape")[:])
            features = g["features"][:] if transform is None else self._transformed(split, transform)
        bad = int((~np.isfinite(features).all(1)).sum()) if features.size else 0
        if bad:
            raise Damaged(f"{self.path} is damaged: {bad} rows of {split}/features are not finite (NaN or inf); "
                          "repair it with extract --verify")
        return SplitFeatures(features, labels, paths)

    def all_rows(self, pool: str = "avg") -> "AllRows":
        """Every split's rows as float32, in file order, with their split; a map cache's rows pooled by `pool` (any
        other cache's as they are, one whose config this version cannot read included)."""
        config = self.header.config
        stored_pool = self.header.config_dict.get("pool")
        if config is None and stored_pool in pools.POOLS and pools.POOLS[stored_pool].keeps_map:
            self.header.feature_config(self.path)  # a map it cannot read: it cannot pool it either (refused)
        pool = pool if config is not None and config.is_map else None
        parts = [(split, self.read_split(split, pool)) for split in self.splits]
        if not parts:
            return AllRows(np.zeros((0, self.pooled_dim(pool)), np.float32), np.zeros(0, np.int64), np.array([]), [])
        return AllRows(np.concatenate([np.asarray(d.features, np.float32) for _, d in parts]),
                       np.concatenate([d.labels for _, d in parts]),
                       np.array([split for split, d in parts for _ in d.paths]), [p for _, d in parts for p in d.paths])

    def _transformed(self, split: str, transform, dataset: str = "features") -> np.ndarray:
        ds = self._h5[split][dataset]
        n, dim = ds.shape
        chunk_rows = (ds.chunks or ds.shape)[0]
        step = chunk_rows * max(1, POOLING_BYTES // max(1, chunk_rows * dim * 4))
        # filled block by block, not concatenated: a concatenation copies the whole pooled split once more (1.2 of
        # the 3 s of reading a 4,000-row flattened map)
        pooled = None
        for start in range(0, n, step):
            block = transform(ds[start:start + step])
            if pooled is None:
                pooled = np.empty((n, block.shape[1]), np.float32)
            pooled[start:start + len(block)] = block
        return transform(ds[0:0]) if pooled is None else pooled

    def views_per_row(self, split: str) -> int:
        """K of a split that holds K augmented views of each row (`extract --augment K`), else 0."""
        g = self._group(split)
        n = g["features"].shape[0]
        return g["views"].shape[0] // n if "views" in g and n else 0

    def read_views(self, split: str, pool: str | None = None) -> np.ndarray:
        """The augmented views of a split, (rows x K, D): rows i*K .. i*K+K-1 are row i's; `pool` as in
        `read_split`. Empty (0, D) for a split without views."""
        g, transform = self._group(split), self.pooling(pool)
        if "views" not in g:
            raise ValueError(f"split {split!r} holds no views")
        with self._reading(split):
            views = g["views"][:] if transform is None else self._transformed(split, transform, "views")
        if views.size and not np.isfinite(views).all():
            raise Damaged(f"{self.path} is damaged: {split}/views are not finite (NaN or inf); repair it with "
                          "extract --verify")
        return views

    def nonfinite_keys(self) -> set[str]:
        """The record keys (paths, or view keys) of rows holding NaN or inf, every row read a block at a time:
        what `extract --verify` extracts again."""
        keys = set()
        for split in self.splits:
            g, paths = self._h5[split], None
            for dataset in (d for d in ("features", "views") if d in g):
                bad = self._nonfinite_rows(split, dataset)
                if len(bad):
                    paths = paths or self.read_paths(split)
                    k = self.views_per_row(split)
                    keys |= {paths[i] if dataset == "features" else view_key(paths[i // k], i % k) for i in bad}
        return keys

    def _nonfinite_rows(self, split: str, dataset: str) -> np.ndarray:
        ds = self._h5[split][dataset]
        step = max(1, (64 << 20) // max(1, ds.shape[1] * ds.dtype.itemsize))
        with self._reading(split):
            bad = [start + np.flatnonzero(~np.isfinite(ds[start:start + step]).all(1))
                   for start in range(0, ds.shape[0], step)]
        return np.concatenate(bad) if bad else np.zeros(0, int)

    def split_shape(self, split: str) -> tuple[int, int, int]:
        """(rows, feature dim, rows per storage chunk) of a split: what a streaming reader aligns its reads to."""
        ds = self._group(split)["features"]
        return ds.shape[0], ds.shape[1], (ds.chunks or ds.shape)[0]

    def read_paths(self, split: str) -> list[str]:
        """The image paths of a split's rows, in row order."""
        with self._reading(split):
            return list(self._group(split)["paths"].asstr(errors="surrogateescape")[:])

    def read_labels(self, split: str) -> np.ndarray:
        with self._reading(split):
            return self._group(split)["labels"][:]

    def read_rows(self, split: str, start: int, stop: int) -> np.ndarray:
        """Feature rows start..stop of a split (a contiguous read), checked finite like `read_split`."""
        with self._reading(split):
            rows = self._group(split)["features"][start:stop]
        if not np.isfinite(rows).all():
            raise Damaged(f"{self.path} is damaged: rows {start}..{stop} of {split}/features are not finite "
                          "(NaN or inf); repair it with extract --verify")
        return rows

    def records(self) -> list[Record]:
        """Every record (rows, then failures, per split) without reading any features."""
        out = []
        for split in self.splits:
            g = self._h5[split]
            with self._reading(split):
                columns = zip(g["paths"].asstr(errors="surrogateescape")[:], g["labels"][:], g["sizes"][:],
                              g["mtimes_ns"][:], [h.decode("ascii") for h in g["sha256"][:]])
                rows = [Record(split, p, int(lab), int(s), int(m), h) for p, lab, s, m, h in columns]
                k = self.views_per_row(split)
                out += rows + [replace(r, path=view_key(r.path, j)) for r in rows for j in range(k)]
                out += [Record(split, decode_path(r["path"]), -1, int(r["size"]), int(r["mtime_ns"]), "",
                               decode_path(r["reason"])) for r in g["failed"][:]]
        return out

    @contextlib.contextmanager
    def _reading(self, split: str):
        """Bytes damaged inside a dataset surface as h5py errors of many types: one line instead."""
        self._h5  # noqa: B018 (a closed cache says so, not that it is damaged)
        try:
            yield
        except (KeyError, OSError, RuntimeError, ValueError, UnicodeDecodeError) as e:
            raise Damaged(f"{self.path} is damaged: split {split!r} cannot be read ({first_line(e)[:200]}); "
                          "rebuild it with extract --force") from None

    def rows(self, split: str, positions: np.ndarray, dataset: str = "features") -> np.ndarray:
        """Feature rows (or, `dataset="views"`, view rows) by position within a split (any order), for copying them
        into a new cache."""
        ds = self._group(split)[dataset]
        lo, hi = int(positions.min()), int(positions.max()) + 1
        if hi - lo <= 4 * len(positions) + 1024:  # a nearly contiguous run: one slice beats a point selection
            return ds[lo:hi][positions - lo]
        order = np.argsort(positions)
        out = np.empty((len(positions), ds.shape[1]), ds.dtype)
        out[order] = ds[positions[order]]
        return out


def open_cache(path: Path) -> Cache:
    return Cache(path)


def row_positions(records: Iterable[Record]) -> dict[str, tuple[str, int]]:
    """Map path -> (split, row) for the rows of a cache, in the order `Cache.records` returns them; a view's key
    (`view_key`) -> (split, its row in /<split>/views)."""
    positions, counters = {}, {}
    for r in records:
        if r.ok:
            counter = (r.split, r.view is not None)  # rows and views are numbered apart, each in record order
            positions[r.path] = (r.split, counters.get(counter, 0))
            counters[counter] = counters.get(counter, 0) + 1
    return positions
