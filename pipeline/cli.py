"""The command line: parse options, call one library function, print its result. No logic lives here.

Defaults are read from the config dataclasses, so they live in one place; every value is checked by its config.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from dataclasses import fields
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup

from pipeline.cache.identity import VGG16_CHANNELS, VIEWS
from pipeline.cache.pools import HEAD_POOLS, POOLS
from pipeline.errors import Interrupted, UserError, forget_interrupted_string_evals
from pipeline.extraction.config import ExtractConfig
from pipeline.heads.config import HeadConfig
from pipeline.heads.registry import HEADS
from pipeline.hub.config import ExportConfig, SimilarConfig
from pipeline.look.config import AuditConfig, ProjectionConfig
from pipeline.serve.config import PredictConfig, ServeConfig
from pipeline.text import human_bytes, printable, shortened_to
from pipeline.train.config import EvaluateConfig, TrainConfig


class _OneLineErrors(TyperGroup):
    """Usage errors (a text where a number goes, an unknown option, a missing argument) as one line and exit 2,
    like every other user error, instead of a framed usage panel."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except Exception as e:
            if type(e).__name__ == "NoArgsIsHelpError":
                typer.echo(e.format_message())
                sys.exit(2)
            if hasattr(e, "format_message") and hasattr(e, "exit_code"):  # click's UsageError and its kin
                typer.echo(f"error: {e.format_message()}", err=True)
                sys.exit(2)
            raise
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(cls=_OneLineErrors, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,
                  help="Cache frozen VGG16 features of an image folder in HDF5, then train fast heads on them.")


def _default(config: type, name: str):
    """The default of a config field: the CLI shows and uses the config's own."""
    return next(f.default for f in fields(config) if f.name == name)


extract_default, head_default, train_default, predict_default = (
    functools.partial(_default, c) for c in (ExtractConfig, HeadConfig, TrainConfig, PredictConfig))


@app.callback()
def _setup(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
           quiet: bool = typer.Option(False, "--quiet", "-q", help="Warnings and errors only.")):
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)


def _user_errors(command):
    """One line and exit 2 for user errors, 130 for Ctrl-C: no traceback for anything the user can fix."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UserError as e:
            _echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        except Interrupted as e:
            _echo(str(e), err=True)
            forget_interrupted_string_evals()
            raise typer.Exit(e.exit_code) from None

    return wrapper


def _echo(text: str, err: bool = False) -> None:
    """Print text for a person: a file name that is not UTF-8 shows its odd bytes as \\xNN escapes."""
    typer.echo(printable(text, lines=True), err=err)


@app.command()
@_user_errors
def extract(
    data: list[str] = typer.Argument(..., help="ImageFolder tree (DATA/<split>/<class>/... or DATA/<class>/...), a CSV manifest path,label[,split], or WebDataset tar shards: [SPLIT=]PATTERN..., e.g. 'train=shards/train-{000..099}.tar' (local paths, globs, URLs through fsspec)."),
    out: Optional[Path] = typer.Option(None, help="Output file (default: features/<dataset>-<fingerprint>.h5)."),
    weights: str = typer.Option(extract_default("weights"), help="imagenet (torchvision download), none (seeded random init), or a local state-dict file."),
    pool: str = typer.Option(extract_default("pool"), help=", ".join(f"{p.name} ({p.dim(VGG16_CHANNELS)} at 224)" for p in POOLS.values())
                             + "; map keeps the pool5 map, so train-head can pool it any of the other ways."),
    image_size: int = typer.Option(extract_default("image_size"), help="Centre-crop side; images are resized to 256/224 of it first."),
    layer: str = typer.Option(extract_default("layer"), help="pool5 (the body's output), or pool4 (512 x 14 x 14 at 224, the input of block 5: for --head block5)."),
    views: str = typer.Option(VIEWS[extract_default("flip")], help="none, or flip: each row is the mean of the image's and its mirror's features."),
    scales: str = typer.Option(",".join(map(str, extract_default("scales"))), help="e.g. 256,384,512: the whole image (no crop) at each shorter side, pooled and averaged (pooled modes only)."),
    augment: int = typer.Option(extract_default("augment"), help="K: also cache K augmented views (random resized crop + flip) of every training image, for train-head --views."),
    augment_seed: int = typer.Option(extract_default("augment_seed"), help="Seed of the augmented views (each view depends on it, its file's path and its index only)."),
    batch_size: int = typer.Option(extract_default("batch_size"), help="Images per forward (default 0: 256 on CUDA, 4 elsewhere)."),
    workers: int = typer.Option(extract_default("workers"), help="DataLoader decode workers (default -1: 16 on CUDA (at most the cores), 1 on CPU)."),
    device: str = typer.Option(extract_default("device"), help="auto, cpu, cuda or mps."),
    precision: str = typer.Option(extract_default("precision"), help="auto (bf16 on CUDA and on CPUs with native bf16, else fp32), fp32, bf16 or fp16."),
    dtype: str = typer.Option(extract_default("dtype"), help="Storage dtype of the features: float16 or float32."),
    decode: str = typer.Option(extract_default("decode"), help="cpu (Pillow in workers) or gpu (batched nvJPEG, CUDA only)."),
    force: bool = typer.Option(False, "--force", help="Rebuild from scratch, replacing any existing file."),
    verify: bool = typer.Option(False, "--verify", help="Hash every file to detect content changes, and retry every failed file."),
    shard: Optional[str] = typer.Option(None, help="I/N: extract part I of N (a job array) into the journal; the last part to finish writes the cache."),
    label_from: str = typer.Option(extract_default("label_from"), help="Tar shards: a sample's class from its .cls (cls), .txt (txt) or a .json field (json:FIELD); auto: the first of .cls, .json's label, .txt that the first sample has."),
):
    """Run the frozen VGG16 body over every image once and cache the pooled features in HDF5.

    Under torchrun (`torchrun --nproc-per-node G -m pipeline extract ...`) every rank takes its part and rank 0
    writes the cache."""
    from pipeline import api

    s = api.extract(data, out=out, weights=weights, pool=pool, image_size=image_size, layer=layer, views=views,
                    scales=scales, augment=augment, augment_seed=augment_seed, batch_size=batch_size, workers=workers,
                    device=device, precision=precision, dtype=dtype, decode=decode, force=force, verify=verify,
                    shard=shard, label_from=label_from)
    if not s.wrote_cache:
        if s.remaining:  # a part of a job array; a rank other than 0 prints nothing but its progress
            _echo(f"{s.worker}: extracted {s.extracted} images; {s.remaining} images of other parts remain: the last "
                  f"part to finish (or a plain extract) writes {s.out}")
        return
    if s.up_to_date:
        _echo(f"up to date: {s.out} ({sum(s.rows.values())} images, {s.seconds:.2f} s)")
        return
    rows = ", ".join(f"{split} {n}" for split, n in sorted(s.rows.items()))
    _echo(f"wrote {s.out}: {sum(s.rows.values())} images ({rows}), {len(s.failed)} failed, dim {s.feature_dim}, "
          f"{human_bytes(s.file_bytes)}")
    _echo(f"extracted {s.extracted} {'images and views' if s.views else 'images'} in {s.seconds:.1f} s ({s.images_per_s:.1f} images/s through the model), "
          f"reused {s.reused} from the cache, resumed {s.resumed} from an interrupted run; fingerprint {s.fingerprint}")
    for r in s.failed:
        _echo(f"  failed {printable(r.path)}: {r.reason}")
    if s.views:
        _echo(f"views        {s.views} augmented views cached beside their images (--augment)")


@app.command()
@_user_errors
def info(file: Path = typer.Argument(..., help="A feature cache (.h5)."),
         as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON.")):
    """Summarise a feature cache: config, splits, counts per class, feature dim, failed files."""
    from pipeline.cache.summary import describe, describe_copies

    d = describe(file)
    if as_json:
        typer.echo(json.dumps(d.to_json(), indent=2))
        return
    h = d.header
    _echo(f"{d.path}  ({human_bytes(d.file_bytes)}, schema ok)")
    _echo(f"fingerprint  {h.fingerprint}   feature dim {h.feature_dim}   classes {len(h.class_names)}")
    if d.map_shape:
        c, rows, cols = d.map_shape
        heads = "".join(f"; train-head --head {s.name} fine-tunes block 5 on it"
                        for s in HEADS.values() if s.takes_map and h.config.feeds_block5)
        _echo(f"map          {h.config.layer} map {c}x{rows}x{cols} per row (row-major): train-head --pool "
              f"{'|'.join(HEAD_POOLS)}|auto{heads}")
    _echo(f"config       {json.dumps(h.config_dict, sort_keys=True)}")
    if h.config is None:
        _echo(f"             not a config this vggcache can use ({h.config_problem})")
    _echo(f"source       {h.source.root} ({h.source.kind})")
    _echo(f"created      {h.created}   updated {h.updated}")
    if h.extraction:
        e = h.extraction
        _echo(f"extraction   {e.device} {e.precision}, {e.images_per_s} images/s")
    _echo(f"copies       {describe_copies(file)}")
    for split, s in sorted(d.splits.items()):
        per_class = ", ".join(f"{printable(name)} {n}" for name, n in s.per_class.items())
        views = f", {s.views} augmented views ({s.views // max(1, s.rows)} per row)" if s.views else ""
        _echo(f"split {split}: {s.rows} rows ({per_class}){views}, {len(s.failed)} failed")
        for r in s.failed:
            _echo(f"  failed {printable(r.path)}: {r.reason}")


@app.command("train-head")
@_user_errors
def train_head(
    features: Path = typer.Argument(..., help="A feature cache made by `extract`."),
    head: str = typer.Option(head_default("kind"), help="; ".join(f"{h.name}: {h.description}" for h in HEADS.values()) + "."),
    out: Optional[Path] = typer.Option(None, help="Run folder (default: models/<features>-<head>-<time>)."),
    train_split: str = typer.Option(train_default("train_split"), help="Split to fit on."),
    val_split: str = typer.Option(train_default("val_split"), help="Split to choose hyperparameters on (held out of train when absent)."),
    test_split: str = typer.Option(train_default("test_split"), help="Split scored once at the end, when present."),
    val_fraction: float = typer.Option(train_default("val_fraction"), help="Fraction of train held out when there is no validation split."),
    pool: str = typer.Option(train_default("pool"), help="Map cache: " + ", ".join(HEAD_POOLS) + ", or auto (sweep them all on validation). Pooled cache: its own pooling."),
    norm: Optional[str] = typer.Option(None, help="standard, l2 (unit rows), power (signed sqrt, then l2), or auto (sweep them); default: standard, l2 for knn."),
    refit: Optional[bool] = typer.Option(None, "--refit/--no-refit", help="Refit the choice on train+val before scoring test (default: on when there is a test split)."),
    views: Optional[bool] = typer.Option(None, "--views/--no-views", help="Train on the cache's augmented views (extract --augment) beside their images (default: when it has them and they fit --memory-budget)."),
    C: Optional[float] = typer.Option(None, "--C", help="logreg: fix C instead of sweeping 45 values 1e-6..1e5."),
    k: Optional[int] = typer.Option(None, "--k", help="knn: fix k instead of sweeping 1, 3, 5, 10, 20, 50."),
    hidden: int = typer.Option(head_default("hidden"), help="linear: width of one hidden layer (0: a single linear layer)."),
    dropout: float = typer.Option(head_default("dropout"), help="linear: dropout after the hidden layer."),
    lr: Optional[float] = typer.Option(None, help="linear: fix the AdamW learning rate instead of sweeping 1e-3, 1e-2."),
    weight_decay: Optional[float] = typer.Option(None, help="linear: fix weight decay instead of sweeping 1e-6..1."),
    epochs: Optional[int] = typer.Option(None, help="linear, block5: most epochs (default 200, block5 30)."),
    batch_size: Optional[int] = typer.Option(None, help="linear, block5: rows per step (default 256, block5 32)."),
    patience: Optional[int] = typer.Option(None, help="linear, block5: epochs without a better held-out loss before stopping (default 15, block5 5)."),
    freeze_convs: int = typer.Option(head_default("freeze_convs"), help="block5: how many of conv5_1..conv5_3 stay frozen."),
    weights: Optional[str] = typer.Option(None, help="block5: the weights file the cache was made with, if it has moved (checked by sha256)."),
    early_stop_fraction: float = typer.Option(head_default("validation_fraction"), help="linear: fraction of train held out for early stopping."),
    seed: int = typer.Option(head_default("seed"), help="Seed of the held-out splits and of the linear head."),
    device: str = typer.Option(head_default("device"), help="logreg, linear, block5: auto (CUDA when there is one), cpu, cuda or mps."),
    solver: Optional[str] = typer.Option(None, help="logreg: auto (default: Newton in float64 for a small problem on a CPU, else float32 L-BFGS along the C path, on --device; run.json says which and why), newton, lbfgs (torch: its old name), or sklearn (scikit-learn's lbfgs in float64 on the CPU: the reference)."),
    memory_budget: Optional[str] = typer.Option(None, help="Most memory the features may take, e.g. 8G (default: half the memory available); over it, the linear head streams them from the file."),
    stream: bool = typer.Option(False, "--stream", help="Stream the features from the file whatever their size (linear head)."),
    track: Optional[str] = typer.Option(None, help="mlflow: log the saved run to MLflow (MLFLOW_TRACKING_URI, else ./mlruns); needs the track extra."),
    force: bool = typer.Option(False, "--force", help="--out may hold a run: its run files are replaced (nothing else in the folder is touched)."),
):
    """Train a head on cached features, choose its hyperparameters on validation, save and report it."""
    from pipeline import api
    from pipeline.heads.metrics import format_metrics

    run = api.train_head(features, out=out, train_split=train_split, val_split=val_split, test_split=test_split,
                         val_fraction=val_fraction, memory_budget=memory_budget, stream=stream, pool=pool, refit=refit,
                         views=views, head=head, C=C, k=k, norm=norm, hidden=hidden, dropout=dropout, lr=lr,
                         weight_decay=weight_decay, epochs=epochs, batch_size=batch_size, patience=patience,
                         early_stop_fraction=early_stop_fraction, freeze_convs=freeze_convs, weights=weights,
                         solver=solver, seed=seed, device=device, track=track, force=force)
    for split, m in run.metrics.items():
        _echo(format_metrics(m, f"{run.folder.name} on {split}") + "\n")
    from pipeline.runs.folder import RUN_FILES, selection_note
    from pipeline.runs.record import describe_chosen

    r = run.record
    data = "streamed from the file" if r.loading and r.loading.mode == "stream" else "in memory"
    refit_note = "; refit on train+val" + (" before test" if r.splits.test else "") if r.refit else ""
    if r.splits.views_per_image:
        refit_note += f"; trained on {r.splits.views_per_image} augmented views of each training image too"
    _echo(f"chose {describe_chosen(r.head.chosen)} on {r.splits.val}{refit_note}; fit {r.timings.fit_seconds:.2f} s "
          f"({len(r.sweep)} candidates, data {data})")
    note = selection_note(len(r.sweep), run.metrics)
    if note:
        _echo(note)
    _echo(f"saved {run.folder}: {', '.join(name for name in sorted(RUN_FILES) if (run.folder / name).is_file())}")


@app.command()
@_user_errors
def evaluate(run: Path = typer.Argument(..., help="A run folder made by train-head."),
             features: Optional[Path] = typer.Option(None, help="Feature file (default: the one the run was trained on)."),
             split: Optional[str] = typer.Option(None, help="Split to score (default: test, else val)."),
             as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON.")):
    """Score a saved head on any split of a feature file made with the same extractor config."""
    from pipeline.heads.metrics import format_metrics
    from pipeline.train.evaluate import evaluate_run

    e = evaluate_run(EvaluateConfig(run=run, features=features, split=split))
    _echo(json.dumps(e.metrics, indent=2) if as_json else format_metrics(e.metrics, f"{Path(run).name} on {e.features.name}:{e.split}"))


@app.command()
@_user_errors
def predict(run: Path = typer.Argument(..., help="A run folder made by train-head."),
            images: list[str] = typer.Argument(..., help="Image files or folders (searched recursively)."),
            out: Optional[Path] = typer.Option(None, help="CSV file to write (default: standard output)."),
            top_k: int = typer.Option(predict_default("top_k"), help="Classes listed per image."),
            weights: Optional[str] = typer.Option(None, help="The weights file, if the run's has moved (checked by sha256)."),
            batch_size: int = typer.Option(predict_default("batch_size"), help="Images per forward."),
            workers: int = typer.Option(predict_default("workers"), help="DataLoader decode workers."),
            device: str = typer.Option(predict_default("device"), help="auto, cpu, cuda or mps."),
            precision: str = typer.Option(predict_default("precision"), help="auto (as the run's features were extracted), fp32, bf16 or fp16."),
            report: bool = typer.Option(False, "--report", help="Say whether the images look like the run's training data (one line, and a PNG beside --out: p.csv -> p.drift.png)."),
            force: bool = typer.Option(False, "--force", help="Replace --out even if it is not a predictions CSV (never needed for one predict wrote).")):
    """Predict classes of new images with a saved run: same extractor as its features, then its head."""
    from pipeline.serve.predict import predict as run_predict

    rows = run_predict(PredictConfig(run=run, images=tuple(images), out=out, top_k=top_k, weights=weights,
                                     batch_size=batch_size, workers=workers, device=device, precision=precision,
                                     report=report, force=force))
    if out:
        failed = sum(bool(r["error"]) for r in rows)
        _echo(f"wrote {out}: {len(rows)} images, {failed} unreadable")


@app.command()
@_user_errors
def report(run: Path = typer.Argument(..., help="A run folder made by train-head.")):
    """Write the run's report.html again (one self-contained page: record, metrics, pictures, files)."""
    from pipeline.look.report import rewrite

    _echo(f"wrote {rewrite(run)}")


@app.command()
@_user_errors
def export(run: Path = typer.Argument(..., help="A run folder made by train-head."),
           format: str = typer.Option("onnx", "--format", help="onnx (run by onnxruntime) or torchscript (torch.jit.load)."),
           out: Optional[Path] = typer.Option(None, help="File to write (default: beside the run folder, RUN.onnx or RUN.pt)."),
           weights: Optional[str] = typer.Option(None, help="The weights file, if the run's has moved (checked by sha256)."),
           force: bool = typer.Option(False, "--force", help="Replace --out even if it is not a model file of that format.")):
    """Write a run as one self-contained model file: uint8 images (N, 3, S, S) in, class probabilities out."""
    from pipeline.serve.export import export as run_export

    e = run_export(run, format, out, weights, force)
    _echo(f"wrote {e.path}: {e.format}, {human_bytes(e.bytes)}; input uint8 RGB (N, 3, {e.crop_size}, {e.crop_size}) "
          f"(resize and centre-crop as extract: pipeline.preprocess), output probabilities of {', '.join(e.classes)}")


@app.command()
@_user_errors
def serve(run: Path = typer.Argument(..., help="A run folder made by train-head."),
          host: str = typer.Option(ServeConfig.host, help="Address to bind (default: this machine only; no authentication, no TLS)."),
          port: int = typer.Option(ServeConfig.port, help="Port."),
          workers: int = typer.Option(ServeConfig.workers, help="Worker processes, each with the run loaded."),
          max_request_mb: float = typer.Option(ServeConfig.max_request_mb, help="Largest request body accepted (413 above)."),
          top_k: int = typer.Option(ServeConfig.top_k, help="Classes listed per image."),
          weights: Optional[str] = typer.Option(None, help="The weights file, if the run's has moved (checked by sha256)."),
          device: str = typer.Option(ServeConfig.device, help="auto, cpu, cuda or mps."),
          features: Optional[Path] = typer.Option(None, help="The run's feature cache: also answer GET/POST /similar from it.")):
    """Serve a run over HTTP: POST /predict (multipart image files) -> JSON; GET /health, GET /info; with
    --features, GET/POST /similar."""
    from pipeline.serve.server import serve as run_serve

    run_serve(ServeConfig(run=str(run), host=host, port=port, workers=workers, max_request_mb=max_request_mb,
                          top_k=top_k, weights=weights, device=device,
                          features=None if features is None else str(features)))


@app.command()
@_user_errors
def runs(models: Path = typer.Argument(Path("models"), help="Folder of run folders."),
         features: Optional[str] = typer.Option(None, help="Only runs on caches whose file name contains this."),
         head: Optional[str] = typer.Option(None, help="Only runs of this head kind."),
         sort: str = typer.Option("test", help="test (best test accuracy first, then runs without one by validation), val, fit or name."),
         as_json: bool = typer.Option(False, "--json", help="Print the table as JSON.")):
    """Compare every saved run: head, features, chosen hyperparameters, scores, fit time."""
    import shutil

    from pipeline.runs.listing import list_runs
    from pipeline.runs.record import describe_chosen

    rows = list_runs(models, features, head, sort)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    fmt = lambda v: "-" if v is None else f"{v:.4f}"
    table = [(printable(r["name"]), r["head"], printable(r["features"]), describe_chosen(r["chosen"]).replace(", ", ","),
              fmt(r["test_accuracy"]), fmt(r["test_macro_f1"]), fmt(r["val_accuracy"]) + ("*" if r["selection_score"] else ""),
              f"{r['fit_seconds']:.2f}") for r in rows]
    header = ("name", "head", "features", "chosen", "test acc", "test F1", "val acc", "fit s")
    width = shutil.get_terminal_size((120, 24)).columns if sys.stdout.isatty() else None  # piped: nothing shortened
    for line in _fitted_columns(header, table, width):
        _echo(line)
    if any(r["selection_score"] for r in rows):
        _echo("* no test split: the validation score chose the run's settings among its candidates, so it is optimistic")


def _fitted_columns(header: tuple, table: list[tuple], width: int | None) -> list[str]:
    """Left-aligned text columns, numbers right-aligned; the features and chosen columns, the widest first, are
    shortened in the middle (`abc...xyz`) until the table fits `width` (None: never). A run's name is always whole:
    it is what `evaluate`, `predict` and `export` take."""
    widths = [max(len(str(row[i])) for row in [header, *table]) for i in range(len(header))]
    texts = [2, 3]  # features, chosen: the columns that may be shortened
    while width and sum(widths) + 2 * (len(widths) - 1) > width and max(widths[i] for i in texts) > 12:
        widest = max(texts, key=lambda i: widths[i])
        widths[widest] -= 1
    cell = lambda value, i: shortened_to(str(value), widths[i]).ljust(widths[i]) if i < 4 else str(value).rjust(widths[i])
    return ["  ".join(cell(value, i) for i, value in enumerate(row)).rstrip() for row in [header, *table]]


@app.command()
@_user_errors
def audit(features: Path = typer.Argument(..., help="A feature cache made by `extract`."),
          threshold: float = typer.Option(AuditConfig.threshold, help="Centred cosine similarity from which two images are near-duplicates."),
          neighbours: int = typer.Option(AuditConfig.neighbours, help="List an image whose this many nearest neighbours all carry another label."),
          out: Optional[Path] = typer.Option(None, help="CSV of every finding (default: FEATURES.audit.csv)."),
          force: bool = typer.Option(False, "--force", help="Replace --out even if it is not an audit CSV.")):
    """Find exact duplicates (sha256), near-duplicates (cached features) and likely mislabelled images, within and
    across splits: leakage between train and test makes a score optimistic."""
    from pipeline.look.audit import audit as run_audit
    from pipeline.look.audit import summary

    cfg = AuditConfig(features=features, threshold=threshold, neighbours=neighbours, out=out, force=force)
    report = run_audit(cfg)
    for line in summary(report):
        _echo(line)
    _echo(f"wrote {cfg.csv_path}")


@app.command("export-features")
@_user_errors
def export_features(features: Path = typer.Argument(..., help="A feature cache made by `extract`."),
                    out: Path = typer.Option(..., help="A new or empty folder for the Parquet files."),
                    pool: Optional[str] = typer.Option(None, help=f"A map cache's rows pooled: {', '.join(HEAD_POOLS)} (default avg)."),
                    split: Optional[list[str]] = typer.Option(None, help="Only this split (repeat for more; default: all)."),
                    part_mb: int = typer.Option(ExportConfig.part_mb, help="About this many MB of embeddings per Parquet file."),
                    force: bool = typer.Option(False, "--force", help="Replace an earlier export in --out.")):
    """Write the cache's rows as Parquet (path, split, label, class, sha256, embedding as float32), readable by
    pandas, DuckDB, Spark and Hugging Face datasets without vggcache."""
    from pipeline.hub.parquet import export_features as run_export

    s = run_export(ExportConfig(features=features, out=out, pool=pool, splits=tuple(split or ()), part_mb=part_mb,
                                force=force))
    _echo(f"wrote {s.rows} rows x {s.dim} to {s.out}: {len(s.files)} Parquet files, {human_bytes(s.bytes)}, "
          f"{s.seconds:.1f} s")


@app.command()
@_user_errors
def similar(features: Path = typer.Argument(..., help="A feature cache made by `extract`."),
            queries: list[str] = typer.Argument(..., help="Image files, or paths already in the cache (as `info` lists them)."),
            k: int = typer.Option(SimilarConfig.k, "--k", help="Neighbours per query."),
            split: Optional[list[str]] = typer.Option(None, help="Search only this split (repeat for more; default: all)."),
            pool: Optional[str] = typer.Option(None, help=f"A map cache's rows pooled: {', '.join(HEAD_POOLS)} (default avg)."),
            out: Optional[Path] = typer.Option(None, help="Write the neighbours as CSV."),
            html: Optional[Path] = typer.Option(None, help="Write a page of the queries and their neighbours as thumbnails."),
            index: str = typer.Option(SimilarConfig.index, help="auto (exact up to a measured size, approximate above), exact or approximate."),
            weights: Optional[str] = typer.Option(None, help="The weights file, if the cache's has moved (checked by sha256)."),
            device: str = typer.Option(SimilarConfig.device, help="auto, cpu, cuda or mps (to embed image files)."),
            force: bool = typer.Option(False, "--force", help="Replace --out / --html even if they are not what similar writes.")):
    """The k nearest cached images to each query, by cosine similarity of the cached features, from an index kept
    beside the cache."""
    from pipeline.look.similar_page import similar as run_similar

    r = run_similar(SimilarConfig(features=features, queries=tuple(queries), k=k, splits=tuple(split or ()), pool=pool,
                                  out=out, html=html, index=index, weights=weights, device=device, force=force))
    for q in r.results:
        if q.error:
            _echo(f"{printable(q.query)}: {q.error}")
            continue
        _echo(f"{printable(q.query)} ({'in the cache' if q.source == 'cache' else 'image file'}):")
        width = max(len(printable(n.path)) for n in q.neighbours) if q.neighbours else 0
        for rank, n in enumerate(q.neighbours, 1):
            _echo(f"  {rank:>3}  {n.similarity:7.4f}  {printable(n.path):<{width}}  {n.split}  {printable(n.label)}")
    _echo(f"index: {r.index}; {r.seconds:.2f} s")
    for path in r.written:
        _echo(f"wrote {path}")


def _projection_options(name: str):
    """The options of `projection` (and of its old name, `map`: its picture is FEATURES.map.png by default)."""

    def command(features: Path = typer.Argument(..., help="A feature cache made by `extract`."),
                run: Optional[Path] = typer.Option(None, help="A run trained on it: its mistakes are ringed."),
                method: str = typer.Option(ProjectionConfig.method, help="pca (any size: a sample of 20,000) or tsne (a sample of 3,000)."),
                out: Optional[Path] = typer.Option(None, help=f"PNG to write (default: FEATURES.{name}.png)."),
                seed: int = typer.Option(ProjectionConfig.seed, help="Seed of the sample and of t-SNE."),
                html: Optional[Path] = typer.Option(None, help="Also (or, without --out, only) write an interactive page: hover a point for its thumbnail, path, label and the run's prediction; filter by split and class."),
                force: bool = typer.Option(False, "--force", help="Replace --out (or --html) even if it is not what this command writes.")):
        from pipeline.look.projection import draw

        if name != "projection":
            _echo(f"note: `pipeline {name}` is now `pipeline projection` (the same options); the old name stays as an "
                  "alias", err=True)
        for path in draw(ProjectionConfig(features=features, run=run, method=method, out=out, seed=seed, force=force,
                                          html=html, name=name)):
            _echo(f"wrote {path}")

    return command


app.command("projection", help="Draw the cache's images in two dimensions (PCA or t-SNE), coloured by class, one "
                               "marker per split.")(_user_errors(_projection_options("projection")))
app.command("map", help="The old name of `projection` (an alias; its picture is FEATURES.map.png by default).")(
    _user_errors(_projection_options("map")))


@app.command("make-demo-data")
@_user_errors
def make_demo_data(out: Path = typer.Argument(Path("demo_data"), help="Folder to create."),
                   train: int = typer.Option(40, min=1, help="Training images per class."),
                   val: int = typer.Option(15, min=1, help="Validation images per class."),
                   test: int = typer.Option(15, min=1, help="Test images per class."),
                   seed: int = typer.Option(0, min=0, help="Random seed."),
                   force: bool = typer.Option(False, "--force", help="OUT may hold demo data made before: it is made again.")):
    """Generate a small labelled JPEG folder (circle / checks / stripes) to try the pipeline offline."""
    from pipeline import api

    api.make_demo_data(out, {"train": train, "val": val, "test": test}, seed=seed, force=force)
    _echo(f"wrote {out}: 3 classes, {train}/{val}/{test} train/val/test images per class")


def main() -> None:
    app()
