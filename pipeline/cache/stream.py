"""Heads on caches larger than memory: a split's rows read from the HDF5 file in chunk-aligned blocks.

`SplitRows` holds only the labels (8 bytes a row) and reads features as the head asks: shuffled minibatches for
training (whole storage chunks in random order, shuffled again inside a block of a few tens of MB, the usual
shuffle buffer), one pass in order for standardisation statistics and for predictions. Peak memory is one block,
whatever the number of rows.

Whether a split is streamed is decided once, against a memory budget (`train-head --memory-budget`, by default
half of the memory available when the command starts).
"""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np

from pipeline.cache.store import Cache

# Rows read, shuffled and handed out together: the peak memory of a streamed head (tests lower it to see that).
BLOCK_BYTES = int(os.environ.get("VGGCACHE_BLOCK_BYTES", str(64 << 20)))
BUDGET_FRACTION = 0.5  # of the memory available, by default


def available_memory() -> int:
    """Bytes of memory available now (MemAvailable on Linux; the physical memory elsewhere)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_budget() -> int:
    return int(available_memory() * BUDGET_FRACTION)


def in_memory_bytes(cache: Cache, splits: list[str], copies: float, dim: int | None = None) -> int:
    """What fitting a head on these splits in memory takes: `copies` float32 copies of the rows (the head's
    `HeadSpec.memory_copies`), and labels. `dim`: the rows' size once pooled (a map cache), else the file's."""
    total = 0
    for split in splits:
        n, file_dim, _ = cache.split_shape(split)
        total += int(n * ((dim or file_dim) * 4 * copies + 8))
    return total


def views_bytes(cache: Cache, split: str, copies: float, dim: int | None = None) -> int:
    """What the augmented views of a split (`extract --augment`) add to `in_memory_bytes`: 0 without views."""
    n, file_dim, _ = cache.split_shape(split)
    return int(n * cache.views_per_row(split) * (dim or file_dim) * 4 * copies)


class SplitRows:
    """The rows of one split (or of a subset of its rows), read on demand.

    Rows are numbered locally, 0..len-1 in file order; `labels` holds theirs. `blocks()` reads them in order,
    `shuffled()` in minibatches; both yield (features, local row numbers). `pool` (a map cache pooled at head
    time) is applied to the rows as they are read; `dim` is then its output size.
    """

    def __init__(self, cache: Cache, split: str, subset: np.ndarray | None = None,
                 block_bytes: int | None = None, pool: str | None = None):
        self.cache, self.split, self.pool, self.transform = cache, split, pool, cache.pooling(pool)
        self.n_file_rows, self.file_dim, self.chunk_rows = cache.split_shape(split)
        self.dim = cache.pooled_dim(pool)
        self.index = np.arange(self.n_file_rows) if subset is None else np.sort(np.asarray(subset, dtype=np.int64))
        self.labels = cache.read_labels(split)[self.index]
        self.chunks_per_block = max(1, (block_bytes or BLOCK_BYTES) // max(1, self._chunk_bytes()))

    def __len__(self) -> int:
        return len(self.index)

    def subset(self, rows: np.ndarray) -> "SplitRows":
        """These local rows as a SplitRows of their own (a held-out part of a split)."""
        return SplitRows(self.cache, self.split, self.index[np.asarray(rows)], self.chunks_per_block * self._chunk_bytes(),
                         self.pool)

    def _chunk_bytes(self) -> int:
        return self.chunk_rows * self.file_dim * 4

    def _n_chunks(self) -> int:
        return -(-self.n_file_rows // self.chunk_rows)

    def _mask(self, rows: np.ndarray | None) -> np.ndarray:
        keep = np.zeros(self.n_file_rows, bool)
        keep[self.index if rows is None else self.index[rows]] = True
        return keep

    def _read(self, chunks, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The kept rows of these storage chunks: (features as float32, local row numbers)."""
        X, file_rows = [], []
        for c in chunks:
            start = int(c) * self.chunk_rows
            stop = min(start + self.chunk_rows, self.n_file_rows)
            wanted = np.flatnonzero(keep[start:stop])
            if len(wanted):
                rows = self.cache.read_rows(self.split, start, stop)[wanted]
                X.append(rows.astype(np.float32) if self.transform is None else self.transform(rows))
                file_rows.append(start + wanted)
        if not X:
            return np.empty((0, self.dim), np.float32), np.empty(0, np.int64)
        return np.concatenate(X), np.searchsorted(self.index, np.concatenate(file_rows))

    def blocks(self, rows: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(features, local row numbers) in file order, a block at a time; `rows`: only these local rows."""
        keep, n = self._mask(rows), self._n_chunks()
        for first in range(0, n, self.chunks_per_block):
            X, local = self._read(range(first, min(first + self.chunks_per_block, n)), keep)
            if len(local):
                yield X, local

    def shuffled(self, rows: np.ndarray, batch_size: int, rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Minibatches over local `rows`: storage chunks in random order, rows shuffled within a block."""
        keep, order = self._mask(rows), rng.permutation(self._n_chunks())
        for first in range(0, len(order), self.chunks_per_block):
            X, local = self._read(order[first:first + self.chunks_per_block], keep)
            mix = rng.permutation(len(local))
            for start in range(0, len(mix), batch_size):
                take = mix[start:start + batch_size]
                yield X[take], local[take]

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The features of local `rows` (sorted), in memory: for a held-out set kept small."""
        parts = [X for X, _ in self.blocks(rows)]
        return np.concatenate(parts) if parts else np.empty((0, self.dim), np.float32)

    def moments(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation of local `rows`, in one streaming pass (float64 sums)."""
        total, squares, n = np.zeros(self.dim), np.zeros(self.dim), 0
        for X, _ in self.blocks(rows):
            X64 = X.astype(np.float64)
            total += X64.sum(0)
            squares += (X64 * X64).sum(0)
            n += len(X)
        mean = total / max(n, 1)
        return mean, np.sqrt(np.maximum(squares / max(n, 1) - mean * mean, 0))
