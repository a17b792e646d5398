"""`make bench` row 16: stage two as a user meets it, the code before issue 25 (BEFORE) against today's, in one run.

16a: the default `train-head` on a real pooled cache (hymenoptera's default: 245 training rows x 512): its fit
     against `--solver sklearn`'s (the reference), each the median of 3 whole commands taken in turn; the choice of
     both; the whole command's wall time and where it goes (run.json's timings; the rest is starting Python and
     importing). BEFORE's default command beside it.
16b: an unchanged rerun of `extract` (fresh process) at 10,000 images (generated 80x60 JPEGs, extracted at 32 px so
     that the first extraction is quick here), against extracting as many images at row 3's rate; BEFORE's rerun of
     the same cache beside it.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEFORE = "9313fbb"  # the last commit before issue 25 (the default head's solver, the imports, the rerun)


def worktree(tmp: Path, commit: str) -> Path | None:
    """A checkout of `commit` beside the working tree (git worktree); None when git cannot make one."""
    target = tmp / f"tree-{commit}"
    done = subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(target), commit],
                          capture_output=True, text=True)
    return target if done.returncode == 0 else None


def remove_worktree(tree: Path | None) -> None:
    if tree is not None:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)


def cli(args: list[str], tree: Path | None = None) -> tuple[float, str]:
    """A whole `pipeline` command, in a fresh process (`tree`: another checkout's code): wall seconds, stdout."""
    import os

    env = None if tree is None else os.environ | {"PYTHONPATH": str(tree)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pipeline", "-q", *args], cwd=tree or ROOT, capture_output=True,
                          text=True, env=env)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"bench: pipeline {' '.join(args)} failed: {done.stderr.strip()[-800:]}")
    return seconds, done.stdout


def train_head(cache: Path, out: Path, extra: list[str], tree: Path | None = None) -> dict:
    seconds, _ = cli(["train-head", str(cache), "--out", str(out), *extra], tree)
    record = json.loads((out / "run.json").read_text())
    return {"seconds": seconds, "timings": record["timings"], "chosen": record["head"]["chosen"],
            "methods": record["head"].get("methods", {})}


def bench_default_head(cache: Path, tmp: Path, before: Path | None, repeats: int = 3) -> dict:
    """16a: the default train-head and the reference, `repeats` times each in turn; medians."""
    runs: dict[str, list[dict]] = {"default": [], "sklearn": [], "before": []}
    for i in range(repeats):
        runs["default"].append(train_head(cache, tmp / f"head-default-{i}", []))
        runs["sklearn"].append(train_head(cache, tmp / f"head-sklearn-{i}", ["--solver", "sklearn"]))
        if before is not None:
            runs["before"].append(train_head(cache, tmp / f"head-before-{i}", [], before))
    out = {}
    for name, done in runs.items():
        if not done:
            continue
        timings = {key: statistics.median(r["timings"].get(key) or 0.0 for r in done) for key in done[0]["timings"]}
        out[name] = {"seconds": statistics.median(r["seconds"] for r in done), "timings": timings,
                     "chosen": done[0]["chosen"], "methods": done[0]["methods"]}
        out[name]["rest_seconds"] = out[name]["seconds"] - sum(timings.values())
    return out


def bench_rerun(tmp: Path, before: Path | None, images: int = 10_000) -> dict:
    """16b: first extraction of `images` small JPEGs, then the unchanged rerun, today's and BEFORE's."""
    from pipeline.synthetic import make_image_folder

    per_class = images // 3 + (images % 3 > 0)
    data = make_image_folder(tmp / "rerun-images", {"train": per_class}, size=(80, 60), seed=1)
    cache = tmp / "rerun.h5"
    args = ["extract", str(data), "--weights", "none", "--image-size", "32", "--out", str(cache)]
    first, _ = cli(args)
    rerun, said = cli(args)
    out = {"images": 3 * per_class, "first_seconds": first, "rerun_seconds": rerun, "up_to_date": "up to date" in said}
    if before is not None:
        out["before_rerun_seconds"] = cli(args, before)[0]
    return out


def bench_stage_two(tmp: Path, pooled_cache: Path | None) -> dict:
    before = worktree(tmp, BEFORE)
    try:
        out = {"before": BEFORE if before else None}
        if pooled_cache is not None:
            out["head"] = bench_default_head(pooled_cache, tmp, before)
            h = out["head"]
            print(f"  default train-head fit {h['default']['timings']['fit_seconds']:.2f} s, --solver sklearn "
                  f"{h['sklearn']['timings']['fit_seconds']:.2f} s", flush=True)
        out["rerun"] = bench_rerun(tmp, before)
        print(f"  rerun at {out['rerun']['images']:,} images: {out['rerun']['rerun_seconds']:.2f} s", flush=True)
    finally:
        remove_worktree(before)
    return out


def _breakdown(r: dict) -> str:
    t = r["timings"]
    parts = [f"load {t['load_seconds']:.2f}", f"fit {t['fit_seconds']:.2f}"]
    parts += [f"{name} {t[key]:.2f}" for name, key in (("score", "score_seconds"), ("save", "save_seconds")) if t.get(key)]
    return f"{r['seconds']:.2f} s ({', '.join(parts)}, start-up and imports {r['rest_seconds']:.2f})"


def markdown_rows(r: dict, images_per_s: float) -> list[str]:
    lines = []
    if "head" in r:
        h = r["head"]
        for name, what in (("default", "default"), ("sklearn", "`--solver sklearn`"), ("before", f"default at {BEFORE}")):
            if name in h:
                lines.append(f"| 16 | `train-head`, {what}, real pooled cache (median of 3 whole commands) | "
                             f"{_breakdown(h[name])}; chose {h[name]['chosen']} |")
    v = r["rerun"]
    before = f"; at {BEFORE}: {v['before_rerun_seconds']:.2f} s" if "before_rerun_seconds" in v else ""
    lines.append(f"| 16 | unchanged `extract` rerun, {v['images']:,} images (first extraction at 32 px: "
                 f"{v['first_seconds']:.0f} s; at row 3's rate: {v['images'] / images_per_s:.0f} s) | "
                 f"{v['rerun_seconds']:.2f} s{before} |")
    return lines


def targets(r: dict, images_per_s: float) -> list[tuple[str, str, str, bool | None]]:
    rows = []
    if "head" in r:
        new, ref = (r["head"][k]["timings"]["fit_seconds"] for k in ("default", "sklearn"))
        rows.append(("default train-head fit / `--solver sklearn` fit, real pooled cache", f"{new / ref:.2f}x",
                     "<= 1.25x", new <= 1.25 * ref))
        same = r["head"]["default"]["chosen"] == r["head"]["sklearn"]["chosen"]
        rows.append(("default train-head chooses as `--solver sklearn`", "yes" if same else "NO", "yes", same))
    v = r["rerun"]
    extraction = v["images"] / images_per_s
    rows.append((f"unchanged rerun / extracting as many images, {v['images']:,}", f"1/{extraction / v['rerun_seconds']:.0f}",
                 "<= 1/50", v["rerun_seconds"] * 50 <= extraction))
    return rows


if __name__ == "__main__":
    import argparse
    import tempfile

    p = argparse.ArgumentParser(description="row 16 alone: the default train-head and an unchanged rerun")
    p.add_argument("--cache", type=Path, default=None, help="a real pooled cache (extract DATA)")
    p.add_argument("--images-per-s", type=float, default=4.0, help="this machine's extraction speed (bench row 3)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = bench_stage_two(Path(tmp), a.cache)
    print("\n".join(markdown_rows(result, a.images_per_s)))
    for row in targets(result, a.images_per_s):
        print(row)
