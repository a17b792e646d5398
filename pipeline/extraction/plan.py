"""Planning an extraction: image by image, is its row in the journal, in the cache, or still to be made?

Pure bookkeeping on file stats, hashes and records: no torch, so an up-to-date rerun answers in a second.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from pathlib import Path

from pipeline.cache.header import Header
from pipeline.cache.record import Record, unreadable_reason, view_key
from pipeline.extraction.augment import augments
from pipeline.extraction.dataset import Dataset

FROM_CACHE, FROM_JOURNAL = "cache", "journal"  # where a done row of a plan comes from (Plan.sources)


@dataclass
class Plan:
    """Every image with the record the cache will hold; `sources` says where done rows come from."""

    records: list[Record] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)  # path -> FROM_CACHE | FROM_JOURNAL
    todo: list[Record] = field(default_factory=list)


def _unreadable_now(file: Path | None) -> str:
    """Why `file` cannot be read now (the reason recorded for it), or "" when it can (an image in a tar shard is
    tried again: its shard was listed, so it can be read)."""
    if file is None:
        return ""
    try:
        with open(file, "rb") as f:
            f.read(1)
    except OSError as e:
        return unreadable_reason(e)
    return ""


def _done_before(prev: Record | None, stamp: tuple[int, int], file: Path | None, verify: bool, digest) -> Record | None:
    """`prev` if it still describes the file: same size and mtime, or (after a touch or copy) the same content.

    A failure is redone when the file changed, always with `verify`, and, when the file could not be read at all,
    as soon as it can be (a fixed permission or a remounted disk changes neither size nor mtime).
    """
    size, mtime_ns = stamp
    if prev is None:
        return None
    if not prev.ok:
        if verify or (prev.size, prev.mtime_ns) != stamp:
            return None
        if prev.unreadable:
            reason = _unreadable_now(file)
            return replace(prev, reason=reason) if reason else None
        return prev
    if (prev.size, prev.mtime_ns) == stamp and not verify:
        return prev
    if prev.sha256 and prev.size == size and digest() == prev.sha256:
        return replace(prev, mtime_ns=mtime_ns)
    return None


def make_plan(dataset: Dataset, cached: list[Record], journal: dict, verify: bool, augment: int = 0) -> Plan:
    """Decide, image by image, whether its row is in the journal, in the cache, or still to be extracted; with
    `augment` K, the same for each of the K views of every image of a training split (augment.AUGMENTED_SPLITS).

    The journal is asked first: its rows were made after the cache was written, so where both know a file,
    the journal's row is the newer one (after `--verify` found a changed file, the cache's row is stale).
    """
    labels, old = dataset.label_index(), {r.path: r for r in cached}
    plan = Plan()
    for item in dataset.items:
        label, stamp = labels[item.label], dataset.stamp(item.path)
        if stamp is None:
            plan.records.append(Record(item.split, item.path, -1, -1, -1, "", "FileNotFoundError: listed but missing"))
            continue
        # hashed at most once, and only if needed
        digest = functools.cache(lambda path=item.path: dataset.digest(path))
        plan_one = functools.partial(_plan_one, plan, journal, old, item.split, label, stamp,
                                     dataset.file(item.path), verify, digest)
        image = plan_one(item.path)
        if augment and augments(item.split) and image.ok:  # (a record still to do is ok until it fails)
            views = [plan_one(view_key(item.path, j)) for j in range(augment)]
            _fail_with_views(plan, image, views)
    return plan


def _plan_one(plan: Plan, journal: dict, old: dict, split: str, label: int, stamp, file: Path | None, verify: bool,
              digest, key: str) -> Record:
    """The record of `key` (an image's path, or one of its views' keys), done before or added to `plan.todo`."""
    for source, prev in ((FROM_JOURNAL, journal.get(key, (None,))[0]), (FROM_CACHE, old.get(key))):
        done = _done_before(prev, stamp, file, verify, digest)
        if done is not None:
            plan.records.append(replace(done, split=split, label=label if done.ok else -1))
            plan.sources[key] = source
            return plan.records[-1]
    plan.todo.append(Record(split, key, label, *stamp))
    plan.records.append(plan.todo[-1])
    return plan.todo[-1]


def _fail_with_views(plan: Plan, image: Record, views: list[Record]) -> None:
    """An image whose view failed is recorded as failed, its views dropped: a split with views holds all K views
    of every row (the same bytes decode the same way, so this happens only to a file changed between reads)."""
    bad = next((v for v in views if not v.ok), None)
    if bad is None:
        return
    failed = replace(image, label=-1, reason=f"{bad.reason} (view {bad.view[1]})")
    plan.records[plan.records.index(image)] = failed
    dropped = set(views)
    plan.records[:] = [r for r in plan.records if r not in dropped]
    plan.todo[:] = [r for r in plan.todo if r not in dropped]
    plan.sources.pop(image.path, None)


def unchanged(plan: Plan, header: Header, cached: list[Record], dataset: Dataset) -> bool:
    """The cache already holds exactly this plan's records (journal rows equal to its own were written into it
    by an earlier run that stopped before removing the journal, or by another part of a job array)."""
    return not plan.todo and list(dataset.class_names) == header.class_names and set(plan.records) == set(cached)
