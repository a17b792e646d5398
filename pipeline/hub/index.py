"""The nearest-neighbour index of a cache's rows (faiss), built once and kept beside the cache, keyed by its
fingerprint and its content; and the one exact neighbour search of the project (`exact_search`, which the audit
uses too).

Similarity is the cosine of rows centred on the cache's mean row (every split's rows, pooled alike), as the
audit's near-duplicates are: a ReLU network's features are all non-negative and their raw cosines crowd near 1.
The index holds the centred unit rows (`unit_rows`) of the selected splits, so an inner product is that cosine:
`IndexFlatIP` (exact) or `IndexIVFFlat` (approximate: rows in `4 sqrt(n)` k-means cells, the query's nearest
`nprobe` searched), the approximate one above APPROXIMATE_ABOVE rows (bench/similar_index.py measured it).

Files: `<cache>.index/<kind>-<selection>.faiss` (faiss's own format: `faiss.read_index` reads it; no pickle) and
beside it `.json`, written after it, which holds what the index means: its key (a digest of the fingerprint, the
header's creation and update times, every row's split, path, label and sha256, the pooling and splits), the mean
row, the row count, and the size and sha256 of the .faiss bytes. Both are written to a temporary file and renamed,
so a kill leaves the old pair, a .faiss without its .json (rebuilt), or the new pair, never a file that loads as
valid and is not. On load everything is checked (key, size, digest, rows, dimension) and a sample of stored rows is
compared with the cache's: any difference and the index is rebuilt, with one log line. A folder that cannot be
written (a read-only cache folder) means an index in memory, with one log line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.cache.store import Cache
from pipeline.errors import UserError

log = logging.getLogger(__name__)

FORMAT = "vggcache-index-1"
# auto: exact up to this many rows, approximate above. bench/similar_index.py (2-core Xeon with AVX512-BF16, shared,
# 512 dims, clustered rows): an exact query costs ~0.6 us a row (64 ms at 100,000 rows), so ~160 ms at 250,000, most
# of what embedding one image costs (0.25 s); IVF answers in ~1 ms with recall@10 >= 0.95, for a build paid once
# (53 s at 100,000 rows against 0.1 s)
APPROXIMATE_ABOVE = 250_000
NPROBE_SHARE = 1 / 16  # cells searched per query, of nlist: recall@10 >= 0.95 on clustered rows (the bench)
SPOT_CHECKS = 8  # stored rows compared with the cache's on every load (plus every cached query's own row)
MAX_JSON_BYTES = 64 << 20  # the side file: a mean row of at most a few million floats
QUERY_ROWS = 4096  # queries per search call: bounds the results held at once


def faiss_module(threads: int | None = None):
    """faiss, imported on first use (never at CLI start-up). It carries its own OpenMP runtime beside torch's: a
    process that runs the model as well (serve) gives faiss one thread, since both runtimes keep their threads
    spinning after a parallel region and two pools of all the cores on one machine slow each other down; a search
    of one query gains nothing from threads anyway."""
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which of its builds it loads: not the user's concern
    import faiss

    if threads is not None:
        faiss.omp_set_num_threads(max(1, threads))
    return faiss


def unit_rows(X: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Rows centred on `mean` and scaled to unit length, float32 (a zero row stays zero): the audit's similarity
    and the index's, computed by this one function."""
    X = np.array(X, np.float32, copy=True)
    if len(X):
        X -= mean
    X /= np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    return X


def exact_search(index, queries: np.ndarray, k: int, block: int = QUERY_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, row ids) of each query's k best rows by exact inner product, a block of queries at a time;
    -1 ids (and -inf) where there are fewer rows than k."""
    k = max(1, min(k, max(index.ntotal, 1)))
    parts = [index.search(np.ascontiguousarray(queries[s:s + block], np.float32), k)
             for s in range(0, len(queries), block)]
    if not parts:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    return np.concatenate([d for d, _ in parts]), np.concatenate([i for _, i in parts])


@dataclass(frozen=True)
class Selection:
    """What an index holds: which splits (all of them: ()), pooled how."""

    pool: str | None
    splits: tuple[str, ...]

    @property
    def name(self) -> str:
        """A short, safe file name part (split names come from the data and may be anything)."""
        return hashlib.sha256(json.dumps([self.pool, list(self.splits)]).encode()).hexdigest()[:12]


@dataclass
class RowIndex:
    """An index of a cache's selected rows, ready to search: the faiss index over the centred unit rows, the mean
    that centres a query, where each index row lies in the cache."""

    index: object  # faiss.Index
    kind: str  # exact | approximate
    selection: Selection
    mean: np.ndarray
    rows: list[tuple[str, int]]  # index row -> (split, position in the split)
    how: str  # built | loaded | built in memory
    where: Path | None
    seconds: float

    def search(self, raw: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, index rows) of the k nearest rows to each raw query row (pooled as the index's rows)."""
        return exact_search(self.index, unit_rows(raw, self.mean), k)

    def stored(self, row: int) -> np.ndarray:
        """The centred unit row the index holds at `row`."""
        return self.index.reconstruct(int(row))

    def describe(self) -> str:
        where = f" at {self.where}" if self.where else ""
        return f"{self.kind}, {self.index.ntotal:,} rows, {self.how}{where} in {self.seconds:.2f} s"


def choose_kind(asked: str, rows: int) -> str:
    return asked if asked != "auto" else "approximate" if rows > APPROXIMATE_ABOVE else "exact"


def selected_rows(cache: Cache, splits: tuple[str, ...]) -> list[tuple[str, int]]:
    """(split, position) of every row of the selected splits (all: ()), in the index's order."""
    for split in splits:
        if split not in cache.splits:
            raise UserError(f"--split {split}: {cache.path} has no such split (splits: {', '.join(cache.splits) or 'none'})")
    chosen = [s for s in cache.splits if not splits or s in splits]
    return [(split, i) for split in chosen for i in range(cache.split_shape(split)[0])]


def content_key(cache: Cache, selection: Selection, kind: str) -> str:
    """What the index was built from: the extractor (fingerprint), the cache's writes (created, updated) and every
    row (split, path, label, sha256), with the pooling, the splits and the kind. The same extractor run again with
    more images keeps the fingerprint, never this key."""
    h = cache.header
    digest = hashlib.sha256(json.dumps([FORMAT, h.fingerprint, h.created, h.updated, selection.pool,
                                        list(selection.splits), kind]).encode())
    for r in cache.records():
        if r.ok and r.view is None:
            digest.update(f"{r.split}\0{r.path}\0{r.label}\0{r.sha256}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def open_index(cache: Cache, selection: Selection, asked: str = "auto", check_rows: tuple[int, ...] = (),
               threads: int | None = None) -> RowIndex:
    """The index of the selected rows: loaded from beside the cache when it is there and matches the cache, else
    built (and kept there when the folder can be written). `check_rows`: index rows whose stored vectors are also
    compared with the cache's (a cached query's own row)."""
    start = time.perf_counter()
    faiss = faiss_module(threads)
    rows = selected_rows(cache, selection.splits)
    kind = choose_kind(asked, len(rows))
    key = content_key(cache, selection, kind)
    folder = Path(f"{cache.path}.index")
    files = folder / f"{kind}-{selection.name}.faiss", folder / f"{kind}-{selection.name}.json"
    loaded = _load(faiss, files, key, len(rows))
    if loaded is not None:
        index, mean = loaded
        spots = _spot_rows(len(rows), check_rows)
        if _matches(cache, selection, index, mean, rows, spots):
            return RowIndex(index, kind, selection, mean, rows, "loaded", files[0], time.perf_counter() - start)
        log.warning("%s no longer matches %s (the cache changed after it was built): rebuilding it", files[0], cache.path)
    index, mean = build(faiss, cache, selection, kind, rows)
    where = _save(faiss, index, mean, key, kind, files)
    how = "built" if where else "built in memory"
    return RowIndex(index, kind, selection, mean, rows, how, where, time.perf_counter() - start)


def pooled_rows(cache: Cache, split: str, pool: str | None, start: int, stop: int) -> np.ndarray:
    """Rows start..stop of a split as float32, pooled by `pool` (a map cache's) as the index's rows are."""
    rows = cache.read_rows(split, start, stop)
    transform = cache.pooling(pool)
    return np.asarray(transform(rows) if transform else rows, np.float32)


def cache_mean(cache: Cache, pool: str | None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The mean row of every split (pooled by `pool`), and each split's rows as float32."""
    parts = {split: np.asarray(cache.read_split(split, pool).features, np.float32) for split in cache.splits}
    everything = np.concatenate(list(parts.values())) if parts else np.zeros((0, cache.pooled_dim(pool)), np.float32)
    mean = everything.mean(0) if len(everything) else np.zeros(everything.shape[1], np.float32)
    return mean.astype(np.float32), parts


def build(faiss, cache: Cache, selection: Selection, kind: str, rows: list[tuple[str, int]]):
    """A new index of the selected rows; its mean row (over every split, whatever the selection)."""
    mean, parts = cache_mean(cache, selection.pool)
    chosen = [s for s in cache.splits if not selection.splits or s in selection.splits]
    dim = len(mean)
    X = unit_rows(np.concatenate([parts[s] for s in chosen]) if chosen else np.zeros((0, dim), np.float32), mean)
    del parts
    index = approximate_index(faiss, X) if kind == "approximate" else faiss.IndexFlatIP(dim)
    index.add(X)
    log.info("built the %s index of %s: %d rows x %d", kind, cache.path, len(X), dim)
    return index, mean


def cells_for(n: int) -> int:
    """nlist: about 4 sqrt(n) cells, with at least 39 training rows each (faiss's k-means wants that many)."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def approximate_index(faiss, X: np.ndarray):
    """IVF-Flat over unit rows: k-means cells trained on a seeded sample; nprobe of NPROBE_SHARE of them."""
    n, dim = X.shape
    nlist = cells_for(n)
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = 1234
    sample = X if n <= 64 * nlist else X[np.random.default_rng(0).choice(n, 64 * nlist, replace=False)]
    index.train(sample)
    index.nprobe = max(1, math.ceil(nlist * NPROBE_SHARE))
    index.make_direct_map()  # stored rows can be read back: the spot checks, a cached query's own row
    index.own_fields = True
    quantizer.this.disown()  # owned by the index from here, freed with it
    return index


def _spot_rows(n: int, check_rows: tuple[int, ...]) -> list[int]:
    sample = np.random.default_rng().choice(n, min(n, SPOT_CHECKS), replace=False).tolist() if n else []
    return sorted(set(sample) | {r for r in check_rows if 0 <= r < n})


def _matches(cache: Cache, selection: Selection, index, mean: np.ndarray, rows, spots: list[int]) -> bool:
    """The stored vectors of `spots` are the cache's rows, centred and scaled as when the index was built."""
    for r in spots:
        split, pos = rows[r]
        expected = unit_rows(pooled_rows(cache, split, selection.pool, pos, pos + 1), mean)[0]
        if not np.allclose(index.reconstruct(int(r)), expected, atol=1e-5):
            return False
    return True


def _load(faiss, files: tuple[Path, Path], key: str, n: int):
    """(index, mean) from the pair of files, or None (absent, stale or damaged: said in one line)."""
    faiss_file, json_file = files
    if not json_file.exists() and not faiss_file.exists():
        return None
    if not (json_file.is_file() and faiss_file.is_file()):  # a FIFO would block a read for ever: never read one
        log.warning("the index %s cannot be used (its files are not both regular files): building it", faiss_file)
        return None
    try:
        if json_file.stat().st_size > MAX_JSON_BYTES:
            raise ValueError(f"{json_file.name} is over {MAX_JSON_BYTES >> 20} MB")
        meta = json.loads(json_file.read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"{json_file.name} is not a vggcache index description")
        if meta.get("key") != key:
            log.info("the index %s was built from other rows of the cache: rebuilding it", faiss_file)
            return None
        size = faiss_file.stat().st_size
        if size != meta.get("faiss_bytes"):
            raise ValueError(f"{faiss_file.name} holds {size:,} bytes, {meta.get('faiss_bytes')} were written")
        data = faiss_file.read_bytes()
        if hashlib.sha256(data).hexdigest() != meta.get("faiss_sha256"):
            raise ValueError(f"{faiss_file.name} is not the file that was written (sha256 differs)")
        index = faiss.deserialize_index(np.frombuffer(data, np.uint8))
        mean = np.asarray(meta.get("mean"), np.float32)
        if index.ntotal != n or meta.get("rows") != n or index.d != len(mean) or mean.ndim != 1:
            raise ValueError(f"it holds {index.ntotal} rows of {index.d}, the cache {n} rows of {len(mean)}")
        return index, mean
    except (OSError, ValueError, TypeError, RuntimeError, UnicodeDecodeError) as e:
        log.warning("the index %s cannot be used (%s): rebuilding it", faiss_file, str(e).splitlines()[0][:200]
                    if str(e) else type(e).__name__)
        return None


def _save(faiss, index, mean: np.ndarray, key: str, kind: str, files: tuple[Path, Path]) -> Path | None:
    """Write the pair (the .faiss first, then the .json that vouches for it), each atomically; None, with one log
    line, when the folder cannot be written or a file there is not ours."""
    faiss_file, json_file = files
    folder = faiss_file.parent
    try:
        folder.mkdir(exist_ok=True)
        if folder.is_symlink() or not folder.is_dir():
            raise OSError(f"{folder} is not a folder this tool made")
        for path in files:
            if path.is_symlink() or (path.exists() and not path.is_file()):
                raise OSError(f"{path} is not a file this tool wrote")
        data = faiss.serialize_index(index).tobytes()
        _write_atomically(faiss_file, data)
        meta = {"format": FORMAT, "key": key, "kind": kind, "rows": int(index.ntotal), "dim": int(index.d),
                "faiss_bytes": len(data), "faiss_sha256": hashlib.sha256(data).hexdigest(),
                "mean": [float(v) for v in mean], "built": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        _write_atomically(json_file, json.dumps(meta).encode())
        return faiss_file
    except OSError as e:
        log.warning("the index is kept in memory only: %s cannot be written (%s)", folder, e.strerror or e)
        return None


def _write_atomically(path: Path, data: bytes) -> None:
    """`data` into a temporary file of the same folder, flushed to disk, then renamed over `path`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _remove_orphans(path)


def _remove_orphans(path: Path) -> None:
    """Temporary files of `path` left by a writer that was killed (its process is gone)."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            pid = int(tmp.name[len(path.name) + 2:].split(".")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except (ValueError, PermissionError, OSError):
            continue
