"""Score a folder with a model exported by `pipeline export`, with onnxruntime, Pillow and numpy alone (no vggcache).

Usage: python docs/score_with_onnxruntime.py MODEL.onnx FOLDER   -> path,class,probability per image
(docs/production.md shows this file; tests run it and compare with `predict`, and compare its `preprocess` with
`pipeline.preprocess` on images of every mode the project reads, 16-bit and float included.)
"""
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime
from PIL import Image, ImageOps

FORMATS = ("JPEG", "PNG", "BMP", "GIF", "TIFF", "WEBP")  # raster formats only: Pillow runs Ghostscript for PostScript
SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def to_rgb(image):
    """8-bit RGB as vggcache makes it: 16-bit and 32-bit integer images scaled by 1/257 (Pillow's convert clips them
    at 255), float images stretched from their minimum to their maximum, palette transparency through RGBA."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        levels = np.clip(np.asarray(image, dtype=np.float64), 0, 65535) / 257
        image = Image.fromarray(levels.round().astype(np.uint8), "L")
    elif image.mode == "F":
        pixels = np.asarray(image, dtype=np.float64)
        span = float(pixels.max() - pixels.min()) or 1.0
        image = Image.fromarray(((pixels - pixels.min()) / span * 255).round().astype(np.uint8), "L")
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image if image.mode == "RGB" else image.convert("RGB")


def preprocess(path, resize, crop):
    """As vggcache's extract: JPEG draft decoding, EXIF orientation, RGB, shorter side to `resize` (bilinear,
    antialiased), centre crop of `crop`: a uint8 (3, crop, crop) array."""
    image = Image.open(path, formats=FORMATS)
    if image.format in ("JPEG", "MPO"):
        image.draft(None, (resize, resize))
    image = to_rgb(ImageOps.exif_transpose(image))
    w, h = image.size
    size = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
    image = image.resize(size, Image.BILINEAR)
    left, top = int(round((size[0] - crop) / 2.0)), int(round((size[1] - crop) / 2.0))
    return np.asarray(image.crop((left, top, left + crop, top + crop))).transpose(2, 0, 1)


def main(model, folder):
    session = onnxruntime.InferenceSession(model)
    meta = session.get_modelmeta().custom_metadata_map
    classes = json.loads(meta["vggcache.class_names"])
    crop, resize = int(meta["vggcache.crop_size"]), int(meta["vggcache.resize_size"])
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in SUFFIXES)
    for start in range(0, len(paths), 32):
        batch = np.stack([preprocess(p, resize, crop) for p in paths[start:start + 32]])
        for path, proba in zip(paths[start:start + 32], session.run(None, {"images": batch})[0]):
            print(f"{path},{classes[proba.argmax()]},{proba.max():.4f}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
