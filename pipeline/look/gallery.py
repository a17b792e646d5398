"""The mistakes of a run to look at rather than read: errors.png, a contact sheet of the most confident ones.

Thumbnails are read from the dataset the cache was made from (its root is recorded in the cache; paths are relative
to it). A file that has gone, or no longer decodes, shows a grey placeholder with its name: a picture is never worth
a crash.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.runs.mistakes import Mistake
from pipeline.text import printable

MAX_SHOWN = 32  # thumbnails on the sheet; errors.csv lists every mistake
THUMB = 128  # px, the longer side of a thumbnail
COLUMNS = 8


def thumbnail(path: Path | None, size: int = THUMB) -> np.ndarray | None:
    """The image at `path` as an RGB array, its longer side `size` px (a JPEG decoded at a reduced scale, never
    below twice that); None when it cannot be read."""
    from PIL import ImageOps

    from pipeline.extraction.tars import read_member
    from pipeline.images import opened

    if path is None:
        return None
    try:
        source = path if Path(path).exists() else read_member(path)  # an image of a tar shard dataset
        if source is None:
            return None
        with opened(source) as img:  # the allowed formats only: a dataset file is never given to Ghostscript
            if img.format == "JPEG":
                img.draft("RGB", (size * 2, size * 2))
            img = ImageOps.exif_transpose(img).convert("RGB")
            img.thumbnail((size, size))
            return np.asarray(img)
    except Exception:  # gone, unreadable or not an image any more: a placeholder instead
        return None


def write_sheet(out: Path, found: list[Mistake], image_root: Path | None, title: str) -> Path:
    """errors.png: the MAX_SHOWN most confident mistakes (the splits mixed), or a sheet that says there are none."""
    found = sorted(found, key=lambda m: (-m.probability, m.split, m.path))
    return contact_sheet(found[:MAX_SHOWN], image_root, out, f"{title}: {len(found)} mistakes"
                         + (f", the {MAX_SHOWN} most confident" if len(found) > MAX_SHOWN else ""))


def contact_sheet(found: list[Mistake], image_root: Path | None, out: Path, title: str) -> Path:
    from pipeline.look.plots import save

    return save(sheet_figure(found, image_root, title), out, 100)


def sheet_figure(found: list[Mistake], image_root: Path | None, title: str):
    """The thumbnails of `found`, each titled with its split, file, true and predicted class; the title above."""
    from pipeline.look.plots import pyplot, shortened

    plt = pyplot()
    cols = max(1, min(COLUMNS, len(found)))
    rows = max(1, -(-len(found) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 2.2 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, m in zip(axes.flat, found):
        image = thumbnail(Path(image_root) / m.path if image_root else None)
        if image is None:
            ax.imshow(np.full((THUMB, THUMB, 3), 200, np.uint8))
            ax.text(THUMB / 2, THUMB / 2, "missing", ha="center", va="center", fontsize=8)
        else:
            ax.imshow(image)
        name = printable(Path(m.path).name)
        ax.set_title(f"{m.split}: {shortened(name, 1.7, 6.5)}\ntrue {shortened(printable(m.true), 1.4, 6.5)}\n"
                     f"pred {shortened(printable(m.predicted), 1.1, 6.5)} {m.probability:.2f}", fontsize=6.5,
                     color="darkred")
    if not found:
        axes.flat[0].text(0.5, 0.5, "no mistakes", ha="center", va="center", fontsize=12)
    fig.suptitle(shortened(printable(title), 1.9 * cols - 0.2, 9), fontsize=9)
    fig.tight_layout()
    return fig
