"""Pages rendered in a real browser: Debian's Chromium, headless (`.ci/run` installs it when it is missing)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# no network, no first-run work: the machine's network is closed, and Chromium would retry its services
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]

needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (.ci/run installs it)")


def render(page: Path, tmp: Path, size=(1200, 900)) -> tuple[str, np.ndarray]:
    """(the DOM after the page's scripts ran, a screenshot as an RGB array) of a local file."""
    profile = tmp / "chromium-profile"
    common = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}"]
    dom = subprocess.run([*common, "--dump-dom", page.resolve().as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    shot = tmp / "screenshot.png"
    subprocess.run([*common, f"--screenshot={shot}", page.resolve().as_uri()], capture_output=True, timeout=120)
    return dom, np.asarray(Image.open(shot).convert("RGB"))


def rendered_without_errors(dom: str) -> bool:
    """The page's own check ran to the end (data-rendered) and recorded no error nor console.error."""
    body = re.search(r"<body[^>]*>", dom)
    return bool(body) and 'data-rendered="yes"' in body[0] and 'data-errors="yes"' not in body[0]


def not_blank(pixels: np.ndarray, min_pixels: int = 2000) -> bool:
    """More than a background: thousands of pixels (text, points, pictures) differ from the most common colour."""
    flat = pixels.reshape(-1, 3)
    values, counts = np.unique(flat, axis=0, return_counts=True)
    return len(flat) - counts.max() >= min_pixels
