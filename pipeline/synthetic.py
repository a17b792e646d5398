"""Generate small labelled image folders (shapes of random colour and place) for the demo, tests and benchmark."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "checks", "stripes")


def draw(shape: str, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """One image of `shape` on a noisy background; colours, position and scale vary, so the task is not trivial."""
    w, h = size
    background = rng.integers(0, 256, 3)
    pixels = np.clip(background + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels)
    pen = ImageDraw.Draw(img)
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    r = int(min(w, h) * rng.uniform(0.2, 0.35))
    cx, cy = int(rng.uniform(r, w - r)), int(rng.uniform(r, h - r))
    if shape == "circle":
        pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "checks":
        step = max(2, r // 2)
        for x in range(0, w, step):
            for y in range((x // step) % 2 * step, h, 2 * step):
                pen.rectangle([x, y, x + step - 1, y + step - 1], fill=colour)
    else:
        step = max(2, r // 2)
        for x in range(0, w, 2 * step):
            pen.rectangle([x, 0, x + step - 1, h], fill=colour)
    return img


def make_image_folder(root: Path, per_class: dict[str, int], size: tuple[int, int] = (64, 48),
                      classes: tuple[str, ...] = SHAPES, seed: int = 0, fmt: str = "JPEG") -> Path:
    """root/<split>/<class>/<n>.jpg for each split in `per_class` (e.g. {"train": 20, "val": 8})."""
    rng = np.random.default_rng(seed)
    ext = {"JPEG": "jpg", "PNG": "png"}[fmt]
    for split, n in per_class.items():
        for cls in classes:
            folder = Path(root) / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                draw(cls, size, rng).save(folder / f"{i:05d}.{ext}", fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return Path(root)

