"""The command line: parse options, call one library function, print its result. No logic lives here."""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from pipeline.errors import Interrupted, UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Cache frozen VGG16 features of an image folder in HDF5, then train fast heads on them.")


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
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        except Interrupted as e:
            typer.echo(str(e), err=True)
            raise typer.Exit(130) from None

    return wrapper


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


@app.command()
@_user_errors
def extract(
    data: Path = typer.Argument(..., help="ImageFolder tree (DATA/<split>/<class>/... or DATA/<class>/...) or a CSV manifest path,label[,split]."),
    out: Optional[Path] = typer.Option(None, help="Output file [default: features/<dataset>-<fingerprint>.h5]."),
    weights: str = typer.Option("imagenet", help="imagenet (torchvision download), none (seeded random init), or a local state-dict file."),
    pool: str = typer.Option("avg", help="avg (512), max (512), avgmax (1024) or flatten (25088)."),
    image_size: int = typer.Option(224, help="Centre-crop side; images are resized to 256/224 of it first."),
    batch_size: int = typer.Option(0, help="Images per forward [default: 256 on CUDA, 4 elsewhere]."),
    workers: int = typer.Option(-1, help="DataLoader decode workers [default: 16 on CUDA (at most the cores), 1 on CPU]."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or mps."),
    precision: str = typer.Option("auto", help="auto (bf16 on CUDA and on CPUs with native bf16, else fp32), fp32, bf16 or fp16."),
    dtype: str = typer.Option("float16", help="Storage dtype of the features: float16 or float32."),
    decode: str = typer.Option("cpu", help="cpu (Pillow in workers) or gpu (batched nvJPEG, CUDA only)."),
    force: bool = typer.Option(False, "--force", help="Rebuild from scratch, replacing any existing file."),
    verify: bool = typer.Option(False, "--verify", help="Hash every file to detect content changes, not only size/mtime changes."),
):
    """Run the frozen VGG16 body over every image once and cache the pooled features in HDF5."""
    from pipeline.config import ExtractConfig
    from pipeline.extract import extract as run_extract

    s = run_extract(ExtractConfig(data=data, out=out, weights=weights, pool=pool, image_size=image_size,
                                  batch_size=batch_size, workers=workers, device=device, precision=precision,
                                  dtype=dtype, decode=decode, force=force, verify=verify))
    if s.up_to_date:
        typer.echo(f"up to date: {s.out} ({sum(s.rows.values())} images, {s.seconds:.2f} s)")
        return
    rows = ", ".join(f"{split} {n}" for split, n in sorted(s.rows.items()))
    typer.echo(f"wrote {s.out}: {sum(s.rows.values())} images ({rows}), {len(s.failed)} failed, dim {s.feature_dim}, "
               f"{_size(s.file_bytes)}")
    typer.echo(f"extracted {s.extracted} images in {s.seconds:.1f} s ({s.images_per_s:.1f} images/s through the model), "
               f"reused {s.reused} from the cache, resumed {s.resumed} from an interrupted run; fingerprint {s.fingerprint}")
    for r in s.failed:
        typer.echo(f"  failed {r.path}: {r.reason}")


@app.command()
@_user_errors
def info(file: Path = typer.Argument(..., help="A feature cache (.h5)."),
         as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON.")):
    """Summarise a feature cache: config, splits, counts per class, feature dim, failed files."""
    from pipeline.store import describe

    d = describe(file)
    if as_json:
        typer.echo(json.dumps(d, indent=2))
        return
    typer.echo(f"{d['path']}  ({_size(d['file_bytes'])}, schema ok)")
    typer.echo(f"fingerprint  {d['fingerprint']}   feature dim {d['feature_dim']}   classes {len(d['class_names'])}")
    typer.echo(f"config       {json.dumps(d['config'], sort_keys=True)}")
    typer.echo(f"source       {d['source'].get('root')} ({d['source'].get('kind')})")
    typer.echo(f"created      {d['created']}   updated {d['updated']}")
    if d["extraction"]:
        e = d["extraction"]
        typer.echo(f"extraction   {e.get('device')} {e.get('precision')}, {e.get('images_per_s')} images/s")
    for split, s in sorted(d["splits"].items()):
        per_class = ", ".join(f"{name} {n}" for name, n in s["per_class"].items())
        typer.echo(f"split {split}: {s['rows']} rows ({per_class}), {len(s['failed'])} failed")
        for f in s["failed"]:
            typer.echo(f"  failed {f['path']}: {f['reason']}")


@app.command("train-head")
@_user_errors
def train_head(
    features: Path = typer.Argument(..., help="A feature cache made by `extract`."),
    head: str = typer.Option("logreg", help="logreg (scikit-learn) or linear (torch)."),
    out: Optional[Path] = typer.Option(None, help="Run folder [default: models/<features>-<head>-<time>]."),
    train_split: str = typer.Option("train", help="Split to fit on."),
    val_split: str = typer.Option("val", help="Split to choose hyperparameters on (held out of train when absent)."),
    test_split: str = typer.Option("test", help="Split scored once at the end, when present."),
    val_fraction: float = typer.Option(0.2, help="Fraction of train held out when there is no validation split."),
    C: Optional[float] = typer.Option(None, "--C", help="logreg: fix C instead of sweeping 1e-4..1e2."),
    hidden: int = typer.Option(0, help="linear: width of one hidden layer (0: a single linear layer)."),
    dropout: float = typer.Option(0.5, help="linear: dropout after the hidden layer."),
    lr: float = typer.Option(1e-3, help="linear: AdamW learning rate."),
    weight_decay: Optional[float] = typer.Option(None, help="linear: fix weight decay instead of sweeping 1e-4..1e-1."),
    epochs: int = typer.Option(200, help="linear: most epochs (early stopping on validation loss)."),
    patience: int = typer.Option(15, help="linear: epochs without a better validation loss before stopping."),
    seed: int = typer.Option(0, help="Seed of the held-out split and of the linear head."),
    device: str = typer.Option("auto", help="linear: auto, cpu, cuda or mps."),
):
    """Train a head on cached features, choose its hyperparameters on validation, save and report it."""
    from pipeline.evaluate import format_metrics
    from pipeline.train import HeadConfig, TrainConfig
    from pipeline.train import train_head as run_train

    run = run_train(TrainConfig(features=features, out=out, train_split=train_split, val_split=val_split,
                                test_split=test_split, val_fraction=val_fraction,
                                head=HeadConfig(kind=head, C=C, hidden=hidden, dropout=dropout, lr=lr,
                                                weight_decay=weight_decay, epochs=epochs, patience=patience,
                                                seed=seed, device=device)))
    for split, m in run.metrics.items():
        typer.echo(format_metrics(m, f"{run.folder.name} on {split}") + "\n")
    t = run.info["timings"]
    chosen = ", ".join(f"{k}={v:g}" for k, v in run.info["head"]["chosen"].items())
    typer.echo(f"chose {chosen} on {run.info['splits']['val']}; fit {t['fit_seconds']:.2f} s "
               f"({len(run.info['sweep'])} candidates); saved {run.folder}")


@app.command()
@_user_errors
def evaluate(run: Path = typer.Argument(..., help="A run folder made by train-head."),
             features: Optional[Path] = typer.Option(None, help="Feature file [default: the one the run was trained on]."),
             split: Optional[str] = typer.Option(None, help="Split to score [default: test, else val]."),
             as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON.")):
    """Score a saved head on any split of a feature file made with the same extractor config."""
    from pipeline.evaluate import evaluate_run, format_metrics

    metrics, split, features = evaluate_run(run, features, split)
    typer.echo(json.dumps(metrics, indent=2) if as_json else format_metrics(metrics, f"{Path(run).name} on {features.name}:{split}"))


@app.command()
@_user_errors
def predict(run: Path = typer.Argument(..., help="A run folder made by train-head."),
            images: list[Path] = typer.Argument(..., help="Image files or folders (searched recursively)."),
            out: Optional[Path] = typer.Option(None, help="CSV file to write [default: standard output]."),
            top_k: int = typer.Option(3, help="Classes listed per image."),
            weights: Optional[str] = typer.Option(None, help="The weights file, if the run's has moved (checked by sha256)."),
            batch_size: int = typer.Option(32, help="Images per forward."),
            device: str = typer.Option("auto", help="auto, cpu, cuda or mps."),
            precision: str = typer.Option("auto", help="auto (as the run's features were extracted), fp32, bf16 or fp16.")):
    """Predict classes of new images with a saved run: same extractor as its features, then its head."""
    from pipeline.predict import PredictConfig
    from pipeline.predict import predict as run_predict

    rows = run_predict(PredictConfig(run=run, images=tuple(images), out=out, top_k=top_k, weights=weights,
                                     batch_size=batch_size, device=device, precision=precision))
    if out:
        failed = sum(bool(r["error"]) for r in rows)
        typer.echo(f"wrote {out}: {len(rows)} images, {failed} unreadable")


@app.command()
@_user_errors
def runs(models: Path = typer.Argument(Path("models"), help="Folder of run folders."),
         as_json: bool = typer.Option(False, "--json", help="Print the table as JSON.")):
    """Compare every saved run: head, features, chosen hyperparameters, scores, fit time; best validation first."""
    from pipeline.runs import list_runs

    rows = list_runs(models)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    fmt = lambda v: "-" if v is None else f"{v:.4f}"
    header = f"{'name':<40} {'head':<7} {'features':<32} {'params':<24} {'val acc':>8} {'val F1':>7} {'test acc':>8} {'test F1':>7} {'fit s':>6}"
    typer.echo(header)
    for r in rows:
        params = ",".join(f"{k}={v:g}" for k, v in r["chosen"].items())
        typer.echo(f"{r['name']:<40} {r['head']:<7} {r['features']:<32} {params:<24} {fmt(r['val_accuracy']):>8} "
                   f"{fmt(r['val_macro_f1']):>7} {fmt(r['test_accuracy']):>8} {fmt(r['test_macro_f1']):>7} {r['fit_seconds']:>6.2f}")


@app.command("make-demo-data")
@_user_errors
def make_demo_data(out: Path = typer.Argument(Path("demo_data"), help="Folder to create."),
                   train: int = typer.Option(40, help="Training images per class."),
                   val: int = typer.Option(15, help="Validation images per class."),
                   test: int = typer.Option(15, help="Test images per class."),
                   seed: int = typer.Option(0, help="Random seed.")):
    """Generate a small labelled JPEG folder (circle / checks / stripes) to try the pipeline offline."""
    from pipeline.synthetic import make_image_folder

    make_image_folder(out, {"train": train, "val": val, "test": test}, size=(96, 72), seed=seed)
    typer.echo(f"wrote {out}: 3 classes, {train}/{val}/{test} train/val/test images per class")


def main() -> None:
    app()
