"""What a feature cache holds, as one frozen record (`FeatureConfig`), and the fingerprint that names it.

A config is written into every cache and every run; its hash is the cache's fingerprint, so two caches compare
equal only when they were made the same way. Its form in a file is declared field by field (`CANONICAL`), not
derived from the attribute names: renaming an attribute never changes an existing cache's fingerprint (a test pins
five legacy fingerprints). No h5py and no torch here: planning an extraction and reading a run need neither.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Callable

from pipeline.cache import pools
from pipeline.errors import UserError
from pipeline.params import BOOLEAN, Interval, OneOf, Satisfies, validate

DTYPES = ("float16", "float32")
SCALES_EXPECTED = "sizes from 32 to 2048 without repeats, e.g. 256,384,512"
VGG16_CHANNELS = 512

# torchvision's VGG16_Weights.IMAGENET1K_V1.transforms(): kept here so that planning an extraction (and the
# "up to date" answer) needs no torch import; backbone/vgg16.py checks them against torchvision when it loads the model.
IMAGENET_RESIZE, IMAGENET_CROP = 256, 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _three_numbers(values, positive: bool = False) -> bool:
    return isinstance(values, tuple) and len(values) == 3 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and (v > 0 if positive else True) for v in values)


def scale_sizes(sizes) -> bool:
    """A tuple of shorter sides: 32..2048, sorted, no repeats (what parse_scales makes; () for one centre crop)."""
    return isinstance(sizes, tuple) and all(isinstance(s, int) and not isinstance(s, bool) and 32 <= s <= 2048
                                            for s in sizes) and list(sizes) == sorted(set(sizes))


@dataclass(frozen=True)
class FeatureConfig:
    """Everything that defines the features in a cache; its hash is the cache's fingerprint.

    Device, autocast precision and decoder are recorded beside it (header.Extraction), not in it: they change
    values only at the level of float rounding, so a cache made on a GPU serves a head used on a CPU.
    Its form in a file, and what is hashed, is declared field by field in CANONICAL (below), not derived from the
    attribute names here: renaming an attribute never changes an existing cache's fingerprint.
    """

    weights_id: str  # "torchvision:<enum>", "sha256:<hex of the file>" or "random:seed=0,torch=<version>"
    pool: str
    image_size: int
    resize_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    antialias: bool = True
    dtype: str = "float16"
    backbone: str = "torchvision.models.vgg16.features"
    flip: bool = False  # each row is the mean of the image's and its mirror's features (`extract --views flip`)
    scales: tuple[int, ...] = ()  # () : one centre crop; else the whole image at each shorter side, pooled, averaged
    layer: str = "pool5"  # a pools.LAYERS name: pool5 (the body's output) or pool4 (the input of block 5)
    augment: int = 0  # K augmented views of each training image, cached beside its row (extraction/augment.py)
    augment_seed: int = 0
    augment_recipe: str = ""  # augment.RECIPE when augment > 0: what the views are, in words

    PARAMS = {
        "weights_id": Satisfies(lambda w: isinstance(w, str) and w.split(":")[0] in ("torchvision", "sha256", "random"),
                                "torchvision:..., sha256:... or random:..."),
        "pool": OneOf(tuple(pools.POOLS)), "image_size": Interval(int, 32, 1024), "resize_size": Interval(int, 32, 4096),
        "mean": Satisfies(_three_numbers, "three numbers"),
        "std": Satisfies(lambda m: _three_numbers(m, positive=True), "three positive numbers"),
        "interpolation": Satisfies(lambda t: isinstance(t, str), "a text"), "antialias": BOOLEAN,
        "dtype": OneOf(DTYPES), "backbone": Satisfies(lambda t: isinstance(t, str), "a text"),
        "flip": BOOLEAN, "scales": Satisfies(scale_sizes, SCALES_EXPECTED),
        "layer": OneOf(tuple(pools.LAYERS)), "augment": Interval(int, 0, 64), "augment_seed": Interval(int, 0, 2**32 - 1),
        "augment_recipe": Satisfies(lambda t: isinstance(t, str), "a text"),
    }

    def __post_init__(self):
        validate(self)

    @property
    def is_map(self) -> bool:
        """The cache holds the layer's map itself (`extract --pool map`): rows are pooled at head time."""
        return pools.get(self.pool).keeps_map

    @property
    def feeds_block5(self) -> bool:
        """The cache holds the map of the input of block 5 (`extract --layer pool4 --pool map`): the block5 head's."""
        return self.is_map and pools.LAYERS[self.layer].feeds_block5

    @property
    def map_side(self) -> int:
        return pools.map_side(self.image_size, self.layer)

    @property
    def feature_dim(self) -> int:
        return pools.get(self.pool).dim(VGG16_CHANNELS, self.map_side)

    @property
    def map_shape(self) -> tuple[int, int, int] | None:
        """(C, h, w) of a row of a map cache, else None."""
        return (VGG16_CHANNELS, self.map_side, self.map_side) if self.is_map else None

    def pooled_dim(self, pool: str | None) -> int:
        """Size of this cache's rows once pooled by `pool` at head time (None: the rows as stored)."""
        return self.feature_dim if pool is None else pools.get(pool).dim(VGG16_CHANNELS, self.map_side)

    def pooled_name(self, pool: str | None) -> str:
        """The pooling a head's rows have: `pool` applied at head time, or the cache's own (None)."""
        return pool or self.pool

    def head_pooling(self, pool: str | None):
        """Rows of this (map) cache -> rows pooled by `pool` (a pools.HEAD_POOLS name); None: the rows as they are."""
        if pool is None:
            return None
        if not self.is_map:
            raise ValueError(f"only a map cache is pooled at head time; this one holds {self.pool}")
        return pools.from_map(pool, VGG16_CHANNELS, self.map_side)

    def to_dict(self) -> dict:
        """The canonical form, as a cache's config attribute holds it: CANONICAL's names and JSON values, a field
        added since schema 1 left out at its default, so every cache made before it keeps its fingerprint."""
        out = {}
        for c in CANONICAL:
            value = c.to_json(getattr(self, c.attribute))
            if c.since_schema_1 or value != c.to_json(c.default):
                out[c.name] = value
        return out

    @classmethod
    def parse(cls, d: dict, what: str) -> "FeatureConfig":
        """`from_dict` for a config read from a file: one UserError naming `what` when it is not one."""
        try:
            return cls.from_dict(d)
        except (TypeError, KeyError, ValueError, UserError) as e:
            raise UserError(f"{what} is not an extractor config this vggcache knows ({e})") from None

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureConfig":
        """The canonical form back (`to_dict`), every value validated; unknown or missing names are refused."""
        if not isinstance(d, dict):
            raise TypeError(f"expected a JSON object, found {type(d).__name__}")
        unknown = sorted(set(d) - {c.name for c in CANONICAL})
        if unknown:
            raise ValueError(f"unknown field {unknown[0]!r}")
        values = {}
        for c in CANONICAL:
            if c.name in d:
                values[c.attribute] = c.from_json(d[c.name])
            elif c.since_schema_1 and c.default is REQUIRED:
                raise KeyError(c.name)
        return cls(**values)

    def fingerprint(self) -> str:
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]

    def changes_from(self, stored: dict) -> dict:
        """What differs between a config as a cache stores it (perhaps one this version cannot read) and this one:
        name -> (theirs, ours), a name left out of either shown at its default; values as JSON holds them."""
        defaults = {c.name: c.to_json(c.default) for c in CANONICAL if c.default is not REQUIRED}
        ours, theirs = json.loads(json.dumps(self.to_dict())), json.loads(json.dumps(stored))
        names = sorted(set(ours) | set(theirs), key=lambda k: (k not in ours, k))
        values = {k: (theirs.get(k, defaults.get(k)), ours.get(k, defaults.get(k))) for k in names}
        return {k: (a, b) for k, (a, b) in values.items() if a != b}


REQUIRED = object()


def _same(value):
    return value


def _as_tuple(value):
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"expected a list, found {json.dumps(value)[:40]}")
    return tuple(value)


def _flip_from(views):
    if views not in VIEWS:
        raise ValueError(f"views {views!r} is not one of {', '.join(VIEWS)}")
    return views == "flip"


@dataclass(frozen=True)
class Canonical:
    """How one FeatureConfig attribute is named and written in a cache's config (and so in its fingerprint).

    `name` never changes once a cache holds it: an attribute may be renamed in code, its canonical name stays.
    A field added after schema 1 (`since_schema_1=False`) is written only when it differs from its `default`.
    """

    attribute: str
    name: str
    default: object = REQUIRED
    since_schema_1: bool = True
    to_json: Callable = _same
    from_json: Callable = _same


VIEWS = ("none", "flip")  # the words of `extract --views` and of a config's "views"


CANONICAL = (
    Canonical("weights_id", "weights"),
    Canonical("pool", "pool"),
    Canonical("image_size", "image_size"),
    Canonical("resize_size", "resize_size"),
    Canonical("mean", "mean", IMAGENET_MEAN, to_json=list, from_json=_as_tuple),
    Canonical("std", "std", IMAGENET_STD, to_json=list, from_json=_as_tuple),
    Canonical("interpolation", "interpolation", "bilinear"),
    Canonical("antialias", "antialias", True),
    Canonical("dtype", "dtype", "float16"),
    Canonical("backbone", "backbone", "torchvision.models.vgg16.features"),
    # added after schema 1: left out at their default
    Canonical("flip", "views", False, False, lambda flip: VIEWS[bool(flip)], _flip_from),
    Canonical("scales", "scales", (), False, list, _as_tuple),
    Canonical("layer", "layer", "pool5", False),
    Canonical("augment", "augment", 0, False),
    Canonical("augment_seed", "augment_seed", 0, False),
    Canonical("augment_recipe", "augment_recipe", "", False),
)


FeatureConfig.OPTIONS = {c.attribute: c.name for c in CANONICAL}  # a bad value is named as the file names it


def generated_config(pool: str = "avg", image_size: int = 224, **fields) -> FeatureConfig:
    """The FeatureConfig of a cache whose rows were generated, not extracted (tests, benchmarks): no weights behind
    it (`random:generated`), so no model can rebuild it."""
    resize = round(image_size * IMAGENET_RESIZE / IMAGENET_CROP)
    return FeatureConfig(weights_id="random:generated", pool=pool, image_size=image_size, resize_size=resize, **fields)
