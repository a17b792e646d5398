"""The HDF5 layout of a feature cache, declared once (the reader, the validation and the writer use these):

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

import h5py
import numpy as np

from pipeline.errors import UserError

SCHEMA_VERSION = 2
VIEWS_SCHEMA = 2  # the first schema with /<split>/views
CHUNK_BYTES = 1 << 20  # ~1 MiB row chunks: large contiguous reads, small enough for partial reads
STR = h5py.string_dtype("utf-8")
FAILED_DTYPE = np.dtype([("path", STR), ("reason", STR), ("size", "<i8"), ("mtime_ns", "<i8")])
JSON_ATTRS = {"config": dict, "class_names": list, "source": dict, "extraction": dict, "versions": dict}
TEXT_ATTRS = ("fingerprint", "created", "updated")
SPLIT_DATASETS = ("features", "labels", "paths", "sizes", "mtimes_ns", "sha256", "failed")
OPTIONAL_DATASETS = ("views",)
FEATURE_DTYPES = (np.dtype("float16"), np.dtype("float32"))


def encode_path(path: str) -> bytes:
    """File names are stored as their bytes: a name that is not valid UTF-8 (kept by Python as surrogate escapes)
    round-trips exactly instead of failing the write."""
    return path.encode("utf-8", "surrogateescape")


def decode_path(value) -> str:
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else str(value)


class Damaged(UserError):
    """The file is HDF5 but not a complete vggcache cache: names what is wrong."""
