"""`make bench` row 13: the head sweeps of train-head on map caches, the code before issue 25 (BASELINE) against
today's, in the same run; row 14: logistic regression streamed from a cache over the memory budget.

13: synthetic 7x7x512 map caches of 1,000, 3,000 and 4,000 training rows in 2, 4 and 6 classes, and 16,000 in 6
    (ReLU features of a low-rank latent with correlated channels and overlapping classes, so that solvers need
    realistic iteration counts), and a real one when given (hymenoptera with 8 augmented views of each training
    image); logreg `--pool auto --norm auto` (5 poolings x 3 normalisations x 45 C) and linear `--pool auto`
    (5 poolings x 8 configurations), whole commands, against extracting as many images (row 3's rate, or the real
    cache's own extraction).
14: logreg on a pooled cache at 4x and 16x the memory budget, streamed, against the same fit in memory: peak RSS
    and fit time.
"""

from __future__ import annotations

import json
import os
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
    from pipeline.cache.header import Header
    from pipeline.cache.identity import generated_config
    from pipeline.cache.record import Record
    from pipeline.cache.writer import write_atomic

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
    config = generated_config(pool="map", image_size=side * 32)
    records = [Record("train" if i < train_rows else "val", f"{i:07d}.jpg", int(labels[i]), 1, 1, f"{i:064x}")
               for i in range(n)]
    header = Header(fingerprint=config.fingerprint(), config=config, class_names=[f"c{c}" for c in range(classes)],
                          feature_dim=config.feature_dim)

    def fetch(batch):
        index = np.array([int(r.path[:7]) for r in batch])
        g = np.random.default_rng(seed + 1 + int(index[0]))
        z = means[labels[index]] + g.standard_normal((len(index), latent)) * 1.0  # (b, latent)
        fmap = np.einsum("bl,lc,lhw->bchw", z, loadings, spatial, optimize=True)
        fmap += g.standard_normal(fmap.shape) * 0.8
        return np.maximum(fmap, 0).reshape(len(index), -1).astype(np.float32)

    write_atomic(path, header, records, fetch, "float16")
    return path


def _cli(args: list[str], tree: Path | None = None) -> tuple[float, dict]:
    """A whole `pipeline` command and its peak RSS; `tree`: run another checkout's code (from inside it, since
    `python -c` puts the current folder first on the path)."""
    start = time.perf_counter()
    env = None if tree is None else os.environ | {"PYTHONPATH": str(tree)}
    done = subprocess.run([sys.executable, "-c", RSS_PROBE, "-q", *args], cwd=tree or ROOT, capture_output=True,
                          text=True, env=env)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"bench: pipeline {' '.join(args)} failed: {done.stderr.strip()[-800:]}")
    return seconds, json.loads(done.stdout.strip().splitlines()[-1])


def sweep(cache: Path, out: Path, head: str, tree: Path | None = None) -> dict:
    """One `train-head` sweep as a whole command (`tree`: today's code): seconds, fit seconds, the choice,
    validation accuracy and every candidate's."""
    args = ["train-head", str(cache), "--head", head, "--pool", "auto", "--out", str(out)]
    if head == "logreg":
        args += ["--norm", "auto"]
    seconds, rss = _cli(args, tree)
    record = json.loads((out / "run.json").read_text())
    return {"seconds": seconds, "fit_seconds": record["timings"]["fit_seconds"], "peak_rss_mb": rss["peak_rss_mb"],
            "chosen": record["head"]["chosen"], "candidates": len(record["sweep"]),
            "val_accuracy": json.loads((out / "metrics.json").read_text())["val"]["accuracy"],
            "table": {_key(row): row["val_accuracy"] for row in record["sweep"]}}


def _key(row: dict) -> str:
    """A candidate as both versions name it: pooling, normalisation and swept values (not every parameter)."""
    swept = {k: v for k, v in row["params"].items() if k in ("C", "lr", "weight_decay", "norm")}
    return json.dumps([row["pool"], swept], sort_keys=True)


def compare(reference: dict, new: dict) -> dict:
    """How far the new sweep's candidates are from the reference's (validation accuracy, points)."""
    gaps = [abs(new["table"][key] - acc) * 100 for key, acc in reference["table"].items() if key in new["table"]]
    return {"speedup": reference["seconds"] / new["seconds"], "max_gap_points": max(gaps, default=0.0),
            "same_choice": reference["chosen"] == new["chosen"]}


BASELINE = "9313fbb"  # the last commit before issue 25 (the Newton and batched L-BFGS solvers): row 13's "before"
SIZES = tuple((n, k) for n in (1000, 3000, 4000) for k in (2, 4, 6)) + ((16000, 6),)  # (training rows, classes)


def baseline_tree(tmp: Path) -> Path | None:
    """A checkout of BASELINE beside the working tree (git worktree), to run today's code in the same run; None
    when git cannot make one (a copy without history)."""
    target = tmp / "baseline"
    done = subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(target), BASELINE],
                          capture_output=True, text=True)
    return target if done.returncode == 0 else None


def remove_tree(tree: Path | None) -> None:
    if tree is not None:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)


def bench_sweeps(tmp: Path, real: tuple[Path, float] | None = None, sizes=SIZES, reference_rows: int = 1000) -> dict:
    """Row 13: the logreg and linear auto sweeps, today's code on every cache, BASELINE's on the synthetic caches
    of `reference_rows` and on the real one (`real`: the cache and the seconds its extraction took), in the same
    run."""
    tree = baseline_tree(tmp)
    out = {"baseline": BASELINE if tree else None, "caches": {}}
    caches = {"real": (None, real[0])} if real is not None and real[0].is_file() else {}  # the target's case first
    caches |= {f"synthetic {n:,}, {k} classes": (n, synthetic_map_cache(tmp / f"sweep{n}-{k}.h5", n, k))
               for n, k in sizes}
    try:
        for name, (n, cache) in caches.items():
            row = out["caches"][name] = {"train_rows": _train_rows(cache)}
            if n is None:
                row["extract_seconds"] = real[1]
            for head in ("logreg", "linear"):
                row[head] = sweep(cache, tmp / f"run-{name}-{head}".replace(" ", "-").replace(",", ""), head)
                if tree is not None and (n is None or n <= reference_rows):
                    row[f"{head}_before"] = sweep(cache, tmp / f"run-{name}-{head}-before".replace(" ", "-").replace(",", ""),
                                                  head, tree)
                    row[f"{head}_compare"] = compare(row[f"{head}_before"], row[head])
                print(f"  {name}: {head} {row[head]['seconds']:.1f} s" + (
                    f", at {BASELINE} {row[head + '_before']['seconds']:.1f} s ({row[head + '_compare']['speedup']:.1f}x, "
                    f"largest gap {row[head + '_compare']['max_gap_points']:.2f} points, same choice: "
                    f"{row[head + '_compare']['same_choice']})" if head + "_before" in row else ""), flush=True)
    finally:
        remove_tree(tree)
    return out


def _train_rows(cache: Path) -> int:
    from pipeline.cache.store import open_cache

    with open_cache(cache) as c:
        return c.split_shape("train")[0] * (1 + c.views_per_row("train"))


def extraction_seconds(row: dict, images_per_s: float) -> float:
    """What extracting the cache's training rows costs: the real cache's own extraction, else row 3's rate."""
    return row.get("extract_seconds") or row["train_rows"] / images_per_s


def markdown_rows(r: dict, images_per_s: float) -> list[str]:
    lines = []
    for name, row in r["caches"].items():
        n = row["train_rows"]
        for head in ("logreg", "linear"):
            new, before = row[head], row.get(f"{head}_before")
            what = "--pool auto --norm auto" if head == "logreg" else "--pool auto"
            figure = f"{new['seconds']:.1f} s ({new['candidates']} fits), val acc {new['val_accuracy']:.3f}"
            if before:
                c = row[f"{head}_compare"]
                figure += (f"; at {r['baseline']} {before['seconds']:.1f} s: {c['speedup']:.1f}x, largest gap "
                           f"{c['max_gap_points']:.2f} points, same choice: {'yes' if c['same_choice'] else 'NO'}")
            lines.append(f"| 13 | `{head}` {what}, {name} ({n:,} training rows; extracting them: "
                         f"{extraction_seconds(row, images_per_s):.0f} s) | {figure} |")
    return lines


def targets(r: dict, images_per_s: float) -> list[tuple[str, str, str, bool | None]]:
    rows, seconds = [], {}
    for name, row in r["caches"].items():
        budget = extraction_seconds(row, images_per_s)
        for head in ("logreg", "linear"):
            took = row[head]["seconds"]
            seconds[name, head] = took
            rows.append((f"{head} auto sweep (whole command), {name} / extracting as many images",
                         f"1/{budget / took:.1f}", "<= 1/10", took * 10 <= budget))
            c = row.get(f"{head}_compare")
            if c:
                rows.append((f"{head} auto sweep, {name}: {r['baseline']} / today", f"{c['speedup']:.1f}x", "reported", None))
                # neither solver is the exact optimum (both stop at a tolerance): the gap is reported; the tests hold
                # every candidate within 0.5 point of scikit-learn solved to 1e-8
                rows.append((f"{head} auto sweep, {name}: largest gap to {r['baseline']}'s candidates",
                             f"{c['max_gap_points']:.2f} points", "reported", None))
                rows.append((f"{head} auto sweep, {name}: same choice as {r['baseline']}",
                             "yes" if c["same_choice"] else "NO", "yes", c["same_choice"]))
    for k in (2, 4, 6):
        small, large = f"synthetic 1,000, {k} classes", f"synthetic 4,000, {k} classes"
        if (small, "logreg") in seconds and (large, "logreg") in seconds:
            growth = seconds[large, "logreg"] / seconds[small, "logreg"]
            rows.append((f"logreg auto sweep, {k} classes: 4,000 rows / 1,000 rows", f"{growth:.1f}x", "<= 4x", growth <= 4))
    return rows


if __name__ == "__main__":
    import argparse
    import tempfile

    p = argparse.ArgumentParser(description="rows 13 alone: the sweeps on synthetic map caches (and a real one)")
    p.add_argument("--sizes", nargs="+", default=[f"{n}x{k}" for n, k in SIZES], help="ROWSxCLASSES, e.g. 4000x6")
    p.add_argument("--real", type=Path, default=None, help="a real map cache (extract --pool map [--augment K])")
    p.add_argument("--real-extract-seconds", type=float, default=None, help="what extracting --real took")
    p.add_argument("--reference-rows", type=int, default=1000, help=f"run {BASELINE}'s code up to this many rows")
    p.add_argument("--images-per-s", type=float, default=4.0, help="this machine's extraction speed (bench row 3)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sizes = [tuple(int(v) for v in size.split("x")) for size in a.sizes]
        real = (a.real, a.real_extract_seconds) if a.real else None
        result = bench_sweeps(Path(tmp), real, sizes, a.reference_rows)
    print("\n".join(markdown_rows(result, a.images_per_s)))
    for row in targets(result, a.images_per_s):
        print(row)
