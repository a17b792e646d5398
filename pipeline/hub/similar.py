"""`pipeline similar`: the k nearest cached images to each query, an image file or a path in the cache, by the
cosine of rows centred on the cache's mean row (the audit's similarity), from the index kept beside the cache
(hub/index.py).

A query is a path as the cache lists it (`train/ants/x.jpg`: its cached row is the query, no image is read), else
an image file, embedded by the cache's own extractor (same config; the weights checked by hash, as predict does)
and rounded to the cache's storage dtype as its rows were, so that a cached image queried as a file meets its own
row. A path in the cache wins over a file of the same name (the row is what the cache holds of it, and costs no
model); `./train/ants/x.jpg` names the file. Every query is checked before any heavy work: one that is neither,
or a file that is not an image, is one line.
"""

from __future__ import annotations

import csv
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline import files
from pipeline.cache.store import Cache, open_cache
from pipeline.errors import UserError
from pipeline.hub.config import SimilarConfig
from pipeline.hub.index import RowIndex, Selection, open_index, pooled_rows, selected_rows
from pipeline.text import csv_cell, printable

log = logging.getLogger(__name__)

CSV_COLUMNS = ("query", "source", "rank", "similarity", "split", "path", "label")
SIMILAR_CSV = files.csv_output("similar CSV", CSV_COLUMNS)


@dataclass(frozen=True)
class Neighbour:
    split: str
    path: str
    label: str  # the class name
    similarity: float  # cosine of the rows centred on the cache's mean row (hub/index.py)


@dataclass(frozen=True)
class QueryResult:
    query: str  # as given
    source: str  # "cache" (a path in the cache) or "file" (an image file, embedded with the cache's extractor)
    neighbours: tuple[Neighbour, ...] = ()
    error: str = ""  # a query that could not be answered (not an image, not found): its reason


@dataclass(frozen=True)
class SimilarResult:
    results: tuple[QueryResult, ...]
    index: str  # the index used, in words (kind, rows, built or loaded, where)
    seconds: float
    written: tuple = field(default=())  # the files written (--out, --html)
    image_root: str | None = None  # where the cached paths are (the cache's source root), for pictures


@dataclass(frozen=True)
class Query:
    text: str
    source: str  # cache | file
    place: tuple[str, int] | None = None  # (split, position) of a cached query


def similar(cfg: SimilarConfig, draw: Callable | None = None) -> SimilarResult:
    """Answer every query of `cfg`; write --out, and --html by `draw(results, image_root, out, title)`: the page
    is drawn by pipeline.look.similar_page (a layer above this one), whose `similar` passes it."""
    if cfg.html and draw is None:
        raise UserError("--html is drawn by pipeline.look.similar_page.similar: call that (the CLI does)")
    start = time.perf_counter()
    _check_outputs(cfg)
    with open_cache(cfg.features) as cache:
        selection = Selection(head_pool(cache, cfg.pool), tuple(cfg.splits))
        queries = resolve_queries(cache, cfg.queries)
        embed = FileEmbedder(cache, selection.pool, cfg) if any(q.source == "file" for q in queries) else None
        place_rows = {place: row for row, place in enumerate(selected_rows(cache, selection.splits))}
        index = open_index(cache, selection, cfg.index, tuple(place_rows[q.place] for q in queries
                                                              if q.source == "cache" and q.place in place_rows))
        results = answer(cache, index, queries, cfg.k, embed)
        root = cache.header.source.root
    written = write_outputs(cfg, results, root, draw)
    return SimilarResult(tuple(results), index.describe(), time.perf_counter() - start, written, root)


def _check_outputs(cfg: SimilarConfig) -> None:
    """--out and --html can be written, and replace only what similar wrote (unless --force): before any work."""
    if cfg.out:
        files.ensure_writable_file(cfg.out, "--out", inputs=(cfg.features,), output=SIMILAR_CSV, force=cfg.force)
    if cfg.html:
        files.ensure_writable_file(cfg.html, "--html", inputs=(cfg.features,), output=files.HTML, force=cfg.force)
    if cfg.out and cfg.html and Path(cfg.out).resolve() == Path(cfg.html).resolve():
        raise UserError(f"--out and --html are the same file ({cfg.out}): choose two")


def head_pool(cache: Cache, pool: str | None) -> str | None:
    """The pooling of the rows searched: a map cache's rows pooled by --pool (avg by default), as train-head does;
    a pooled cache's rows as stored (--pool refused: there is no map to pool)."""
    config = cache.header.feature_config(cache.path)
    if config.is_map:
        return pool or "avg"
    if pool is not None:
        raise UserError(f"--pool {pool}: {cache.path} holds {config.pool}-pooled rows, not a map to pool (--pool is "
                        "for a cache extracted with --pool map)")
    return None


def resolve_queries(cache: Cache, texts: tuple[str, ...]) -> list[Query]:
    """Each query as a cached row or an image file, every file decoded once to refuse what is not an image: one
    line naming the first query that is neither, before the index or the model is touched."""
    if not texts:
        raise UserError("no query: give image files, or paths in the cache (as `info` lists them)")
    places = {}
    counters: dict[str, int] = {}
    for r in cache.records():
        if r.ok and r.view is None:
            places[r.path] = (r.split, counters.get(r.split, 0))
            counters[r.split] = counters.get(r.split, 0) + 1
    out = []
    for text in texts:
        if text in places:
            out.append(Query(text, "cache", places[text]))
        elif os.path.lexists(text):
            _check_image(text, cache)
            out.append(Query(text, "file"))
        else:
            raise UserError(f"query {printable(text)!r} is neither a path in {cache.path} (as `info` lists them) nor "
                            "an image file")
    return out


def _check_image(path: str, cache: Cache) -> None:
    from pipeline.images import Refused, open_image, read_image_file, why_not_read

    fcfg = cache.header.feature_config(cache.path)
    try:
        data = read_image_file(path)  # a folder, a FIFO, a device or a file over the size limit: refused unread
    except Refused as e:
        raise UserError(f"query {printable(path)!r} is not an image this tool reads ({e})") from None
    except OSError as e:
        raise UserError(f"query {printable(path)!r} cannot be read ({e.strerror or type(e).__name__})") from None
    try:
        open_image(data, fcfg.resize_size).close()
    except Exception as e:
        raise UserError(f"query {printable(path)!r} is not an image this tool reads ({why_not_read(e, len(data))})") from None


class FileEmbedder:
    """The cache's own extractor, rebuilt as predict rebuilds a run's: the same config, the weights checked by
    hash, the precision the cache was extracted at (so that a cached image meets its own row)."""

    def __init__(self, cache: Cache, pool: str | None, cfg: SimilarConfig):
        from pipeline.backbone.vgg16 import rebuilt_extractor

        h = cache.header
        self.fcfg = h.feature_config(cache.path)
        self.extractor = rebuilt_extractor(self.fcfg, h.weights_file, cfg.weights, h.precision, cfg.device)
        self.pooling = self.fcfg.head_pooling(pool)

    def __call__(self, paths: list[str]) -> tuple[dict[int, np.ndarray], dict[int, str]]:
        """Rows of the files that decode (by position in `paths`), and the reason of each that does not."""
        from pipeline.backbone.vgg16 import as_stored
        from pipeline.extraction.embed import image_batches
        from pipeline.extraction.reader import decoded_images

        rows, errors = {}, {}
        for batch in image_batches("cpu", Path(""), paths, self.fcfg, 4, 0, self.extractor.device):
            ok, images = decoded_images(batch)
            positions = batch["index"].tolist()
            if ok:
                features = as_stored(self.extractor(images), self.fcfg)
                features = self.pooling(features) if self.pooling else features
                rows.update({positions[k]: f for k, f in zip(ok, features)})
            errors.update({positions[k]: batch["error"][k] for k in range(len(positions)) if k not in ok})
        return rows, errors


def answer(cache: Cache, index: RowIndex, queries: list[Query], k: int, embed: FileEmbedder | None) -> list[QueryResult]:
    """Each query's k nearest rows of the index; a cached query's own row first when it is among the rows searched."""
    raw, errors = {}, {}
    files_asked = [(i, q.text) for i, q in enumerate(queries) if q.source == "file"]
    if files_asked:
        rows, failed = embed([t for _, t in files_asked])
        raw.update({files_asked[j][0]: row for j, row in rows.items()})
        errors.update({files_asked[j][0]: why for j, why in failed.items()})
    for i, q in enumerate(queries):
        if q.source == "cache":
            raw[i] = pooled_rows(cache, q.place[0], index.selection.pool, q.place[1], q.place[1] + 1)[0]
    paths, labels = _row_names(cache, index)
    own = {place: r for r, place in enumerate(index.rows)}
    order = sorted(raw)
    sims, ids = index.search(np.stack([raw[i] for i in order]), k) if order else (None, None)
    found = {i: (sims[j], ids[j]) for j, i in enumerate(order)}
    out = []
    for i, q in enumerate(queries):
        if i in errors or i not in found:
            out.append(QueryResult(q.text, q.source, error=errors.get(i, "not answered")))
            continue
        s, r = found[i]
        pairs = [(float(v), int(j)) for v, j in zip(s, r) if j >= 0]
        if q.source == "cache" and q.place in own:
            pairs = _own_row_first(pairs, own[q.place], index, k)
        out.append(QueryResult(q.text, q.source, tuple(
            Neighbour(index.rows[j][0], paths[j], labels[j], v) for v, j in pairs[:k])))
    return out


def _own_row_first(pairs: list[tuple[float, int]], own: int, index: RowIndex, k: int) -> list[tuple[float, int]]:
    """A cached query's own row at rank 1: an exact copy ties with it at 1.0, and the approximate index may even
    rank a copy above it; its similarity is its stored row's with itself."""
    rest = [(v, j) for v, j in pairs if j != own]
    mine = next((v for v, j in pairs if j == own), None)
    if mine is None:
        stored = index.stored(own)
        mine = float(np.dot(stored, stored))
    return [(mine, own)] + rest[:k - 1]


def _row_names(cache: Cache, index: RowIndex) -> tuple[list[str], list[str]]:
    """Path and class name of every index row."""
    names = cache.class_names
    by_split = {}
    for split in dict.fromkeys(s for s, _ in index.rows):
        by_split[split] = (cache.read_paths(split), cache.read_labels(split))
    paths = [by_split[s][0][i] for s, i in index.rows]
    labels = [names[int(by_split[s][1][i])] for s, i in index.rows]
    return paths, labels


def write_outputs(cfg: SimilarConfig, results: list[QueryResult], root: str | None, draw) -> tuple[Path, ...]:
    written = []
    if cfg.out:
        written.append(write_csv(results, Path(cfg.out)))
    if cfg.html:
        written.append(draw(results, Path(root) if root else None, Path(cfg.html),
                            f"similar images in {Path(cfg.features).name}"))
    return tuple(written)


def write_csv(results: list[QueryResult], path: Path) -> Path:
    """A row per neighbour (a query that failed: one row with its reason in `label`); every text cell through
    csv_cell, so that no name is evaluated by a spreadsheet."""
    with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for q in results:
            if q.error:
                w.writerow((csv_cell(q.query), q.source, "", "", "", "", csv_cell(f"error: {q.error}")))
            for rank, n in enumerate(q.neighbours, 1):
                w.writerow((csv_cell(q.query), q.source, rank, f"{n.similarity:.6f}", csv_cell(n.split),
                            csv_cell(n.path), csv_cell(n.label)))
    return path


class Searcher:
    """An index with the names of its rows, kept to answer many queries (serve's /similar)."""

    def __init__(self, cache: Cache, selection: Selection, asked: str = "auto", threads: int | None = None):
        self.index = open_index(cache, selection, asked, threads=threads)
        self.paths, self.labels = _row_names(cache, self.index)
        self.row_of = {p: r for r, p in enumerate(self.paths)}

    def _neighbours(self, pairs: list[tuple[float, int]]) -> tuple[Neighbour, ...]:
        return tuple(Neighbour(self.index.rows[j][0], self.paths[j], self.labels[j], v) for v, j in pairs)

    def of_row(self, row: int, k: int) -> tuple[Neighbour, ...]:
        """The k nearest rows to index row `row`, itself first."""
        from pipeline.hub.index import exact_search

        sims, ids = exact_search(self.index.index, self.index.stored(row)[None], k)
        pairs = [(float(v), int(j)) for v, j in zip(sims[0], ids[0]) if j >= 0]
        return self._neighbours(_own_row_first(pairs, row, self.index, k))

    def of_raw(self, raw: np.ndarray, k: int) -> tuple[Neighbour, ...]:
        """The k nearest rows to a raw row (pooled as the index's rows, not yet centred)."""
        sims, ids = self.index.search(raw[None], k)
        return self._neighbours([(float(v), int(j)) for v, j in zip(sims[0], ids[0]) if j >= 0][:k])
