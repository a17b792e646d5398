"""Every stage's frozen config, validated where it is built (defaults live here once), and the fingerprint that
names what a feature cache holds."""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import re
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path

from pipeline import pools
from pipeline.augment import RECIPE
from pipeline.errors import UserError
from pipeline.heads import HEADS, NORMS
from pipeline.params import Interval, OneOf, Optional, Satisfies, validate

POOLS = tuple(pools.POOLS)
DTYPES = ("float16", "float32")
DEVICES = ("auto", "cpu", "cuda", "mps")
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


@dataclass(frozen=True)
class FeatureConfig:
    """Everything that defines the features in a cache; its hash is the cache's fingerprint.

    Device, autocast precision and decoder are recorded beside it (`extraction`), not in it: they change
    values only at the level of float rounding, so a cache made on a GPU serves a head used on a CPU.
    """

    weights: str  # "torchvision:<enum>", "sha256:<hex of the file>" or "random:seed=0,torch=<version>"
    pool: str
    image_size: int
    resize_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    antialias: bool = True
    dtype: str = "float16"
    backbone: str = "torchvision.models.vgg16.features"
    views: str = "none"  # "flip": each row is the mean of the image's and its mirror's features
    scales: tuple[int, ...] = ()  # () : one centre crop; else the whole image at each shorter side, pooled, averaged
    layer: str = "pool5"  # pool5 (the body's output) or pool4 (the input of block 5, for fine-tuning it)
    augment: int = 0  # K augmented views of each training image, cached beside its row (augment.py)
    augment_seed: int = 0
    augment_recipe: str = ""  # augment.RECIPE when augment > 0: what the views are, in words

    @property
    def map_side(self) -> int:
        return pools.map_side(self.image_size, self.layer)

    @property
    def feature_dim(self) -> int:
        return pools.get(self.pool).dim(VGG16_CHANNELS, self.map_side)

    @property
    def map_shape(self) -> tuple[int, int, int] | None:
        """(C, h, w) of a row of a map cache (`pool == "map"`), else None."""
        return (VGG16_CHANNELS, self.map_side, self.map_side) if self.pool == "map" else None

    def pooled_dim(self, pool: str) -> int:
        """Size of this (map) cache's rows once pooled by `pool` at head time."""
        return pools.get(pool).dim(VGG16_CHANNELS, self.map_side)

    def head_pooling(self, pool: str | None):
        """Rows of this (map) cache -> rows pooled by `pool` (a pools.HEAD_POOLS name); None: the rows as they are."""
        if pool is None:
            return None
        if self.pool != "map":
            raise ValueError(f"only a map cache is pooled at head time; this one holds {self.pool}")
        return pools.from_map(pool, VGG16_CHANNELS, self.map_side)

    def to_dict(self) -> dict:
        """The canonical form: a field added since schema 1 is left out at its default, so every cache made before
        it keeps its fingerprint."""
        d = asdict(self)
        for name, default in LATER_FIELD_DEFAULTS.items():
            if d[name] == default:
                del d[name]
        if "scales" in d:
            d["scales"] = list(d["scales"])  # as JSON reads it back
        return d

    @classmethod
    def parse(cls, d: dict, what: str) -> "FeatureConfig":
        """`from_dict` for a config read from a file: one UserError naming `what` when it is not one."""
        try:
            return cls.from_dict(d)
        except (TypeError, KeyError, ValueError) as e:
            raise UserError(f"{what} is not an extractor config this vggcache knows ({e})") from None

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureConfig":
        d = dict(d)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        d["scales"] = tuple(d.get("scales", ()))
        return cls(**d)

    def fingerprint(self) -> str:
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]


LATER_FIELD_DEFAULTS = {"views": "none", "scales": (), "layer": "pool5", "augment": 0, "augment_seed": 0, "augment_recipe": ""}
LAYERS = tuple(pools.LAYER_STRIDES)
VIEWS = ("none", "flip")


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
    views: str = "none"
    scales: str = ""  # "256,384,512": the whole image at each shorter side (see FeatureConfig.scales)
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
        "views": OneOf(VIEWS),
        "layer": OneOf(LAYERS),
        "augment": Interval(int, 0, 64),
        "augment_seed": Interval(int, 0, 2**32 - 1),
        "scales": Satisfies(lambda s: parse_scales(s) is not None, "sizes from 32 to 2048 without repeats, e.g. 256,384,512"),
    }

    def __post_init__(self):
        validate(self)
        if self.pool == "map" and (self.views != "none" or self.scale_sizes):
            raise UserError("--pool map keeps one centre-crop view: --views and --scales need a pooled --pool "
                            f"({', '.join(pools.HEAD_POOLS)})")
        if self.augment and self.scale_sizes:
            raise UserError("--augment caches crops at --image-size, and --scales whole images: use one of them")

    @property
    def scale_sizes(self) -> tuple[int, ...]:
        return parse_scales(self.scales)

    @property
    def shard_part(self) -> tuple[int, int] | None:
        return _shard_part(self.shard) if self.shard is not None else None


def _shard_part(text: str) -> tuple[int, int] | None:
    """'I/N' -> (I, N) when 0 <= I < N; None for anything else."""
    match = re.fullmatch(r"(\d{1,6})/(\d{1,6})", text.strip())
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
    n_iter_no_change: int | None = None
    freeze_convs: int = 0  # block5: how many of conv5_1..conv5_3 stay frozen
    weights: str | None = None  # block5: the weights file, when the cache's has moved (checked by its hash)
    validation_fraction: float = 0.1
    seed: int = 0
    device: str = "auto"

    PARAMS = {
        "kind": OneOf(tuple(HEADS)), "C": Optional(POSITIVE), "k": Optional(Interval(int, 1, 1 << 20)),
        "norm": Optional(OneOf(NORMS + ("auto",))), "hidden": Interval(int, 0, 1 << 16),
        "dropout": Interval(float, 0, 1, open_high=True), "lr": Optional(POSITIVE),
        "weight_decay": Optional(Interval(float, 0, None)), "epochs": Optional(Interval(int, 1, 100_000)),
        "batch_size": Optional(Interval(int, 1, 1 << 20)), "n_iter_no_change": Optional(Interval(int, 1, 100_000)),
        "freeze_convs": Interval(int, 0, 3),
        "validation_fraction": Interval(float, 0, 1, open_low=True, open_high=True),
        "seed": Interval(int, 0, 2**32 - 1), "device": OneOf(DEVICES),
    }
    OPTIONS = {"kind": "--head", "n_iter_no_change": "--patience", "validation_fraction": "--early-stop-fraction"}
    SWEPT = ("C", "k", "lr", "weight_decay")  # each belongs to the heads whose grid has it

    def __post_init__(self):
        validate(self)
        spec = HEADS[self.kind]
        foreign = [name for name in self.SWEPT
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

    PARAMS = {"val_fraction": Interval(float, 0, 1, open_low=True, open_high=True),
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

    PARAMS = {"method": OneOf(("pca", "tsne")), "seed": Interval(int, 0, 2**32 - 1),
              "out": Optional(Satisfies(lambda p: Path(p).suffix.lower() in (".png", ".svg", ".pdf"),
                                        "a file name ending in .png, .svg or .pdf"))}

    def __post_init__(self):
        validate(self)

    @property
    def png_path(self) -> Path:
        return Path(self.out) if self.out else Path(f"{self.features}.map.png")


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


def feature_config(weights: str, pool: str, image_size: int, dtype: str, views: str = "none",
                   scales: tuple[int, ...] = (), layer: str = "pool5", augment: int = 0,
                   augment_seed: int = 0) -> FeatureConfig:
    """The feature definition for these options; resize keeps torchvision's 256/224 ratio at any crop size."""
    resize = round(image_size * IMAGENET_RESIZE / IMAGENET_CROP)
    return FeatureConfig(weights=weights_identity(weights), pool=pool, image_size=image_size, resize_size=resize,
                         dtype=dtype, views=views, scales=tuple(scales), layer=layer, augment=augment,
                         augment_seed=augment_seed if augment else 0, augment_recipe=RECIPE if augment else "")


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
