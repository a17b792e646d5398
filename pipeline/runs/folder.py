"""A run folder (models/NAME): its layout, declared once, and the one writer and loader of a run (`RunWriter`,
`load_run`); the head writes its own arrays (heads/registry.py), and pipeline.look draws the pictures and the page
into the names declared here.

    run.json              RunRecord (schema_version 2): head, sweep (the whole validation curve), splits, timings,
                          the features' identity, the head-time pooling of a map cache, whether it was refit
    head.npz              the head's learned arrays (read with allow_pickle=False)
    metrics.json          split -> metrics (see heads/metrics.py)
    report.txt            the metrics as tables
    confusion_matrix.png  test, else val
    sweep.png             validation accuracy against the first swept hyperparameter, the choice marked
    errors.csv            every misclassified validation (and test) image: true, predicted, probability
    errors.png            the most confident of them as thumbnails (look/gallery.py)
    reference.npz         what predict --report compares new images with (reference.py)
    report.html           one self-contained page of all the above (look/report.py)

What a run folder is trusted for: it is data, never code. Loading one parses JSON and reads numeric arrays with
`allow_pickle=False`; the only file it names, the head, must be a plain file inside the folder. The sha256 in
run.json catches a damaged or swapped head file, not a deliberate edit (whoever can write the folder can write the
hash too): a run from someone else can give wrong predictions, but it cannot run code on your machine.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pipeline import files
from pipeline.cache.identity import FeatureConfig
from pipeline.errors import UserError
from pipeline.files import sha256_file
from pipeline.heads.config import HeadConfig
from pipeline.heads.metrics import format_metrics
from pipeline.heads.registry import HEAD_FILE, HEADS, full_proba, load_head, save_head
from pipeline.runs import mistakes, reference
from pipeline.runs.record import RunRecord, parsed
from pipeline.text import printable
from pipeline.versions import library_versions

RUN_FILE, METRICS_FILE, REPORT_FILE = "run.json", "metrics.json", "report.txt"
# the pictures and the page of a run, drawn by pipeline.look (pictures.py, report.py) into these names
CONFUSION_FILE, SWEEP_FILE, ERRORS_PNG, REPORT_HTML = "confusion_matrix.png", "sweep.png", "errors.png", "report.html"
RUN_FILES = (HEAD_FILE, METRICS_FILE, REPORT_FILE, CONFUSION_FILE, SWEEP_FILE, mistakes.ERRORS_CSV, ERRORS_PNG,
             reference.REFERENCE_FILE, REPORT_HTML, RUN_FILE)  # every file a run folder holds, run.json last
# made before a save's first file and removed after run.json: a folder a killed save left is still known as ours
SAVING_MARK = ".vggcache-saving"
RUN_MARKS = ("schema_version", "head", "features", "head_sha256")  # fields every run.json has had
MAX_RECORD_BYTES = 64 << 20


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
        return parsed(self.record, self.folder / RUN_FILE)

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


def is_run_folder(folder: Path) -> bool:
    """A folder train-head made: its run.json is a run record (a JSON object with a run's fields, of any schema
    version), or it holds SAVING_MARK, what a save killed before run.json leaves. Files that are only named like a
    run's (a report.html, an errors.csv, a run.json of the user's own) are not enough: they may be the user's."""
    folder = Path(folder)
    mark, path = folder / SAVING_MARK, folder / RUN_FILE
    if mark.is_file() and not mark.is_symlink():
        return True
    if path.is_symlink() or not path.is_file() or path.stat().st_size > MAX_RECORD_BYTES:
        return False
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get("schema_version"), int) and all(k in data for k in RUN_MARKS)


def ensure_free(folder: Path, force: bool = False) -> bool:
    """Fail before the fit, not after it: --out is a new folder, an empty one, or (--force) a run folder, whose
    run files alone are then replaced (files.ensure_output_folder). True when a run is there to be replaced."""
    folder = Path(folder)
    replacing = files.ensure_output_folder(folder, "--out", is_run_folder, "a run", force)
    blocked = [name for name in RUN_FILES if (folder / name).exists() and not (folder / name).is_file()]
    if blocked:
        raise UserError(f"--out {folder} holds {blocked[0]}, which is not a file: remove it or choose another --out")
    return replacing


class RunWriter:
    """Writes one run folder: `with RunWriter(folder) as w`, each file in turn, `w.commit(record)` last.

    run.json is written last, so a folder that holds it is complete; if anything fails before (an error, Ctrl-C, a
    full disk), every file of the run written so far is removed, and an OSError becomes one UserError line.
    """

    def __init__(self, folder: Path, force: bool = False):
        self.folder, self.force = Path(folder), force
        self.head_file: Path | None = None

    def __enter__(self) -> "RunWriter":
        replacing = ensure_free(self.folder, self.force)
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / SAVING_MARK).write_text("a train-head save in progress, or killed: --force replaces it\n")
        if replacing:
            for name in RUN_FILES[::-1]:  # run.json first: never a complete-looking mix of two runs
                (self.folder / name).unlink(missing_ok=True)
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if error is None:
            return
        for name in (*RUN_FILES, SAVING_MARK):  # no half-written run left behind
            (self.folder / name).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise UserError(f"cannot write the run into {self.folder} ({error.strerror or error})") from None

    def write_head(self, head) -> None:
        self.head_file = save_head(head, self.folder)

    def write_metrics(self, metrics: dict, note: str | None) -> None:
        """metrics.json, and report.txt: every split scored as tables, then `note` (the selection caveat)."""
        (self.folder / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
        name = printable(self.folder.name)
        text = "\n\n".join(format_metrics(m, f"{name} on {split}") for split, m in metrics.items())
        text += f"\n\n{note}" if note else ""
        (self.folder / REPORT_FILE).write_text(printable(text, lines=True) + "\n", encoding="utf-8")

    def write_mistakes(self, found: list[mistakes.Mistake]) -> None:
        mistakes.write_csv(self.folder, found)

    def write_reference(self, arrays: dict) -> None:
        reference.save(self.folder, arrays)

    def record(self, **fields) -> RunRecord:
        """The run's record: what the caller knows of the run (`fields`), and its name, time, versions and head."""
        if self.head_file is None:
            raise ValueError("write the head before the record")
        return RunRecord(name=self.folder.name, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                         versions=library_versions(), head_file=self.head_file.name,
                         head_sha256=sha256_file(self.head_file), **fields)

    def commit(self, record: RunRecord, metrics: dict) -> "Run":
        """run.json, last: the folder is a complete run from now on."""
        (self.folder / RUN_FILE).write_text(record.to_json())
        (self.folder / SAVING_MARK).unlink(missing_ok=True)
        return Run(self.folder, record, metrics)


def _utf8_text(path: Path) -> str:
    """A run file's text; a byte that is not UTF-8 is damage (JSON is UTF-8, and this tool writes it as ASCII), not
    something to replace with U+FFFD and carry into an export."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is damaged: byte 0x{data[e.start]:02x} at offset {e.start} is not UTF-8") from None


def load_run(folder: Path) -> Run:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"run folder not found: {folder}")
    for name in (RUN_FILE, METRICS_FILE):
        if not (folder / name).is_file():
            raise UserError(f"run {folder} is missing {name}")
    record = RunRecord.from_json(_utf8_text(folder / RUN_FILE), folder / RUN_FILE)
    try:
        metrics = json.loads(_utf8_text(folder / METRICS_FILE))
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
