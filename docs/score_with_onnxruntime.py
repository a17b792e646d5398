"""Score a folder with a model exported by `pipeline export`, with onnxruntime, Pillow and numpy alone (no vggcache).

Usage: python docs/score_with_onnxruntime.py MODEL.onnx FOLDER   -> path,class,probability per image
(docs/production.md shows this file; a test runs it and compares with `predict`. 16-bit images: vggcache rescales them to
8 bits where Pillow's convert("RGB") clips; every 8-bit image is preprocessed exactly as extract does.)
"""
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime
from PIL import Image, ImageOps


def preprocess(path, resize, crop):
    """As vggcache's extract: JPEG draft decoding, EXIF orientation, RGB, shorter side to `resize` (bilinear,
    antialiased), centre crop of `crop`: a uint8 (3, crop, crop) array."""
    image = Image.open(path)
    if image.format == "JPEG":
        image.draft(None, (resize, resize))
    image = ImageOps.exif_transpose(image).convert("RGB")
    w, h = image.size
    size = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
    image = image.resize(size, Image.BILINEAR)
    left, top = int(round((size[0] - crop) / 2.0)), int(round((size[1] - crop) / 2.0))
    return np.asarray(image.crop((left, top, left + crop, top + crop))).transpose(2, 0, 1)


session = onnxruntime.InferenceSession(sys.argv[1])
meta = session.get_modelmeta().custom_metadata_map
classes, crop, resize = json.loads(meta["vggcache.class_names"]), int(meta["vggcache.crop_size"]), int(meta["vggcache.resize_size"])
paths = sorted(p for p in Path(sys.argv[2]).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
for start in range(0, len(paths), 32):
    batch = np.stack([preprocess(p, resize, crop) for p in paths[start:start + 32]])
    for path, proba in zip(paths[start:start + 32], session.run(None, {"images": batch})[0]):
        print(f"{path},{classes[proba.argmax()]},{proba.max():.4f}")
