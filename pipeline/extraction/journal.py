"""Crash-safe progress of an unfinished extraction: one shard per commit, each committed by an atomic rename.

A shard is `<writer>-NNNNNN.npy` (feature rows) plus `<writer>-NNNNNN.json` (its records). Both are written to a
temporary name, fsynced and renamed, the JSON last: a shard whose JSON exists is complete, whatever moment the
process was killed at. Every writer (a single process, a torchrun rank, a job-array part) names its shards after
itself and holds `lock.<writer>`, so writers never touch each other's files; every reader loads every writer's
complete shards, so a run resumes whatever the number of processes that started it. `lock.final` is held while a
cache is written from the journal.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import os
import re
import shutil
import socket
from dataclasses import asdict
from pathlib import Path

import numpy as np

from pipeline import files
from pipeline.cache.record import Record
from pipeline.errors import UserError

log = logging.getLogger(__name__)
SHARD = re.compile(r"^(?:(?P<writer>[A-Za-z0-9]+)-)?(?P<number>\d{6})$")  # no writer: a shard of vggcache <= 0.1
META = "journal.json"
HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"


def _write_durably(path: Path, write) -> None:
    tmp = path.with_name(f"{path.name}.{HOST}-{os.getpid()}.tmp")  # two writers, even on two nodes, never share one
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


def _try_lock(path: Path):
    """An open file holding an exclusive POSIX record lock on `path`, or None if another process holds it.

    A record lock, not flock: DataLoader workers are forked and would inherit an flock, keeping it held after a
    kill -9 of the main process for as long as the orphaned workers live.
    """
    f = open(path, "a")
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        return None
    return f


def _commit_order(path: Path) -> tuple[int, str]:
    try:
        return path.stat().st_mtime_ns, path.name
    except FileNotFoundError:
        return 0, path.name


class Journal:
    """The partial-results folder beside a cache, as one writer sees it; holds `lock.<writer>` while open."""

    def __init__(self, directory: Path, fingerprint: str, writer: str = "main"):
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.writer = writer
        self._lock = None
        self._final_held = False
        self._shards: dict[str, np.ndarray] = {}  # shard stem -> its rows (memory-mapped)
        self.entries: dict[str, tuple[Record, str, int]] = {}  # path -> (record, shard stem, row in shard or -1)

    def __enter__(self) -> "Journal":
        """Take this writer's lock, and nothing else: the caller reads the previous cache, then calls `resume`."""
        with self.final_lock():  # so that no writer appears while another removes the folder
            self._lock = _try_lock(self.directory / f"lock.{self.writer}")
        if self._lock is None:
            raise UserError(f"another extraction is writing {self.directory} (as {self.writer}: its lock is held); "
                            "wait for it to end")
        return self

    def _still_linked(self, lock, name: str) -> bool:
        try:
            return os.stat(self.directory / name).st_ino == os.fstat(lock.fileno()).st_ino
        except FileNotFoundError:
            return False

    def __exit__(self, *exc) -> None:
        if self._lock is not None and self.directory.exists() and not self._holds_shards():
            self.remove()  # nothing worth resuming (e.g. the model failed to load): leave no empty folder behind
        self.release()

    def release(self) -> None:
        """Give up this writer's lock: it will write nothing more (a rank done with its part)."""
        if self._lock is not None:
            self._lock.close()  # closing the file releases the lock
            self._lock = None

    def _holds_shards(self) -> bool:
        return any(p.suffix == ".json" and SHARD.match(p.stem) for p in self.directory.iterdir())

    def resume(self, may_discard: bool = True) -> "Journal":
        """Load every writer's complete shards made with this fingerprint; another fingerprint's are discarded
        (by the one worker allowed to: the others must not delete what a peer is writing)."""
        meta = self.directory / META
        found = json.loads(meta.read_text()).get("fingerprint") if meta.exists() else self.fingerprint
        if found != self.fingerprint:
            if not may_discard:
                raise UserError(f"{self.directory} holds partial results of another extractor config ({found}); "
                                "finish or delete them first")
            log.warning("discarding partial results in %s: they were made with another extractor config", self.directory)
            self.clear()
        if may_discard and not meta.exists():
            self._write_meta()
        self.reload()
        if self.entries:
            log.info("resuming: %d images already done in %s", len(self.entries), self.directory)
        return self

    def reload(self) -> None:
        """(Re)read every complete shard on disk, from every writer, in commit order: where two writers extracted
        the same file (a rerun after a fix), the later row is the one kept."""
        self._shards.clear()
        self.entries.clear()
        shards = [p for p in self.directory.glob("*.json") if SHARD.match(p.stem)]
        for path in sorted(shards, key=_commit_order):
            self._load_shard(path.stem, path)

    def _load_shard(self, stem: str, path: Path) -> None:
        try:
            records = [Record(**r) for r in json.loads(path.read_text())]
            features = np.load(self.directory / f"{stem}.npy", mmap_mode="r")
            if features.shape[0] != sum(r.ok for r in records):
                raise ValueError(f"{features.shape[0]} rows for {sum(r.ok for r in records)} records")
        except Exception as e:  # a shard we cannot trust is only lost work: its images are extracted again
            log.warning("ignoring damaged partial shard %s (%s)", path.name, e)
            return
        self._index(stem, features, records)

    def _index(self, stem: str, features: np.ndarray, records: list[Record]) -> None:
        self._shards[stem] = features
        row = 0
        for r in records:
            self.entries[r.path] = (r, stem, row if r.ok else -1)
            row += r.ok

    def append(self, records: list[Record], features: np.ndarray) -> None:
        """Commit a batch or more: their records (successes and failures) and the feature rows of the successes."""
        numbers = [int(m["number"]) for stem in self._shards if (m := SHARD.match(stem)) and m["writer"] == self.writer]
        stem = f"{self.writer}-{max(numbers, default=-1) + 1:06d}"
        npy, meta = self.directory / f"{stem}.npy", self.directory / f"{stem}.json"
        _write_durably(npy, lambda f: f.write(_npy_bytes(features)))
        _write_durably(meta, lambda f: f.write(json.dumps([asdict(r) for r in records]).encode()))
        self._index(stem, np.load(npy, mmap_mode="r"), records)

    @staticmethod
    def writer_of(entry: tuple[Record, str, int]) -> str:
        """The writer that committed a journal entry ("" for a shard of vggcache <= 0.1)."""
        return SHARD.match(entry[1])["writer"] or ""

    def rows(self, shard: str, positions: np.ndarray) -> np.ndarray:
        return np.asarray(self._shards[shard][positions])

    def clear(self) -> None:
        """Forget every shard (--force, or another config's); the folder stays this fingerprint's."""
        busy = self._other_writers()
        if busy:
            raise UserError(f"cannot discard the partial results in {self.directory}: {busy[0]} is still writing them")
        for path in self.directory.iterdir():
            if not path.name.startswith("lock."):
                path.unlink()
        self._shards.clear()
        self.entries.clear()
        self._write_meta()

    def _write_meta(self, **extra) -> None:
        meta = {"fingerprint": self.fingerprint} | extra
        _write_durably(self.directory / META, lambda f: f.write(json.dumps(meta).encode()))

    def agree_on_batch_size(self, batch_size: int) -> None:
        """The parts of a job array cut the same list into the same batches: the first records its batch size,
        the others must use it (a GPU node and a CPU node have different defaults)."""
        meta = json.loads((self.directory / META).read_text()) if (self.directory / META).exists() else {}
        recorded = meta.get("batch_size")
        if recorded is None:
            self._write_meta(batch_size=batch_size)
        elif recorded != batch_size:
            raise UserError(f"the other parts in {self.directory} use --batch-size {recorded}, this one {batch_size}: "
                            f"pass --batch-size {recorded} (parts must cut the same batches)")

    @contextlib.contextmanager
    def final_lock(self):
        """Held while a cache is written from the journal (one writer at a time swaps the cache), while a writer
        takes its own lock, and while the folder is removed. Waits its turn; re-entrant."""
        if self._final_held:
            yield
            return
        while True:
            self.directory.mkdir(parents=True, exist_ok=True)
            f = open(self.directory / "lock.final", "a")
            fcntl.lockf(f, fcntl.LOCK_EX)
            if self._still_linked(f, "lock.final"):
                break
            f.close()  # the writer before us removed the folder: lock in the new one
        self._final_held = True
        try:
            yield
        finally:
            self._final_held = False
            f.close()

    def _other_writers(self) -> list[str]:
        """The writers other than this one whose lock is held now."""
        busy = []
        for lock in self.directory.glob("lock.*"):
            if lock.name in (f"lock.{self.writer}", "lock.final"):
                continue
            held = _try_lock(lock)
            if held is None:
                busy.append(lock.name[len("lock."):])
            else:
                held.close()
        return busy

    def remove(self) -> None:
        """Delete the folder once its results are in the cache, unless another writer is still at work in it."""
        with self.final_lock():
            busy = self._other_writers()
            if busy:
                log.debug("keeping %s: %s is still writing", self.directory, busy[0])
                return
            self._shards.clear()
            shutil.rmtree(self.directory, ignore_errors=True)
