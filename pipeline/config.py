"""Every stage's frozen config, validated where it is built (defaults live here once), and the fingerprint that
names what a feature cache holds."""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Callable

from pipeline import pools
from pipeline.augment import RECIPE
from pipeline.errors import UserError
from pipeline.heads import HEADS, NORMS
from pipeline.params import Interval, OneOf, Optional, Satisfies, parse_option, validate
from pipeline.tracking import TRACKERS

POOLS = tuple(pools.POOLS)
DTYPES = ("float16", "float32")
DEVICES = ("auto", "cpu", "cuda", "mps")
BOOLEAN = Satisfies(lambda v: isinstance(v, bool), "true or false")
SCALES_EXPECTED = "sizes from 32 to 2048 without repeats, e.g. 256,384,512"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DECODERS = ("cpu", "gpu")
VGG16_CHANNELS = 512
RANDOM_SEED = 0

# torchvision's VGG16_Weights.IMAGENET1K_V1.transforms(): kept here so that planning an extraction (and the
# "up to date" answer) needs no torch import; backbone.py checks them against torchvision when it loads the model.
IMAGENET_WEIGHTS = "VGG16_Weights.IMAGENET1K_V1"
IMAGENET_RESIZE, IMAGENET_CROP = 256, 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _three_numbers(values, positive: bool = False) -> bool:
    return isinstance(values, tuple) and len(values) == 3 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and (v > 0 if positive else True) for v in values)


def _scale_sizes(sizes) -> bool:
    """A tuple of shorter sides: 32..2048, sorted, no repeats (what parse_scales makes; () for one centre crop)."""
    return isinstance(sizes, tuple) and all(isinstance(s, int) and not isinstance(s, bool) and 32 <= s <= 2048
                                            for s in sizes) and list(sizes) == sorted(set(sizes))


@dataclass(frozen=True)
class FeatureConfig:
    """Everything that defines the features in a cache; its hash is the cache's fingerprint.

    Device, autocast precision and decoder are recorded beside it (store.Extraction), not in it: they change
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
    augment: int = 0  # K augmented views of each training image, cached beside its row (augment.py)
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
        "flip": BOOLEAN, "scales": Satisfies(_scale_sizes, SCALES_EXPECTED),
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

    data: Path
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
        "scales": Satisfies(_scale_sizes, SCALES_EXPECTED),
    }
    OPTIONS = {"flip": "--views"}

    def __post_init__(self):
        validate(self)
        if pools.get(self.pool).keeps_map and (self.flip or self.scales):
            raise UserError("--pool map keeps one centre-crop view: --views and --scales need a pooled --pool "
                            f"({', '.join(pools.HEAD_POOLS)})")
        if self.augment and self.scales:
            raise UserError("--augment caches crops at --image-size, and --scales whole images: use one of them")

    @property
    def shard_part(self) -> tuple[int, int] | None:
        return _shard_part(self.shard) if self.shard is not None else None


def _shard_part(text: str) -> tuple[int, int] | None:
    """'I/N' -> (I, N) when 0 <= I < N; None for anything else."""
    match = re.fullmatch(r"(\d{1,6})/(\d{1,6})", text)  # exactly I/N: no spaces, here or there
    if not match or not int(match[1]) < int(match[2]):
        return None
    return int(match[1]), int(match[2])


POSITIVE = Interval(float, 0, None, open_low=True)



@dataclass(frozen=True)
class HeadConfig:
    """Which head, and the hyperparameters fixed by the user (None: chosen by the sweep on validation)."""

    kind: str = "logreg"
    C: float | None = None
    k: int | None = None
    norm: str | None = None  # None: the head's default (HeadSpec.default_norm); "auto": swept with the rest
    hidden: int = 0
    dropout: float = 0.5
    lr: float | None = None
    weight_decay: float | None = None
    epochs: int | None = None  # None: the head's own default (HeadSpec.defaults)
    batch_size: int | None = None
    patience: int | None = None
    freeze_convs: int = 0  # block5: how many of conv5_1..conv5_3 stay frozen
    solver: str | None = None  # logreg: torch (default) or sklearn (the reference solver)
    weights: str | None = None  # block5: the weights file, when the cache's has moved (checked by its hash)
    validation_fraction: float = 0.1
    seed: int = 0
    device: str = "auto"

    PARAMS = {
        "kind": OneOf(tuple(HEADS)), "C": Optional(POSITIVE), "k": Optional(Interval(int, 1, 1 << 20)),
        "norm": Optional(OneOf(NORMS + ("auto",))), "hidden": Interval(int, 0, 1 << 16),
        "dropout": Interval(float, 0, 1, open_high=True), "lr": Optional(POSITIVE),
        "weight_decay": Optional(Interval(float, 0, None)), "epochs": Optional(Interval(int, 1, 100_000)),
        "batch_size": Optional(Interval(int, 1, 1 << 20)), "patience": Optional(Interval(int, 1, 100_000)),
        "freeze_convs": Interval(int, 0, 3), "solver": Optional(OneOf(("torch", "sklearn"))),
        "validation_fraction": Interval(float, 0, 1, open_low=True, open_high=True),
        "seed": Interval(int, 0, 2**32 - 1), "device": OneOf(DEVICES),
    }
    OPTIONS = {"kind": "--head", "validation_fraction": "--early-stop-fraction"}
    SPECIFIC = ("C", "k", "lr", "weight_decay", "solver")  # each belongs to the heads whose grid or fixed has it

    def __post_init__(self):
        validate(self)
        spec = HEADS[self.kind]
        foreign = [name for name in self.SPECIFIC
                   if getattr(self, name) is not None and name not in spec.grid and name not in spec.fixed]
        if self.norm is not None and spec.default_norm is None:
            raise UserError(f"--norm does not apply to --head {self.kind}, which takes the maps as they are")
        if foreign:
            option = "--" + foreign[0].replace("_", "-")
            owners = ", ".join(h.name for h in HEADS.values() if foreign[0] in h.grid or foreign[0] in h.fixed)
            raise UserError(f"{option} applies to --head {owners}, not to --head {self.kind} (which sweeps "
                            f"{', '.join(spec.grid)})")

    @property
    def norms(self) -> tuple[str, ...]:
        """The normalisations tried: the one asked for, all of them for "auto", else the head's default."""
        if HEADS[self.kind].default_norm is None:
            return ()
        return NORMS if self.norm == "auto" else (self.norm or HEADS[self.kind].default_norm,)

    def candidates(self) -> list[dict]:
        """The constructor arguments of every head the sweep fits: every norm x the product of the grids, with each
        hyperparameter the user fixed taking that one value."""
        spec = HEADS[self.kind]
        axes = {name: [getattr(self, name)] if getattr(self, name) is not None else list(values)
                for name, values in spec.grid.items()}
        fixed = {name: getattr(self, name) if getattr(self, name) is not None else spec.defaults.get(name)
                 for name in spec.fixed}
        norms = [{"norm": norm} for norm in self.norms] or [{}]
        return [fixed | norm | dict(zip(axes, values)) for norm in norms for values in itertools.product(*axes.values())]


@dataclass(frozen=True)
class TrainConfig:
    features: Path
    head: HeadConfig = field(default_factory=HeadConfig)
    out: Path | None = None
    models_dir: Path = Path("models")
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    val_fraction: float = 0.2  # held out of train, stratified, when the file has no validation split
    memory_budget: str | None = None  # "8G", "512M", bytes; None: half the memory available (see stream.py)
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


@dataclass(frozen=True)
class AuditConfig:
    """What `pipeline audit` was asked to check (see audit.py)."""

    features: Path
    threshold: float = 0.92  # centred cosine from which two images are near-duplicates (README: bench/near_duplicates.py)
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
class MapConfig:
    """What `pipeline map` was asked to draw (see embedding_map.py)."""

    features: Path
    run: Path | None = None  # its mistakes are ringed, and a map cache is pooled as its head pools it
    method: str = "pca"
    out: Path | None = None  # None: beside the cache, <cache>.map.png
    seed: int = 0
    force: bool = False  # replace --out even when it is not a picture
    html: Path | None = None  # an interactive page (map_page.py); then the picture only when --out asks for it

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
        return Path(self.out) if self.out else None if self.html else Path(f"{self.features}.map.png")


def parse_bytes(text: str) -> int:
    """'8G' -> 8 * 2**30; plain digits are bytes. Raises ValueError for anything else."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)I?B?\s*", str(text), re.IGNORECASE)
    if not match:
        raise ValueError(f"not a size: {text!r}")
    return int(float(match[1]) * 1024 ** " KMGT".index(match[2].upper() or " "))


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
    report: bool = False  # compare the new images with the run's training data (drift.py): one line and a PNG
    force: bool = False  # replace --out (and the report's picture) even when they are not what predict writes

    PARAMS = {"top_k": Interval(int, 1, 1 << 20), "batch_size": Interval(int, 1, 65536), "workers": Interval(int, 0, 256),
              "device": OneOf(DEVICES), "precision": OneOf(PRECISIONS)}

    def __post_init__(self):
        validate(self)
        if self.report and not self.out:
            raise UserError("--report draws its picture beside the predictions: pass --out FILE.csv too")

    @property
    def report_path(self) -> Path:
        """Where --report draws its picture: beside --out (p.csv -> p.drift.png)."""
        return Path(f"{Path(self.out).with_suffix('')}.drift.png")


@dataclass(frozen=True)
class ServeConfig:
    """What `pipeline serve` was asked to do (see serve.py)."""

    run: str
    host: str = "127.0.0.1"  # localhost only: no authentication, no TLS (put it behind a proxy for more)
    port: int = 8000
    workers: int = 1  # uvicorn worker processes, each with the run loaded
    max_request_mb: float = 32.0
    top_k: int = 3
    weights: str | None = None  # the weights file, when the run's features came from one and it has moved
    device: str = "auto"

    PARAMS = {"port": Interval(int, 1, 65535), "workers": Interval(int, 1, 64), "top_k": Interval(int, 1, 1 << 20),
              "max_request_mb": Interval(float, 0, 4096, open_low=True), "device": OneOf(DEVICES)}

    def __post_init__(self):
        validate(self)


@dataclass(frozen=True)
class EvaluateConfig:
    run: Path
    features: Path | None = None  # None: the cache the run was trained on
    split: str | None = None  # None: test, else val, else the first split

    PARAMS = {}  # nothing to constrain but the files themselves, which are checked when they are opened

    def __post_init__(self):
        validate(self)


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def weights_is_file(weights: str) -> bool:
    """A --weights spec that names a state-dict file (not imagenet or none)."""
    return weights not in ("imagenet", "none")


def weights_identity(weights: str) -> str:
    """Name the weights so that two caches compare equal only when they were made with the same numbers."""
    if weights == "imagenet":
        return f"torchvision:{IMAGENET_WEIGHTS}"
    if weights == "none":
        return f"random:seed={RANDOM_SEED},torch={version('torch')}"
    path = Path(weights)
    if not path.is_file():
        raise UserError(f"--weights {weights!r} is not 'imagenet', 'none' or an existing state-dict file")
    st = path.stat()
    return f"sha256:{_weights_sha256(str(path.resolve()), st.st_size, st.st_mtime_ns)}"


@functools.lru_cache(maxsize=8)
def _weights_sha256(path: str, size: int, mtime_ns: int) -> str:
    """Planning and model building both ask for the identity: hash a weights file (~60 MB) once per process."""
    return sha256_file(Path(path))


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


def weights_spec(identity: str, weights_file: str | None, override: str | None = None) -> str:
    """The --weights value (imagenet | none | a file) that rebuilds weights named `identity`; the caller's model
    building then checks that the file has that very hash."""
    if identity.startswith("torchvision:"):
        return "imagenet"
    if identity.startswith("random:"):
        return "none"
    path = override or weights_file
    if not path or not Path(path).is_file():
        raise UserError(f"the features were made with the weights file {identity} (recorded at {path}); "
                        "pass it with --weights PATH")
    if weights_identity(path) != identity:
        raise UserError(f"--weights {path} is {weights_identity(path)}, but the features were made with {identity}")
    return path


def library_versions() -> dict[str, str]:
    names = ("vggcache", "torch", "torchvision", "numpy", "h5py", "pillow", "scikit-learn")
    return {name: _version_or_none(name) for name in names}


def _version_or_none(name: str) -> str:
    try:
        return version(name)
    except Exception:  # not installed as a distribution (e.g. running from a source tree)
        return "unknown"
