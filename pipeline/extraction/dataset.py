"""Find the images of a dataset (ImageFolder tree, CSV manifest or WebDataset tar shards: tars.py), its splits and
its label map; an image's stamp (size, mtime) and sha256, wherever its bytes lie."""

from __future__ import annotations

import csv
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import UserError
from pipeline.files import sha256_file

if TYPE_CHECKING:
    from pipeline.extraction.tars import TarIndex

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
FLAT_SPLIT = "all"
MANIFEST_HEADER = ("path", "label", "split")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
_SPLIT_PREFIX = re.compile(r"^(?P<split>[A-Za-z0-9_.-]+)=(?P<pattern>.+)$")


def tar_spec(text: str) -> tuple[str | None, str]:
    """A DATA argument `[SPLIT=]PATTERN` as (split or None, pattern); a path that exists is never split."""
    match = _SPLIT_PREFIX.match(text)
    return (match["split"], match["pattern"]) if match and not os.path.exists(text) else (None, text)


def is_tar_spec(text: str) -> bool:
    """Whether a DATA argument names WebDataset tar shards (`[SPLIT=]PATTERN` ending in .tar, .tar.gz...)."""
    return tar_spec(text)[1].lower().endswith(TAR_SUFFIXES)


@dataclass(frozen=True)
class Item:
    """One image of the dataset: its split, its path relative to the dataset root, and its class name."""

    split: str
    path: str
    label: str


@dataclass(frozen=True)
class Dataset:
    """What discovery found: where the images live, their class names (label order) and the images; for tar
    shards, `tars` says where each image's bytes lie."""

    root: Path
    name: str
    kind: str  # "folder", "csv" or "webdataset"
    class_names: tuple[str, ...]
    items: tuple[Item, ...]
    tars: TarIndex | None = None

    def label_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.class_names)}

    @property
    def splits(self) -> list[str]:
        return sorted({item.split for item in self.items})

    @property
    def location(self) -> str:
        """Where the dataset is, as a cache's header records it."""
        return self.tars.root if self.tars else str(self.root.resolve())

    def stamp(self, path: str) -> tuple[int, int] | None:
        """(size, mtime_ns) of image `path`, None if it is gone."""
        if self.tars:
            return self.tars.stamp(path)
        try:
            st = os.stat(self.root / path)
        except OSError:
            return None
        return st.st_size, st.st_mtime_ns

    def digest(self, path: str) -> str:
        """The sha256 of image `path`'s bytes."""
        return self.tars.digest(path) if self.tars else sha256_file(self.root / path)

    def file(self, path: str) -> Path | None:
        """The file of image `path` (None: its bytes lie in a tar shard)."""
        return None if self.tars else self.root / path


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def discover(source, label_from: str = "auto") -> Dataset:
    """Describe the dataset at `source`: a folder tree, a `.csv` manifest, or WebDataset tar shards (one or more
    `[SPLIT=]PATTERN`, as a string or a list; `label_from` says where their classes are)."""
    specs = [source] if isinstance(source, (str, Path)) else list(source)
    if any(is_tar_spec(os.fspath(spec)) for spec in specs):
        return _discover_tars([os.fspath(spec) for spec in specs], label_from)
    if len(specs) != 1:
        raise UserError(f"{len(specs)} data paths given: extract takes one folder or CSV, or tar shards (.tar)")
    source = Path(specs[0])
    if not source.exists():
        raise UserError(f"data path not found: {source}")
    if source.is_file():
        if source.suffix.lower() != ".csv":
            raise UserError(f"data path {source} is a file but not a .csv manifest (expected a folder or a .csv)")
        items = _read_manifest(source)
        root, name, kind = source.parent, source.stem, "csv"
    else:
        items = _scan_folder(source)
        root, name, kind = source, source.resolve().name, "folder"
    class_names = _class_names(items, source)
    return Dataset(root=root, name=name, kind=kind, class_names=class_names, items=tuple(sorted(items, key=_order)))


def _discover_tars(specs: list[str], label_from: str) -> Dataset:
    not_tars = [spec for spec in specs if not is_tar_spec(spec)]
    if not_tars:
        raise UserError(f"{not_tars[0]} is not a tar shard (.tar): give either tar shards or one folder or CSV")
    from pipeline.extraction.tars import dataset_name, is_url, list_shards  # here: a folder's rerun never imports it

    found = list_shards([tar_spec(spec) for spec in specs], label_from)
    items = []
    for split, path, label in found.items:
        if split_problem(split):
            raise UserError(f"tar sample {path}: split {split!r} {split_problem(split)} (a split is a group of the "
                            "cache: a name such as train, val or test)")
        items.append(Item(split, path, label))
    class_names = _class_names(items, found.index.root)
    if all(name.isdecimal() for name in class_names):  # .cls numbers: label i is class "i" when all are present
        class_names = tuple(sorted(class_names, key=int))
    return Dataset(root=Path(".") if is_url(found.index.root) else Path(found.index.root),
                   name=dataset_name(found.index), kind="webdataset", class_names=class_names,
                   items=tuple(sorted(items, key=_order)), tars=found.index)


def _order(item: Item) -> tuple[str, str]:
    return item.split, item.path


def _visible_entries(folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as e:
        raise _unlistable(folder, e) from None


def _unlistable(folder, e: OSError) -> UserError:
    """A folder we cannot list would silently drop its images (and their cached rows): refuse instead."""
    return UserError(f"cannot list {folder} ({e.strerror or type(e).__name__}); fix its permissions, or move it out "
                     "of the dataset")


def _dir_key(path: str | Path) -> tuple[int, int] | None:
    """The identity of the real directory behind `path` (links followed); None if it cannot be reached."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class _Walk:
    """Directories already scanned, by real identity: each is entered once, so a link back up the tree (a loop) or
    into another class folder is skipped instead of listing images again under the wrong label."""

    def __init__(self, root: Path, fences: list[Path]):
        self.root = root
        self.seen = {key for key in map(_dir_key, fences) if key is not None}
        self.skipped: list[str] = []

    def images_below(self, folder: Path) -> list[str]:
        """All image files under `folder`, recursively, as paths relative to it (sorted, '/'-separated)."""
        found = []
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True, onerror=self._cannot_list):
            rel = Path(dirpath).relative_to(folder)
            dirnames[:] = [d for d in sorted(dirnames) if not d.startswith(".") and self._first_visit(Path(dirpath) / d)]
            found += [(rel / f).as_posix() for f in sorted(filenames) if is_image_name(f) and not f.startswith(".")]
        return found

    @staticmethod
    def _cannot_list(e: OSError):
        raise _unlistable(e.filename, e)

    def _first_visit(self, path: Path) -> bool:
        key = _dir_key(path)
        if key is None:
            return False
        if key in self.seen:
            self.skipped.append(path.relative_to(self.root).as_posix())
            return False
        self.seen.add(key)
        return True

    def report(self) -> None:
        if self.skipped:
            shown = ", ".join(self.skipped[:5]) + (", ..." if len(self.skipped) > 5 else "")
            log.warning("skipped %d directory links that lead back into folders already scanned (a loop, or another "
                        "class): %s", len(self.skipped), shown)


def _scan_folder(root: Path) -> list[Item]:
    """Split layout (root/<split>/<class>/...) when top-level folders hold class folders, else flat (root/<class>/...)."""
    top = [e for e in _visible_entries(root) if e.is_dir()]
    if not top:
        raise UserError(f"no class folders in {root} (expected {root}/<class>/<image> or {root}/<split>/<class>/<image>)")
    holds_images = {e.name: any(not c.is_dir() and is_image_name(c.name) for c in _visible_entries(Path(e.path))) for e in top}
    if any(holds_images.values()):
        bare = [name for name, has in holds_images.items() if not has]
        if bare and all(any(c.is_dir() for c in _visible_entries(root / n)) for n in bare):
            raise UserError(f"{root} mixes class folders with split folders ({', '.join(bare)}): use one layout")
        walk = _Walk(root, [root, *(Path(e.path) for e in top)])
        items = _scan_split(walk, root, FLAT_SPLIT, prefix="")
    else:
        bad = next((e.name for e in top if split_problem(e.name)), None)
        if bad is not None:
            raise UserError(f"split folder {root / bad} {split_problem(bad)}: rename it (train, val, test)")
        classes = [Path(c.path) for e in top for c in _visible_entries(Path(e.path)) if c.is_dir()]
        walk = _Walk(root, [root, *(Path(e.path) for e in top), *classes])
        items = [item for split in top for item in _scan_split(walk, Path(split.path), split.name, prefix=f"{split.name}/")]
    walk.report()
    if not items:
        raise UserError(f"no images found under {root} (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return items


def _scan_split(walk: _Walk, folder: Path, split: str, prefix: str) -> list[Item]:
    classes = [e for e in _visible_entries(folder) if e.is_dir()]
    if not classes:
        raise UserError(f"no class folders in {folder} (expected {folder}/<class>/<image>)")
    items = []
    for cls in classes:
        items += [Item(split, f"{prefix}{cls.name}/{rel}", cls.name) for rel in walk.images_below(Path(cls.path))]
    return items


def _read_manifest(csv_path: Path) -> list[Item]:
    """Rows `path,label[,split]` (an optional header row names them); paths are relative to the CSV's folder."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            rows = [(n, row) for n, row in enumerate(csv.reader(f), start=1) if any(cell.strip() for cell in row)]
    except UnicodeDecodeError as e:
        raise UserError(f"manifest {csv_path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                        "save it as UTF-8") from None
    except csv.Error as e:
        raise UserError(f"manifest {csv_path} is not a readable CSV file ({e})") from None
    if rows and tuple(c.strip().lower() for c in rows[0][1]) in (MANIFEST_HEADER[:2], MANIFEST_HEADER):
        rows = rows[1:]
    if not rows:
        raise UserError(f"manifest {csv_path} lists no images (expected rows 'path,label[,split]')")
    items, seen = [], {}
    for line, row in rows:
        item = _manifest_item(csv_path, line, row)
        if item.path in seen:
            raise UserError(f"manifest {csv_path} line {line}: {item.path} is already listed on line {seen[item.path]}")
        seen[item.path] = line
        items.append(item)
    return items


def _manifest_item(csv_path: Path, line: int, row: list[str]) -> Item:
    cells = [c.strip() for c in row]
    if any("\0" in c for c in cells):
        raise UserError(f"manifest {csv_path} line {line}: a NUL byte in {next(c for c in cells if chr(0) in c)!r}; "
                        "paths and labels cannot contain one")
    if len(cells) not in (2, 3) or not all(cells):
        raise UserError(f"manifest {csv_path} line {line}: expected 'path,label[,split]', got {','.join(row)!r}")
    path = Path(cells[0])
    if path.is_absolute() or ".." in path.parts:
        raise UserError(f"manifest {csv_path} line {line}: path {cells[0]!r} must be relative to the CSV's folder")
    split = cells[2] if len(cells) == 3 else FLAT_SPLIT
    if split_problem(split):
        raise UserError(f"manifest {csv_path} line {line}: split {split!r} {split_problem(split)} (a split is a group "
                        "of the cache: a name such as train, val or test)")
    return Item(split, path.as_posix(), cells[1])


def split_problem(name: str) -> str | None:
    """Why `name` cannot name a split (an HDF5 group at the cache's root), or None."""
    if name in (".", ".."):
        return "is not a name"
    if "/" in name:
        return "contains '/'"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "contains a control character"
    if len(name.encode("utf-8", "surrogateescape")) > 255:
        return "is longer than 255 bytes"
    return None


def _class_names(items: list[Item], source: Path) -> tuple[str, ...]:
    """Class names come from the train split (or `all`) and must cover every other split."""
    if not items:
        raise UserError(f"no images found under {source} (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    splits = {item.split for item in items}
    reference = next((s for s in ("train", FLAT_SPLIT) if s in splits), None)
    if reference is None:
        log.warning("no 'train' split in %s: class names are the union of all splits", source)
        return tuple(sorted({item.label for item in items}))
    names = sorted({item.label for item in items if item.split == reference})
    unknown = sorted({(item.split, item.label) for item in items if item.label not in names})
    if unknown:
        split, label = unknown[0]
        raise UserError(f"class {label!r} in split {split!r} is not a class of {reference!r} (classes: {', '.join(names)})")
    return tuple(names)
