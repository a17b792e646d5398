"""The HDF5 feature cache: its schema, defined once here, and the only code that touches h5py.

    / attrs   schema_version, fingerprint, config (JSON), class_names (JSON), versions (JSON),
              source (JSON), extraction (JSON), feature_dim, created, updated
    /<split>/features   (N, D) float16|float32, chunked by rows
    /<split>/labels     (N,) int64, index into class_names
    /<split>/paths      (N,) UTF-8 text, relative to the dataset root (a name that is not UTF-8: its raw bytes)
    /<split>/sizes      (N,) int64 bytes      \
    /<split>/mtimes_ns  (N,) int64            }  what the next run compares to spot changed files
    /<split>/sha256     (N,) ASCII hex digest /
    /<split>/failed     (F,) records of (path, reason, size, mtime_ns)
    /<split>/views      (N*K, D) optional (schema 2, `extract --augment K`): rows i*K .. i*K+K-1 are the K
                        augmented views of row i, so a view always goes with its source image, label and split

A file without views is written as schema 1, so that an older vggcache still reads it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Iterable

import h5py
import numpy as np

from pipeline import files, pools
from pipeline.config import FeatureConfig
from pipeline.errors import UserError, first_line
from pipeline.params import is_json_of

SCHEMA_VERSION = 2
VIEWS_SCHEMA = 2  # the first schema with /<split>/views
CHUNK_BYTES = 1 << 20  # ~1 MiB row chunks: large contiguous reads, small enough for partial reads
STR = h5py.string_dtype("utf-8")
UNREADABLE = "cannot read"  # how the reason of a file that could not be read at all starts (see Record.unreadable)
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

    @property
    def view(self) -> tuple[str, int] | None:
        """(source path, view index) of an augmented view's record (see `view_key`), None for an image's own row."""
        return view_of(self.path)

    @property
    def unreadable(self) -> bool:
        """The file could not be read at all (permissions, I/O): a failure that may go away without the file changing."""
        return self.reason.startswith(UNREADABLE)


VIEW_SEP = "\0"  # no file name holds a NUL byte (and manifests refuse one), so a view's key never names a file


def view_key(path: str, index: int) -> str:
    """The key of view `index` of the image at `path`: its record's path in a plan, a journal and `Cache.records`
    (the file itself stores views by row, in /<split>/views, never by this key)."""
    return f"{path}{VIEW_SEP}{index}"


def view_of(key: str) -> tuple[str, int] | None:
    """(source path, view index) of a view's key, None for an image's own path: the one reader of `view_key`."""
    source, sep, index = key.partition(VIEW_SEP)
    return (source, int(index)) if sep else None


def shown(path: str) -> str:
    """A record's path as a person reads it: 'a/b.jpg (view 2)' for a view."""
    view = view_of(path)
    return f"{view[0]} (view {view[1]})" if view else path


def unreadable_reason(e: Exception) -> str:
    """The recorded reason of a file that could not be read at all (see Record.unreadable)."""
    detail = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    return f"{UNREADABLE} ({type(e).__name__}: {detail})"[:300]


@dataclass(frozen=True)
class Extraction:
    """How the rows were last extracted (the root attribute `extraction`): recorded beside the config, not in it,
    since none of it changes the features beyond float rounding. Every field may be absent from an older file."""

    device: str | None = None
    precision: str | None = None  # fp32 | bf16 | fp16: predict embeds new images the same way by default
    decode: str | None = None
    batch_size: int | None = None
    workers: int | None = None
    torch_threads: int | None = None
    processes: int | None = None
    weights_file: str | None = None  # the state-dict file the weights came from (None: imagenet or random)
    images: int | None = None  # went through the model in that run
    seconds: float | None = None
    images_per_s: float | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "Extraction | None":
        """The attribute as read (None for an empty one): informational, so read leniently, a value of the wrong
        type as absent; the file's own dict is kept beside it (`Header.stored`) and written back as it was."""
        return _lenient(cls, d) if d else None


@dataclass(frozen=True)
class Source:
    """The dataset the rows came from (the root attribute `source`)."""

    root: str | None = None  # its folder, resolved; a manifest's paths are relative to it
    kind: str | None = None  # data.Dataset.kind
    name: str | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "Source":
        return _lenient(cls, d)


def _lenient(cls, d: dict):
    """A dataclass of optional fields from a JSON object: unknown names ignored, a value of the wrong type None."""
    hints = typing.get_type_hints(cls)
    kinds = {f.name: typing.get_args(hints[f.name])[0] for f in fields(cls)}  # X of `X | None`
    return cls(**{name: d[name] if is_json_of(kind, d.get(name)) else None for name, kind in kinds.items()})


@dataclass(frozen=True)
class Header:
    """The root attributes: what a reader needs to trust and reuse the features.

    `config` is parsed and validated once, when the file is opened; a config this vggcache cannot read (a later
    version's, or an edited one) is None and `config_problem` says why, so that `info` still shows the file.
    """

    fingerprint: str
    config: FeatureConfig | None
    class_names: list[str]
    feature_dim: int
    source: Source = field(default_factory=Source)
    extraction: Extraction | None = None
    versions: dict = field(default_factory=dict)
    created: str = ""
    updated: str = ""
    config_problem: str = ""
    # the JSON attributes config, source and extraction as the file holds them (None: a header made in memory):
    # shown by info and written back unchanged when a cache is rewritten
    stored: dict | None = field(default=None, compare=False, repr=False)

    def feature_config(self, path: Path) -> FeatureConfig:
        """The config, or one UserError saying why this vggcache cannot use the cache at `path`."""
        if self.config is None:
            raise UserError(f"{path} holds features of an extractor config this vggcache cannot use ({self.config_problem})")
        return self.config

    @property
    def weights_file(self) -> str | None:
        """The state-dict file the features were made from, as the last extraction recorded it."""
        return self.extraction.weights_file if self.extraction else None

    @property
    def precision(self) -> str | None:
        """The autocast precision of the last extraction (fp32, bf16, fp16)."""
        return self.extraction.precision if self.extraction else None

    @property
    def config_dict(self) -> dict:
        """The config as the file holds it (what `info` shows, readable or not)."""
        return self.attribute("config")

    def attribute(self, name: str) -> dict:
        """A JSON attribute as the file holds it, or as this header's typed value writes it."""
        if self.stored is not None and name in self.stored:
            return self.stored[name]
        value = getattr(self, name)
        if name == "config":
            return value.to_dict() if value is not None else {}
        values = asdict(value) if value is not None else {}
        return dict(sorted((k, v) for k, v in values.items() if v is not None or name == "extraction"))


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


_JSON_ATTRS = {"config": dict, "class_names": list, "source": dict, "extraction": dict, "versions": dict}
_TEXT_ATTRS = ("fingerprint", "created", "updated")
SPLIT_DATASETS = ("features", "labels", "paths", "sizes", "mtimes_ns", "sha256", "failed")
OPTIONAL_DATASETS = ("views",)
FEATURE_DTYPES = (np.dtype("float16"), np.dtype("float32"))


def _encode_path(path: str) -> bytes:
    """File names are stored as their bytes: a name that is not valid UTF-8 (kept by Python as surrogate escapes)
    round-trips exactly instead of failing the write."""
    return path.encode("utf-8", "surrogateescape")


def _decode_path(value) -> str:
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else str(value)


class Damaged(UserError):
    """The file is HDF5 but not a complete vggcache cache: names what is wrong."""


class Cache:
    """An open, validated cache: the header, its splits, and reads of whole splits. Open once per command."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file, self.header = _open_validated(self.path)
        self.splits = sorted(self._file.keys())

    def __enter__(self) -> "Cache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def _group(self, split: str) -> h5py.Group:
        if split not in self.splits:
            raise UserError(f"{self.path} has no split {split!r} (splits: {', '.join(self.splits) or 'none'})")
        return self._file[split]

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
        ds = self._file[split][dataset]
        n, dim = ds.shape
        chunk_rows = (ds.chunks or ds.shape)[0]
        step = chunk_rows * max(1, (64 << 20) // max(1, chunk_rows * dim * 4))  # ~64 MB of float32 raw rows a read
        parts = [transform(ds[start:start + step]) for start in range(0, n, step)]
        return np.concatenate(parts) if parts else transform(ds[0:0])

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
            g, paths = self._file[split], None
            for dataset in (d for d in ("features", "views") if d in g):
                bad = self._nonfinite_rows(split, dataset)
                if len(bad):
                    paths = paths or self.read_paths(split)
                    k = self.views_per_row(split)
                    keys |= {paths[i] if dataset == "features" else view_key(paths[i // k], i % k) for i in bad}
        return keys

    def _nonfinite_rows(self, split: str, dataset: str) -> np.ndarray:
        ds = self._file[split][dataset]
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
            g = self._file[split]
            with self._reading(split):
                columns = zip(g["paths"].asstr(errors="surrogateescape")[:], g["labels"][:], g["sizes"][:],
                              g["mtimes_ns"][:], [h.decode("ascii") for h in g["sha256"][:]])
                rows = [Record(split, p, int(lab), int(s), int(m), h) for p, lab, s, m, h in columns]
                k = self.views_per_row(split)
                out += rows + [replace(r, path=view_key(r.path, j)) for r in rows for j in range(k)]
                out += [Record(split, _decode_path(r["path"]), -1, int(r["size"]), int(r["mtime_ns"]), "",
                               _decode_path(r["reason"])) for r in g["failed"][:]]
        return out

    @contextlib.contextmanager
    def _reading(self, split: str):
        """Bytes damaged inside a dataset surface as h5py errors of many types: one line instead."""
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


def _open_validated(path: Path) -> tuple[h5py.File, Header]:
    if not Path(path).is_file():
        raise UserError(f"feature file not found: {path}")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise UserError(f"{path} is not a readable HDF5 file ({e})") from None
    try:
        header = _validate(f, Path(path).stat().st_size)
    except Damaged as e:
        f.close()
        raise Damaged(f"{path} {e}") from None
    except (KeyError, OSError, RuntimeError, ValueError) as e:  # damaged bytes inside HDF5's own structures
        f.close()
        raise Damaged(f"{path} is damaged: HDF5 cannot read it ({first_line(e)[:200]}); rebuild it with extract "
                      "--force") from None
    except BaseException:
        f.close()
        raise
    return f, header


def _validate(f: h5py.File, file_bytes: int) -> Header:
    """The whole schema, checked once on opening; every problem is one `Damaged` line naming what is wrong.
    Sizes are checked before anything is read: a crafted file cannot make a reader allocate what it declares."""
    if "schema_version" not in f.attrs:
        raise Damaged("is not a vggcache feature file (no schema_version attribute)")
    version = f.attrs["schema_version"]
    if not isinstance(version, (int, np.integer)) or isinstance(version, (bool, np.bool_)) or version < 1:
        raise Damaged(f"is damaged: schema_version is {_show(version)}, expected a positive integer")
    if int(version) > SCHEMA_VERSION:
        raise Damaged(f"has schema_version {int(version)}; this vggcache reads up to {SCHEMA_VERSION}: upgrade it")
    header = _header_of(_checked_attrs(f.attrs))
    members = list(f.items())
    for name, member in members:
        if not isinstance(member, h5py.Group):
            raise Damaged(f"is damaged: unexpected dataset /{name} at the root (splits are groups)")
    declared = sum(_declared_bytes(group) for _, group in members)
    if declared > file_bytes:  # a cache is never compressed: every row it declares takes its bytes in the file
        raise Damaged(f"is damaged: its splits declare {files.human_bytes(declared)} of data in a file of "
                      f"{files.human_bytes(file_bytes)}")
    for name, member in members:
        _check_split(name, member, header.feature_dim, len(header.class_names))
    return header


def _declared_bytes(group: h5py.Group) -> int:
    """What a split's datasets declare, uncompressed (a variable-length text counts its 8-byte reference only)."""
    return sum(int(ds.size) * ds.dtype.itemsize for ds in group.values() if isinstance(ds, h5py.Dataset))


def _show(value) -> str:
    return repr(value.decode(errors="replace") if isinstance(value, bytes) else value)[:60]


def _checked_attrs(attrs) -> dict:
    found = {}
    for key in (*_TEXT_ATTRS, "feature_dim", *_JSON_ATTRS):
        if key not in attrs:
            raise Damaged(f"is damaged: the root attribute {key!r} is missing")
    for key in _TEXT_ATTRS:
        if not isinstance(attrs[key], (str, bytes)):
            raise Damaged(f"is damaged: the root attribute {key!r} is {_show(attrs[key])}, expected text")
    dim = attrs["feature_dim"]
    if not isinstance(dim, (int, np.integer)) or isinstance(dim, (bool, np.bool_)) or dim < 1:
        raise Damaged(f"is damaged: feature_dim is {_show(dim)}, expected a positive integer")
    found["feature_dim"] = int(dim)
    for key in _TEXT_ATTRS:
        found[key] = _decode_path(attrs[key])
    for key, kind in _JSON_ATTRS.items():
        try:
            found[key] = json.loads(attrs[key])
        except (TypeError, ValueError):
            raise Damaged(f"is damaged: the root attribute {key!r} is not JSON") from None
        if not isinstance(found[key], kind):
            raise Damaged(f"is damaged: the root attribute {key!r} is not a JSON {'object' if kind is dict else 'list'}")
    if not found["class_names"] or not all(isinstance(c, str) for c in found["class_names"]):
        raise Damaged("is damaged: class_names is not a non-empty list of names")
    if len(set(found["class_names"])) < len(found["class_names"]):
        raise Damaged("is damaged: class_names names a class twice")
    return found


def _check_split(split: str, g: h5py.Group, dim: int, n_classes: int) -> None:
    names = set(g.keys())
    missing = [d for d in SPLIT_DATASETS if d not in names]
    if missing:
        raise Damaged(f"is damaged: split {split!r} has no {', '.join(missing)} dataset")
    extra = sorted(names - set(SPLIT_DATASETS) - set(OPTIONAL_DATASETS))
    if extra:
        raise Damaged(f"is damaged: split {split!r} holds unexpected members {', '.join(extra)}")
    if not all(isinstance(g[d], h5py.Dataset) for d in names):
        raise Damaged(f"is damaged: a member of split {split!r} is not a dataset")
    features = g["features"]
    if features.ndim != 2 or features.shape[1] != dim or features.dtype not in FEATURE_DTYPES:
        raise Damaged(f"is damaged: {split}/features is {features.shape} {features.dtype}, expected (N, {dim}) float16|float32")
    n = features.shape[0]
    if "views" in names:
        views = g["views"]
        if views.ndim != 2 or views.shape[1] != dim or views.dtype != features.dtype or \
                (views.shape[0] % n if n else views.shape[0]):
            raise Damaged(f"is damaged: {split}/views is {views.shape} {views.dtype}, expected (N x K, {dim}) "
                          f"{features.dtype} for the {n} rows of {split}/features")
    for column in ("labels", "paths", "sizes", "mtimes_ns", "sha256"):
        if g[column].shape != (n,):
            raise Damaged(f"is damaged: {split}/{column} has shape {g[column].shape}, expected ({n},) like {split}/features")
    labels = g["labels"][:]
    if labels.dtype.kind not in "iu" or (n and (labels.min() < 0 or labels.max() >= n_classes)):
        raise Damaged(f"is damaged: {split}/labels are not indices into the {n_classes} class names")
    _check_digests(split, g["sha256"])
    _check_paths(split, g["paths"])
    failed = g["failed"]
    if failed.ndim != 1 or failed.dtype.names is None or set(FAILED_DTYPE.names) - set(failed.dtype.names):
        raise Damaged(f"is damaged: {split}/failed is not a table of ({', '.join(FAILED_DTYPE.names)})")


_HEX = np.zeros(256, bool)
_HEX[np.frombuffer(b"0123456789abcdef", np.uint8)] = True


def _check_digests(split: str, ds: h5py.Dataset) -> None:
    """64 lowercase hex digits each: what the next extract compares a file's bytes with."""
    if ds.dtype != np.dtype("S64"):
        raise Damaged(f"is damaged: {split}/sha256 is {ds.dtype}, expected 64-byte ASCII digests")
    digits = ds[:].view(np.uint8).reshape(-1, 64) if ds.shape[0] else np.zeros((0, 64), np.uint8)
    bad = np.flatnonzero(~_HEX[digits].all(1))
    if len(bad):
        raise Damaged(f"is damaged: {split}/sha256 row {bad[0]} is not a hex digest")


def _check_paths(split: str, ds: h5py.Dataset) -> None:
    """Relative, without '..', sorted and distinct: rows are written in path order, one per image."""
    paths = list(ds.asstr(errors="surrogateescape")[:])
    for i, path in enumerate(paths):
        if not path or path.startswith("/") or ".." in path.split("/"):
            raise Damaged(f"is damaged: {split}/paths row {i} ({printable_path(path)}) is not relative to the dataset root")
        if i and paths[i - 1] >= path:
            raise Damaged(f"is damaged: {split}/paths are not sorted and distinct (row {i}: {printable_path(path)})")


def printable_path(path: str) -> str:
    return files.printable(repr(path))[:120]


def read_header(path: Path) -> Header:
    with open_cache(path) as cache:
        return cache.header


def splits_of(path: Path) -> list[str]:
    with open_cache(path) as cache:
        return cache.splits


def read_records(path: Path) -> tuple[Header, list[Record]]:
    """Header and every record (rows, then failures, per split) without reading any features."""
    with open_cache(path) as cache:
        return cache.header, cache.records()


def _header_of(attrs: dict) -> Header:
    """The typed header of checked root attributes: the config parsed (or None, and why), the rest typed."""
    try:
        config, problem = FeatureConfig.from_dict(attrs["config"]), ""
    except KeyError as e:
        config, problem = None, f"its config has no {e}"
    except (TypeError, ValueError, UserError) as e:
        config, problem = None, f"its config: {e}"
    if config is not None and config.fingerprint() != attrs["fingerprint"]:  # an edited config, or fingerprint
        config, problem = None, f"its config hashes to {config.fingerprint()}, not to its fingerprint {attrs['fingerprint']}"
    return Header(fingerprint=attrs["fingerprint"], config=config, class_names=attrs["class_names"],
                  feature_dim=attrs["feature_dim"], source=Source.from_dict(attrs["source"]),
                  extraction=Extraction.from_dict(attrs["extraction"]), versions=attrs["versions"],
                  created=attrs["created"], updated=attrs["updated"], config_problem=problem,
                  stored={name: attrs[name] for name in ("config", "source", "extraction")})


def read_split(path: Path, split: str) -> SplitFeatures:
    """Features, labels and paths of one split (opens the file for this one read)."""
    with open_cache(path) as cache:
        return cache.read_split(split)


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


def estimated_bytes(n_rows: int, dim: int, dtype: str) -> int:
    """About what a cache of `n_rows` takes on disk: the features plus ~200 bytes of columns per row."""
    return n_rows * (dim * np.dtype(dtype).itemsize + 200) + (1 << 20)


class _GuardedFile:
    """The file HDF5 writes a new cache through (h5py's file-object driver).

    HDF5 caches its writes; when one fails it tries again as objects close, at interpreter exit included, where a
    full disk used to end in a segfault. Here the first failed write is recorded, and from then on writes go to a
    small in-memory overlay (reads see them, so HDF5's view of the file stays consistent): HDF5 sees only
    successes and closes cleanly, the writer stops at its next block, and `write_atomic` raises the recorded error.
    """

    def __init__(self, path: Path):
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self.error: OSError | None = None
        self._pos = self._size = 0
        self._overlay: list[tuple[int, bytes]] = []  # (offset, bytes) written after the error

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = {0: 0, 1: self._pos, 2: self._size}[whence] + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def write(self, data) -> int:
        data = bytes(data)
        if self.error is None:
            try:
                self._write_all(self._pos, data)
            except OSError as e:
                self.error = e
        if self.error is not None:
            self._overlay.append((self._pos, data))
        self._pos += len(data)
        self._size = max(self._size, self._pos)
        return len(data)

    def _write_all(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self._fd, view, offset)
            if n == 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            view, offset = view[n:], offset + n

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self._size - self._pos))
        block = bytearray(n)
        real = os.pread(self._fd, n, self._pos)
        block[:len(real)] = real
        for offset, data in self._overlay:  # later writes win: applied in order
            lo, hi = max(offset, self._pos), min(offset + len(data), self._pos + n)
            if lo < hi:
                block[lo - self._pos:hi - self._pos] = data[lo - offset:hi - offset]
        buffer[:n] = block
        self._pos += n
        return n

    def read(self, n: int = -1) -> bytes:
        buffer = bytearray(self._size - self._pos if n < 0 else n)
        return bytes(buffer[:self.readinto(buffer)])

    def truncate(self, size: int | None = None) -> int:
        size = self._pos if size is None else size
        if self.error is None:
            try:
                os.ftruncate(self._fd, size)
            except OSError as e:
                self.error = e
        self._size = size
        return size

    def flush(self) -> None:
        pass  # unbuffered: every write is already the kernel's

    def sync_and_close(self) -> None:
        if self.error is None:
            try:
                os.fsync(self._fd)
            except OSError as e:
                self.error = e
        os.close(self._fd)


def write_atomic(path: Path, header: Header, records: list[Record],
                 fetch: Callable[[list[Record]], np.ndarray], dtype: str) -> None:
    """Write a complete cache to a temporary name, then rename it over `path`: readers never see half a file.

    A write that fails (a full disk) removes the temporary file and raises one `UserError` (`DiskFull`).
    """
    tmp = Path(f"{path}.tmp")
    out = _GuardedFile(tmp)
    try:
        with h5py.File(out, "w") as f:
            _write_header(f, header, VIEWS_SCHEMA if any(r.view for r in records) else 1)
            for split in sorted({r.split for r in records}):
                if out.error is None:  # else the disk is full: stop writing a file that will be removed
                    _write_split(f.create_group(split), [r for r in records if r.split == split],
                                 header.feature_dim, fetch, dtype, out)
        out.sync_and_close()
        if out.error is None:
            os.replace(tmp, path)
            return
    except BaseException:
        out.sync_and_close()
        tmp.unlink(missing_ok=True)
        raise
    tmp.unlink(missing_ok=True)
    if files.is_disk_full(out.error):
        raise files.DiskFull(f"the disk holding {tmp} is full")
    raise UserError(f"cannot write {tmp} ({out.error.strerror or out.error})")


def _write_header(f: h5py.File, header: Header, schema_version: int) -> None:
    f.attrs["schema_version"] = schema_version
    f.attrs["fingerprint"] = header.fingerprint
    f.attrs["feature_dim"] = header.feature_dim
    f.attrs["created"], f.attrs["updated"] = header.created, header.updated
    values = {"config": header.config_dict, "class_names": header.class_names, "versions": header.versions,
              "source": header.attribute("source"), "extraction": header.attribute("extraction")}
    for key in _JSON_ATTRS:
        f.attrs[key] = json.dumps(values[key], sort_keys=True)


def _write_split(g: h5py.Group, records: list[Record], dim: int, fetch, dtype: str, out: _GuardedFile) -> None:
    rows = sorted((r for r in records if r.ok and not r.view), key=lambda r: r.path)
    failed = sorted((r for r in records if not r.ok and not r.view), key=lambda r: r.path)
    _write_rows(g, "features", rows, dim, fetch, dtype, out)
    views = _views_in_row_order(rows, [r for r in records if r.view])
    if views:
        _write_rows(g, "views", views, dim, fetch, dtype, out)
    columns = {"labels": np.array([r.label for r in rows], dtype="<i8"),
               "paths": np.array([_encode_path(r.path) for r in rows], dtype=object),
               "sizes": np.array([r.size for r in rows], dtype="<i8"),
               "mtimes_ns": np.array([r.mtime_ns for r in rows], dtype="<i8"),
               "sha256": np.array([r.sha256 for r in rows], dtype="S64"),
               "failed": np.array([(_encode_path(r.path), _encode_path(r.reason), r.size, r.mtime_ns) for r in failed],
                                  dtype=FAILED_DTYPE)}
    for name, data in columns.items():
        g.create_dataset(name, data=data, dtype=STR if name == "paths" else None)


def _write_rows(g: h5py.Group, name: str, rows: list[Record], dim: int, fetch, dtype: str, out: _GuardedFile) -> None:
    chunk_rows = max(1, CHUNK_BYTES // (dim * np.dtype(dtype).itemsize))
    # a split whose every image failed has no rows: HDF5 takes a chunk larger than an empty dataset only when it may grow
    ds = g.create_dataset(name, (len(rows), dim), dtype=dtype, chunks=(min(chunk_rows, max(1, len(rows))), dim),
                          maxshape=(None, dim) if not rows else None)
    for start in range(0, len(rows), chunk_rows):
        if out.error is not None:
            return
        ds[start:start + chunk_rows] = fetch(rows[start:start + chunk_rows])


def _views_in_row_order(rows: list[Record], views: list[Record]) -> list[Record]:
    """The view records of a split in /<split>/views order: row by row, K views each. Every row must have all K
    (the plan records an image whose views failed as failed), so a view can never lose its source."""
    if not views:
        return []
    by_key = {r.path: r for r in views if r.ok}
    k = 1 + max(r.view[1] for r in views)
    ordered = [by_key.get(view_key(r.path, j)) for r in rows for j in range(k)]
    if any(v is None for v in ordered):
        missing = next(view_key(r.path, j) for r in rows for j in range(k) if view_key(r.path, j) not in by_key)
        raise ValueError(f"no view row for {shown(missing)}: every row of a split with views needs all {k}")
    return ordered


@dataclass(frozen=True)
class SplitSummary:
    rows: int = 0
    views: int = 0  # augmented views (`extract --augment`)
    per_class: dict[str, int] = field(default_factory=dict)
    failed: list[Record] = field(default_factory=list)


@dataclass(frozen=True)
class Summary:
    """What `info` shows of a cache: its header, rows per split and class, every failed file."""

    path: Path
    file_bytes: int
    header: Header
    splits: dict[str, SplitSummary]

    @property
    def map_shape(self) -> tuple[int, int, int] | None:
        """(C, h, w) of each row of a map cache; None for a pooled cache, or a config this version cannot read."""
        return self.header.config.map_shape if self.header.config is not None else None

    def to_json(self) -> dict:
        h = self.header
        splits = {name: {"rows": s.rows, "views": s.views, "per_class": s.per_class,
                         "failed": [{"path": r.path, "reason": r.reason} for r in s.failed]}
                  for name, s in self.splits.items()}
        return {"path": str(self.path), "file_bytes": self.file_bytes, "fingerprint": h.fingerprint,
                "feature_dim": h.feature_dim, "map_shape": list(self.map_shape) if self.map_shape else None,
                "class_names": h.class_names, "config": h.config_dict,
                "source": h.attribute("source"), "extraction": h.attribute("extraction"), "versions": h.versions,
                "created": h.created, "updated": h.updated, "splits": splits}


def describe(path: Path) -> Summary:
    """A summary of a cache: header, rows per split and class, and every failed file."""
    with open_cache(path) as cache:
        header, records, names = cache.header, cache.records(), cache.splits
    splits = {split: SplitSummary(per_class={name: 0 for name in header.class_names}) for split in names}
    counts = {split: [0, 0] for split in names}
    for r in records:
        if r.view:
            counts[r.split][1] += 1
        elif r.ok:
            counts[r.split][0] += 1
            splits[r.split].per_class[header.class_names[r.label]] += 1
        else:
            splits[r.split].failed.append(r)
    splits = {split: replace(s, rows=counts[split][0], views=counts[split][1]) for split, s in splits.items()}
    return Summary(Path(path), Path(path).stat().st_size, header, splits)
