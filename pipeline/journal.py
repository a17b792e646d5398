"""Crash-safe progress of an unfinished extraction: one shard per batch, each committed by an atomic rename.

A shard is `NNNNNN.npy` (the batch's feature rows) plus `NNNNNN.json` (its records). Both are written to a
temporary name, fsynced and renamed, the JSON last: a shard whose JSON exists is complete, whatever moment
the process was killed at. Rerunning the same command reuses every complete shard and ignores the rest.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np

from pipeline.errors import UserError
from pipeline.store import Record

log = logging.getLogger(__name__)


def _write_durably(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Journal:
    """The partial-results folder beside a cache; holds an exclusive lock while open."""

    def __init__(self, directory: Path, fingerprint: str):
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self._lock = None
        self._shards: dict[int, np.ndarray] = {}
        self.entries: dict[str, tuple[Record, int, int]] = {}  # path -> (record, shard, row in shard or -1)

    def __enter__(self) -> "Journal":
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.directory / "lock", "w")
        try:
            # A POSIX record lock, not flock: DataLoader workers are forked and would inherit an flock, keeping it
            # held after a kill -9 of the main process for as long as the orphaned workers live.
            fcntl.lockf(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise UserError(f"another extraction is writing {self.directory} (its lock is held); wait for it to end") from None
        self._load()
        return self

    def __exit__(self, *exc) -> None:
        if not self._shards and self.directory.exists():
            self.remove()  # nothing worth resuming (e.g. the model failed to load): leave no empty folder behind
        if self._lock is not None:
            self._lock.close()  # closing the file releases the lock
            self._lock = None

    def _load(self) -> None:
        meta = self.directory / "journal.json"
        if meta.exists() and json.loads(meta.read_text()).get("fingerprint") != self.fingerprint:
            log.warning("discarding partial results in %s: they were made with another extractor config", self.directory)
            self.clear()
        _write_durably(meta, lambda f: f.write(json.dumps({"fingerprint": self.fingerprint}).encode()))
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
        _write_durably(npy, lambda f: np.save(f, features))
        _write_durably(meta, lambda f: f.write(json.dumps([asdict(r) for r in records]).encode()))
        self._shards[shard] = np.load(npy, mmap_mode="r")
        row = 0
        for r in records:
            self.entries[r.path] = (r, shard, row if r.ok else -1)
            row += r.ok

    def rows(self, shard: int, positions: np.ndarray) -> np.ndarray:
        return np.asarray(self._shards[shard][positions])

    def clear(self) -> None:
        for path in self.directory.iterdir():
            if path.name != "lock":
                path.unlink()
        self._shards.clear()
        self.entries.clear()

    def remove(self) -> None:
        """Delete the folder once its results are in the cache (the lock goes with it)."""
        self._shards.clear()
        shutil.rmtree(self.directory, ignore_errors=True)
