"""How similar are an image and its edited copy, and how similar are two distinct images: the evidence behind the
default `audit --threshold`.

    python bench/near_duplicates.py [--data DIR] [--weights FILE] [--copies 20] [--seed 0] [--picture PNG]

Edits `--copies` training images of the dataset in common ways (re-encoded, resized, cropped, mirrored,
brightened, rotated, grey), extracts the copies and the dataset with the same settings, and prints two tables
(docs/looking.md, "Choosing the threshold"): each edit's centred cosine to its source (the audit's similarity, centred on
the dataset's mean, as if the copies were a few among many), with the share caught at candidate thresholds; and
the most similar pairs of distinct images of the dataset itself, which a threshold must stay above. `--picture`
draws the closest distinct pair side by side (the picture in docs/looking.md).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from protocol import _timed_cli  # noqa: E402

from pipeline.cache.store import open_cache
from pipeline.heads.normalise import row_normalised  # noqa: E402

THRESHOLDS = (0.90, 0.92, 0.93, 0.94, 0.95)


def _centre_crop(im: Image.Image, share: float) -> Image.Image:
    w, h = im.size
    cw, ch = round(w * share), round(h * share)
    return im.crop(((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch))


EDITS = {  # name: (edit, JPEG quality it is saved at)
    "JPEG quality 30": (lambda im: im, 30),
    "half size": (lambda im: im.resize((im.width // 2, im.height // 2), Image.BILINEAR), 95),
    "quarter size": (lambda im: im.resize((im.width // 4, im.height // 4), Image.BILINEAR), 95),
    "90% centre crop": (lambda im: _centre_crop(im, 0.9), 95),
    "80% centre crop": (lambda im: _centre_crop(im, 0.8), 95),
    "brightness +20%": (lambda im: ImageEnhance.Brightness(im).enhance(1.2), 95),
    "rotated 5 degrees": (lambda im: im.rotate(5, resample=Image.BILINEAR), 95),
    "mirror": (ImageOps.mirror, 95),
    "grey": (lambda im: ImageOps.grayscale(im).convert("RGB"), 95),
}


def sources(data: Path, count: int, seed: int) -> list[Path]:
    """`count` decodable training images (train/ when the dataset has it), drawn with `seed`."""
    root = data / "train" if (data / "train").is_dir() else data
    candidates = sorted(p for p in root.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    random.Random(seed).shuffle(candidates)
    chosen = []
    for path in candidates:
        try:
            Image.open(path).convert("RGB")
        except OSError:
            continue
        chosen.append(path)
        if len(chosen) == count:
            break
    return chosen


def write_copies(chosen: list[Path], dst: Path) -> None:
    """dst/<edit>/<index>.jpg: every edit of every chosen image (the folder name is the edit, the file its source)."""
    for name, (edit, quality) in EDITS.items():
        (dst / name).mkdir(parents=True)
        for i, path in enumerate(chosen):
            edit(ImageOps.exif_transpose(Image.open(path)).convert("RGB")).save(dst / name / f"{i:03d}.jpg",
                                                                                quality=quality)


def rows_and_paths(path: Path) -> tuple[np.ndarray, list[str]]:
    """Every row of a cache (float32) and its image path, as the audit reads them."""
    with open_cache(path) as cache:
        rows = cache.all_rows()
    return rows.features, rows.paths


def measure(data: Path, weights: str, copies: int, seed: int, tmp: Path) -> tuple[dict, list]:
    chosen = sources(data, copies, seed)
    write_copies(chosen, tmp / "copies")
    for folder, out in ((data, tmp / "data.h5"), (tmp / "copies", tmp / "copies.h5")):
        _timed_cli("extract", str(folder), "--weights", weights, "--out", str(out), "--force")
    (X, names), (E, edited) = rows_and_paths(tmp / "data.h5"), rows_and_paths(tmp / "copies.h5")
    mean = X.mean(0)  # the dataset's: the copies are centred as if they were a few among many
    U, V = row_normalised(X - mean, "l2"), row_normalised(E - mean, "l2")
    row = {name: r for r, name in enumerate(names)}
    source_row = [row[str(path.relative_to(data))] for path in chosen]
    by_edit = {name: [] for name in EDITS}
    for key, v in zip(edited, V):
        name, file = key.rsplit("/", 1)
        by_edit[name].append(float(v @ U[source_row[int(file[:3])]]))
    S = U @ U.T
    np.fill_diagonal(S, -2)
    i, j = np.triu_indices(len(U), 1)
    top = np.argsort(-S[i, j])[:5]
    return by_edit, [(float(S[i[t], j[t]]), names[i[t]], names[j[t]]) for t in top]


def markdown(by_edit: dict, closest: list, copies: int) -> str:
    lines = [f"| edit of {copies} training images | min | median | " + " | ".join(f">= {t}" for t in THRESHOLDS) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in THRESHOLDS) + " |"]
    for name, sims in by_edit.items():
        s = np.array(sims)
        lines.append(f"| {name} | {s.min():.3f} | {np.median(s):.3f} | "
                     + " | ".join(f"{(s >= t).mean():.0%}" for t in THRESHOLDS) + " |")
    lines += ["", "| most similar distinct images | similarity |", "| --- | --- |"]
    lines += [f"| {a} ~ {b} | {s:.3f} |" for s, a, b in closest]
    return "\n".join(lines)


def draw_pair(data: Path, closest: list, out: Path, cell: int = 200) -> None:
    """The closest distinct pair, each image fitted in a `cell` px square, its similarity written beneath."""
    similarity, a, b = closest[0]
    sheet = Image.new("RGB", (2 * cell, cell + 20), "white")
    for k, path in enumerate((a, b)):
        im = ImageOps.exif_transpose(Image.open(data / path)).convert("RGB")
        im.thumbnail((cell - 4, cell - 4))
        sheet.paste(im, (k * cell + (cell - im.width) // 2, (cell - im.height) // 2))
    ImageDraw.Draw(sheet).text((4, cell + 4), f"centred cosine {similarity:.3f}", fill="black")
    sheet.save(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "hymenoptera")
    p.add_argument("--weights", default=str(ROOT.parent / "shared" / "weights" / "vgg16_imagenet_features.pth"))
    p.add_argument("--copies", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--picture", type=Path, help="write the closest distinct pair here (PNG)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        by_edit, closest = measure(args.data.resolve(), args.weights, args.copies, args.seed, Path(tmp))
    print(markdown(by_edit, closest, args.copies))
    if args.picture:
        draw_pair(args.data.resolve(), closest, args.picture)


if __name__ == "__main__":
    main()
