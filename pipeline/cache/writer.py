"""Writing a complete cache: to a temporary name, then renamed over the old one, so that readers never see
half a file; a full disk ends in one line, never in a crash inside HDF5.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Callable

import h5py
import numpy as np

from pipeline import files
from pipeline.cache.header import Header
from pipeline.cache.record import Record, shown, view_key
from pipeline.cache.schema import CHUNK_BYTES, FAILED_DTYPE, JSON_ATTRS, STR, VIEWS_SCHEMA, encode_path
from pipeline.errors import UserError


def estimated_bytes(n_rows: int, dim: int, dtype: str) -> int:
    """About what a cache of `n_rows` takes on disk: the features plus ~200 bytes of columns per row."""
    return n_rows * (dim * np.dtype(dtype).itemsize + 200) + (1 << 20)


class GuardedFile:
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
    out = GuardedFile(tmp)
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
    for key in JSON_ATTRS:
        f.attrs[key] = json.dumps(values[key], sort_keys=True)


def _write_split(g: h5py.Group, records: list[Record], dim: int, fetch, dtype: str, out: GuardedFile) -> None:
    rows = sorted((r for r in records if r.ok and not r.view), key=lambda r: r.path)
    failed = sorted((r for r in records if not r.ok and not r.view), key=lambda r: r.path)
    _write_rows(g, "features", rows, dim, fetch, dtype, out)
    views = _views_in_row_order(rows, [r for r in records if r.view])
    if views:
        _write_rows(g, "views", views, dim, fetch, dtype, out)
    columns = {"labels": np.array([r.label for r in rows], dtype="<i8"),
               "paths": np.array([encode_path(r.path) for r in rows], dtype=object),
               "sizes": np.array([r.size for r in rows], dtype="<i8"),
               "mtimes_ns": np.array([r.mtime_ns for r in rows], dtype="<i8"),
               "sha256": np.array([r.sha256 for r in rows], dtype="S64"),
               "failed": np.array([(encode_path(r.path), encode_path(r.reason), r.size, r.mtime_ns) for r in failed],
                                  dtype=FAILED_DTYPE)}
    for name, data in columns.items():
        g.create_dataset(name, data=data, dtype=STR if name == "paths" else None)


def _write_rows(g: h5py.Group, name: str, rows: list[Record], dim: int, fetch, dtype: str, out: GuardedFile) -> None:
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
