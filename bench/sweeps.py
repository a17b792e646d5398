"""`make bench` row 13: the head sweeps of train-head on map caches, the reference (scikit-learn) solver against the
batched torch one, in the same run; row 14: logistic regression streamed from a cache over the memory budget.

13: synthetic 7x7x512 map caches of 1,000, 4,000 and 16,000 training rows (6 classes, ReLU features of a low-rank
    latent with correlated channels and overlapping classes, so that solvers need realistic iteration counts), and a
    real one when given (hymenoptera with augmented views); logreg `--pool auto --norm auto` (5 poolings x 3
    normalisations x 45 C) and linear `--pool auto` (5 poolings x 8 configurations), whole commands.
14: logreg on a pooled cache at 4x and 16x the memory budget, streamed, against the same fit in memory: peak RSS
    and fit time.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RSS_PROBE = """
import json, resource, runpy, sys
sys.argv = ["pipeline", *sys.argv[1:]]
try:
    runpy.run_module("pipeline", run_name="__main__")
except SystemExit as e:
    code = e.code
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def synthetic_map_cache(path: Path, train_rows: int, classes: int = 6, seed: int = 0, side: int = 7) -> Path:
    """A map cache (512 x side x side rows, float16) of `train_rows` training rows and a quarter as many validation
    rows: a 24-dimensional latent per image (its class's mean plus noise, classes overlapping), seen through random
    non-negative channel loadings and smooth spatial patterns, then a ReLU; written through the real schema."""
    from pipeline import store
    from pipeline.synthetic import rows_config

    rng = np.random.default_rng(seed)
    latent, channels = 24, 512
    means = rng.standard_normal((classes, latent)) * 0.9
    loadings = np.abs(rng.standard_normal((latent, channels))) * rng.choice([-1, 1], (latent, channels), p=[0.3, 0.7])
    yy, xx = np.mgrid[0:side, 0:side] / (side - 1)
    centres = rng.uniform(0, 1, (latent, 2))
    spatial = np.exp(-((yy[None] - centres[:, :1, None]) ** 2 + (xx[None] - centres[:, 1:, None]) ** 2) / 0.15)
    n_val = max(classes * 4, train_rows // 4)
    n = train_rows + n_val
    labels = rng.integers(0, classes, n)
    config = rows_config(pool="map", image_size=side * 32)
    records = [store.Record("train" if i < train_rows else "val", f"{i:07d}.jpg", int(labels[i]), 1, 1, f"{i:064x}")
               for i in range(n)]
    header = store.Header(fingerprint=config.fingerprint(), config=config, class_names=[f"c{c}" for c in range(classes)],
                          feature_dim=config.feature_dim)

    def fetch(batch):
        index = np.array([int(r.path[:7]) for r in batch])
        g = np.random.default_rng(seed + 1 + int(index[0]))
        z = means[labels[index]] + g.standard_normal((len(index), latent)) * 1.0  # (b, latent)
        fmap = np.einsum("bl,lc,lhw->bchw", z, loadings, spatial, optimize=True)
        fmap += g.standard_normal(fmap.shape) * 0.8
        return np.maximum(fmap, 0).reshape(len(index), -1).astype(np.float32)

    store.write_atomic(path, header, records, fetch, "float16")
    return path


def _cli(args: list[str], env: dict | None = None) -> tuple[float, dict]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", RSS_PROBE, "-q", *args], cwd=ROOT, capture_output=True, text=True,
                          env=env)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"bench: pipeline {' '.join(args)} failed: {done.stderr.strip()[-800:]}")
    return seconds, json.loads(done.stdout.strip().splitlines()[-1])


def sweep(cache: Path, out: Path, head: str, solver: str | None = None, extra: tuple[str, ...] = ()) -> dict:
    """One `train-head` sweep as a whole command: seconds, fit seconds, the choice and validation accuracy."""
    args = ["train-head", str(cache), "--head", head, "--pool", "auto", "--out", str(out), *extra]
    if head == "logreg":
        args += ["--norm", "auto"]
    if solver:
        args += ["--solver", solver]
    seconds, rss = _cli(args)
    record = json.loads((out / "run.json").read_text())
    return {"seconds": seconds, "fit_seconds": record["timings"]["fit_seconds"], "peak_rss_mb": rss["peak_rss_mb"],
            "chosen": record["head"]["chosen"], "candidates": len(record["sweep"]),
            "val_accuracy": json.loads((out / "metrics.json").read_text())["val"]["accuracy"],
            "table": {json.dumps([row["pool"], row["params"]], sort_keys=True): row["val_accuracy"]
                      for row in record["sweep"]}}


def compare(reference: dict, new: dict) -> dict:
    """How far the new sweep's candidates are from the reference's (validation accuracy, points)."""
    gaps = [abs(new["table"][key] - acc) * 100 for key, acc in reference["table"].items() if key in new["table"]]
    return {"speedup": reference["seconds"] / new["seconds"], "max_gap_points": max(gaps, default=0.0),
            "same_choice": reference["chosen"] == new["chosen"]}


if __name__ == "__main__":
    import argparse
    import tempfile

    p = argparse.ArgumentParser(description="row 13 alone: the sweeps on synthetic map caches")
    p.add_argument("--rows", type=int, nargs="+", default=[1000])
    p.add_argument("--heads", nargs="+", default=["logreg"])
    p.add_argument("--solvers", nargs="+", default=["sklearn", "torch"])
    p.add_argument("--keep", type=Path, default=None, help="keep the caches in this folder")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = a.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for rows in a.rows:
            cache = folder / f"map{rows}.h5"
            if not cache.exists():
                synthetic_map_cache(cache, rows)
            for head in a.heads:
                results = {}
                for solver in a.solvers if head == "logreg" else [None]:
                    results[solver] = sweep(cache, Path(tmp) / f"run-{rows}-{head}-{solver}", head, solver)
                    r = results[solver]
                    print(f"{rows} rows {head} {solver}: {r['seconds']:.1f} s (fit {r['fit_seconds']:.1f} s), "
                          f"chose {r['chosen']}, val {r['val_accuracy']:.3f}, peak {r['peak_rss_mb']:.0f} MB", flush=True)
                if len(results) == 2:
                    print("  ", compare(*results.values()), flush=True)
