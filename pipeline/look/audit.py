"""Audit a cache before trusting a score on it: exact duplicates (the stored sha256), near-duplicates (cosine
similarity of the cached features), and images whose nearest neighbours all carry another label (likely
mislabelled). No image is decoded and no model runs: everything comes from the cache.

Similarities are cosines of the features centred on their mean: a ReLU network's features are all non-negative,
and their raw cosines crowd near 1 for any two photographs, which would hide the copies.
"""

from __future__ import annotations

import csv
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline import files
from pipeline.cache.record import Record
from pipeline.cache.store import Cache, open_cache
from pipeline.cache.summary import copies, pairs_per_splits
from pipeline.hub.index import unit_rows
from pipeline.look.config import AuditConfig
from pipeline.look.neighbours import similar_pairs_and_neighbours
from pipeline.text import csv_cell, printable


@dataclass(frozen=True)
class Entry:
    """One image of an audit: its split, path and class name."""

    split: str
    path: str
    label: str


def _side(e: Entry) -> tuple:
    """The order of a pair's two images: the training one first, then by split and path."""
    return e.split != "train", e.split, e.path


@dataclass(frozen=True)
class Pair:
    kind: str  # "exact" (same bytes) | "near" (similar features)
    similarity: float
    a: Entry
    b: Entry

    @property
    def splits(self) -> tuple[str, str]:
        return tuple(sorted((self.a.split, self.b.split)))

    @property
    def crosses(self) -> bool:
        return self.a.split != self.b.split


@dataclass(frozen=True)
class Suspect:
    """An image whose k nearest neighbours all carry another label: `suggested` is the most common of theirs."""

    entry: Entry
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
        return pairs_per_splits([p.splits for p in pairs])


def exact_duplicates(records: list[Record], class_names: list[str]) -> list[Pair]:
    """Rows whose files have the same sha256 (summary.copies): each copy paired with the first of its group;
    pairs across splits first."""
    entry = lambda r: Entry(r.split, r.path, class_names[r.label])
    return [Pair("exact", 1.0, entry(a), entry(b)) for a, b in copies(records)]


def centred_unit_rows(cache: Cache) -> tuple[np.ndarray, list[Entry], np.ndarray]:
    """Every row of every split (a map cache average-pooled), centred on the mean row and scaled to unit length;
    the row's entry and label index."""
    rows = cache.all_rows()
    X, labels = rows.features, rows.labels
    entries = [Entry(str(s), p, cache.header.class_names[y]) for s, p, y in zip(rows.splits, rows.paths, labels)]
    mean = X.mean(0) if len(X) else np.zeros(X.shape[1], np.float32)
    return unit_rows(X, mean), entries, labels  # the similarity `similar` ranks by (hub/index.py)


def likely_mislabelled(entries: list[Entry], labels: np.ndarray, idx: np.ndarray, sim: np.ndarray,
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
    with open_cache(cfg.features) as cache:
        records, names = cache.records(), cache.header.class_names
        X, entries, labels = centred_unit_rows(cache)
    report = AuditReport(rows=len(entries), threshold=cfg.threshold,
                         neighbours=min(cfg.neighbours, max(len(entries) - 1, 0)))  # what is used: at most the others
    report.exact = exact_duplicates(records, names)
    same_bytes = {(p.a.path, p.b.path) for p in report.exact} | {(p.b.path, p.a.path) for p in report.exact}
    (i, j, s), idx, sim = similar_pairs_and_neighbours(X, cfg.threshold, cfg.neighbours)
    near = [Pair("near", float(v), *sorted((entries[a], entries[b]), key=_side)) for a, b, v in zip(i, j, s)
            if (entries[a].path, entries[b].path) not in same_bytes]
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
            w.writerow((p.kind, f"{p.similarity:.4f}", *map(csv_cell, (p.a.split, p.a.path, p.a.label, p.b.split,
                                                                     p.b.path, p.b.label))))
        for s in report.suspects:
            w.writerow(("mislabel?", f"{s.similarity:.4f}", *map(csv_cell, (s.entry.split, s.entry.path, s.entry.label,
                                                                         "", "", s.suggested))))
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


def _where(e: Entry) -> str:
    """A path as the user knows it, with its split when the path does not already start with it; a control
    character in a name (a newline) shown escaped, so that every finding stays one line."""
    text = printable(e.path if e.path.startswith(f"{e.split}/") else f"{e.path} ({e.split})")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
