"""`make bench` rows for WebDataset input: the same images read from a folder and from tar shards, measured in one
run: the reading rate alone (read, decode, resize, batch: no forward) and `extract` end to end.

    python bench/tar_shards.py [--images 1200] [--size 64] [--per-shard 200] [--workers 1]
"""

from __future__ import annotations

import argparse
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.extraction import reader  # noqa: E402
from pipeline.extraction.config import ExtractConfig, extract_feature_config  # noqa: E402
from pipeline.extraction.dataset import discover  # noqa: E402
from pipeline.extraction.runner import extract  # noqa: E402
from pipeline.synthetic import make_image_folder  # noqa: E402


def pack(folder: Path, out: Path, per_shard: int) -> list[str]:
    """The folder's images as WebDataset shards (key.jpg + key.txt, the class), in the folder's order."""
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(folder.rglob("*.jpg"))
    specs = []
    for start in range(0, len(files), per_shard):
        shard = out / f"train-{start // per_shard:05d}.tar"
        with tarfile.open(shard, "w") as tar:
            for f in files[start:start + per_shard]:
                key = f"{f.parts[-2]}_{f.stem}"
                tar.add(f, arcname=f"{key}.jpg")
                label = out / ".label"
                label.write_text(f.parts[-2])
                tar.add(label, arcname=f"{key}.txt")
        specs.append(f"train={shard}")
    return specs


def reading_rate(data, size: int, workers: int) -> float:
    """Images per second through the loader alone (read, decode, resize, crop, batch), as extract reads them."""
    dataset = discover(data)
    fcfg = extract_feature_config(ExtractConfig(data=data, weights="none", image_size=size))
    paths = [item.path for item in dataset.items]
    files = reader.ImageFiles(dataset.root, paths, fcfg.resize_size, fcfg.image_size)
    source = reader.TarSamples(files, dataset.tars) if dataset.tars else files
    start = time.perf_counter()
    n = sum(len(batch["error"]) for batch in reader.batches_of(reader.make_loader(source, 32, workers, False)))
    assert n == len(paths)
    return n / (time.perf_counter() - start)


def end_to_end(data, out: Path, size: int, workers: int) -> float:
    start = time.perf_counter()
    extract(ExtractConfig(data=data, out=out, weights="none", image_size=size, workers=workers, precision="fp32"))
    return time.perf_counter() - start


def run(tmp: Path, images: int = 1200, size: int = 64, per_shard: int = 200, workers: int = 1) -> dict:
    folder = make_image_folder(tmp / "images", {"train": images // 3}, size=(160, 120))
    specs = pack(folder, tmp / "shards", per_shard)
    n = len(list(folder.rglob("*.jpg")))
    rows = {"images": n, "shards": len(specs), "image_size": size, "workers": workers}
    rows["read_folder_images_per_s"] = reading_rate(folder, size, workers)
    rows["read_tars_images_per_s"] = reading_rate(tuple(specs), size, workers)
    rows["extract_folder_s"] = end_to_end(folder, tmp / "folder.h5", size, workers)
    rows["extract_tars_s"] = end_to_end(tuple(specs), tmp / "tars.h5", size, workers)
    return rows


def markdown(r: dict) -> str:
    return "\n".join([
        f"{r['images']} JPEGs of 160 x 120 px, {r['shards']} shards, crop {r['image_size']}, {r['workers']} decode "
        "worker(s)", "",
        "| what | folder | tar shards | shards / folder |", "| --- | --- | --- | --- |",
        f"| reading rate (no forward), images/s | {r['read_folder_images_per_s']:.0f} | "
        f"{r['read_tars_images_per_s']:.0f} | {r['read_tars_images_per_s'] / r['read_folder_images_per_s']:.2f} |",
        f"| extract end to end, s | {r['extract_folder_s']:.1f} | {r['extract_tars_s']:.1f} | "
        f"{r['extract_tars_s'] / r['extract_folder_s']:.2f} |"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--per-shard", type=int, default=200)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(markdown(run(Path(tmp), args.images, args.size, args.per_shard, args.workers)))


if __name__ == "__main__":
    main()
