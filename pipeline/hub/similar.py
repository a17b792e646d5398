"""`pipeline similar`: the k nearest cached images to each query, an image file or a path in the cache (to be
written: issue 27)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.hub.config import SimilarConfig


@dataclass(frozen=True)
class Neighbour:
    split: str
    path: str
    label: str  # the class name
    similarity: float  # cosine


@dataclass(frozen=True)
class QueryResult:
    query: str  # as given
    source: str  # "cache" (a path in the cache) or "file" (an image file, embedded with the cache's extractor)
    neighbours: tuple[Neighbour, ...] = ()
    error: str = ""  # a query that could not be answered (not an image, not found): its reason


@dataclass(frozen=True)
class SimilarResult:
    results: tuple[QueryResult, ...]
    index: str  # the index used, in words (kind, rows, built or loaded, where)
    seconds: float
    written: tuple = field(default=())  # the files written (--out, --html)


def similar(cfg: SimilarConfig) -> SimilarResult:
    raise NotImplementedError
