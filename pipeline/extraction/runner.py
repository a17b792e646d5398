"""The extract stage: plan what is new or changed, run the frozen body over it once, write a complete cache.

plan (plan.py) -> each worker's share (distributed.py) -> read, embed, commit (embed.py, journal.py) -> barrier
-> one writer: the cache from the journal and the previous cache (cache/writer.py).
torch is imported only when images must go through the model: an up-to-date rerun answers in about a second.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pipeline import files
from pipeline.cache.header import Extraction, Header, Source
from pipeline.cache.identity import FeatureConfig
from pipeline.cache.record import Record
from pipeline.cache.store import Cache, open_cache, row_positions
from pipeline.cache.writer import estimated_bytes, write_atomic
from pipeline.errors import UserError, interruption_in, sigterm_as_ctrl_c
from pipeline.extraction import distributed, embed
from pipeline.extraction.augment import AUGMENTED_SPLITS, augments
from pipeline.extraction.config import ExtractConfig, extract_feature_config
from pipeline.extraction.dataset import Dataset, discover
from pipeline.extraction.journal import Journal
from pipeline.extraction.plan import FROM_CACHE, FROM_JOURNAL, Plan, make_plan, unchanged
from pipeline.versions import library_versions

log = logging.getLogger(__name__)

@dataclass
class ExtractSummary:
    out: Path
    fingerprint: str
    up_to_date: bool
    rows: dict[str, int]
    extracted: int  # went through the model in this run (every rank's, for rank 0 of a torchrun job)
    reused: int  # rows kept from the previous cache
    resumed: int  # rows finished by an earlier, interrupted run
    failed: list[Record]
    feature_dim: int
    file_bytes: int
    seconds: float
    images_per_s: float
    worker: str = "single process"
    wrote_cache: bool = True  # False: a torchrun rank other than 0, or a part that left the cache to another
    remaining: int = 0  # images that other parts of a job array still have to extract
    views: int = 0  # augmented views in the cache (`--augment`)


def default_output(features_dir: Path, dataset_name: str, fcfg: FeatureConfig) -> Path:
    return Path(features_dir) / f"{dataset_name}-{fcfg.fingerprint()}.h5"


def partial_dir(out: Path) -> Path:
    return Path(f"{out}.partial")


@dataclass(frozen=True)
class _Job:
    """What every step of one extraction needs to know."""

    cfg: ExtractConfig
    dataset: Dataset
    fcfg: FeatureConfig
    out: Path
    worker: distributed.Worker


def extract(cfg: ExtractConfig) -> ExtractSummary:
    """Bring the cache for `cfg.data` up to date with the images on disk; resumable at any point, by any number
    of processes (a torchrun job, or the parts of a job array)."""
    start = time.perf_counter()
    worker = distributed.worker_from(cfg.shard_part)
    if cfg.force and worker.part:
        raise UserError("--force with --shard would discard the other parts' work: run a plain extract --force, "
                        "or delete the cache and its .partial folder, then start the parts")
    dataset = discover(cfg.data, cfg.label_from)
    if cfg.augment and not any(augments(split) for split in dataset.splits):
        # not refused: a test set extracted with a training cache's config (views and all) serves its runs
        log.warning("--augment makes views of the training split (%s), and %s has %s: no views are made (name the "
                    "training split train)", " or ".join(AUGMENTED_SPLITS), cfg.data, ", ".join(dataset.splits))
    fcfg = extract_feature_config(cfg)
    job = _Job(cfg, dataset, fcfg, Path(cfg.out) if cfg.out else default_output(cfg.features_dir, dataset.name, fcfg), worker)
    files.ensure_writable_file(job.out, "--out")
    distributed.quiet_unless_leader(worker)
    group = distributed.Group(worker)
    # SIGTERM: the worker commits what it has and says how to continue, instead of dying with uncommitted batches
    # (decode workers ignore it: reader.make_loader)
    with sigterm_as_ctrl_c(), embed.quiet_about_dead_workers(), group.started(cfg.device), \
            contextlib.ExitStack() as stack:
        journal = _open_journal(job, group, stack)
        stack.enter_context(_saying_what_is_saved(job, journal))
        plan, shared, up_to_date, repairing = _first_plan(job, journal, group)
        if up_to_date and worker.single:
            journal.remove()
            return _summary(job, plan, 0, time.perf_counter() - start, up_to_date=True)
        extraction = _extract_share(job, plan, shared, journal) if plan.todo else None
        if worker.follower:
            journal.release()  # done writing: rank 0 may remove the folder once the cache is written
        group.barrier()
        if worker.follower:
            return _summary(job, plan, extraction.images if extraction else 0, time.perf_counter() - start, wrote_cache=False)
        return _finish(job, journal, extraction, len(plan.todo), start, repairing)


@contextlib.contextmanager
def _saying_what_is_saved(job: _Job, journal: Journal):
    """A stop outside the embedding loop (loading the model, waiting at a barrier, writing the cache) ends like one
    inside it: one line that says what is saved."""
    try:
        yield
    except KeyboardInterrupt as e:
        raise embed.interruption(job.worker, journal, e) from None
    except (RuntimeError, ConnectionError, EOFError) as e:  # a decode worker's death is reported asynchronously
        stop = interruption_in(e)  # or a Ctrl-C while a lazy import made a class (Python wraps it)
        if stop is None and not embed.worker_died(e):
            raise
        raise embed.interruption(job.worker, journal, stop or e) from None


def _open_journal(job: _Job, group: distributed.Group, stack: contextlib.ExitStack) -> Journal:
    """This worker's view of the journal, its lock held. Of a torchrun job, rank 0 opens it first and prepares it
    (only it may discard shards: --force, another config's); the other ranks open it after a barrier."""
    prepares = not job.worker.follower
    journal = Journal(partial_dir(job.out), job.fcfg.fingerprint(), job.worker.name)
    if prepares:
        stack.enter_context(journal)
        if job.cfg.force:
            journal.clear()
        else:
            journal.resume()
    group.barrier()
    if not prepares:
        stack.enter_context(journal)
        journal.resume(may_discard=False)
    return journal


def _first_plan(job: _Job, journal: Journal, group: distributed.Group) -> tuple[Plan, list[Record], bool, bool]:
    """Every worker's plan of the work, the list it cuts into shares, whether the cache is up to date, and whether
    rows of it are extracted again because they are not finite (`--verify` reads every row).

    The parts of a job array start (and restart) at different times, so each cuts the list as if no part of the
    array had run yet (the rows the parts committed are left out of that list's planning): every part then takes
    the batches it would have taken at the start, and skips the ones already done.
    """
    with _previous_cache(job.out, job.fcfg, job.cfg.force) as old:
        old_records, header = (old.records(), old.header) if old else ([], None)
        broken = old.nonfinite_keys() if old is not None and job.cfg.verify else set()
    if broken:
        log.warning("%d rows of %s are not finite (NaN or inf): extracting them again", len(broken), job.out)
        old_records = [r for r in old_records if r.path not in broken]
    plan = make_plan(job.dataset, old_records, journal.entries, job.cfg.verify, job.fcfg.augment)
    shared = plan.todo
    if job.worker.part:
        before = {p: e for p, e in journal.entries.items() if not job.worker.in_my_array(journal.writer_of(e))}
        shared = make_plan(job.dataset, old_records, before, job.cfg.verify, job.fcfg.augment).todo
    if job.worker.rank:  # the shares depend on the batch size too: a CPU node and a GPU node differ
        batch = embed.batch_size_for(job.cfg, job.worker)
        group.check_same("images to extract and batch size", distributed.plan_digest([r.path for r in plan.todo], batch))
    up_to_date = header is not None and not broken and unchanged(plan, header, old_records, job.dataset)
    return plan, shared, up_to_date, bool(broken)


def _extract_share(job: _Job, plan: Plan, shared: list[Record], journal: Journal) -> Extraction:
    """This worker's batches of `shared`, less the images already done (`plan.todo` holds those still to do)."""
    files.ensure_free_space(job.out.parent, _bytes_needed(plan, job.fcfg), f"extracting {len(plan.todo)} images")
    still_to_do = {r.path for r in plan.todo}
    return embed.run_model(job.cfg, job.fcfg, job.dataset, shared, journal, job.worker, keep=still_to_do)


def _finish(job: _Job, journal: Journal, extraction: Extraction | None, job_todo: int,
            start: float, repairing: bool = False) -> ExtractSummary:
    """Write the cache from the journal and the previous cache, under the final lock (one writer at a time)."""
    with journal.final_lock(), _previous_cache(job.out, job.fcfg, job.cfg.force) as old:
        journal.reload()  # every worker's shards, committed before the barrier (or by the other parts)
        old_records = old.records() if old else []
        plan = make_plan(job.dataset, old_records, journal.entries, verify=False, augment=job.fcfg.augment)
        extracted = (extraction.images if extraction else 0) if job.worker.part else job_todo
        seconds = time.perf_counter() - start
        if old is not None and not repairing and unchanged(plan, old.header, old_records, job.dataset):
            journal.remove()
            return _summary(job, plan, extracted, seconds, up_to_date=not extracted)
        if plan.todo and job.worker.part:  # other parts are still at work: the last one writes
            return _summary(job, plan, extracted, seconds, wrote_cache=False, remaining=len(plan.todo))
        if plan.todo:  # files changed while we read them: their new content is not in the journal
            raise UserError(f"{len(plan.todo)} files changed during extraction (e.g. {plan.todo[0].path}); "
                            "rerun the same command to extract them (nothing done so far is lost)")
        header = _header(job.fcfg, job.dataset, old.header if old else None, extraction)
        _write(job.out, header, plan, old, old_records, journal, job.fcfg.dtype)
        journal.remove()
    return _summary(job, plan, extracted, time.perf_counter() - start)


@contextlib.contextmanager
def _previous_cache(out: Path, fcfg: FeatureConfig, force: bool):
    """The existing cache at `out`, open, if it was made with this very config; anything else is refused or replaced."""
    if force or not out.exists():
        yield None
        return
    try:
        cache = open_cache(out)
    except UserError as e:
        raise UserError(f"{e}; refusing to overwrite it (use --force to replace it, or another --out)") from None
    with cache:
        if cache.header.fingerprint == fcfg.fingerprint() and cache.header.config is None:
            raise UserError(f"{out} holds features of an extractor config this vggcache cannot use "
                            f"({cache.header.config_problem}); refusing to overwrite it (use --force to replace it, "
                            "or another --out)")
        if cache.header.fingerprint != fcfg.fingerprint():
            changed = fcfg.changes_from(cache.header.config_dict)
            diff = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()) or \
                "the same config under another fingerprint: the file was edited"
            raise UserError(f"{out} holds features of extractor config {cache.header.fingerprint}, this run's is "
                            f"{fcfg.fingerprint()} ({diff}); use another --out, or --force to replace it")
        yield cache


def _bytes_needed(plan: Plan, fcfg: FeatureConfig) -> int:
    """The journal's shards for the images to extract, then the new cache beside the old one."""
    journal = len(plan.todo) * (fcfg.feature_dim * np.dtype(fcfg.dtype).itemsize + 400)
    return journal + estimated_bytes(len(plan.records), fcfg.feature_dim, fcfg.dtype)


def _header(fcfg: FeatureConfig, dataset: Dataset, old: Header | None,
            extraction: Extraction | None) -> Header:
    """The new cache's header; without an extraction in this run (only removals), the previous one's, as it was."""
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    source = Source(root=dataset.location, kind=dataset.kind, name=dataset.name)
    kept = extraction is None and old is not None
    return Header(fingerprint=fcfg.fingerprint(), config=fcfg, class_names=list(dataset.class_names),
                        feature_dim=fcfg.feature_dim, source=source, extraction=old.extraction if kept else extraction,
                        versions=library_versions(), created=old.created if old else now, updated=now,
                        stored={"extraction": old.attribute("extraction")} if kept else None)


def _write(out: Path, header: Header, plan: Plan, old: Cache | None, old_records: list[Record],
           journal: Journal, dtype: str) -> None:
    """Write the new cache from rows kept from the old one and rows in the journal, then swap it in."""
    positions = row_positions(old_records)

    def fetch(rows: list[Record]) -> np.ndarray:
        groups = defaultdict(list)
        for i, r in enumerate(rows):
            if plan.sources[r.path] == FROM_CACHE:
                split, row = positions[r.path]
                groups[True, split, "views" if r.view else "features"].append((i, row))
            else:
                groups[False, journal.entries[r.path][1], ""].append((i, journal.entries[r.path][2]))
        block = np.empty((len(rows), header.feature_dim), dtype)
        for (in_cache, where, dataset), pairs in groups.items():
            index, pos = (np.array(column) for column in zip(*pairs))
            block[index] = old.rows(where, pos, dataset) if in_cache else journal.rows(where, pos)
        return block

    saved = f"{len(journal.entries)} images are saved in {journal.directory}" if journal.entries else "nothing was lost"
    try:
        files.ensure_free_space(out.parent, estimated_bytes(len(plan.records), header.feature_dim, dtype),
                                "writing the cache")
        write_atomic(out, header, plan.records, fetch, dtype)
    except UserError as e:  # DiskFull too: the journal keeps every extracted row, so a rerun only writes
        raise type(e)(f"{e}; {saved}: free some space and rerun the same command") from None


def _summary(job: _Job, plan: Plan, extracted: int, seconds: float, up_to_date: bool = False,
             wrote_cache: bool = True, remaining: int = 0) -> ExtractSummary:
    rows = defaultdict(int)
    for r in plan.records:
        rows[r.split] += r.ok and not r.view
    sources = list(plan.sources.values())
    size = job.out.stat().st_size if job.out.exists() else 0
    return ExtractSummary(out=job.out, fingerprint=job.fcfg.fingerprint(), up_to_date=up_to_date, rows=dict(rows),
                          extracted=extracted, reused=sources.count(FROM_CACHE),
                          resumed=max(0, sources.count(FROM_JOURNAL) - extracted), failed=[r for r in plan.records if not r.ok and not r.view],
                          feature_dim=job.fcfg.feature_dim, file_bytes=size, seconds=seconds,
                          images_per_s=extracted / seconds if extracted and seconds else 0.0,
                          worker=job.worker.describe, wrote_cache=wrote_cache, remaining=remaining,
                          views=sum(r.ok and r.view is not None for r in plan.records))
