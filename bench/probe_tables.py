"""The probe-protocol tables of docs/probe-protocol.md on a real dataset, reproducibly: `python bench/probe_tables.py MODE ...`.

    extract DATA --weights W --out DIR      one cache per feature kind (avg, map, flip, scales 256,384,512) in DIR
    speed DATA --weights W --out DIR        extraction images/s of each kind on the first 16 images of every class
    pools DIR                               validation accuracy and fit time of every pooling x head, one map cache
    steps DIR                               the protocol step by step: former grid, 45 C, norms, knn, linear, views

Prints markdown tables. Not a test and not part of `make bench`: it takes tens of minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.cache import pools  # noqa: E402
from pipeline.cache.store import open_cache
from pipeline.extraction.config import ExtractConfig
from pipeline.extraction.runner import extract  # noqa: E402
from pipeline.heads.config import HeadConfig
from pipeline.runs.record import describe_chosen  # noqa: E402
from pipeline.train.config import TrainConfig  # noqa: E402
from pipeline.train.data import load_data
from pipeline.train.loading import plan_loading  # noqa: E402
from pipeline.train.runner import train_head  # noqa: E402
from pipeline.train.sweep import sweep_candidates

KINDS = {"avg": {}, "map": {"pool": "map"}, "flip": {"flip": True}, "scales": {"scales": (256, 384, 512)}}


def make_caches(data: Path, weights: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, options in KINDS.items():
        s = extract(ExtractConfig(data=data, out=out / f"{name}.h5", weights=weights, **options))
        print(f"| {name} | {s.file_bytes / 1e6:.1f} MB | {s.images_per_s:.2f} images/s | {s.seconds:.0f} s |", flush=True)


def speed(data: Path, weights: str, out: Path, per_class: int = 16) -> None:
    """Images/s through the model of each kind, on the same few images, in one run (so the ratios hold)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import scale

    with tempfile.TemporaryDirectory() as tmp:
        few = scale.subset(data, Path(tmp) / "few", per_class)
        # a throwaway run first: oneDNN builds its kernels on the first batches, which would count against `avg`
        extract(ExtractConfig(data=scale.subset(data, Path(tmp) / "warm", 2), out=Path(tmp) / "warm.h5", weights=weights))
        print("| features | images/s through the model | x avg |\n| --- | --- | --- |")
        base = None
        for name, options in KINDS.items():
            s = extract(ExtractConfig(data=few, out=Path(tmp) / f"{name}.h5", weights=weights, **options))
            base = base or s.images_per_s
            print(f"| {name} | {s.images_per_s:.2f} | {s.images_per_s / base:.2f} |", flush=True)


def _run(cache: Path, tmp: Path, name: str, **kw) -> tuple[float, float, str]:
    head = HeadConfig(**kw.pop("head", {}))
    run = train_head(TrainConfig(features=cache, out=tmp / name, head=head, **kw))
    chosen = describe_chosen(run.record.head.chosen)
    return run.metrics["val"]["accuracy"], run.record.timings.fit_seconds, chosen


def pools_table(folder: Path) -> None:
    cache = folder / "map.h5"
    print("| pooling | " + " | ".join(f"{h} val acc (fit s)" for h in ("logreg", "linear", "knn")) + " |")
    print("| --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for pool in (*pools.HEAD_POOLS, "auto"):
            cells = []
            for kind in ("logreg", "linear", "knn"):
                acc, fit, chosen = _run(cache, Path(tmp), f"{pool}-{kind}", pool=pool, head={"kind": kind})
                cells.append(f"{acc:.3f} ({fit:.1f} s)" + (f" chose {chosen.split('pool=')[-1]}" if pool == "auto" else ""))
            print(f"| {pool} | " + " | ".join(cells) + " |", flush=True)


def _former_grid(cache: Path) -> tuple[float, float, str]:
    """Yesterday's default: 7 independent fits, C 1e-4..1e2, standardised features."""
    cfg = TrainConfig(features=cache)
    start, best = time.perf_counter(), None
    with open_cache(cache) as c:
        data = load_data(cfg, c, plan_loading(cfg, c))
        for C in np.logspace(-4, 2, 7):
            for score, _ in sweep_candidates(HeadConfig(C=float(C)), data):
                key = (score["val_accuracy"], -score["val_log_loss"])
                best = max(best or (key, C), (key, C))
    return best[0][0], time.perf_counter() - start, f"C={best[1]:g}"


def steps_table(folder: Path) -> None:
    avg = folder / "avg.h5"
    steps = [("logreg, former grid (7 C, 1e-4..1e2)", lambda t: _former_grid(avg)),
             ("logreg, 45 C 1e-6..1e5 (default)", lambda t: _run(avg, t, "c45")),
             ("logreg, 45 C, norm l2", lambda t: _run(avg, t, "l2", head={"norm": "l2"})),
             ("logreg, 45 C, norm power", lambda t: _run(avg, t, "power", head={"norm": "power"})),
             ("logreg, 45 C, norm auto (swept)", lambda t: _run(avg, t, "auto", head={"norm": "auto"})),
             ("knn, k swept (norm l2)", lambda t: _run(avg, t, "knn", head={"kind": "knn"})),
             ("linear, weight decay x lr swept", lambda t: _run(avg, t, "linear", head={"kind": "linear"})),
             ("logreg, 45 C, `--views flip`", lambda t: _run(folder / "flip.h5", t, "flip")),
             ("logreg, 45 C, `--scales 256,384,512`", lambda t: _run(folder / "scales.h5", t, "scales"))]
    print("| step | val acc | fit s | chosen |\n| --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for what, fn in steps:
            acc, fit, chosen = fn(Path(tmp))
            print(f"| {what} | {acc:.3f} | {fit:.2f} | {chosen} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=("extract", "speed", "pools", "steps"))
    p.add_argument("path", type=Path, help="DATA for extract and speed, the caches' folder for pools and steps")
    p.add_argument("--weights", default="none")
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    if a.mode == "extract":
        make_caches(a.path, a.weights, a.out)
    elif a.mode == "speed":
        speed(a.path, a.weights, a.out)
    else:
        (pools_table if a.mode == "pools" else steps_table)(a.path)


if __name__ == "__main__":
    main()
