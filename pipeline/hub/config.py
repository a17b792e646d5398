"""What `pipeline export-features` and `pipeline similar` were asked to do, validated where built."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.cache import pools
from pipeline.device import DEVICES
from pipeline.params import Interval, OneOf, Optional, validate

INDEX_KINDS = ("auto", "exact", "approximate")  # auto: exact up to a measured size (index.py), approximate above


@dataclass(frozen=True)
class ExportConfig:
    """`pipeline export-features CACHE --out DIR`: the cache's rows as Parquet parts in a new folder."""

    features: Path
    out: Path  # a new or empty folder, or (force) one that export-features wrote before
    pool: str | None = None  # a map cache's rows pooled this way (default avg); a pooled cache's rows as stored
    splits: tuple[str, ...] = ()  # () : every split
    part_mb: int = 128  # rows per Parquet file: about this many MB of embeddings
    force: bool = False

    PARAMS = {"pool": Optional(OneOf(tuple(pools.HEAD_POOLS))), "part_mb": Interval(int, 1, 1 << 16)}

    def __post_init__(self):
        validate(self)


@dataclass(frozen=True)
class SimilarConfig:
    """`pipeline similar CACHE QUERY...`: the k nearest cached images to each query, by cosine."""

    features: Path
    queries: tuple[str, ...]  # image files (embedded with the cache's extractor) or paths already in the cache
    k: int = 10
    splits: tuple[str, ...] = ()  # () : search every split
    pool: str | None = None  # a map cache's rows pooled this way (default avg)
    out: Path | None = None  # the neighbours as CSV
    html: Path | None = None  # the queries and their neighbours as thumbnails on one page
    index: str = "auto"
    weights: str | None = None  # the weights file, when the cache's features came from one and it has moved
    device: str = "auto"
    force: bool = False  # replace --out / --html even when they are not what similar writes

    PARAMS = {"k": Interval(int, 1, 10_000), "pool": Optional(OneOf(tuple(pools.HEAD_POOLS))),
              "index": OneOf(INDEX_KINDS), "device": OneOf(DEVICES)}

    def __post_init__(self):
        validate(self)
