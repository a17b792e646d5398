"""Fine-tuning block 5 from a cached pool4 map, against a probe on pool5 and against the tutorial's loop.

    python bench/finetune.py [--data DIR] [--weights FILE] [--tutorial-epochs N] [--datasets original,degraded]

One table per dataset (docs/heads.md, "Fine-tuning block 5"): each row is whole commands in fresh processes, timed from
the images on disk to a trained head (extract, then train-head), with its validation accuracy:
  logreg on pool5       extract (avg pool5), train-head --head logreg
  block5 on pool4       extract --layer pool4 --pool map, train-head --head block5
  block5, --augment 4   the same with 4 cached augmented views of each training image
  tutorial loop         bench/tutorial.py: N epochs of the whole network (25 in the tutorial; fewer here to save
                        time: its 25-epoch time is extrapolated from the epochs run, its accuracy is the best of them)
`--datasets degraded` builds a copy of the data far from ImageNet (degraded_copy) and measures the same rows on it.
`make bench` row 11 is `bench_block5`: pool4 extraction + block5 training against row 4's 25 tutorial epochs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from protocol import _timed_cli  # noqa: E402

DEGRADED_SIDE = 48  # px: the shorter side every image is shrunk to, in grey, before going back to its own size


def degraded_copy(src: Path, dst: Path, side: int = DEGRADED_SIDE) -> Path:
    """`src` with every decodable image turned grey and blurred: shrunk so that its shorter side is `side` px, then
    resized back (bilinear). Colour and fine texture, what ImageNet features lean on, are gone; the object's shape
    stays. Files Pillow cannot read are copied as they are (the dataset's quirks stay quirks)."""
    for path in sorted(p for p in Path(src).rglob("*") if p.is_file()):
        out = dst / path.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            with Image.open(path) as img:
                grey = ImageOps.exif_transpose(img).convert("L")
        except OSError:
            shutil.copyfile(path, out)
            continue
        scale = side / min(grey.size)
        small = grey.resize((max(1, round(grey.width * scale)), max(1, round(grey.height * scale))), Image.BILINEAR)
        small.resize(grey.size, Image.BILINEAR).convert("RGB").save(out, quality=95)  # format: from the name
    return dst


def probe_row(data: Path, weights: str, tmp: Path, name: str, extract_args: list[str], head_args: list[str]) -> dict:
    """Extract, then train a head, as a user would: two commands, timed whole; the run's validation accuracy."""
    cache, run = tmp / f"{name}.h5", tmp / f"{name}-run"
    tmp.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(run, ignore_errors=True)
    extract_s = _timed_cli("extract", str(data), "--weights", weights, "--out", str(cache), "--force", *extract_args)
    train_s = _timed_cli("train-head", str(cache), "--out", str(run), *head_args)
    record = json.loads((run / "run.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    images = record["splits"]["n_train"] + record["splits"]["n_val"]
    return {"name": name, "extract_seconds": extract_s, "train_seconds": train_s, "seconds": extract_s + train_s,
            "images": images, "images_per_s": images / (extract_s + train_s), "val_accuracy": metrics["val"]["accuracy"],
            "file_mb": cache.stat().st_size / 1e6, "chosen": record["head"]["chosen"],
            "views_per_image": record["splits"].get("views_per_image", 0)}


def bench_block5(data: Path, weights: str, tmp: Path) -> dict:
    """`make bench` row 11: from the images to a trained block5 head (pool4 extraction, then train-head)."""
    return probe_row(data, weights, tmp, "block5", ["--layer", "pool4", "--pool", "map"], ["--head", "block5"])


def table(data: Path, weights: str, tmp: Path, tutorial_epochs: int) -> list[dict]:
    import tutorial

    rows = [probe_row(data, weights, tmp, "logreg-pool5", [], ["--head", "logreg"]),
            bench_block5(data, weights, tmp),
            probe_row(data, weights, tmp, "block5-augment4", ["--layer", "pool4", "--pool", "map", "--augment", "4"],
                      ["--head", "block5"])]
    t = tutorial.fit(data, weights, tutorial_epochs)
    rows.append({"name": f"tutorial loop (best of {tutorial_epochs} epochs)", "seconds": t["seconds"],
                 "seconds_25_epochs": 25 * t["epoch_seconds"], "images": t["images"],
                 "images_per_s": t["images"] / (25 * t["epoch_seconds"]), "loop_images_per_s": t["images_per_s"],
                 "val_accuracy": t["val_accuracy"], "history": t["history"]})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| strategy | val accuracy | wall time to the trained head | images/s (dataset / wall time) |",
             "|---|---|---|---|"]
    for r in rows:
        if "extract_seconds" in r:
            when = f"{r['seconds']:.0f} s ({r['extract_seconds']:.0f} + {r['train_seconds']:.0f})"
        else:
            when = f"{r['seconds_25_epochs'] / 60:.1f} min for 25 epochs ({r['seconds']:.0f} s measured)"
        lines.append(f"| {r['name']} | {r['val_accuracy']:.3f} | {when} | {r['images_per_s']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    shared = ROOT.parent / "shared"
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=shared / "data" / "hymenoptera")
    p.add_argument("--weights", default=str(shared / "weights" / "vgg16_imagenet_features.pth"))
    p.add_argument("--tutorial-epochs", type=int, default=5)
    p.add_argument("--datasets", default="original,degraded",
                   help="original (--data), degraded (its grey, blurred copy), or both, comma-separated")
    p.add_argument("--work", type=Path, default=Path("/tmp/vggcache-finetune"))
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "finetune.json")
    args = p.parse_args()
    wanted = args.datasets.split(",")
    datasets = {"original": args.data} if "original" in wanted else {}
    if "degraded" in wanted:
        datasets["degraded"] = degraded_copy(args.data, args.work / "data-degraded")
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}  # a table measured before is kept
    for name, data in datasets.items():
        start = time.perf_counter()
        results[name] = table(data, args.weights, args.work / name, args.tutorial_epochs)
        print(f"\n{name} ({data}, {time.perf_counter() - start:.0f} s)\n{markdown(results[name])}", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
