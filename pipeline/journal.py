"""Crash-safe progress of an unfinished extraction: one shard per batch, each committed by an atomic rename.

A shard is `NNNNNN.npy` (the batch's feature rows) plus `NNNNNN.json` (its records). Both are written to a
temporary name, fsynced and renamed, the JSON last: a shard whose JSON exists is complete, whatever moment
the process was killed at. Rerunning the same command reuses every complete shard and ignores the rest.
"""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np

from pipeline import files
from pipeline.errors import UserError
from pipeline.store import Record

log = logging.getLogger(__name__)


def _write_durably(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if files.is_disk_full(e):
            raise files.DiskFull(f"the disk holding {path.parent} is full") from None
        raise


def _npy_bytes(array: np.ndarray) -> bytes:
    """The .npy file's bytes: written with a plain f.write, a full disk raises ENOSPC (numpy's own tofile does
    not say why it wrote less)."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


class Journal:
    """The partial-results folder beside a cache; holds an exclusive lock while open."""

    def __init__(self, directory: Path, fingerprint: str):
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self._lock = None
        self._shards: dict[int, np.ndarray] = {}
        self.entries: dict[str, tuple[Record, int, int]] = {}  # path -> (record, shard, row in shard or -1)

    def __enter__(self) -> "Journal":
        """Take the lock, and nothing else: the caller reads the previous cache under it, then calls `resume`."""
        for _ in range(10):
            self.directory.mkdir(parents=True, exist_ok=True)
            self._lock = open(self.directory / "lock", "w")
            try:
                # A POSIX record lock, not flock: DataLoader workers are forked and would inherit an flock, keeping
                # it held after a kill -9 of the main process for as long as the orphaned workers live.
                fcntl.lockf(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self._lock.close()
                raise UserError(f"another extraction is writing {self.directory} (its lock is held); "
                                "wait for it to end") from None
            if self._still_linked():
                return self
            self._lock.close()  # the holder removed the folder as we opened the file: lock the new one
        raise UserError(f"could not lock {self.directory}: it keeps being removed by another process")

    def _still_linked(self) -> bool:
        try:
            return os.stat(self.directory / "lock").st_ino == os.fstat(self._lock.fileno()).st_ino
        except FileNotFoundError:
            return False

    def resume(self) -> "Journal":
        """Load the complete shards of an interrupted run made with this fingerprint; discard any other's."""
        self._load()
        return self

    def __exit__(self, *exc) -> None:
        if self.directory.exists() and not self._holds_shards():
            self.remove()  # nothing worth resuming (e.g. the model failed to load): leave no empty folder behind
        if self._lock is not None:
            self._lock.close()  # closing the file releases the lock
            self._lock = None

    def _holds_shards(self) -> bool:
        return any(p.suffix == ".json" and p.stem.isdigit() for p in self.directory.iterdir())

    def _load(self) -> None:
        meta = self.directory / "journal.json"
        if meta.exists() and json.loads(meta.read_text()).get("fingerprint") != self.fingerprint:
            log.warning("discarding partial results in %s: they were made with another extractor config", self.directory)
            self.clear()
        self._write_meta()
        for path in sorted(self.directory.glob("*.json")):
            if path.stem.isdigit():
                self._load_shard(int(path.stem), path)
        if self.entries:
            log.info("resuming: %d images already done in %s", len(self.entries), self.directory)

    def _load_shard(self, shard: int, path: Path) -> None:
        try:
            records = [Record(**r) for r in json.loads(path.read_text())]
            features = np.load(self.directory / f"{shard:06d}.npy", mmap_mode="r")
            if features.shape[0] != sum(r.ok for r in records):
                raise ValueError(f"{features.shape[0]} rows for {sum(r.ok for r in records)} records")
        except Exception as e:  # a shard we cannot trust is only lost work: its images are extracted again
            log.warning("ignoring damaged partial shard %s (%s)", path.name, e)
            return
        self._shards[shard] = features
        row = 0
        for r in records:
            self.entries[r.path] = (r, shard, row if r.ok else -1)
            row += r.ok

    def append(self, records: list[Record], features: np.ndarray) -> None:
        """Commit one batch: its records (successes and failures) and the feature rows of the successes."""
        shard = max(self._shards, default=-1) + 1
        npy, meta = self.directory / f"{shard:06d}.npy", self.directory / f"{shard:06d}.json"
        _write_durably(npy, lambda f: f.write(_npy_bytes(features)))
        _write_durably(meta, lambda f: f.write(json.dumps([asdict(r) for r in records]).encode()))
        self._shards[shard] = np.load(npy, mmap_mode="r")
        row = 0
        for r in records:
            self.entries[r.path] = (r, shard, row if r.ok else -1)
            row += r.ok

    def rows(self, shard: int, positions: np.ndarray) -> np.ndarray:
        return np.asarray(self._shards[shard][positions])

    def clear(self) -> None:
        """Forget every shard (--force, or another config's); the folder stays this fingerprint's."""
        for path in self.directory.iterdir():
            if path.name != "lock":
                path.unlink()
        self._shards.clear()
        self.entries.clear()
        self._write_meta()

    def _write_meta(self) -> None:
        _write_durably(self.directory / "journal.json", lambda f: f.write(json.dumps({"fingerprint": self.fingerprint}).encode()))

    def remove(self) -> None:
        """Delete the folder once its results are in the cache (the lock goes with it)."""
        self._shards.clear()
        shutil.rmtree(self.directory, ignore_errors=True)
