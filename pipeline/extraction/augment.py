"""Augmented views cached beside the centre crops (`extract --augment K`): which splits get them, and each view's
random resized crop and flip, drawn from a seed, the image's path and the view's index only.

A view is therefore the same whatever the batch, the worker, the rank or the run that makes it: a resumed or
incremental extraction, or a job array, caches exactly the views a single run would. Only the split a head trains
on gets views; validation and test rows stay centre crops (torchvision's, as every other row).
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

from pipeline.extraction.dataset import FLAT_SPLIT

# The training split of a folder with splits, or the one split of a flat folder (train-head holds its validation
# rows out by source image, views included: see train/data.py).
AUGMENTED_SPLITS = ("train", FLAT_SPLIT)
# torchvision's RandomResizedCrop defaults and a horizontal flip, as in the tutorial's training transform
SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)
FLIP_P = 0.5
RECIPE = f"random_resized_crop(scale={SCALE[0]:g}-{SCALE[1]:g},ratio=3/4-4/3,bilinear,antialias)+hflip(p={FLIP_P:g})"
ATTEMPTS = 10


def augments(split: str) -> bool:
    return split in AUGMENTED_SPLITS


def _rng(seed: int, path: str, index: int) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}\0{path}\0{index}".encode("utf-8", "surrogateescape")).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def view_params(seed: int, path: str, index: int, width: int, height: int) -> tuple[int, int, int, int, bool]:
    """(top, left, crop height, crop width, flip) of view `index` of the image at `path`: torchvision's
    RandomResizedCrop.get_params (ten tries at a random area and aspect ratio, else the centre crop of the
    clamped ratio), drawn from a generator seeded by (seed, path, index) instead of the global one."""
    rng = _rng(seed, path, index)
    area, log_ratio = width * height, (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(ATTEMPTS):
        target = area * rng.uniform(*SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w, bool(rng.random() < FLIP_P)
    in_ratio = width / height
    if in_ratio < RATIO[0]:
        w, h = width, round(width / RATIO[0])
    elif in_ratio > RATIO[1]:
        w, h = round(height * RATIO[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w, bool(rng.random() < FLIP_P)
