"""What `pipeline extract` was asked to do (`ExtractConfig`, validated where it is built), and the feature
config (`cache.identity.FeatureConfig`) such an extraction makes.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.backbone.weights import weights_identity
from pipeline.cache import pools
from pipeline.cache.identity import (
    DTYPES,
    IMAGENET_CROP,
    IMAGENET_RESIZE,
    SCALES_EXPECTED,
    VIEWS,
    FeatureConfig,
    scale_sizes,
)
from pipeline.device import DEVICES, PRECISIONS
from pipeline.errors import UserError
from pipeline.extraction.augment import RECIPE
from pipeline.extraction.dataset import is_tar_spec
from pipeline.params import BOOLEAN, Interval, OneOf, Optional, Satisfies, parse_option, validate

POOLS = tuple(pools.POOLS)
DECODERS = ("cpu", "gpu")
LABEL_FROM = r"auto|cls|txt|json:[^\s]{1,100}"
LAYERS = tuple(pools.LAYERS)


def flip_option(text: str) -> bool:
    """`extract --views none|flip` -> ExtractConfig.flip; one UserError line for anything else."""
    return parse_option("--views", text, lambda t: {"none": False, "flip": True}.get(t), f"one of {', '.join(VIEWS)}")


def scales_option(text: str) -> tuple[int, ...]:
    """`extract --scales 384,256` -> ExtractConfig.scales (256, 384); one UserError line for anything else."""
    return parse_option("--scales", text, parse_scales, SCALES_EXPECTED)


def parse_scales(text: str) -> tuple[int, ...] | None:
    """'384,256' -> (256, 384), sorted so that the order given does not change the fingerprint; '' -> (); None for
    anything else (sizes 32..2048, no repeats)."""
    if not text.strip():
        return ()
    parts = [p.strip() for p in text.split(",")]
    if not all(re.fullmatch(r"[0-9]{1,4}", p) for p in parts):
        return None
    sizes = tuple(sorted(int(p) for p in parts))
    return sizes if all(32 <= s <= 2048 for s in sizes) and len(set(sizes)) == len(sizes) else None


@dataclass(frozen=True)
class ExtractConfig:
    """What `pipeline extract` was asked to do."""

    data: Path | str | tuple[str, ...]  # a folder or CSV, or WebDataset tar shards: [SPLIT=]PATTERN, one or more
    out: Path | None = None
    weights: str = "imagenet"  # imagenet | none | path to a state dict
    pool: str = "avg"
    image_size: int = 224
    flip: bool = False  # --views flip: each row is the mean of the image's and its mirror's features
    scales: tuple[int, ...] = ()  # the whole image at each shorter side (see FeatureConfig.scales); --scales 256,384
    layer: str = "pool5"
    augment: int = 0  # K augmented views of each training image (augment.py)
    augment_seed: int = 0
    batch_size: int = 0  # 0: 256 on CUDA, 4 elsewhere
    workers: int = -1  # -1: chosen from the device and the CPU count
    device: str = "auto"
    precision: str = "auto"
    dtype: str = "float16"
    decode: str = "cpu"
    force: bool = False
    verify: bool = False  # hash every file, not only those whose size or mtime changed
    shard: str | None = None  # "I/N": this process extracts part I of N of a job array (no process group)
    features_dir: Path = field(default=Path("features"))
    label_from: str = "auto"  # tar shards: where a sample's class is (tars.py): auto, cls, txt or json:FIELD

    PARAMS = {
        "pool": OneOf(POOLS),
        "dtype": OneOf(DTYPES),
        "device": OneOf(DEVICES),
        "precision": OneOf(PRECISIONS),
        "decode": OneOf(DECODERS),
        "image_size": Interval(int, 32, 1024),
        "batch_size": Interval(int, 0, 65536),
        "workers": Interval(int, -1, 256),
        "shard": Optional(Satisfies(lambda s: _shard_part(s) is not None, "I/N with 0 <= I < N, e.g. 0/4")),
        "flip": BOOLEAN,
        "layer": OneOf(LAYERS),
        "augment": Interval(int, 0, 64),
        "augment_seed": Interval(int, 0, 2**32 - 1),
        "scales": Satisfies(scale_sizes, SCALES_EXPECTED),
        "label_from": Satisfies(lambda v: isinstance(v, str) and re.fullmatch(LABEL_FROM, v) is not None,
                                "auto, cls, txt or json:FIELD"),
    }
    OPTIONS = {"flip": "--views"}

    def __post_init__(self):
        validate(self)
        object.__setattr__(self, "data", _data(self.data))
        if pools.get(self.pool).keeps_map and (self.flip or self.scales):
            raise UserError("--pool map keeps one centre-crop view: --views and --scales need a pooled --pool "
                            f"({', '.join(pools.HEAD_POOLS)})")
        if self.augment and self.scales:
            raise UserError("--augment caches crops at --image-size, and --scales whole images: use one of them")

    @property
    def shard_part(self) -> tuple[int, int] | None:
        return _shard_part(self.shard) if self.shard is not None else None


def _data(data) -> Path | tuple[str, ...]:
    """A folder or CSV as a Path (one given in a list too); tar shard specs as a tuple of strings (a URL must not
    go through Path, which would fold its '//')."""
    given = [data] if isinstance(data, (str, Path)) else list(data)
    if not given:
        raise UserError("no DATA given: a folder, a CSV manifest, or tar shards")
    texts = [os.fspath(d) for d in given]
    if len(texts) == 1 and not is_tar_spec(texts[0]):
        return Path(texts[0])
    return tuple(texts)


def _shard_part(text: str) -> tuple[int, int] | None:
    """'I/N' -> (I, N) when 0 <= I < N; None for anything else."""
    match = re.fullmatch(r"(\d{1,6})/(\d{1,6})", text)  # exactly I/N: no spaces, here or there
    if not match or not int(match[1]) < int(match[2]):
        return None
    return int(match[1]), int(match[2])


def feature_config(weights: str, pool: str, image_size: int, dtype: str, flip: bool = False,
                   scales: tuple[int, ...] = (), layer: str = "pool5", augment: int = 0,
                   augment_seed: int = 0) -> FeatureConfig:
    """The feature definition for these options (`weights` the user's spec); resize keeps torchvision's 256/224
    ratio at any crop size."""
    resize = round(image_size * IMAGENET_RESIZE / IMAGENET_CROP)
    return FeatureConfig(weights_id=weights_identity(weights), pool=pool, image_size=image_size, resize_size=resize,
                         dtype=dtype, flip=flip, scales=tuple(scales), layer=layer, augment=augment,
                         augment_seed=augment_seed if augment else 0, augment_recipe=RECIPE if augment else "")


def extract_feature_config(cfg: "ExtractConfig") -> FeatureConfig:
    """The features an extraction with these options makes."""
    return feature_config(cfg.weights, cfg.pool, cfg.image_size, cfg.dtype, cfg.flip, cfg.scales, cfg.layer,
                          cfg.augment, cfg.augment_seed)
