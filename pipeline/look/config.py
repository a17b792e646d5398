"""What `audit` and `projection` were asked to do, validated where built.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.params import Interval, OneOf, Optional, Satisfies, validate


@dataclass(frozen=True)
class AuditConfig:
    """What `pipeline audit` was asked to check (see audit.py)."""

    features: Path
    threshold: float = 0.92  # centred cosine from which two images are near-duplicates (docs/looking.md: bench/near_duplicates.py)
    neighbours: int = 5  # an image whose k nearest neighbours all carry another label is listed
    out: Path | None = None  # the CSV of findings; None: beside the cache, <cache>.audit.csv
    force: bool = False  # replace --out even when it is not an audit CSV

    PARAMS = {"threshold": Interval(float, -1, 1), "neighbours": Interval(int, 1, 1000)}

    def __post_init__(self):
        validate(self)

    @property
    def csv_path(self) -> Path:
        return Path(self.out) if self.out else Path(f"{self.features}.audit.csv")


@dataclass(frozen=True)
class ProjectionConfig:
    """What `pipeline projection` was asked to draw (see projection.py)."""

    features: Path
    run: Path | None = None  # its mistakes are ringed, and a map cache is pooled as its head pools it
    method: str = "pca"
    out: Path | None = None  # None: beside the cache, <cache>.projection.png
    seed: int = 0
    force: bool = False  # replace --out even when it is not a picture
    html: Path | None = None  # an interactive page (projection_page.py); then the picture only when --out asks for it
    name: str = "projection"  # of the picture beside the cache: "map" under the command's old name, as it always was

    PARAMS = {"method": OneOf(("pca", "tsne")), "seed": Interval(int, 0, 2**32 - 1),
              "out": Optional(Satisfies(lambda p: Path(p).suffix.lower() in (".png", ".svg", ".pdf"),
                                        "a file name ending in .png, .svg or .pdf")),
              "html": Optional(Satisfies(lambda p: Path(p).suffix.lower() in (".html", ".htm"),
                                         "a file name ending in .html"))}

    def __post_init__(self):
        validate(self)

    @property
    def png_path(self) -> Path | None:
        """The picture to draw: --out, else beside the cache unless only --html was asked for."""
        return Path(self.out) if self.out else None if self.html else Path(f"{self.features}.{self.name}.png")
