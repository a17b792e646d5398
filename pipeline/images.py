"""Which files are images, and what reading one may cost: the one decoding policy of `extract`, `predict`, `serve`,
the Python API and the pictures of a run.

- **An allowlist of raster formats, recognised from the bytes** (`RASTER_FORMATS`), never from a file's name:
  Pillow is only asked to try these plugins. Pillow also reads PostScript, EPS and PDF by running Ghostscript on
  the file, a program of whoever wrote it, with no time limit (a 200-byte upload named cat.jpg ran `gs` on the
  server); those, and every other format, are refused without a byte of them being interpreted.
- **A bound before reading**: only a regular file is read (links followed), opened so that a FIFO or a device
  never blocks or streams for ever, and only when it is at most `MAX_FILE_BYTES` (256 MB unless the environment's
  VGGCACHE_MAX_IMAGE_BYTES says otherwise: a 3 GB file of zeros named .jpg was read whole before this).
- **A bound before decoding**: Pillow's decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`, 89.5 Mpx), an error
  at any size over it (Pillow itself only warns up to twice the limit).
- **A bound after resizing**: an image whose sides are more than `MAX_ASPECT`:1 apart is refused before it is
  decoded, since scaling its short side up to the crop would make its long side unbounded (a 1 KB 8000 x 1 JPEG
  needed 2.9 GB at 224 px). So a resized image holds at most MAX_ASPECT x resize_size^2 pixels: 1.3 Mpx (4 MB as
  8-bit RGB) at the default crop of 224 (resized to 256), 27 Mpx at a crop of 1,024.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from pathlib import Path

import numpy as np

# (a camera's multi-picture JPEG opens through the JPEG plugin, as format "MPO")
RASTER_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "TIFF", "WEBP")
READ_AS = "a JPEG, PNG, BMP, GIF, TIFF or WebP image"
MAX_ASPECT = 20  # longest side / shortest side of an image that is resized by its short side
_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
MAX_FILE_BYTES = int(os.environ.get("VGGCACHE_MAX_IMAGE_BYTES", str(256 << 20)))
_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


class Refused(ValueError):
    """An input that is not read: not an allowed raster format, or a shape whose resizing would cost too much."""


def read_image_file(path: str | Path) -> bytes:
    """The bytes of the image file at `path`: a regular file (links followed) of at most MAX_FILE_BYTES. Raises
    Refused for anything else, OSError when it cannot be opened. Opened non-blocking, so that a FIFO named cat.jpg
    is refused at once instead of waiting for a writer for ever."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a file")
            raise Refused(f"not a regular file ({kind})")
        if st.st_size > MAX_FILE_BYTES:
            raise Refused(f"{st.st_size:,} bytes: over the {MAX_FILE_BYTES:,}-byte limit of one image file")
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_FILE_BYTES + 1)
    if data is None:  # a special file (/proc/kmsg) that would wait for data: never an image
        raise Refused("not a regular file (it would wait for data)")
    if len(data) > MAX_FILE_BYTES:  # it grew while being read
        raise Refused(f"over the {MAX_FILE_BYTES:,}-byte limit of one image file")
    return data


def opened(source: bytes | str | Path):
    """A lazily opened Pillow image of the allowed formats (only the header read so far), from bytes or a path (read
    by read_image_file). Raises Refused for any other format, Pillow's DecompressionBombError for an image over its
    pixel limit."""
    from PIL import Image, UnidentifiedImageError

    data = source if isinstance(source, (bytes, bytearray, memoryview)) else read_image_file(source)
    fp = io.BytesIO(data)
    with warnings.catch_warnings():
        # Pillow only warns between 1x and 2x its pixel limit; every image over the limit is a bomb here
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return Image.open(fp, formats=RASTER_FORMATS)
        except UnidentifiedImageError:
            raise Refused(f"not {READ_AS}") from None


def check_shape(width: int, height: int, resize_to: int) -> None:
    """Refuse an image whose resizing (short side to `resize_to`) would make it longer than MAX_ASPECT x that."""
    short, long = min(width, height), max(width, height)
    if short < 1 or long > MAX_ASPECT * short:
        raise Refused(f"{width}x{height} px: its sides are more than {MAX_ASPECT}:1 apart (resizing its short side to "
                      f"{resize_to} px would make it {long * resize_to // max(short, 1):,} px long)")


def open_image(data: bytes, resize_to: int | None = None, capped: bool = False):
    """Decode bytes to an upright 8-bit RGB image. `resize_to`: the short side it will be resized to, which bounds
    its shape (check_shape; not when the caller caps the long side itself, `capped`) and lets a JPEG be decoded at
    the smallest DCT scale still at least that."""
    from PIL import Image, ImageOps

    img = opened(data)
    if resize_to and not capped:
        check_shape(*img.size, resize_to)
    if resize_to:
        if img.format in ("JPEG", "MPO"):
            img.draft(None, (resize_to, resize_to))
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img.load()
    return to_rgb(ImageOps.exif_transpose(img))


ROWS_AT_ONCE = 256  # 16-bit and float images are rescaled this many rows at a time: float64 copies of a whole
# 89 Mpx image took 2.6 GB a decode


def to_rgb(img):
    """Any Pillow mode to 8-bit RGB: 16-bit and float images are rescaled rather than clipped."""
    from PIL import Image

    if img.mode in _SIXTEEN_BIT:
        img = Image.fromarray(_rescaled(np.asarray(img), lambda a: np.clip(a, 0, 65535) / 257), "L")
    elif img.mode == "F":
        arr = np.asarray(img)
        low = float(arr.min())
        span = float(arr.max()) - low or 1.0
        img = Image.fromarray(_rescaled(arr, lambda a: (a - low) / span * 255), "L")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # palette transparency must go through RGBA, as Pillow warns
    return img if img.mode == "RGB" else img.convert("RGB")


def _rescaled(arr: np.ndarray, scale) -> np.ndarray:
    """uint8 of round(scale(rows)) in float64, a block of rows at a time (the same values as the whole at once)."""
    out = np.empty(arr.shape, np.uint8)
    for start in range(0, arr.shape[0], ROWS_AT_ONCE):
        block = arr[start:start + ROWS_AT_ONCE].astype(np.float64)
        out[start:start + ROWS_AT_ONCE] = scale(block).round()
    return out


def why_not_read(e: Exception, n_bytes: int) -> str:
    """A short, deterministic reason an image was not read (Pillow's own messages name memory addresses)."""
    if n_bytes == 0:
        return "empty file (0 bytes)"
    if isinstance(e, Refused):
        return f"{e} ({n_bytes:,} bytes)" if str(e).startswith("not ") else str(e)
    if "DecompressionBomb" in type(e).__name__:
        return f"over Pillow's decompression-bomb limit ({str(e).split(', could be')[0][:200]})"
    return f"{type(e).__name__}: {e}".strip()[:300]
