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
