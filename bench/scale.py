"""`make bench` rows for scaling out: extraction on several processes, heads streamed from caches over a budget.

Every figure is a whole process, started fresh, so start-up costs count as they do for a user; ratios compare
figures of the same run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _extract_cmd(data: Path, out: Path, weights: str) -> list[str]:
    return ["-m", "pipeline", "-q", "extract", str(data), "--out", str(out), "--weights", weights, "--force"]


def subset(data: Path, root: Path, per_class: int) -> Path:
    """The first `per_class` images of every class folder of every split (copied), for a row that must stay short."""
    for split in (p for p in sorted(data.iterdir()) if p.is_dir()):
        for cls in (p for p in sorted(split.iterdir()) if p.is_dir()):
            target = root / split.name / cls.name
            target.mkdir(parents=True, exist_ok=True)
            for image in sorted(f for f in cls.iterdir() if f.is_file())[:per_class]:
                shutil.copy(image, target / image.name)
    return root


def bench_processes(data: Path, weights: str, tmp: Path, processes: int, device: str = "cpu") -> dict:
    """2 processes x 1 thread (torchrun) against 1 process x all threads, on the same images: end-to-end images/s."""
    n_images = sum(1 for p in data.rglob("*") if p.is_file())
    threads = os.cpu_count() or 1
    runs = {
        "single": ([sys.executable, *_extract_cmd(data, tmp / "one.h5", weights)], {}),
        "torchrun": ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
                      *_extract_cmd(data, tmp / "many.h5", weights)],
                     {"OMP_NUM_THREADS": str(max(1, threads // processes))} if device == "cpu" else {}),
    }
    out = {"images": n_images, "processes": processes, "threads_per_process": max(1, threads // processes)}
    for name, (cmd, env) in runs.items():
        start = time.perf_counter()
        done = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, **env), capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            said = [line for line in done.stderr.splitlines() if "error:" in line or "interrupted" in line]
            raise RuntimeError(f"{name} extract failed: {' | '.join(said) or done.stderr[-2000:]}")
        out[name] = {"seconds": seconds, "images_per_s": n_images / seconds}
        print(f"  {name}: {n_images / seconds:.2f} images/s", flush=True)
    out["ratio"] = out["torchrun"]["images_per_s"] / out["single"]["images_per_s"]
    return out


STREAM_PROBE = """
import json, sys, time
from pipeline.heads.config import HeadConfig
from pipeline.train.config import TrainConfig
from pipeline.train.runner import train_head
start = time.perf_counter()
heads = {"linear": HeadConfig(kind="linear", weight_decay=1e-3, lr=1e-3, epochs=5, patience=100),
         "logreg": HeadConfig(kind="logreg", C=1.0)}
run = train_head(TrainConfig(features=sys.argv[1], out=sys.argv[2], memory_budget=sys.argv[3], head=heads[sys.argv[4]]))
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"fit_seconds": run.record.timings.fit_seconds, "mode": run.record.loading.mode,
                  "val_accuracy": run.metrics["val"]["accuracy"], "peak_mb": hwm / 1024}))
"""


def synthetic_cache(path: Path, rows: int, dim: int = 512, classes: int = 10) -> Path:
    """A train/val cache of separable-ish random features, written through the real schema, in blocks."""
    from pipeline.cache.header import Header
    from pipeline.cache.identity import generated_config
    from pipeline.cache.record import Record
    from pipeline.cache.writer import write_atomic

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((classes, dim)).astype(np.float32)
    labels = rng.integers(0, classes, rows)
    records = [Record("train" if i % 5 else "val", f"{i:08d}.jpg", int(labels[i]), 1, 1, "0" * 64)
               for i in range(rows)]
    header = Header(fingerprint=generated_config().fingerprint(), config=generated_config(), class_names=[str(c) for c in range(classes)], feature_dim=dim)

    def fetch(batch):
        index = np.array([int(r.path[:8]) for r in batch])
        noise = np.random.default_rng(int(index[0])).standard_normal((len(index), dim)).astype(np.float32) * 3
        return np.maximum(centres[labels[index]] + noise, 0)  # ReLU-like, as pooled features are

    write_atomic(path, header, records, fetch, "float16")
    return path


def bench_streaming(tmp: Path, budget_mb: int = 32, multiples=(4, 16), head: str = "linear") -> dict:
    """A head in memory and streamed, on caches `multiples` times the budget (float32 rows): the linear head (5
    epochs), or logreg (one C: a streamed path costs two passes over the file an iteration)."""
    out = {"budget_mb": budget_mb, "head": head}
    for k in multiples:
        rows = k * budget_mb * (1 << 20) // (512 * 4 + 8)
        path = synthetic_cache(tmp / f"stream{k}.h5", rows)
        row = {"rows": rows}
        for mode, budget in (("memory", "1T"), ("stream", f"{budget_mb}M")):
            done = subprocess.run([sys.executable, "-c", STREAM_PROBE, str(path), str(tmp / f"run-{k}-{mode}-{head}"),
                                   budget, head],
                                  cwd=ROOT, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"streaming row failed: {done.stderr[-2000:]}")
            row[mode] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"  {k}x budget, {mode}: fit {row[mode]['fit_seconds']:.1f} s, peak {row[mode]['peak_mb']:.0f} MB, "
                  f"val {row[mode]['val_accuracy']:.3f}", flush=True)
        row["fit_ratio"] = row["stream"]["fit_seconds"] / row["memory"]["fit_seconds"]
        out[str(k)] = row
        path.unlink()
    return out
