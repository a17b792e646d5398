"""Decode image files into model-ready uint8 tensors inside DataLoader workers; a bad file becomes a recorded error."""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: 16-bit and float images are rescaled rather than clipped."""
    if img.mode in _SIXTEEN_BIT:
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray((np.clip(arr, 0, 65535) / 257).round().astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        span = float(arr.max() - arr.min()) or 1.0
        img = Image.fromarray(((arr - arr.min()) / span * 255).round().astype(np.uint8), "L")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # palette transparency must go through RGBA, as Pillow warns
    return img if img.mode == "RGB" else img.convert("RGB")


def open_image(data: bytes, draft_size: int | None = None) -> Image.Image:
    """Decode bytes to an upright RGB image; a JPEG is decoded at the smallest DCT scale still >= draft_size."""
    with warnings.catch_warnings():
        # Pillow only warns between 1x and 2x its pixel limit; we treat every image over the limit as a bomb
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data))
        if draft_size and img.format == "JPEG":
            img.draft(None, (draft_size, draft_size))
        img.load()
    img = ImageOps.exif_transpose(img)
    return to_rgb(img)


def preprocess(img: Image.Image, resize_size: int, crop_size: int) -> torch.Tensor:
    """torchvision's ImageClassification up to the dtype conversion: resize, centre crop, to a uint8 CHW tensor."""
    img = TF.resize(img, resize_size, interpolation=InterpolationMode.BILINEAR, antialias=True)
    return TF.pil_to_tensor(TF.center_crop(img, crop_size))


def describe_failure(e: Exception, n_bytes: int | None) -> str:
    """A short, deterministic reason (Pillow's own message for unknown formats names a memory address)."""
    if isinstance(e, UnidentifiedImageError):
        return "empty file (0 bytes)" if n_bytes == 0 else f"not a decodable image ({n_bytes} bytes)"
    return f"{type(e).__name__}: {e}".strip()[:300]


class ImageFiles(torch.utils.data.Dataset):
    """Files under `root`, decoded and preprocessed; never raises for a bad file, it reports it in `error`."""

    def __init__(self, root: Path, paths: list[str], resize_size: int, crop_size: int):
        self.root, self.paths = Path(root), list(paths)
        self.resize_size, self.crop_size = resize_size, crop_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        image, error, digest, data = torch.zeros(3, self.crop_size, self.crop_size, dtype=torch.uint8), "", "", None
        try:
            data = (self.root / self.paths[index]).read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            image = preprocess(open_image(data, self.resize_size), self.resize_size, self.crop_size)
        except Exception as e:  # any failure is this file's, not the run's: report it and go on
            error = describe_failure(e, None if data is None else len(data))
        return {"index": index, "image": image, "error": error, "sha256": digest}


def make_loader(dataset: ImageFiles, batch_size: int, workers: int, pin_memory: bool) -> DataLoader:
    """Batches in dataset order; workers decode and resize so the main process only runs the model."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin_memory,
                      prefetch_factor=4 if workers else None, persistent_workers=False)
