"""The mistakes of a run, to look at rather than read: errors.csv (every misclassified row) and errors.png (a
contact sheet of the most confident ones), written into the run folder.

Thumbnails are read from the dataset the cache was made from (its root is recorded in the cache; paths are relative
to it). A file that has gone, or no longer decodes, shows a grey placeholder with its name: a picture is never worth
a crash.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import UserError
from pipeline.files import printable

ERRORS_CSV, ERRORS_PNG = "errors.csv", "errors.png"
MAX_SHOWN = 32  # thumbnails on the sheet; errors.csv lists every mistake
THUMB = 128  # px, the longer side of a thumbnail
COLUMNS = 8


@dataclass(frozen=True)
class Mistake:
    split: str
    path: str
    true: str
    predicted: str
    probability: float  # the head's probability of its (wrong) prediction


def mistakes(split: str, paths: list[str], y: np.ndarray, proba: np.ndarray, class_names: list[str]) -> list[Mistake]:
    """Every row of a scored split whose prediction is wrong, most confident first."""
    predicted = proba.argmax(1)
    wrong = np.flatnonzero(predicted != y)
    found = [Mistake(split, paths[i], class_names[y[i]], class_names[predicted[i]], float(proba[i, predicted[i]]))
             for i in wrong]
    return sorted(found, key=lambda m: (-m.probability, m.split, m.path))


def write_errors(folder: Path, found: list[Mistake], image_root: Path | None, title: str) -> None:
    """errors.csv (every mistake) and errors.png (the MAX_SHOWN most confident, or a sheet that says there are
    none), the splits mixed, most confident first."""
    found = sorted(found, key=lambda m: (-m.probability, m.split, m.path))
    with open(Path(folder) / ERRORS_CSV, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        w = csv.writer(f)
        w.writerow(("split", "path", "true", "predicted", "probability"))
        w.writerows((m.split, m.path, m.true, m.predicted, f"{m.probability:.4f}") for m in found)
    contact_sheet(found[:MAX_SHOWN], image_root, Path(folder) / ERRORS_PNG,
                  f"{title}: {len(found)} mistakes" + (f", the {MAX_SHOWN} most confident" if len(found) > MAX_SHOWN else ""))


def read_errors(folder: Path) -> list[Mistake]:
    """The mistakes listed in a run's errors.csv; none for a run older than it. A damaged file is one line."""
    path = Path(folder) / ERRORS_CSV
    if not path.is_file():
        return []
    try:
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            return [Mistake(r["split"], r["path"], r["true"], r["predicted"], float(r["probability"]))
                    for r in csv.DictReader(f)]
    except (KeyError, ValueError, csv.Error) as e:
        raise UserError(f"{path} is damaged ({e}); retrain the run") from None


def thumbnail(path: Path | None, size: int = THUMB) -> np.ndarray | None:
    """The image at `path` as an RGB array, its longer side `size` px (a JPEG decoded at a reduced scale, never
    below twice that); None when it cannot be read."""
    from PIL import Image, ImageOps

    if path is None:
        return None
    try:
        with Image.open(path) as img:
            if img.format == "JPEG":
                img.draft("RGB", (size * 2, size * 2))
            img = ImageOps.exif_transpose(img).convert("RGB")
            img.thumbnail((size, size))
            return np.asarray(img)
    except Exception:  # gone, unreadable or not an image any more: a placeholder instead
        return None


def contact_sheet(found: list[Mistake], image_root: Path | None, out: Path, title: str) -> Path:
    from pipeline.plots import save

    return save(sheet_figure(found, image_root, title), out, 100)


def sheet_figure(found: list[Mistake], image_root: Path | None, title: str):
    """The thumbnails of `found`, each titled with its split, file, true and predicted class; the title above."""
    from pipeline.plots import pyplot, shortened

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
