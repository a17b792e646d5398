"""The extract stage: plan what is new or changed, run the frozen body over it once, write a complete cache.

read (reader.py, in DataLoader workers) -> embed (backbone.py) -> commit per batch (journal.py) -> write (store.py).
torch is imported only when images must go through the model: an up-to-date rerun answers in about a second.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pipeline import files, store
from pipeline.config import ExtractConfig, FeatureConfig, feature_config, library_versions, sha256_file
from pipeline.data import Dataset, discover
from pipeline.errors import Interrupted, UserError
from pipeline.journal import Journal
from pipeline.progress import Progress
from pipeline.store import Record

log = logging.getLogger(__name__)

# Batches are committed together at most this often, so a kill loses at most ~2 s of work and a fast GPU does not
# fsync hundreds of tiny shards a second. Tests set 0 to commit every batch.
COMMIT_EVERY_S = float(os.environ.get("VGGCACHE_COMMIT_EVERY_S", "2.0"))


@dataclass
class Plan:
    """Every image with the record the cache will hold; `sources` says where done rows come from."""

    records: list[Record] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)  # path -> "cache" | "journal"
    todo: list[Record] = field(default_factory=list)


@dataclass
class ExtractSummary:
    out: Path
    fingerprint: str
    up_to_date: bool
    rows: dict[str, int]
    extracted: int  # went through the model in this run
    reused: int  # rows kept from the previous cache
    resumed: int  # rows finished by an earlier, interrupted run
    failed: list[Record]
    feature_dim: int
    file_bytes: int
    seconds: float
    images_per_s: float


def default_output(features_dir: Path, dataset_name: str, fcfg: FeatureConfig) -> Path:
    return Path(features_dir) / f"{dataset_name}-{fcfg.fingerprint()}.h5"


def partial_dir(out: Path) -> Path:
    return Path(f"{out}.partial")


def extract(cfg: ExtractConfig) -> ExtractSummary:
    """Bring the cache for `cfg.data` up to date with the images on disk; resumable at any point."""
    start = time.perf_counter()
    dataset = discover(cfg.data)
    fcfg = feature_config(cfg.weights, cfg.pool, cfg.image_size, cfg.dtype)
    out = Path(cfg.out) if cfg.out else default_output(cfg.features_dir, dataset.name, fcfg)
    files.ensure_writable_file(out, "--out")
    # The lock comes first: the previous cache is read under it, so no other run can swap it in between.
    with Journal(partial_dir(out), fcfg.fingerprint()) as journal, _previous_cache(out, fcfg, cfg.force) as old:
        if cfg.force:
            journal.clear()
        else:
            journal.resume()
        old_records = old.records() if old else []
        plan = make_plan(dataset, old_records, journal.entries, cfg.verify)
        if old is not None and _unchanged(plan, old.header, old_records, dataset):
            journal.remove()
            log.info("%s is up to date (%d images)", out, sum(r.ok for r in old_records))
            return _summary(out, fcfg, plan, 0, time.perf_counter() - start, 0.0, up_to_date=True)
        extraction, model_seconds = old.header.extraction if old else {}, 0.0
        if plan.todo:
            files.ensure_free_space(out.parent, _bytes_needed(plan, fcfg), f"extracting {len(plan.todo)} images")
            extraction = _run_model(cfg, fcfg, dataset.root, plan.todo, journal)
            model_seconds = extraction["seconds"]
            plan = make_plan(dataset, old_records, journal.entries, verify=False)
            if plan.todo:  # files changed while we read them: their new content is not in the journal
                raise UserError(f"{len(plan.todo)} files changed during extraction (e.g. {plan.todo[0].path}); "
                                "rerun the same command to extract them (nothing done so far is lost)")
        header = _header(fcfg, dataset, old.header if old else None, extraction)
        _write(out, header, plan, old, old_records, journal, fcfg.dtype)
        journal.remove()
    n_new = int(extraction.get("images", 0)) if model_seconds else 0
    return _summary(out, fcfg, plan, n_new, time.perf_counter() - start, n_new / model_seconds if model_seconds else 0.0)


@contextlib.contextmanager
def _previous_cache(out: Path, fcfg: FeatureConfig, force: bool):
    """The existing cache at `out`, open, if it was made with this very config; anything else is refused or replaced."""
    if force or not out.exists():
        yield None
        return
    try:
        cache = store.open_cache(out)
    except UserError as e:
        raise UserError(f"{e}; refusing to overwrite it (use --force to replace it, or another --out)") from None
    with cache:
        if cache.header.fingerprint != fcfg.fingerprint():
            changed = {k: (cache.header.config.get(k), v) for k, v in fcfg.to_dict().items() if cache.header.config.get(k) != v}
            diff = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise UserError(f"{out} holds features of extractor config {cache.header.fingerprint}, this run's is "
                            f"{fcfg.fingerprint()} ({diff}); use another --out, or --force to replace it")
        yield cache


def _bytes_needed(plan: Plan, fcfg: FeatureConfig) -> int:
    """The journal's shards for the images to extract, then the new cache beside the old one."""
    journal = len(plan.todo) * (fcfg.feature_dim * np.dtype(fcfg.dtype).itemsize + 400)
    return journal + store.estimated_bytes(len(plan.records), fcfg.feature_dim, fcfg.dtype)


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _unreadable_now(path: Path) -> str:
    """Why `path` cannot be read now (the reason recorded for it), or "" when it can."""
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        return store.unreadable_reason(e)
    return ""


def _done_before(prev: Record | None, stamp: tuple[int, int], path: Path, verify: bool, digest) -> Record | None:
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
            reason = _unreadable_now(path)
            return replace(prev, reason=reason) if reason else None
        return prev
    if (prev.size, prev.mtime_ns) == stamp and not verify:
        return prev
    if prev.sha256 and prev.size == size and digest() == prev.sha256:
        return replace(prev, mtime_ns=mtime_ns)
    return None


def make_plan(dataset: Dataset, cached: list[Record], journal: dict, verify: bool) -> Plan:
    """Decide, image by image, whether its row is in the journal, in the cache, or still to be extracted.

    The journal is asked first: its rows were made after the cache was written, so where both know a file,
    the journal's row is the newer one (after `--verify` found a changed file, the cache's row is stale).
    """
    labels, old = dataset.label_index(), {r.path: r for r in cached}
    plan = Plan()
    for item in dataset.items:
        path, label = dataset.root / item.path, labels[item.label]
        stamp = _stat(path)
        if stamp is None:
            plan.records.append(Record(item.split, item.path, -1, -1, -1, "", "FileNotFoundError: listed but missing"))
            continue
        digest = functools.cache(lambda path=path: sha256_file(path))  # hashed at most once, and only if needed
        for source, prev in (("journal", journal.get(item.path, (None,))[0]), ("cache", old.get(item.path))):
            done = _done_before(prev, stamp, path, verify, digest)
            if done is not None:
                plan.records.append(replace(done, split=item.split, label=label if done.ok else -1))
                plan.sources[item.path] = source
                break
        else:
            plan.todo.append(Record(item.split, item.path, label, *stamp))
            plan.records.append(plan.todo[-1])
    return plan


def _unchanged(plan: Plan, header: store.Header, cached: list[Record], dataset: Dataset) -> bool:
    return (not plan.todo and "journal" not in plan.sources.values() and list(dataset.class_names) == header.class_names
            and set(plan.records) == set(cached))


def _run_model(cfg: ExtractConfig, fcfg: FeatureConfig, root: Path, todo: list[Record], journal: Journal) -> dict:
    """Embed `todo` in batches, committing to the journal as it goes; returns how the extraction ran."""
    import torch

    from pipeline.backbone import Extractor, build_body

    extractor = Extractor(build_body(fcfg, cfg.weights), cfg.device, cfg.precision)
    on_cuda = extractor.device.type == "cuda"
    if cfg.decode == "gpu" and not on_cuda:
        raise UserError(f"--decode gpu needs a CUDA device, and this run is on {extractor.device} (use --decode cpu)")
    batch_size = cfg.batch_size or default_batch_size(on_cuda)
    workers = cfg.workers if cfg.workers >= 0 else default_workers(on_cuda)
    batches = _batches(cfg.decode, root, [r.path for r in todo], fcfg, batch_size, workers, extractor.device)
    log.info("extracting %d images on %s (%s), batch %d, %d workers, %s decode", len(todo), extractor.device,
             extractor.precision, batch_size, workers, cfg.decode)
    start = time.perf_counter()
    _embed_all(extractor, batches, todo, journal, fcfg)
    seconds = time.perf_counter() - start
    return {"device": str(extractor.device), "precision": extractor.precision, "decode": cfg.decode,
            "batch_size": batch_size, "workers": workers, "torch_threads": torch.get_num_threads(),
            "weights_file": None if cfg.weights in ("imagenet", "none") else str(Path(cfg.weights).resolve()),
            "images": len(todo), "seconds": round(seconds, 3), "images_per_s": round(len(todo) / seconds, 2)}


def _batches(decode: str, root: Path, paths: list[str], fcfg: FeatureConfig, batch_size: int, workers: int, device):
    """Batches of {index, image (uint8), error, sha256}: decoded by Pillow in workers, or by nvJPEG on the GPU."""
    from pipeline import reader

    if decode == "cpu":
        files = reader.ImageFiles(root, paths, fcfg.resize_size, fcfg.image_size)
        return reader.make_loader(files, batch_size, workers, pin_memory=device.type == "cuda",
                                  yield_to_model=device.type == "cpu")
    files = reader.EncodedFiles(root, paths, fcfg.resize_size, fcfg.image_size)
    loader = reader.make_encoded_loader(files, batch_size, workers)
    return (reader.decode_on_device(items, fcfg.resize_size, fcfg.image_size, device) for items in loader)


def default_batch_size(on_cuda: bool) -> int:
    """256 fills a GPU; on a CPU, batches of 4 keep the activations in cache and run fastest (see make bench)."""
    return 256 if on_cuda else 4


def default_workers(on_cuda: bool) -> int:
    """On a GPU, decoding is the bottleneck: many workers. On a CPU the model is: one worker keeps it fed."""
    cores = os.cpu_count() or 1
    return min(16, cores) if on_cuda else 1


def _embed_all(extractor, loader, todo: list[Record], journal: Journal, fcfg: FeatureConfig) -> None:
    pending_records, pending_features, last_commit = [], [], time.perf_counter()

    def commit():
        nonlocal pending_records, pending_features, last_commit
        if pending_records:
            journal.append(pending_records, np.concatenate(pending_features).astype(fcfg.dtype))
        pending_records, pending_features, last_commit = [], [], time.perf_counter()

    try:
        with Progress(len(todo), "extract") as progress:
            for batch in loader:
                records, features = _embed_batch(extractor, batch, todo, fcfg)
                pending_records += records
                pending_features.append(features)
                if time.perf_counter() - last_commit >= COMMIT_EVERY_S:
                    commit()
                progress.advance(len(records))
        commit()
    except KeyboardInterrupt:
        commit()
        raise Interrupted(f"interrupted: {len(journal.entries)} images are saved in {journal.directory}; "
                          "rerun the same command to resume") from None
    except files.DiskFull as e:
        raise files.DiskFull(f"{e}: {len(journal.entries)} images are saved in {journal.directory}; "
                             "free some space and rerun the same command to resume") from None


def _embed_batch(extractor, batch: dict, todo: list[Record], fcfg: FeatureConfig) -> tuple[list[Record], np.ndarray]:
    """One loader batch -> its records (failures included) and the feature rows of the images that decoded."""
    from pipeline.reader import decoded_images  # lazily, like all torch code here: already loaded by then

    errors, digests = list(batch["error"]), batch["sha256"]
    ok, images = decoded_images(batch)
    features = extractor(images) if ok else np.empty((0, fcfg.feature_dim), np.float32)
    with np.errstate(over="ignore"):  # an overflow is expected here, and handled
        finite = np.isfinite(features.astype(fcfg.dtype)).all(1)
    if not finite.all():  # a cache never holds NaN or inf: such a row would be refused as damaged by every reader
        for k in np.flatnonzero(~finite):
            errors[ok[k]] = f"features are not finite in {fcfg.dtype} (over its range: try --dtype float32)"
        features = features[finite]
    records = []
    for k, index in enumerate(batch["index"].tolist()):
        r = todo[index]
        if errors[k]:
            log.warning("skipped %s: %s", r.path, errors[k])
        records.append(replace(r, sha256=digests[k], reason=errors[k], label=-1 if errors[k] else r.label))
    return records, features


def _header(fcfg: FeatureConfig, dataset: Dataset, old: store.Header | None, extraction: dict) -> store.Header:
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    source = {"root": str(dataset.root.resolve()), "kind": dataset.kind, "name": dataset.name}
    return store.Header(fingerprint=fcfg.fingerprint(), config=fcfg.to_dict(), class_names=list(dataset.class_names),
                        feature_dim=fcfg.feature_dim, source=source, extraction=extraction,
                        versions=library_versions(), created=old.created if old else now, updated=now)


def _write(out: Path, header: store.Header, plan: Plan, old: store.Cache | None, old_records: list[Record],
           journal: Journal, dtype: str) -> None:
    """Write the new cache from rows kept from the old one and rows in the journal, then swap it in."""
    positions = store.row_positions(old_records)

    def fetch(rows: list[Record]) -> np.ndarray:
        groups = defaultdict(list)
        for i, r in enumerate(rows):
            if plan.sources[r.path] == "cache":
                split, row = positions[r.path]
                groups["cache", split].append((i, row))
            else:
                groups["journal", journal.entries[r.path][1]].append((i, journal.entries[r.path][2]))
        block = np.empty((len(rows), header.feature_dim), dtype)
        for (kind, where), pairs in groups.items():
            index, pos = (np.array(column) for column in zip(*pairs))
            block[index] = old.rows(where, pos) if kind == "cache" else journal.rows(where, pos)
        return block

    saved = f"{len(journal.entries)} images are saved in {journal.directory}" if journal.entries else "nothing was lost"
    try:
        files.ensure_free_space(out.parent, store.estimated_bytes(len(plan.records), header.feature_dim, dtype),
                                "writing the cache")
        store.write_atomic(out, header, plan.records, fetch, dtype)
    except UserError as e:  # DiskFull too: the journal keeps every extracted row, so a rerun only writes
        raise type(e)(f"{e}; {saved}: free some space and rerun the same command") from None


def _summary(out: Path, fcfg: FeatureConfig, plan: Plan, extracted: int, seconds: float, rate: float,
             up_to_date: bool = False) -> ExtractSummary:
    rows = defaultdict(int)
    for r in plan.records:
        rows[r.split] += r.ok
    sources = list(plan.sources.values())
    return ExtractSummary(out=out, fingerprint=fcfg.fingerprint(), up_to_date=up_to_date, rows=dict(rows),
                          extracted=extracted, reused=sources.count("cache"),
                          resumed=sources.count("journal") - extracted, failed=[r for r in plan.records if not r.ok],
                          feature_dim=fcfg.feature_dim, file_bytes=out.stat().st_size, seconds=seconds, images_per_s=rate)
