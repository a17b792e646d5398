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
    batch_size: int = typer.Option(0, help="Images per forward [default: 256 on CUDA, 32 elsewhere]."),
    workers: int = typer.Option(-1, help="DataLoader decode workers [default: 16 on CUDA (at most the cores), 1 on CPU]."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or mps."),
    precision: str = typer.Option("auto", help="auto (bf16 on CUDA, fp32 elsewhere), fp32, bf16 or fp16."),
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
    typer.echo(f"extracted {s.extracted} images this run in {s.seconds:.1f} s ({s.images_per_s:.1f} images/s); "
               f"fingerprint {s.fingerprint}")
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


@app.command("make-demo-data")
@_user_errors
def make_demo_data(out: Path = typer.Argument(Path("demo_data"), help="Folder to create."),
                   train: int = typer.Option(40, help="Training images per class."),
                   val: int = typer.Option(15, help="Validation images per class."),
                   test: int = typer.Option(15, help="Test images per class."),
                   seed: int = typer.Option(0, help="Random seed.")):
    """Generate a small labelled JPEG folder (circle / square / stripes) to try the pipeline offline."""
    from pipeline.synthetic import make_image_folder

    make_image_folder(out, {"train": train, "val": val, "test": test}, size=(96, 72), seed=seed)
    typer.echo(f"wrote {out}: 3 classes, {train}/{val}/{test} train/val/test images per class")


def main() -> None:
    app()
