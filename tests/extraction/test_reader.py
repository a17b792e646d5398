"""Decoding: every Pillow mode becomes RGB, EXIF orientation is applied, bad files become reasons, never crashes."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models import VGG16_Weights

from pipeline.extraction.reader import ImageFiles, preprocess
from pipeline.images import open_image


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("make, expected", [
    (lambda: Image.new("L", (8, 8), 100), (100, 100, 100)),
    (lambda: Image.new("RGBA", (8, 8), (10, 20, 30, 0)), (10, 20, 30)),
    (lambda: Image.new("CMYK", (8, 8), (0, 0, 0, 0)), (255, 255, 255)),
    (lambda: Image.fromarray(np.full((8, 8), 65535, np.uint16)), (255, 255, 255)),
    (lambda: Image.fromarray(np.full((8, 8), 32896, np.uint16)), (128, 128, 128)),
])
def test_modes_convert_to_rgb(make, expected):
    img = open_image(encode(make(), "TIFF"))
    assert img.mode == "RGB"
    assert img.getpixel((3, 3)) == expected


def test_palette_with_transparency_converts_to_rgb():
    img = Image.new("P", (8, 8), 1)
    img.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    out = open_image(encode(img, "PNG", transparency=0))
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (200, 100, 50)


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    assert open_image(encode(img, "JPEG", exif=exif.tobytes())).size == (20, 40)


def test_jpeg_draft_decodes_near_target_size_not_below():
    big = Image.new("RGB", (1600, 1200), (0, 128, 255))
    img = open_image(encode(big, "JPEG"), resize_to=256)
    assert min(img.size) >= 256 and img.size[0] <= 800  # decoded at 1/4 scale (400x300), not at full size


def test_preprocess_matches_torchvision_imagenet_transforms():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8))
    ours = preprocess(img, 256, 224)
    assert ours.dtype == torch.uint8 and ours.shape == (3, 224, 224)
    theirs = VGG16_Weights.IMAGENET1K_V1.transforms()(img)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    torch.testing.assert_close((ours.float() / 255 - mean) / std, theirs)


def test_bad_files_are_reported_not_raised(tmp_path, monkeypatch):
    good = encode(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    files = {"ok.jpg": good, "empty.jpg": b"", "text.png": b"hello, not an image",
             "truncated.jpg": good[: len(good) // 2], "bomb.png": encode(Image.new("RGB", (200, 200)), "PNG")}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200 * 200 - 1)  # 1x to 2x the limit: Pillow only warns
    ds = ImageFiles(tmp_path, list(files) + ["missing.jpg"], 36, 32)
    errors = {ds.paths[i]: ds[i]["error"] for i in range(len(ds))}
    assert errors["ok.jpg"] == ""
    assert errors["empty.jpg"] == "empty file (0 bytes)"
    assert errors["text.png"] == "not a JPEG, PNG, BMP, GIF, TIFF or WebP image (19 bytes)"
    assert "truncated" in errors["truncated.jpg"].lower()
    assert errors["bomb.png"].startswith("over Pillow's decompression-bomb limit (Image size (")
    assert errors["missing.jpg"] == "cannot read (FileNotFoundError: No such file or directory)"
    item = ds[5]  # missing: nothing was read, so no digest
    assert item["image"].shape == (3, 32, 32) and item["sha256"] == ""


@pytest.mark.parametrize("orientation", range(1, 9))
def test_tensor_orientation_matches_pillow(orientation):
    from PIL import ImageOps

    from pipeline.extraction.reader import orient

    arr = np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = orientation
    img.info["exif"] = exif.tobytes()
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(encode(img, "PNG", exif=exif.tobytes())))))
    got = orient(torch.from_numpy(arr).permute(2, 0, 1), orientation).permute(1, 2, 0).numpy()
    assert np.array_equal(got, expected)


def test_batched_jpeg_decode_path_matches_pillow_path_on_cpu(tmp_path):
    """The --decode gpu code path, run with device='cpu' (nvJPEG is not here): same images as the Pillow path."""
    from pipeline.extraction.reader import EncodedFiles, decode_on_device

    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 256, (12, 16, 3)), np.ones((8, 8, 1))).astype(np.uint8)  # 96x128, JPEG-friendly
    exif = Image.Exif()
    exif[0x0112] = 6
    files = {"a.jpg": encode(Image.fromarray(smooth), "JPEG", quality=95),
             "rot.jpg": encode(Image.fromarray(smooth), "JPEG", quality=95, exif=exif.tobytes()),
             "b.png": encode(Image.fromarray(smooth), "PNG"), "cmyk.jpg": encode(Image.new("CMYK", (50, 40)), "JPEG"),
             "bad.jpg": b"\xff\xd8\xff garbage", "a2.jpg": encode(Image.fromarray(smooth[::-1].copy()), "JPEG", quality=95)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    names = list(files)
    encoded, plain = EncodedFiles(tmp_path, names, 73, 64), ImageFiles(tmp_path, names, 73, 64)
    assert encoded[0]["raw"] is not None and encoded[1]["orientation"] == 6
    assert encoded[2]["image"] is not None and encoded[3]["image"] is not None  # PNG, CMYK: decoded in the worker
    batch = decode_on_device([encoded[i] for i in range(6)], 73, 64, "cpu")  # a.jpg and a2.jpg: resized together
    assert batch["image"].shape == (6, 3, 64, 64) and batch["index"].tolist() == [0, 1, 2, 3, 4, 5]
    assert batch["error"] == ["", "", "", "", batch["error"][4], ""] and batch["error"][4]
    for i in (0, 1, 2, 3, 5):
        diff = (batch["image"][i].float() - plain[i]["image"].float()).abs().mean()
        assert diff < 3, (names[i], diff)
    assert batch["sha256"][0] == plain[0]["sha256"]
