"""run.json, typed (`RunRecord`): what was trained on what, what the sweep found, and the numbers to refuse
foreign features; read back field by field, every type checked, one line naming the first that is wrong.
"""

from __future__ import annotations

import json
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path

from pipeline.cache import pools
from pipeline.cache.identity import FeatureConfig
from pipeline.errors import UserError
from pipeline.heads.registry import HEADS
from pipeline.params import is_json_of

RUN_SCHEMA_VERSION = 2  # 1: the head was a joblib pickle, never loaded since (it could run code)


@dataclass(frozen=True)
class FeatureSource:
    """The cache a head was trained on: enough to refuse foreign features and to rebuild the extractor."""

    path: str
    fingerprint: str
    config: dict
    class_names: list
    weights_file: typing.Optional[str]
    precision: typing.Optional[str]


@dataclass(frozen=True)
class HeadRecord:
    kind: str
    config: dict  # the HeadConfig the user asked for
    params: dict  # constructor arguments of the chosen head
    chosen: dict  # swept hyperparameter -> chosen value, and the norm and pooling the head trained on
    converged: bool
    # "pooling/norm" -> how its candidates were fitted and why (logreg: heads/logreg.py's choose_method); empty for
    # the heads with one way to fit, and in a run made before it was recorded
    methods: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SplitsRecord:
    train: str
    val: str  # a split name, or how it was held out of train
    test: typing.Optional[str]
    n_train: int
    n_val: int
    views_per_image: int = 0  # augmented views of each training image trained on beside it (`extract --augment`)


@dataclass(frozen=True)
class Timings:
    """Where a train-head's time went (the rest of the command's wall time: starting Python, importing)."""

    load_seconds: float  # opening the cache, planning the loading, importing what the fit needs
    fit_seconds: float  # reading and pooling the splits, the sweep, scoring validation, the refit
    score_seconds: typing.Optional[float] = None  # test scores, the mistakes, the reference (None: an older run)
    save_seconds: typing.Optional[float] = None  # the run folder: head, metrics, sheets, pictures, report page


@dataclass(frozen=True)
class LoadingRecord:
    """The loading plan (loading.LoadPlan) as it was decided, with the reason of each decision."""

    mode: str  # "memory" | "stream": the features were loaded, or read from the file as the head trained
    budget_bytes: int
    needed_bytes: int  # what loading them would take
    pools: list = field(default_factory=list)  # the head-time poolings swept ([None]: the rows as stored)
    views_per_image: int = 0
    refit: bool = False
    reasons: dict = field(default_factory=dict)  # pools, mode, views, refit -> why

    def problem(self) -> str | None:
        """What is wrong with a record read from a file, or None."""
        if self.mode not in ("memory", "stream"):
            return f"loading.mode is {self.mode!r}, expected memory or stream"
        if min(self.budget_bytes, self.needed_bytes, self.views_per_image) < 0:
            return "loading holds a negative size"
        if not all(p is None or p in pools.HEAD_POOLS for p in self.pools):
            return f"loading.pools are not head-time poolings ({', '.join(pools.HEAD_POOLS)})"
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.reasons.items()):
            return "loading.reasons is not an object of texts"
        return None


@dataclass(frozen=True)
class RunRecord:
    """run.json: written last, so a folder that has it is complete."""

    name: str
    created: str
    head: HeadRecord
    sweep: list
    splits: SplitsRecord
    timings: Timings
    features: FeatureSource
    versions: dict
    head_file: str
    head_sha256: str
    loading: typing.Optional[LoadingRecord] = None
    pool: typing.Optional[str] = None  # the pooling applied at head time to a map cache's rows; None: rows as stored
    refit: bool = False  # the saved head was fitted again on train + val after the choice (test scores that head)
    schema_version: int = RUN_SCHEMA_VERSION

    def to_json(self) -> str:
        data = asdict(self)
        _rename_head_params(data, CODE_TO_FILE)
        return json.dumps(data, indent=2)

    @classmethod
    def from_json(cls, text: str, where: Path) -> "RunRecord":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{where} is not valid JSON ({e})") from None
        if not isinstance(data, dict) or data.get("schema_version") != RUN_SCHEMA_VERSION:
            version = data.get("schema_version") if isinstance(data, dict) else None
            hint = ": it was made by an older vggcache, retrain it" if version == 1 else ""
            raise UserError(f"{where} is not a vggcache run of schema {RUN_SCHEMA_VERSION} (schema_version {version!r}){hint}")
        _rename_head_params(data, FILE_TO_CODE, where)
        record = _build(cls, data, "run.json", where)
        if record.head.kind not in HEADS:
            raise UserError(f"{where}: head kind {record.head.kind!r} is not one of {', '.join(HEADS)}")
        problem = record.loading.problem() if record.loading else None
        if problem:
            raise UserError(f"{where} is damaged: {problem}")
        if record.pool is not None and (record.pool not in pools.HEAD_POOLS or not parsed(record, where).is_map):
            raise UserError(f"{where} is damaged: pool {record.pool!r} is not one of {', '.join(pools.HEAD_POOLS)} "
                            "applied to a map cache")
        return record


# Head parameters whose name in run.json is not their name in code: run.json keeps the name it always had, so that
# every vggcache reads every run (the option and the code say --patience / patience).
CODE_TO_FILE = {"patience": "n_iter_no_change"}
FILE_TO_CODE = {v: k for k, v in CODE_TO_FILE.items()}


def _rename_head_params(data, names: dict, where: Path | None = None) -> None:
    """Rename, in place, the head parameters of a run.json object (head.config, head.params, every sweep row's
    params) by `names`; reading (`where` given), a file holding both names of one parameter is damaged."""
    head = data.get("head") if isinstance(data, dict) else None
    sweep = data.get("sweep") if isinstance(data, dict) else None
    parts = [head.get(part) for part in ("config", "params")] if isinstance(head, dict) else []
    parts += [row.get("params") for row in sweep if isinstance(row, dict)] if isinstance(sweep, list) else []
    for values in (p for p in parts if isinstance(p, dict)):
        for old, new in names.items():
            if old in values and new in values and where is not None:
                raise UserError(f"{where} is damaged: head parameters hold both {old!r} and {new!r}")
            if old in values:
                values[new] = values.pop(old)


def file_params(params: dict) -> dict:
    """Head parameters under the names run.json gives them (what `runs --json` shows)."""
    return {CODE_TO_FILE.get(k, k): v for k, v in params.items()}


def parsed(record: RunRecord, where: Path) -> FeatureConfig:
    """The extractor config of a run, checked against its recorded fingerprint: an edited config is refused."""
    fcfg = FeatureConfig.parse(record.features.config, f"{where} is damaged: features.config")
    if fcfg.fingerprint() != record.features.fingerprint:
        raise UserError(f"{where} is damaged: features.config hashes to {fcfg.fingerprint()}, "
                        f"not to the recorded fingerprint {record.features.fingerprint}")
    return fcfg


def _build(cls, data, name: str, where: Path):
    """A dataclass from JSON, checking every field's type; one line naming the first field that is wrong."""
    if not isinstance(data, dict):
        raise UserError(f"{where} is damaged: {name} is not an object")
    hints, values = typing.get_type_hints(cls), {}
    for f in fields(cls):
        if f.name not in data:
            if f.default is not MISSING or f.default_factory is not MISSING:
                continue
            raise UserError(f"{where} is damaged: {name}.{f.name} is missing")
        values[f.name] = _typed(hints[f.name], data[f.name], f"{name}.{f.name}", where)
    return cls(**values)


def _typed(kind, value, name: str, where: Path):
    options = typing.get_args(kind) if typing.get_origin(kind) is typing.Union else (kind,)
    if value is None and type(None) in options:
        return None
    expected = next(t for t in options if t is not type(None))
    if is_dataclass(expected):
        return _build(expected, value, name, where)
    if not is_json_of(expected, value):
        raise UserError(f"{where} is damaged: {name} is {json.dumps(value)[:40]}, expected {expected.__name__}")
    return value


def describe_chosen(chosen: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in chosen.items())
