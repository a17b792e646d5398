"""The whole schema checked once, when a cache is opened: every problem is one `Damaged` line naming what is
wrong, and sizes are checked before anything is read, so that a crafted file cannot make a reader allocate what it
declares.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from pipeline import text
from pipeline.cache.header import Extraction, Header, Source
from pipeline.cache.identity import FeatureConfig
from pipeline.cache.schema import (
    FAILED_DTYPE,
    FEATURE_DTYPES,
    JSON_ATTRS,
    OPTIONAL_DATASETS,
    SCHEMA_VERSION,
    SPLIT_DATASETS,
    TEXT_ATTRS,
    Damaged,
    decode_path,
)
from pipeline.errors import UserError, first_line


def open_validated(path: Path) -> tuple[h5py.File, Header]:
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
        raise Damaged(f"is damaged: its splits declare {text.human_bytes(declared)} of data in a file of "
                      f"{text.human_bytes(file_bytes)}")
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
    for key in (*TEXT_ATTRS, "feature_dim", *JSON_ATTRS):
        if key not in attrs:
            raise Damaged(f"is damaged: the root attribute {key!r} is missing")
    for key in TEXT_ATTRS:
        if not isinstance(attrs[key], (str, bytes)):
            raise Damaged(f"is damaged: the root attribute {key!r} is {_show(attrs[key])}, expected text")
    dim = attrs["feature_dim"]
    if not isinstance(dim, (int, np.integer)) or isinstance(dim, (bool, np.bool_)) or dim < 1:
        raise Damaged(f"is damaged: feature_dim is {_show(dim)}, expected a positive integer")
    found["feature_dim"] = int(dim)
    for key in TEXT_ATTRS:
        found[key] = decode_path(attrs[key])
    for key, kind in JSON_ATTRS.items():
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
    return text.printable(repr(path))[:120]


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
