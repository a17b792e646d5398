"""The decoding policy (images.py): raster formats recognised from the bytes, and the cost of an image bounded
before and after resizing."""

import io
import os

import pytest
from PIL import EpsImagePlugin, Image

from pipeline import images
from pipeline.images import MAX_ASPECT, Refused, open_image, opened, read_image_file, why_not_read

POSTSCRIPT = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n0 1 150000000 {pop} for\nshowpage\n"


def encoded(fmt: str, size=(40, 30), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, 90).save(buffer, fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "BMP", "GIF", "TIFF", "WEBP"])
def test_every_allowed_raster_format_decodes(fmt):
    assert open_image(encoded(fmt), resize_to=32).size == (40, 30)


@pytest.mark.parametrize("data, reason", [
    (POSTSCRIPT, "not a JPEG, PNG, BMP, GIF, TIFF or WebP image"),
    (b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n", "not a JPEG, PNG, BMP, GIF, TIFF or WebP image"),
    (b"<svg xmlns='http://www.w3.org/2000/svg' width='10' height='10'/>", "not a JPEG, PNG, BMP, GIF, TIFF or WebP image"),
], ids=["postscript", "pdf", "svg"])
def test_a_program_or_document_named_like_an_image_is_refused_unread(data, reason, monkeypatch):
    """PostScript is a program Pillow would hand to Ghostscript: its plugin is never even asked to parse it."""
    asked = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: asked.append(self) or 1 / 0)
    with pytest.raises(Refused) as refused:
        open_image(data, resize_to=256)
    assert str(refused.value) == reason and asked == []
    assert why_not_read(refused.value, len(data)) == f"{reason} ({len(data)} bytes)"


def test_an_extreme_aspect_ratio_is_refused_before_it_is_decoded():
    strip = encoded("JPEG", size=(8000, 1))  # ~1 KB; resized to 256 px high it would be 2,048,000 px long
    with pytest.raises(Refused) as refused:
        open_image(strip, resize_to=256)
    assert str(refused.value) == ("8000x1 px: its sides are more than 20:1 apart (resizing its short side to 256 px "
                                  "would make it 2,048,000 px long)")


def test_the_widest_allowed_shape_decodes():
    assert open_image(encoded("PNG", size=(MAX_ASPECT * 10, 10)), resize_to=256).size == (200, 10)


def test_the_shape_bound_is_for_resizing_only():
    """A caller that caps the long side itself (multi-scale views) reads any shape."""
    assert open_image(encoded("PNG", size=(300, 2)), resize_to=64, capped=True).size == (300, 2)
    assert opened(encoded("PNG", size=(300, 2))).size == (300, 2)


def test_a_regular_image_file_is_read_whole(tmp_path):
    (tmp_path / "a.png").write_bytes(encoded("PNG"))
    assert read_image_file(tmp_path / "a.png") == encoded("PNG")


@pytest.mark.parametrize("make, kind", [
    (lambda p: os.mkfifo(p), "a FIFO"),
    (lambda p: os.symlink("/dev/zero", p), "a character device"),
    (lambda p: os.mkdir(p), "a folder"),
], ids=["fifo", "link-to-dev-zero", "folder"])
def test_what_is_not_a_regular_file_is_refused_without_blocking_or_reading(tmp_path, make, kind):
    make(tmp_path / "x.jpg")  # a FIFO with no writer would block an open() for ever; /dev/zero never ends
    with pytest.raises(Refused) as refused:
        read_image_file(tmp_path / "x.jpg")
    assert str(refused.value) == f"not a regular file ({kind})"


def test_a_file_over_the_size_limit_is_refused_before_it_is_read(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "MAX_FILE_BYTES", 1000)
    with open(tmp_path / "big.jpg", "wb") as f:
        f.truncate(1001)  # sparse: its size is known without a byte written
    with pytest.raises(Refused) as refused:
        read_image_file(tmp_path / "big.jpg")
    assert str(refused.value) == "1,001 bytes: over the 1,000-byte limit of one image file"


@pytest.mark.parametrize("mode, values", [("I;16", (0, 65535)), ("I", (-5, 70000)), ("F", (-2.5, 3.25))],
                         ids=["16-bit", "32-bit", "float"])
def test_rescaling_by_blocks_of_rows_gives_what_the_whole_image_gives(mode, values):
    """to_rgb rescales ROWS_AT_ONCE rows at a time (memory), to the same bytes as one float64 pass over the image."""
    import numpy as np

    rng = np.random.default_rng(0)
    arr = rng.uniform(*values, (images.ROWS_AT_ONCE * 2 + 37, 50))
    img = Image.fromarray(arr.astype({"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]))
    assert img.mode == mode
    whole = np.asarray(img, dtype=np.float64)
    if mode == "F":
        want = ((whole - whole.min()) / (whole.max() - whole.min()) * 255).round().astype(np.uint8)
    else:
        want = (np.clip(whole, 0, 65535) / 257).round().astype(np.uint8)
    got = np.asarray(images.to_rgb(img))
    assert got.shape == (*arr.shape, 3) and np.array_equal(got[..., 0], want)


def test_a_special_file_that_would_wait_is_refused(tmp_path, monkeypatch):
    class WouldWait(io.RawIOBase):  # what a non-blocking /proc/kmsg gives: no data yet
        def __init__(self, fd, mode):
            super().__init__()
            os.close(fd)

        def read(self, n=-1):
            return None

    (tmp_path / "kmsg.jpg").write_bytes(b"")
    monkeypatch.setattr(os, "fdopen", WouldWait)
    with pytest.raises(Refused, match=r"^not a regular file \(it would wait for data\)$"):
        read_image_file(tmp_path / "kmsg.jpg")
