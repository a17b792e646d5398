"""Audit a cache before trusting a score on it: exact duplicates (the stored sha256), near-duplicates (cosine
similarity of the cached features), and images whose nearest neighbours all carry another label (likely
mislabelled). No image is decoded and no model runs: everything comes from the cache.

Near-duplicates and neighbours are exact: every pair of rows is compared, a block of rows against a block at a
time (each pair once: only blocks on or above the diagonal), so memory stays a few blocks whatever the number of
rows. Similarities are cosines of the features centred on their mean: a ReLU network's features are all
non-negative, and their raw cosines crowd near 1 for any two photographs, which would hide the copies.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline import files, store
from pipeline.data import Item
from pipeline.files import printable
from pipeline.config import AuditConfig

log = logging.getLogger(__name__)

BLOCK_ROWS = 4096  # rows per similarity block: a 4096 x 4096 float32 block is 64 MB
SCREEN_MARGIN = 0.01  # bf16 screening: pairs re-scored from this far under the threshold (bf16 errs < 0.003)
CHUNK = 32  # values per chunk whose maximum decides whether its values are looked at (_Best.fold)
# bf16 screening: neighbours re-scored among this many more than asked. bf16 ties are frequent (its spacing is
# 0.002 at 0.4); with 3, 9 of 100,000 synthetic rows got a 5th neighbour 0.001 worse than the exact one, with 5 none
SCREEN_EXTRA = 5


@dataclass(frozen=True)
class Pair:
    kind: str  # "exact" (same bytes) | "near" (similar features)
    similarity: float
    a: Item
    b: Item

    @property
    def splits(self) -> tuple[str, str]:
        return tuple(sorted((self.a.split, self.b.split)))

    @property
    def crosses(self) -> bool:
        return self.a.split != self.b.split


@dataclass(frozen=True)
class Suspect:
    """An image whose k nearest neighbours all carry another label: `suggested` is the most common of theirs."""

    entry: Item
    suggested: str
    similarity: float  # mean similarity of its k neighbours


@dataclass
class AuditReport:
    rows: int
    threshold: float
    neighbours: int
    exact: list[Pair] = field(default_factory=list)
    near: list[Pair] = field(default_factory=list)
    suspects: list[Suspect] = field(default_factory=list)
    seconds: float = 0.0

    @staticmethod
    def counts(pairs: list[Pair]) -> dict[tuple[str, str], int]:
        """Pairs per pair of splits, those across splits first."""
        counts = Counter(p.splits for p in pairs)
        return dict(sorted(counts.items(), key=lambda kv: (kv[0][0] == kv[0][1], kv[0])))


def _side(e: Item) -> tuple:
    """The order of a pair's two images: the training one first, then by split and path."""
    return e.split != "train", e.split, e.path


def exact_duplicates(records: list[store.Record], class_names: list[str]) -> list[Pair]:
    """Rows whose files have the same sha256: each copy paired with the first (by split, path) of its group;
    pairs across splits first."""
    groups: dict[str, list[Item]] = defaultdict(list)
    for r in records:
        if r.ok and r.view is None and r.sha256:
            groups[r.sha256].append(Item(r.split, r.path, class_names[r.label]))
    pairs = []
    for group in groups.values():
        first, *copies = sorted(group, key=_side)
        pairs += [Pair("exact", 1.0, first, copy) for copy in copies]
    return sorted(pairs, key=lambda p: (not p.crosses, p.a.split, p.a.path, p.b.path))


def cross_split_copies(records: list[store.Record], class_names: list[str]) -> dict[tuple[str, str], int]:
    """Exact copies across splits, per pair of splits: what train-head warns about and info summarises."""
    return {splits: n for splits, n in AuditReport.counts(exact_duplicates(records, class_names)).items()
            if splits[0] != splits[1]}


def describe_copies(path: Path) -> str:
    """One line for `info`: exact copies (stored hashes only, no features read), across splits first."""
    with store.open_cache(path) as cache:
        pairs = exact_duplicates(cache.records(), cache.header.class_names)
    if not pairs:
        return "no two images have the same bytes"
    counts = ", ".join(f"{a}/{b} {n}" for (a, b), n in AuditReport.counts(pairs).items())
    crossing = sum(p.crosses for p in pairs)
    return (f"{len(pairs)} images are byte-identical copies of another ({counts})"
            + (f"; {crossing} across splits: scores on them are optimistic" if crossing else "")
            + f"; `pipeline audit {path}` lists them, and near-duplicates")


def centred_unit_rows(cache: store.Cache) -> tuple[np.ndarray, list[Item], np.ndarray]:
    """Every row of every split (a map cache average-pooled), centred on the mean row and scaled to unit length;
    the row's entry and label index."""
    rows = cache.all_rows()
    X, labels = rows.features, rows.labels
    entries = [Item(str(s), p, cache.header.class_names[y]) for s, p, y in zip(rows.splits, rows.paths, labels)]
    if len(X):
        X -= X.mean(0, keepdims=True)
    X /= np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    return X, entries, labels


def similar_pairs_and_neighbours(X: np.ndarray, threshold: float, k: int, block: int = BLOCK_ROWS,
                                 screen_bf16: bool | None = None):
    """(pairs i < j with similarity >= threshold as three arrays, (n, k) nearest neighbours' indices and
    similarities), every pair of rows compared once, a block of rows against another at a time.

    Each block is compared with itself first, which gives every row good neighbours at once; after that, a
    block of products holds few values that beat a row's current worst kept neighbour or reach the threshold,
    and they are found from the maxima of short chunks (_Best.fold) instead of by sorting whole blocks.

    On CPUs with native bf16 the blocks are screened in bf16 (2x to 4x the float32 speed; its error on unit rows
    is under 0.003), then every candidate is scored again in float32: pairs from `threshold - SCREEN_MARGIN` up,
    neighbours among the k + SCREEN_EXTRA best. What is returned is float32 similarity, as without screening.
    """
    import torch

    from pipeline.device import cpu_has_native_bf16

    bf16 = cpu_has_native_bf16() if screen_bf16 is None else screen_bf16
    Xt = torch.from_numpy(np.ascontiguousarray(X, np.float32))
    n, k = len(X), min(k, max(len(X) - 1, 0))
    kept = min(k + SCREEN_EXTRA, max(n - 1, 0)) if bf16 else k
    floor = threshold - SCREEN_MARGIN if bf16 else threshold
    chunk = math.gcd(block, CHUNK)
    padded = -(-n // chunk) * chunk  # whole chunks; padding rows are set to -2 in every product
    Xs = torch.cat([Xt, Xt.new_zeros(padded - n, Xt.shape[1])]).to(torch.bfloat16 if bf16 else torch.float32)
    best, found = _Best(padded, kept, floor, chunk), []

    def product(i0: int, j0: int):
        S = Xs[i0:i0 + block] @ Xs[j0:j0 + block].T
        S[max(n - i0, 0):], S[:, max(n - j0, 0):] = -2.0, -2.0
        if i0 == j0:
            S.fill_diagonal_(-2.0)  # an image is not its own neighbour
        return S

    starts = range(0, padded, block)
    for i0 in starts:
        found.append(best.seed(i0, product(i0, i0)))
    for a, i0 in enumerate(starts):
        for j0 in starts[a + 1:]:
            found.append(best.fold(product(i0, j0), i0, j0))
    i, j = (torch.cat(column) for column in zip(*found)) if found else (torch.zeros(0, dtype=torch.int64),) * 2
    sims = _pair_similarities(Xt, i, j)  # float32, whatever the screening
    keep = sims >= threshold
    idx, sim = best.rescored(Xt, k)
    return (i[keep].numpy(), j[keep].numpy(), sims[keep].numpy()), idx, sim


def _pair_similarities(Xt, i, j, values: int = 1 << 24):
    """Float32 cosine of each pair (i, j), gathering rows a slice of pairs at a time (64 MB of them), so that a
    cache where most pairs are near-duplicates does not gather gigabytes at once."""
    import torch

    step = max(1, values // max(Xt.shape[1], 1))
    parts = [(Xt[i[s:s + step]] * Xt[j[s:s + step]]).sum(1) for s in range(0, len(i), step)]
    return torch.cat(parts) if parts else torch.zeros(0)


def _row_passing(S, w: int, bar):
    """_passing over the rows of block S. A row's chunk is every (C/w)-th column, not w consecutive ones: its
    maxima then reduce across rows of S, element by element, which vectorises (as a column's chunk does)."""
    R, C = S.shape
    by_row = S.view(R, w, C // w)
    return _passing(by_row.transpose(1, 2), by_row.amax(1), bar, (1, C // w))


def _passing(chunks, maxima, bar, steps: tuple[int, int]):
    """(owner, position, value) of every value at or above its owner's bar, looked for only in the chunks whose
    maximum reaches it. chunks: (owner, chunk, offset) view of a block; maxima: (owner, chunk); a value's position
    along its owner is chunk * steps[0] + offset * steps[1]."""
    owner, c = (maxima.float() >= bar[:, None]).nonzero().T
    values = chunks[owner, c].float()  # (live chunks, chunk length)
    m, o = (values >= bar[owner, None]).nonzero().T
    return owner[m], c[m] * steps[0] + o * steps[1], values[m, o]


class _Best:
    """The running `kept` best neighbours of every row: indices and their (screening) similarities. An empty
    slot holds -3: below any cosine, and below the -2 of padding and of a row with itself."""

    def __init__(self, n: int, kept: int, floor: float, chunk: int):
        import torch

        self.sim = torch.full((n, kept), -3.0)
        self.idx = torch.zeros((n, kept), dtype=torch.int64)
        self.kept, self.floor, self.chunk = kept, floor, chunk

    def seed(self, row0: int, S):
        """The best neighbours of rows row0.. within their own block (S: the block against itself); return the
        block's pairs i < j at or above the floor."""
        import torch

        top = S.topk(min(self.kept, S.shape[1]), dim=1)
        real = top.values > -1.5  # not padding, not the row itself
        rows, slots = slice(row0, row0 + len(S)), slice(0, top.values.shape[1])
        self.sim[rows, slots] = top.values.float().where(real, -3.0)
        self.idx[rows, slots] = (top.indices + row0).where(real, 0)
        i, j, _ = _row_passing(S, self.chunk, torch.full((len(S),), self.floor))
        return i[j > i] + row0, j[j > i] + row0

    def bar(self, start: int, count: int):
        """What a value must reach to matter to rows start..: just above their worst kept similarity (a tie
        changes nothing, and ties are everywhere in a cache of identical or blank images), or the floor when
        lower (a pair to report); never below -1.5, where padding and a row's own product lie."""
        import torch

        worst = self.sim[start:start + count, -1] if self.kept else torch.full((count,), float("inf"))
        return torch.nextafter(worst, torch.tensor(float("inf"))).clamp(min=-1.5, max=self.floor)

    def fold(self, S, row0: int, col0: int):
        """Fold block S (rows row0.., columns col0.. with col0 > row0) into the neighbours of its rows and of its
        columns; return its pairs at or above the floor."""
        w, (R, C) = self.chunk, S.shape
        rows, cols, values = _row_passing(S, w, self.bar(row0, R))
        self.merge(rows + row0, cols + col0, values)
        hits = values >= self.floor
        by_col = S.view(R // w, w, C)  # a column's chunk: w consecutive rows
        c_cols, c_rows, c_values = _passing(by_col.permute(2, 0, 1), by_col.amax(1).T, self.bar(col0, C), (w, 1))
        self.merge(c_cols + col0, c_rows + row0, c_values)
        return rows[hits] + row0, cols[hits] + col0

    def merge(self, rows, cols, values) -> None:
        """Fold candidates (row, neighbour, similarity), each (row, neighbour) new, into the kept best: sort each
        affected row's kept and candidates together, keep the first `kept`. Candidates that only reached the
        pair floor, not the row's worst kept, are left out first."""
        import torch

        if not self.kept or not len(rows):
            return
        better = values > self.sim[rows, -1]
        rows, cols, values = rows[better], cols[better], values[better]
        if not len(rows):
            return
        owners, counts = rows.unique(return_counts=True)
        rows = torch.cat([owners.repeat_interleave(self.kept), rows])
        values = torch.cat([self.sim[owners].flatten(), values])
        cols = torch.cat([self.idx[owners].flatten(), cols])
        # one sort, by row then best first: similarities lie in [-3, 1], so row * 8 - similarity never overlaps
        order = (rows.double() * 8 - values.double()).argsort()
        counts = counts + self.kept
        rank = torch.arange(len(order)) - (counts.cumsum(0) - counts).repeat_interleave(counts)
        first = rank < self.kept
        keep = order[first]
        self.sim[rows[keep], rank[first]] = values[keep]
        self.idx[rows[keep], rank[first]] = cols[keep]

    def rescored(self, Xt, k: int, step: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """The k best of the kept candidates, by float32 similarity, a block of rows at a time."""
        import torch

        n = len(Xt)
        idx, sim = np.zeros((n, k), np.int64), np.zeros((n, k), np.float32)
        for start in range(0, n, step):
            rows = slice(start, min(start + step, n))  # self holds padding rows past n
            cand = self.idx[rows]
            exact = torch.einsum("rd,rkd->rk", Xt[rows], Xt[cand])
            exact[self.sim[rows] < -2.5] = -3.0  # slots never filled (fewer rows than kept)
            top = exact.topk(k, dim=1)
            idx[rows], sim[rows] = cand.gather(1, top.indices).numpy(), top.values.numpy()
        return idx, sim


def likely_mislabelled(entries: list[Item], labels: np.ndarray, idx: np.ndarray, sim: np.ndarray,
                       class_names: list[str]) -> list[Suspect]:
    """Images whose every neighbour carries another label, most confident (highest neighbour similarity) first."""
    if not idx.size:
        return []
    others = labels[idx]
    out = [Suspect(entries[i], class_names[Counter(others[i].tolist()).most_common(1)[0][0]], float(sim[i].mean()))
           for i in np.flatnonzero((others != labels[:, None]).all(1))]
    return sorted(out, key=lambda s: -s.similarity)


def audit(cfg: AuditConfig) -> AuditReport:
    """Every check on the cache `cfg.features`; the findings are also written to `cfg.csv_path`."""
    files.ensure_writable_file(cfg.csv_path, "--out", inputs=(cfg.features,),  # before the work, not after
                               output=files.csv_output("audit CSV", CSV_HEADER), force=cfg.force)
    start = time.perf_counter()
    with store.open_cache(cfg.features) as cache:
        records, names = cache.records(), cache.header.class_names
        X, entries, labels = centred_unit_rows(cache)
    report = AuditReport(rows=len(entries), threshold=cfg.threshold,
                         neighbours=min(cfg.neighbours, max(len(entries) - 1, 0)))  # what is used: at most the others
    report.exact = exact_duplicates(records, names)
    copies = {(p.a.path, p.b.path) for p in report.exact} | {(p.b.path, p.a.path) for p in report.exact}
    (i, j, s), idx, sim = similar_pairs_and_neighbours(X, cfg.threshold, cfg.neighbours)
    near = [Pair("near", float(v), *sorted((entries[a], entries[b]), key=_side)) for a, b, v in zip(i, j, s)
            if (entries[a].path, entries[b].path) not in copies]
    report.near = sorted(near, key=lambda p: (not p.crosses, -p.similarity))
    report.suspects = likely_mislabelled(entries, labels, idx, sim, names)
    report.seconds = time.perf_counter() - start
    write_csv(report, cfg.csv_path)
    return report


CSV_HEADER = ("kind", "similarity", "split_a", "path_a", "label_a", "split_b", "path_b", "label_b")


def write_csv(report: AuditReport, path: Path) -> Path:
    """Every finding, a row each: exact and near pairs, then suspects (their suggested label in label_b)."""
    with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        w = csv.writer(f)
        w.writerow(CSV_HEADER)
        for p in report.exact + report.near:
            w.writerow((p.kind, f"{p.similarity:.4f}", p.a.split, p.a.path, p.a.label, p.b.split, p.b.path, p.b.label))
        for s in report.suspects:
            w.writerow(("mislabel?", f"{s.similarity:.4f}", s.entry.split, s.entry.path, s.entry.label, "", "", s.suggested))
    return Path(path)


def summary(report: AuditReport, shown: int = 10) -> list[str]:
    """The report for a person: counts per pair of splits, then the first `shown` findings of each kind."""
    lines = [f"{report.rows} images, every pair compared in {report.seconds:.1f} s (centred cosine >= "
             f"{report.threshold:g}; {report.neighbours} nearest neighbours)"]
    for title, pairs, sign in (("exact duplicates", report.exact, "=="), ("near duplicates", report.near, "~")):
        counts = ", ".join(f"{a}/{b} {n}" + (" (across splits: leakage)" if a != b else "")
                           for (a, b), n in report.counts(pairs).items())
        lines.append(f"{title}: {len(pairs)} pair{'' if len(pairs) == 1 else 's'}" + (f" ({counts})" if pairs else ""))
        lines += [f"  {p.similarity:.3f}  {_where(p.a)} {sign} {_where(p.b)}"
                  + (f"  (labels differ: {p.a.label} / {p.b.label})" if p.a.label != p.b.label else "")
                  for p in pairs[:shown]]
        if len(pairs) > shown:
            lines.append(f"  ... {len(pairs) - shown} more in the CSV")
    lines.append(f"likely mislabelled: {len(report.suspects)} image{'' if len(report.suspects) == 1 else 's'} whose "
                 f"{report.neighbours} nearest neighbours all carry another label (each: its label, the neighbours' "
                 "label, their mean similarity to it)")
    lines += [f"  {_where(s.entry)}: labelled {s.entry.label}, neighbours {s.suggested} (mean similarity "
              f"{s.similarity:.3f})" for s in report.suspects[:shown]]
    if len(report.suspects) > shown:
        lines.append(f"  ... {len(report.suspects) - shown} more in the CSV")
    return lines


def _where(e: Item) -> str:
    """A path as the user knows it, with its split when the path does not already start with it; a control
    character in a name (a newline) shown escaped, so that every finding stays one line."""
    text = printable(e.path if e.path.startswith(f"{e.split}/") else f"{e.path} ({e.split})")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
