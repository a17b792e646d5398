"""A run folder (models/NAME): its typed record, and the one place that writes, reads and lists run folders.

    run.json              RunRecord (schema_version 2): head, sweep (the whole validation curve), splits, timings,
                          the features' identity, the head-time pooling of a map cache, whether it was refit
    head.npz              the head's learned arrays (read with allow_pickle=False)
    metrics.json          split -> metrics (see metrics.py)
    report.txt            the metrics as tables
    confusion_matrix.png  test, else val
    sweep.png             validation accuracy against the first swept hyperparameter, the choice marked
    errors.csv            every misclassified validation (and test) image: true, predicted, probability
    errors.png            the most confident of them as thumbnails (gallery.py)
    reference.npz         what predict --report compares new images with (drift.py)

What a run folder is trusted for: it is data, never code. Loading one parses JSON and reads numeric arrays with
`allow_pickle=False`; the only file it names, the head, must be a plain file inside the folder. The sha256 in
run.json catches a damaged or swapped head file, not a deliberate edit (whoever can write the folder can write the
hash too): a run from someone else can give wrong predictions, but it cannot run code on your machine.
"""

from __future__ import annotations

import functools
import json
import logging
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pipeline import drift, files, gallery, plots, pools, report
from pipeline.files import printable
from pipeline.config import FeatureConfig, HeadConfig, library_versions, sha256_file
from pipeline.errors import UserError
from pipeline.heads import HEAD_FILE, HEADS, full_proba, load_head, save_head
from pipeline.metrics import format_metrics
from pipeline.params import is_json_of

log = logging.getLogger(__name__)

RUN_SCHEMA_VERSION = 2  # 1: the head was a joblib pickle, never loaded since (it could run code)
RUN_FILE, METRICS_FILE, REPORT_FILE, CONFUSION_FILE = "run.json", "metrics.json", "report.txt", "confusion_matrix.png"
SWEEP_FILE = "sweep.png"


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
    load_seconds: float
    fit_seconds: float


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

    @classmethod
    def of(cls, plan) -> "LoadingRecord":
        return cls(mode=plan.mode, budget_bytes=plan.budget_bytes, needed_bytes=plan.needed_bytes,
                   pools=list(plan.pools), views_per_image=plan.views_per_image, refit=plan.refit,
                   reasons=dict(plan.reasons))


@dataclass(frozen=True)
class TrainedRun:
    """What train-head knows of a run when it saves it: every RunRecord field but those `save_run` adds."""

    head: HeadRecord
    sweep: list
    splits: SplitsRecord
    timings: Timings
    features: FeatureSource
    loading: LoadingRecord
    pool: typing.Optional[str]
    refit: bool


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
        if record.pool is not None and (record.pool not in pools.HEAD_POOLS or not _parsed(record, where).is_map):
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


def _parsed(record: RunRecord, where: Path) -> FeatureConfig:
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


@dataclass
class Run:
    """A loaded run folder."""

    folder: Path
    record: RunRecord
    metrics: dict

    @property
    def class_names(self) -> list[str]:
        return self.record.features.class_names

    @property
    def fingerprint(self) -> str:
        return self.record.features.fingerprint

    @functools.cached_property
    def feature_config(self) -> FeatureConfig:
        """The extractor config (parsed once), checked against the recorded fingerprint: an edited one is refused."""
        return _parsed(self.record, self.folder / RUN_FILE)

    def check_features(self, header, path: Path) -> None:
        """The one check that a cache holds this run's features: the fingerprints must be equal (a head refuses
        features of any other extractor config)."""
        if header.fingerprint != self.fingerprint:
            raise UserError(f"{path} was made by extractor config {header.fingerprint} "
                            f"{json.dumps(header.config_dict, sort_keys=True)}, but run {self.folder.name} was trained "
                            f"on {self.fingerprint} {json.dumps(self.record.features.config, sort_keys=True)}: it "
                            "was trained on features of another extractor config; use its cache, or extract with its config")

    def head_pooling(self):
        """What turns the cache's rows into the head's inputs: the run's pooling of a map cache, else None."""
        return None if self.record.pool is None else self.feature_config.head_pooling(self.record.pool)

    def predict_features(self, rows: np.ndarray) -> np.ndarray:
        """Probabilities over the run's classes of rows as its cache stores them (pooled here as the head pools a
        map), one row per image."""
        pooling = self.head_pooling()
        rows = np.asarray(rows, np.float32)
        return full_proba(self.load_head(), pooling(rows) if pooling else rows, len(self.class_names))

    def predict_images(self, paths, top_k: int = 3, **options) -> list[dict]:
        """`predict` on image files or folders (options: weights, batch_size, workers, device, precision): one row
        per image, as the CSV has them (`proba` holds every class's probability)."""
        from pipeline.config import PredictConfig
        from pipeline.predict import predict

        return predict(PredictConfig(run=self.folder, images=tuple(map(Path, paths)), top_k=top_k, **options),
                       quiet=True)

    def load_head(self):
        """The head, from a plain file inside the folder whose sha256 matches run.json."""
        path = _inside(self.folder, self.record.head_file)
        if sha256_file(path) != self.record.head_sha256:
            raise UserError(f"{path} does not match the sha256 in {self.folder / RUN_FILE}: the file was changed or damaged")
        head_cfg = self._checked_params()
        try:
            head = load_head(head_cfg.kind, self.record.head.params, path)
        except (ValueError, KeyError, OSError, TypeError) as e:
            raise UserError(f"{path} is not a {self.record.head.kind} head saved by vggcache ({type(e).__name__}: {e})") from None
        self._check_shape(head)
        return head

    def _checked_params(self) -> HeadConfig:
        """The head's constructor arguments, checked by the constraints train-head checks them with."""
        params = self.record.head.params
        try:
            return HeadConfig(kind=self.record.head.kind, **params)
        except (UserError, TypeError) as e:
            raise UserError(f"{self.folder / RUN_FILE} is damaged: head.params {json.dumps(params)[:80]} ({e})") from None

    def _check_shape(self, head) -> None:
        """Inputs of the size the features give (pooled as the run says), outputs of the run's classes."""
        if self.feature_config.is_map and self.record.pool is None and not HEADS[self.record.head.kind].takes_map:
            raise UserError(f"{self.folder / RUN_FILE} is damaged: the run was trained on a map cache but names no pool")
        dim = self.feature_config.pooled_dim(self.record.pool) if self.record.pool else None
        if dim is not None and head.n_features_in_ != dim:
            raise UserError(f"{self.folder / RUN_FILE} is damaged: its head takes {head.n_features_in_} features, "
                            f"pool {self.record.pool} gives {dim}")
        if int(np.max(head.classes_)) >= len(self.class_names):
            raise UserError(f"{self.folder / HEAD_FILE} is damaged: its classes go beyond the run's "
                            f"{len(self.class_names)} class names")


def _inside(folder: Path, name: str) -> Path:
    """`folder/name` when `name` is a plain file name of a regular file that really lies in `folder`."""
    if name != HEAD_FILE:
        raise UserError(f"{folder / RUN_FILE} names head file {name!r}; a run's head is always {HEAD_FILE} in its folder")
    path = folder / name
    if path.is_symlink() or not path.is_file():
        raise UserError(f"run {folder} is missing its head file {name} (or it is not a regular file)")
    return path


RUN_FILES = (HEAD_FILE, METRICS_FILE, REPORT_FILE, CONFUSION_FILE, SWEEP_FILE, gallery.ERRORS_CSV, gallery.ERRORS_PNG,
             drift.REFERENCE_FILE, report.REPORT_HTML, RUN_FILE)


def ensure_free(folder: Path) -> None:
    """Fail before the fit, not after it: the folder must not hold a run, and must be writable."""
    folder = Path(folder)
    if (folder / RUN_FILE).exists():
        raise UserError(f"{folder} already holds a run; choose another --out")
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--out {folder} is a file, expected a folder")
    blocked = [name for name in RUN_FILES if (folder / name).exists() and not (folder / name).is_file()]
    if blocked:
        raise UserError(f"--out {folder} holds {blocked[0]}, which is not a file: remove it or choose another --out")
    files.ensure_writable_dir(folder if folder.exists() else folder.parent, "--out")


def save_run(folder: Path, head, trained: TrainedRun, metrics: dict, errors: tuple | None = None,
             reference: dict | None = None) -> Run:
    """Write the head, metrics.json, report.txt, the confusion matrix and (given `errors`: the mistakes and the
    dataset root their paths are relative to) errors.csv and errors.png, the drift reference (drift.py) when
    given, then run.json last.

    `trained` holds the RunRecord fields known to the caller; the name, time, versions and head file are added here.
    """
    folder = Path(folder)
    ensure_free(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        head_path = save_head(head, folder)
        (folder / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
        note = selection_note(len(trained.sweep), metrics)
        write_reports(folder, metrics, trained.features.class_names, note)
        _plot_sweep(folder, trained.head, trained.sweep)
        if errors is not None:
            gallery.write_errors(folder, errors[0], errors[1], f"{folder.name} ({' + '.join(metrics)})")
        if reference is not None:
            drift.save(folder, reference)
        full = RunRecord(name=folder.name, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                         versions=library_versions(), head_file=head_path.name, head_sha256=sha256_file(head_path),
                         **{f.name: getattr(trained, f.name) for f in fields(TrainedRun)})
        report.write(Run(folder, full, metrics), note)
        (folder / RUN_FILE).write_text(full.to_json())
    except BaseException as e:
        for name in RUN_FILES:  # no half-written run left behind
            (folder / name).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise UserError(f"cannot write the run into {folder} ({e.strerror or e})") from None
        raise
    return Run(folder, full, metrics)


def write_reports(folder: Path, metrics: dict, class_names: list[str], note: str | None = None) -> None:
    """report.txt for every split scored (and `note`, the selection caveat), confusion_matrix.png for test (or val
    when there is no test)."""
    name = printable(folder.name)
    text = "\n\n".join(format_metrics(m, f"{name} on {split}") for split, m in metrics.items())
    text += f"\n\n{note}" if note else ""
    (folder / REPORT_FILE).write_text(printable(text) + "\n", encoding="utf-8")
    shown = "test" if "test" in metrics else "val"
    plots.plot_confusion(metrics[shown]["confusion_matrix"], [printable(c) for c in class_names], folder / CONFUSION_FILE,
                         f"{name} ({shown})")


def _plot_sweep(folder: Path, head: HeadRecord, table: list[dict]) -> None:
    """sweep.png: validation accuracy against the head's first swept hyperparameter, a line per other setting."""
    x_name, *others = (*HEADS[head.kind].swept, "norm")
    lines: dict[str, list[tuple[float, float]]] = {}
    for row in table:
        label = describe_chosen({"pool": row["pool"]} | {k: row["params"][k] for k in others if k in row["params"]})
        lines.setdefault(label, []).append((row["params"][x_name], row["val_accuracy"]))
    best = next(row for row in table if row["params"] == head.params and row["pool"] == head.chosen["pool"])
    plots.plot_sweep(lines, x_name, (best["params"][x_name], best["val_accuracy"]), folder / SWEEP_FILE,
                     f"{printable(folder.name)}: {head.kind} on validation")


def describe_chosen(chosen: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in chosen.items())


def load_run(folder: Path) -> Run:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"run folder not found: {folder}")
    for name in (RUN_FILE, METRICS_FILE):
        if not (folder / name).is_file():
            raise UserError(f"run {folder} is missing {name}")
    record = RunRecord.from_json((folder / RUN_FILE).read_text(errors="replace"), folder / RUN_FILE)
    try:
        metrics = json.loads((folder / METRICS_FILE).read_text(errors="replace"))
    except json.JSONDecodeError as e:
        raise UserError(f"{folder / METRICS_FILE} is not valid JSON ({e})") from None
    if not isinstance(metrics, dict) or not all(isinstance(m, dict) for m in metrics.values()):
        raise UserError(f"{folder / METRICS_FILE} is damaged: expected an object of split -> metrics")
    return Run(folder, record, metrics)


def selection_note(n_candidates: int, metrics: dict) -> str | None:
    """When no split was kept out of every choice (no test split), the reported score is the one the sweep chose
    by, optimistic: a sentence saying so, and by about how much it could be; None when a test split scored the run.

    The bound is the expected maximum of N noisy estimates of one accuracy p on n images: sqrt(p (1 - p) / n) times
    sqrt(2 ln N), for N independent candidates (correlated candidates, the usual case, are less optimistic)."""
    if "test" in metrics or not n_candidates or "val" not in metrics:
        return None
    n, p = metrics["val"].get("n", 0), metrics["val"].get("accuracy", 0.0)
    bound = (p * (1 - p) / max(n, 1)) ** 0.5 * (2 * np.log(max(n_candidates, 2))) ** 0.5 * 100
    return (f"no test split: the validation score is the selection score (the best of {n_candidates} candidates on "
            f"{n} images), optimistic by up to ~{bound:.1f} points; keep a test split out of every choice for an "
            "unbiased one")


SORT_KEYS = {"test": lambda r: (r["test_accuracy"] is None, -(r["test_accuracy"] or 0), -r["val_accuracy"], r["name"]),
             "val": lambda r: (-r["val_accuracy"], -r["val_macro_f1"], r["name"]),
             "fit": lambda r: (r["fit_seconds"], r["name"]), "name": lambda r: r["name"]}


def list_runs(models_dir: Path, features: str | None = None, head: str | None = None, sort: str = "test") -> list[dict]:
    """One row per complete run under `models_dir` (of cache file name `features`, of head kind `head`): by
    default the best test accuracy first (a score no choice saw), then runs without a test split by validation."""
    models_dir = Path(models_dir)
    if not models_dir.is_dir():
        raise UserError(f"models folder not found: {models_dir}")
    if sort not in SORT_KEYS:
        raise UserError(f"--sort {sort!r} is not valid (expected one of {', '.join(SORT_KEYS)})")
    rows = []
    for path in sorted(models_dir.glob(f"*/{RUN_FILE}")):
        try:
            rows.append(_row(load_run(path.parent)))
        except UserError as e:
            log.warning("skipping %s", e)
    rows = [r for r in rows if (features is None or features in r["features"]) and (head is None or r["head"] == head)]
    return sorted(rows, key=SORT_KEYS[sort])


def _row(run: Run) -> dict:
    val, test = run.metrics.get("val", {}), run.metrics.get("test", {})
    r = run.record
    return {"name": r.name, "head": r.head.kind, "chosen": r.head.chosen, "params": file_params(r.head.params),
            "features": Path(r.features.path).name, "fingerprint": run.fingerprint,
            "val_accuracy": val.get("accuracy", float("nan")), "val_macro_f1": val.get("macro_f1", float("nan")),
            "test_accuracy": test.get("accuracy"), "test_macro_f1": test.get("macro_f1"),
            "fit_seconds": r.timings.fit_seconds, "candidates": len(r.sweep),
            "selection_score": "test" not in run.metrics}
