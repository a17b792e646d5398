"""The GPU checks that fit a short lease (about 5 minutes on an H200, `bash bench/gpu.sh --quick`): rows 1 and 3
(the bare forward in bf16, and `extract` end to end on generated JPEGs), then row 13's logreg and linear auto sweeps
on synthetic 6-class map caches on CUDA (logreg: the whole C path one batched L-BFGS problem), with the logreg sweep
on the same machine's CPU beside them. Writes gpu-quick.json and gpu-quick.md under the results folder.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import sweeps  # noqa: E402

import bench  # noqa: E402


def sweep_on(cache: Path, out: Path, head: str, device: str) -> dict:
    args = ["train-head", str(cache), "--head", head, "--pool", "auto", "--device", device, "--out", str(out)]
    if head == "logreg":
        args += ["--norm", "auto"]
    seconds, _ = sweeps._cli(args)
    record = json.loads((out / "run.json").read_text())
    return {"seconds": seconds, "fit_seconds": record["timings"]["fit_seconds"], "chosen": record["head"]["chosen"],
            "val_accuracy": json.loads((out / "metrics.json").read_text())["val"]["accuracy"],
            "methods": sorted(set(m.split(":")[0] for m in record["head"].get("methods", {}).values()))}


def main(results: Path, images: int = 4000, sizes=(4000, 16000), where: str = "cuda") -> None:
    device = torch.device(where)
    r = {"machine": bench.machine(device)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print("1. limit", flush=True)
        r["limit"] = bench.bench_limit(device, (128, 256), ("channels_last",), ["bf16"], 2.0)
        print("3. extract", flush=True)
        data = bench.generated_jpegs(tmp / "jpegs", images)
        r["extract"] = bench.bench_extract(data, "none", where, "cpu", tmp / "bench.h5")
        print(f"  {r['extract']['images_per_s']:.0f} images/s", flush=True)
        r["sweeps"] = {}
        for n in sizes:
            cache = sweeps.synthetic_map_cache(tmp / f"sweep{n}.h5", n, 6)
            row = r["sweeps"][n] = {}
            for head, dev in (("logreg", where), ("linear", where), ("logreg", "cpu")):
                if dev == "cpu" and (n > 4000 or where == "cpu"):
                    continue
                row[f"{head}_{dev}"] = sweep_on(cache, tmp / f"run-{n}-{head}-{dev}", head, dev)
                print(f"13. {n:,} rows, {head} on {dev}: {row[f'{head}_{dev}']['seconds']:.1f} s", flush=True)
    results.mkdir(parents=True, exist_ok=True)
    (results / "gpu-quick.json").write_text(json.dumps(r, indent=2, default=str))
    e, best = r["extract"], r["limit"]["best"]["bf16"]
    lines = [f"Machine: {r['machine']}", "", "| # | what | figure |", "| --- | --- | --- |",
             f"| 1 | limit: bare `vgg16.features`, bf16, channels_last, batch {best['batch']} | "
             f"{best['images_per_s']:,.0f} images/s |",
             f"| 3 | `extract` end to end, {e['images']:,} generated JPEGs ({e['precision']}, batch {e['batch']}, "
             f"{e['workers']} workers) | {e['images_per_s']:,.0f} images/s ({e['seconds']:.1f} s) |"]
    for n, row in r["sweeps"].items():
        for key, v in row.items():
            head, dev = key.split("_")
            lines.append(f"| 13 | `{head}` auto sweep on {dev}, synthetic {n:,} rows x 6 classes (extracting them: "
                         f"{n / e['images_per_s']:.1f} s) | {v['seconds']:.1f} s (fit {v['fit_seconds']:.1f} s), "
                         f"val acc {v['val_accuracy']:.3f}, chose {v['chosen']}, {', '.join(v['methods'])} |")
    (results / "gpu-quick.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "bench" / "results")
