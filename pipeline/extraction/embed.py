"""Embedding: read the images to do in batches, run the frozen body over them, commit rows to the journal.

The mapper of the extract stage (reader.py decodes in DataLoader workers, backbone/vgg16.py embeds, journal.py
commits); it never touches the HDF5 file (its rows are cache.record's `Record`s, its account of the run a
cache.header `Extraction`), and is what each worker of a distributed extraction runs on its share.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from pipeline import files
from pipeline.backbone.weights import weights_is_file
from pipeline.cache.header import Extraction
from pipeline.cache.identity import FeatureConfig
from pipeline.cache.record import Record, shown
from pipeline.errors import EXIT_CTRL_C, EXIT_SIGTERM, EXIT_WORKER_DIED, Interrupted, Terminated, UserError, first_line
from pipeline.extraction.config import ExtractConfig
from pipeline.extraction.dataset import Dataset
from pipeline.extraction.distributed import Worker, quiet_resource_sharer
from pipeline.extraction.journal import Journal
from pipeline.progress import Progress

log = logging.getLogger(__name__)

# Batches are committed together at most this often, so a kill loses at most ~2 s of work and a fast GPU does not
# fsync hundreds of tiny shards a second. Tests set 0 to commit every batch.
COMMIT_EVERY_S = float(os.environ.get("VGGCACHE_COMMIT_EVERY_S", "2.0"))


def run_model(cfg: ExtractConfig, fcfg: FeatureConfig, dataset: Dataset, todo: list[Record], journal: Journal,
              worker: Worker, keep: set[str]) -> Extraction:
    """Embed this worker's share of `todo` (the images of it in `keep`) in batches, committing to the journal as it
    goes; says how it ran."""
    import torch

    from pipeline.backbone.vgg16 import Extractor, build_body

    extractor = Extractor(build_body(fcfg, cfg.weights), _device(cfg.device, worker), cfg.precision,
                          fixed_shapes=not fcfg.scales)
    on_cuda = extractor.device.type == "cuda"
    if cfg.decode == "gpu" and not on_cuda:
        raise UserError(f"--decode gpu needs a CUDA device, and this run is on {extractor.device} (use --decode cpu)")
    batch_size = cfg.batch_size or default_batch_size(on_cuda, multi_scale=bool(fcfg.scales))
    if worker.part:
        journal.agree_on_batch_size(batch_size)  # parts on other kinds of node must cut the same batches
    workers = cfg.workers if cfg.workers >= 0 else default_workers(on_cuda, worker.local_count)
    # whole batches, as a single process cuts them: the same values, whatever the number of workers; tar shards
    # whole, each read by one worker
    share = worker.take_by(todo, lambda r: dataset.tars.sample_of(r.path).shard) if dataset.tars else \
        worker.take(todo, batch_size)
    mine = [r for r in share if r.path in keep]
    batches = image_batches(cfg.decode, dataset, [r.path for r in mine], fcfg, batch_size, workers, extractor.device)
    log.info("extracting %d images on %s (%s), batch %d, %d workers, %s decode", len(mine), extractor.device,
             extractor.precision, batch_size, workers, cfg.decode)
    start = time.perf_counter()
    _embed_all(extractor, batches, mine, journal, fcfg, worker)
    seconds = time.perf_counter() - start
    return Extraction(
        device=str(extractor.device), precision=extractor.precision, decode=cfg.decode, batch_size=batch_size,
        workers=workers, torch_threads=torch.get_num_threads(), processes=worker.count,
        weights_file=str(Path(cfg.weights).resolve()) if weights_is_file(cfg.weights) else None,
        images=len(mine), seconds=round(seconds, 3), images_per_s=round(len(mine) / max(seconds, 1e-9), 2))


def batch_size_for(cfg: ExtractConfig, worker: Worker) -> int:
    """The batch size this worker will use (asked, or the default of its device)."""
    if cfg.batch_size:
        return cfg.batch_size
    import torch

    device = _device(cfg.device, worker)
    on_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return default_batch_size(on_cuda, multi_scale=bool(cfg.scales))


def _device(asked: str, worker: Worker) -> str:
    """Each rank of a torchrun job on GPUs takes the GPU of its local rank."""
    if not worker.rank or asked not in ("auto", "cuda"):
        return asked
    import torch

    return f"cuda:{worker.local_rank}" if torch.cuda.is_available() else asked


def image_batches(decode: str, source: Dataset | Path, paths: list[str], fcfg: FeatureConfig, batch_size: int,
                  workers: int, device):
    """Batches of {index, image (uint8), error, sha256} of `paths` in `source` (a dataset, or the folder they are
    relative to): decoded by Pillow in workers, or by nvJPEG on the GPU; for multi-scale features (`fcfg.scales`)
    `image` is, per file, its list of whole images at each scale. Files are read by index; tar shards streamed,
    each by one worker (reader.TarSamples)."""
    from pipeline.extraction import reader

    tars = source.tars if isinstance(source, Dataset) else None
    root = source.root if isinstance(source, Dataset) else Path(source)
    read = (lambda images: reader.TarSamples(images, tars)) if tars else (lambda images: images)
    if fcfg.scales:
        if decode != "cpu":
            raise UserError("--scales decodes with Pillow: use --decode cpu")
        images = reader.ScaledImageFiles(root, paths, fcfg.scales)
        return reader.batches_of(reader.make_loader(read(images), batch_size, workers, pin_memory=False,
                                                    yield_to_model=device.type == "cpu", collate_fn=reader.collate_scaled))
    if fcfg.augment and decode != "cpu":
        raise UserError("--augment crops its views with Pillow: use --decode cpu")
    if decode == "cpu":
        images = reader.AugmentedImageFiles(root, paths, fcfg.resize_size, fcfg.image_size, fcfg.augment_seed) \
            if fcfg.augment else reader.ImageFiles(root, paths, fcfg.resize_size, fcfg.image_size)
        return reader.batches_of(reader.make_loader(read(images), batch_size, workers, pin_memory=device.type == "cuda",
                                                    yield_to_model=device.type == "cpu"))
    images = reader.EncodedFiles(root, paths, fcfg.resize_size, fcfg.image_size)
    loader = reader.batches_of(reader.make_encoded_loader(read(images), batch_size, workers))
    return (reader.decode_on_device(items, fcfg.resize_size, fcfg.image_size, device) for items in loader)


def default_batch_size(on_cuda: bool, multi_scale: bool = False) -> int:
    """256 fills a GPU; on a CPU, batches of 4 keep the activations in cache and run fastest (see make bench).
    Multi-scale views run one forward per image and scale whatever the batch: 4 there too, so that a GPU's loader
    does not hold hundreds of whole images at three scales."""
    return 256 if on_cuda and not multi_scale else 4


def default_workers(on_cuda: bool, processes_here: int = 1) -> int:
    """On a GPU, decoding is the bottleneck: many workers (the node's cores shared by its processes). On a CPU the
    model is: one worker keeps it fed."""
    cores = (os.cpu_count() or 1) // max(1, processes_here)
    return max(1, min(16, cores)) if on_cuda else 1


def _embed_all(extractor, loader, todo: list[Record], journal: Journal, fcfg: FeatureConfig, worker: Worker) -> None:
    pending_records, pending_features, last_commit = [], [], time.perf_counter()

    def commit():
        nonlocal pending_records, pending_features, last_commit
        if pending_records:
            journal.append(pending_records, np.concatenate(pending_features).astype(fcfg.dtype))
        pending_records, pending_features, last_commit = [], [], time.perf_counter()

    try:
        with Progress(len(todo), "extract" if worker.single else f"extract ({worker.describe})") as progress, \
                contextlib.closing(loader):  # the decode workers are shut down here, however the loop ends
            for batch in loader:
                records, features = _embed_batch(extractor, batch, todo, fcfg)
                pending_records += records
                pending_features.append(features)
                if time.perf_counter() - last_commit >= COMMIT_EVERY_S:
                    commit()
                progress.advance(len(records))
        commit()
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (errors.sigterm_as_ctrl_c)
        commit()
        raise interruption(worker, journal, e) from None
    except (RuntimeError, ConnectionError, EOFError) as e:
        if not worker_died(e):
            raise
        commit()  # the batches the model already embedded are kept; the dead worker's are extracted on the rerun
        raise interruption(worker, journal, e) from None
    except files.DiskFull as e:
        raise files.DiskFull(f"{e}: {len(journal.entries)} images are saved in {journal.directory}; "
                             "free some space and rerun the same command to resume") from None


def interruption(worker: Worker, journal: Journal, cause: BaseException | None = None) -> Interrupted:
    """The one way an extraction stopped before its end ends: what stopped it, what is saved, and how to go on;
    the exit code says what stopped it (errors.Interrupted)."""
    saved = f"{len(journal.entries)} images are saved in {journal.directory}; rerun the same command to resume"
    if cause is not None and worker_died(cause):
        detail = first_line(cause).rstrip(". ")[:160] if isinstance(cause, RuntimeError) else \
            "its connection broke mid-batch"
        return Interrupted(f"{worker.who}interrupted: a decode worker died ({detail}; the OOM killer? fewer --workers "
                           f"or a smaller --batch-size need less memory): {saved}", EXIT_WORKER_DIED)
    if isinstance(cause, Terminated):
        return Interrupted(f"{worker.who}interrupted by SIGTERM: {saved}", EXIT_SIGTERM)
    return Interrupted(f"{worker.who}interrupted: {saved}", EXIT_CTRL_C)


@contextlib.contextmanager
def quiet_about_dead_workers():
    """A decode worker stopped while it hands a batch over leaves multiprocessing's resource-sharer thread with a
    broken connection, which it prints as a traceback; the interruption line already says what happened."""
    previous = threading.excepthook
    threading.excepthook = quiet_resource_sharer(previous)
    try:
        yield
    finally:
        threading.excepthook = previous


def worker_died(e: BaseException) -> bool:
    """torch's DataLoader reports a worker killed by a signal (or gone without a word) with a RuntimeError; one
    killed while it hands a batch over breaks the connection the batch comes through."""
    return (isinstance(e, RuntimeError) and str(e).startswith("DataLoader worker")) or isinstance(e, (ConnectionError,
                                                                                                      EOFError))


def _embed_batch(extractor, batch: dict, todo: list[Record], fcfg: FeatureConfig) -> tuple[list[Record], np.ndarray]:
    """One loader batch -> its records (failures included) and the feature rows of the images that decoded."""
    from pipeline.extraction.reader import decoded_images  # lazily, like all torch code here: already loaded by then

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
            log.warning("skipped %s: %s", shown(r.path), errors[k])
        records.append(replace(r, sha256=digests[k], reason=errors[k], label=-1 if errors[k] else r.label))
    return records, features
