"""`make bench` rows 10: what the probe protocol costs.

10a: one `extract --pool map`, then `train-head --pool auto` sweeping every pooling x the 45-value C grid on it
     (whole commands, fresh processes): the sweep (reading and pooling the map, every fit, scoring: run.json's
     fit_seconds) should cost at most 1/20 of the extraction it replaces; the whole command is reported beside it.
10b: the 45-value C grid fitted along a warm-started path against the former 7 independent fits, on 10k x 512
     synthetic features.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _timed_cli(*args: str) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pipeline", "-q", *args], cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"bench: pipeline {' '.join(args)} failed: {done.stderr.strip()[-500:]}")
    return time.perf_counter() - start


def bench_map_sweep(data: Path, weights: str, tmp: Path) -> dict:
    cache, run = tmp / "protocol-map.h5", tmp / "protocol-run"
    extract_s = _timed_cli("extract", str(data), "--weights", weights, "--pool", "map", "--out", str(cache), "--force")
    sweep_s = _timed_cli("train-head", str(cache), "--pool", "auto", "--out", str(run))
    record = json.loads((run / "run.json").read_text())
    return {"extract_seconds": extract_s, "command_seconds": sweep_s, "sweep_seconds": record["timings"]["fit_seconds"],
            "candidates": len(record["sweep"]),
            "chosen": record["head"]["chosen"], "file_mb": cache.stat().st_size / 1e6,
            "val_accuracy": json.loads((run / "metrics.json").read_text())["val"]["accuracy"]}


def bench_c_path(synthetic_features, n: int = 10_000) -> dict:
    from pipeline.heads.logreg import LogRegHead
    from pipeline.heads.registry import LOGREG_C

    X, y = synthetic_features(int(n * 1.25))
    Xt, yt, Xv, yv = X[:n], y[:n], X[n:], y[n:]
    start = time.perf_counter()
    former = [LogRegHead(C=float(c)).fit(Xt, yt) for c in np.logspace(-4, 2, 7)]
    former_s = time.perf_counter() - start
    start = time.perf_counter()
    path = LogRegHead().fit_path(Xt, yt, list(LOGREG_C))
    path_s = time.perf_counter() - start
    best = lambda heads: max(h.score(Xv, yv) for h in heads)
    return {"rows": n, "former_seconds": former_s, "path_seconds": path_s, "former_val_accuracy": best(former),
            "path_val_accuracy": best(path)}


def bench_protocol(data: Path, weights: str, tmp: Path, synthetic_features) -> dict:
    out = {"map": bench_map_sweep(data, weights, tmp)}
    print(f"  map extraction {out['map']['extract_seconds']:.1f} s, pooling sweep {out['map']['sweep_seconds']:.1f} s "
          f"(whole command {out['map']['command_seconds']:.1f} s)",
          flush=True)
    out["c_path"] = bench_c_path(synthetic_features)
    print(f"  45-value path {out['c_path']['path_seconds']:.1f} s, 7 fits {out['c_path']['former_seconds']:.1f} s",
          flush=True)
    return out


def markdown_rows(p: dict) -> list[str]:
    m, c = p["map"], p["c_path"]
    from pipeline.runs.record import describe_chosen

    chosen = describe_chosen(m["chosen"])
    return [f"| 10 | `extract --pool map` (whole command), {m['file_mb']:.1f} MB | {m['extract_seconds']:.1f} s |",
            f"| 10 | `train-head --pool auto` on it: {m['candidates']} fits (every pooling x 45 C), chose {chosen} | "
            f"sweep {m['sweep_seconds']:.1f} s (whole command {m['command_seconds']:.1f} s), val acc {m['val_accuracy']:.3f} |",
            f"| 10 | logreg, 45 C along a warm-started path, {c['rows']:,} x 512 synthetic | {c['path_seconds']:.1f} s, "
            f"val acc {c['path_val_accuracy']:.3f} |",
            f"| 10 | logreg, the former 7 independent fits, same rows | {c['former_seconds']:.1f} s, "
            f"val acc {c['former_val_accuracy']:.3f} |"]


def targets(p: dict) -> list[tuple[str, str, str, bool | None]]:
    m, c = p["map"], p["c_path"]
    return [("pooling sweep on a map cache / its extraction", f"1/{m['extract_seconds'] / m['sweep_seconds']:.1f}",
             "<= 1/20", m["sweep_seconds"] * 20 <= m["extract_seconds"]),
            ("45-value C path / former 7 fits, 10k x 512", f"{c['path_seconds'] / c['former_seconds']:.2f}x", "reported", None)]
