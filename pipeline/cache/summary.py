"""What `info` shows of a cache (`describe`): its header, rows per split and class, every failed file, and
the byte-identical copies among its images (from the stored digests: no feature read).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

from pipeline.cache.header import Header
from pipeline.cache.record import Record
from pipeline.cache.store import open_cache


@dataclass(frozen=True)
class SplitSummary:
    rows: int = 0
    views: int = 0  # augmented views (`extract --augment`)
    per_class: dict[str, int] = field(default_factory=dict)
    failed: list[Record] = field(default_factory=list)


@dataclass(frozen=True)
class Summary:
    """What `info` shows of a cache: its header, rows per split and class, every failed file."""

    path: Path
    file_bytes: int
    header: Header
    splits: dict[str, SplitSummary]

    @property
    def map_shape(self) -> tuple[int, int, int] | None:
        """(C, h, w) of each row of a map cache; None for a pooled cache, or a config this version cannot read."""
        return self.header.config.map_shape if self.header.config is not None else None

    def to_json(self) -> dict:
        h = self.header
        splits = {name: {"rows": s.rows, "views": s.views, "per_class": s.per_class,
                         "failed": [{"path": r.path, "reason": r.reason} for r in s.failed]}
                  for name, s in self.splits.items()}
        return {"path": str(self.path), "file_bytes": self.file_bytes, "fingerprint": h.fingerprint,
                "feature_dim": h.feature_dim, "map_shape": list(self.map_shape) if self.map_shape else None,
                "class_names": h.class_names, "config": h.config_dict,
                "source": h.attribute("source"), "extraction": h.attribute("extraction"), "versions": h.versions,
                "created": h.created, "updated": h.updated, "splits": splits}


def describe(path: Path) -> Summary:
    """A summary of a cache: header, rows per split and class, and every failed file."""
    with open_cache(path) as cache:
        header, records, names = cache.header, cache.records(), cache.splits
    splits = {split: SplitSummary(per_class={name: 0 for name in header.class_names}) for split in names}
    counts = {split: [0, 0] for split in names}
    for r in records:
        if r.view:
            counts[r.split][1] += 1
        elif r.ok:
            counts[r.split][0] += 1
            splits[r.split].per_class[header.class_names[r.label]] += 1
        else:
            splits[r.split].failed.append(r)
    splits = {split: replace(s, rows=counts[split][0], views=counts[split][1]) for split, s in splits.items()}
    return Summary(Path(path), Path(path).stat().st_size, header, splits)


def _side(r: Record) -> tuple:
    """The order of a pair's two images: the training one first, then by split and path."""
    return r.split != "train", r.split, r.path


def copies(records: list[Record]) -> list[tuple[Record, Record]]:
    """Images whose files have the same sha256 (the digests stored in the cache): each copy paired with the first
    of its group (a training image first, then by split and path); pairs across splits first."""
    groups: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        if r.ok and r.view is None and r.sha256:
            groups[r.sha256].append(r)
    pairs = []
    for group in groups.values():
        first, *others = sorted(group, key=_side)
        pairs += [(first, other) for other in others]
    return sorted(pairs, key=lambda p: (p[0].split == p[1].split, p[0].split, p[0].path, p[1].path))


def pairs_per_splits(splits: list[tuple[str, str]]) -> dict[tuple[str, str], int]:
    """How many pairs lie in each pair of splits (given as the two splits of each pair), those across splits first."""
    counts = Counter(tuple(sorted(pair)) for pair in splits)
    return dict(sorted(counts.items(), key=lambda kv: (kv[0][0] == kv[0][1], kv[0])))


def copies_across_splits(records: list[Record]) -> dict[tuple[str, str], int]:
    """Exact copies across splits, per pair of splits: what train-head warns about."""
    counts = pairs_per_splits([(a.split, b.split) for a, b in copies(records)])
    return {splits: n for splits, n in counts.items() if splits[0] != splits[1]}


def describe_copies(path: Path) -> str:
    """One line for `info`: exact copies (stored hashes only, no features read), across splits first."""
    with open_cache(path) as cache:
        pairs = copies(cache.records())
    if not pairs:
        return "no two images have the same bytes"
    counts = ", ".join(f"{a}/{b} {n}" for (a, b), n in pairs_per_splits([(a.split, b.split) for a, b in pairs]).items())
    crossing = sum(a.split != b.split for a, b in pairs)
    return (f"{len(pairs)} images are byte-identical copies of another ({counts})"
            + (f"; {crossing} across splits: scores on them are optimistic" if crossing else "")
            + f"; `pipeline audit {path}` lists them, and near-duplicates")
