"""Shared fixtures: tiny image folders and a tiny saved VGG16 state dict, all built in tmp_path."""

from __future__ import annotations

import os

if "PYTEST_XDIST_WORKER" in os.environ:  # `make test` runs two test processes: one thread each, not two fighting
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):  # over 2 cores (set before numpy
        os.environ.setdefault(_name, "1")  # and torch load: their thread pools read these once)

import signal
from pathlib import Path

import pytest

from pipeline.synthetic import make_image_folder

SIZE = 32  # the smallest crop VGG16 accepts (five 2x2 max-pools): keeps a CPU forward in milliseconds


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """data/{train,val}/{circle,checks,stripes}/*.jpg: 4 train and 2 val images per class."""
    return make_image_folder(tmp_path / "data", {"train": 4, "val": 2}, size=(40, 36))


@pytest.fixture(scope="session")
def weights_file(tmp_path_factory) -> Path:
    """A features-only VGG16 state dict with random weights, saved as a user's file would be."""
    import torch
    from torchvision.models import vgg16

    torch.manual_seed(123)
    path = tmp_path_factory.mktemp("weights") / "vgg16_features.pth"
    torch.save({f"features.{k}": v for k, v in vgg16(weights=None).features.state_dict().items()}, path)
    return path


def extract_config(data: Path, out: Path, **kw):
    from pipeline.extraction.config import ExtractConfig

    # fp32 unless a test asks: "auto" is bf16 on CPUs with native bf16 and fp32 elsewhere, and tests compare values
    return ExtractConfig(data=data, out=out, weights=kw.pop("weights", "none"), image_size=kw.pop("image_size", SIZE),
                         batch_size=kw.pop("batch_size", 4), workers=kw.pop("workers", 0),
                         precision=kw.pop("precision", "fp32"), **kw)


def interruptible() -> None:
    """`preexec_fn` for a child that a test interrupts: SIGINT back to its default. A shell starts background jobs
    (`make test &`, `nohup ... &`) with SIGINT ignored, children inherit that, and Ctrl-C would then never arrive."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def read_split(path: Path, split: str):
    """Features, labels and paths of one split of the cache at `path` (opened for this one read)."""
    from pipeline.cache.store import open_cache

    with open_cache(path) as cache:
        return cache.read_split(split)


def read_header(path: Path):
    from pipeline.cache.store import open_cache

    with open_cache(path) as cache:
        return cache.header


def read_records(path: Path):
    """The header and every record (rows, then failures, per split), without reading any features."""
    from pipeline.cache.store import open_cache

    with open_cache(path) as cache:
        return cache.header, cache.records()


def feature_file(path: Path, splits=("train", "val", "test"), config=None, n=90, classes=("a", "b", "c"), seed=0):
    """A cache of separable blobs (16 features, float32), written through the real schema."""
    import numpy as np
    from sklearn.datasets import make_blobs

    from pipeline.cache.header import Header
    from pipeline.cache.identity import generated_config
    from pipeline.cache.record import Record
    from pipeline.cache.writer import write_atomic

    config = config or generated_config()
    X, y = make_blobs(n_samples=n * len(splits), centers=len(classes), n_features=16, cluster_std=1.5, random_state=seed)
    records, rows = [], {}
    for i, (x, label) in enumerate(zip(X, y)):
        split = splits[i % len(splits)]
        records.append(Record(split, f"{split}/{i:04d}.jpg", int(label), 1, 1, "0" * 64))
        rows[records[-1].path] = x
    header = Header(fingerprint=config.fingerprint(), config=config, class_names=list(classes), feature_dim=16)
    write_atomic(path, header, records, lambda rs: np.stack([rows[r.path] for r in rs]), "float32")
    return path
