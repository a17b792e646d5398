"""What `predict` and `serve` were asked to do, validated where built.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.device import DEVICES, PRECISIONS
from pipeline.errors import UserError
from pipeline.params import Interval, OneOf, validate


@dataclass(frozen=True)
class PredictConfig:
    run: Path
    images: tuple[Path, ...]
    out: Path | None = None  # None: CSV on stdout
    top_k: int = 3
    weights: str | None = None  # the weights file, when the run's features came from one and it has moved
    batch_size: int = 32
    workers: int = 0
    device: str = "auto"
    precision: str = "auto"  # auto: as the run's features were extracted (fp32 or bf16), else the device's default
    report: bool = False  # compare the new images with the run's training data (look/drift.py): one line and a PNG
    force: bool = False  # replace --out (and the report's picture) even when they are not what predict writes

    PARAMS = {"top_k": Interval(int, 1, 1 << 20), "batch_size": Interval(int, 1, 65536), "workers": Interval(int, 0, 256),
              "device": OneOf(DEVICES), "precision": OneOf(PRECISIONS)}

    def __post_init__(self):
        validate(self)
        for image in self.images:
            if not isinstance(image, (str, bytes, os.PathLike)):
                raise UserError(f"image path {image!r} is not a path (expected image files or folders)")
            if os.fsdecode(image) == "":  # Path("") is ".": an unset $IMAGES would predict the working folder
                raise UserError("an image path is empty (expected image files or folders)")
        object.__setattr__(self, "images", tuple(Path(os.fsdecode(image)) for image in self.images))
        if self.report and not self.out:
            raise UserError("--report draws its picture beside the predictions: pass --out FILE.csv too")

    @property
    def report_path(self) -> Path:
        """Where --report draws its picture: beside --out (p.csv -> p.drift.png)."""
        return Path(f"{Path(self.out).with_suffix('')}.drift.png")


@dataclass(frozen=True)
class ServeConfig:
    """What `pipeline serve` was asked to do (see server.py)."""

    run: str
    host: str = "127.0.0.1"  # localhost only: no authentication, no TLS (put it behind a proxy for more)
    port: int = 8000
    workers: int = 1  # uvicorn worker processes, each with the run loaded
    max_request_mb: float = 32.0
    top_k: int = 3
    weights: str | None = None  # the weights file, when the run's features came from one and it has moved
    device: str = "auto"
    features: str | None = None  # the run's feature cache: GET/POST /similar search it (hub/similar.py)

    PARAMS = {"port": Interval(int, 1, 65535), "workers": Interval(int, 1, 64), "top_k": Interval(int, 1, 1 << 20),
              "max_request_mb": Interval(float, 0, 4096, open_low=True), "device": OneOf(DEVICES)}

    def __post_init__(self):
        validate(self)
