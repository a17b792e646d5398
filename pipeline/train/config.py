"""What `train-head` and `evaluate` were asked to do: how the cache is read and split and which head
(`TrainConfig`, with its heads.config.HeadConfig), a saved run scored again (`EvaluateConfig`). Each validated where
it is built.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.cache import pools
from pipeline.heads.config import HeadConfig
from pipeline.params import Interval, OneOf, Optional, Satisfies, validate
from pipeline.train.tracking import TRACKERS


@dataclass(frozen=True)
class TrainConfig:
    features: Path
    head: HeadConfig = field(default_factory=HeadConfig)
    out: Path | None = None
    force: bool = False  # --out may be a run folder: its run files are replaced (nothing else in it is touched)
    models_dir: Path = Path("models")
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    val_fraction: float = 0.2  # held out of train, stratified, when the file has no validation split
    memory_budget: str | None = None  # "8G", "512M", bytes; None: half the memory available (see cache/stream.py)
    stream: bool = False  # read the features from the file as the head trains, whatever their size
    pool: str = "auto"  # on a map cache: a pooling of pools.HEAD_POOLS, or auto (swept); on a pooled cache: its own
    refit: bool | None = None  # refit the choice on train+val before test; None: when there is a test split
    views: bool | None = None  # train on the cache's augmented views too; None: when it has them and they fit memory
    track: str | None = None  # log the saved run to a tracker (tracking.py): mlflow

    PARAMS = {"val_fraction": Interval(float, 0, 1, open_low=True, open_high=True),
              "track": Optional(OneOf(TRACKERS)),
              "pool": OneOf(("auto",) + pools.HEAD_POOLS),
              "memory_budget": Optional(Satisfies(lambda s: parse_bytes(s) > 0, "a size such as 8G, 512M or 1000000"))}

    def __post_init__(self):
        validate(self)

    @property
    def budget_bytes(self) -> int | None:
        return None if self.memory_budget is None else parse_bytes(self.memory_budget)


def parse_bytes(text: str) -> int:
    """'8G' -> 8 * 2**30; plain digits are bytes. Raises ValueError for anything else."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)I?B?\s*", str(text), re.IGNORECASE)
    if not match:
        raise ValueError(f"not a size: {text!r}")
    return int(float(match[1]) * 1024 ** " KMGT".index(match[2].upper() or " "))


@dataclass(frozen=True)
class EvaluateConfig:
    run: Path
    features: Path | None = None  # None: the cache the run was trained on
    split: str | None = None  # None: test, else val, else the first split

    PARAMS = {}  # nothing to constrain but the files themselves, which are checked when they are opened

    def __post_init__(self):
        validate(self)
