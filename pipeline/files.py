"""Checks at the file-system boundary: is a place writable, is there room, was an error a full disk.

Long commands call these before their work (a forward pass over a dataset, a sweep of fits), so a wrong --out
or a small disk fails in the first second with one line, not after hours with a traceback.
"""

from __future__ import annotations

import errno
import hashlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipeline.errors import UserError
from pipeline.text import human_bytes


class DiskFull(UserError):
    """The disk filled while writing; the message says what is saved and how to continue."""


def ensure_writable_dir(folder: Path, option: str) -> None:
    """Create `folder` if needed and prove that a file can be created in it (os.access lies for root and on NFS)."""
    folder = Path(folder)
    existing = next(p for p in (folder, *folder.parents) if p.exists() or p == Path(p.anchor))
    if not existing.is_dir():
        raise UserError(f"{option}: {existing} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".vggcache-write-test-"):
            pass
    except OSError as e:
        raise UserError(f"{option}: cannot write in {folder} ({e.strerror or type(e).__name__})") from None


def ensure_output_folder(folder: Path, option: str, ours: Callable[[Path], bool], what: str, force: bool) -> bool:
    """The folder a command writes with `option` may be a new one, an empty one, or (`force`) one that holds an
    earlier output of this kind (`ours`); anything else is refused in one line, so that no file the user made is
    ever written over. True when there is such an earlier output to replace. Checked before any work."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{option} {folder} is a file, expected a folder")
    entries = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if entries and ours(folder):
        if not force:
            raise UserError(f"{option} {folder} already holds {what}: choose another {option}, or --force to replace it")
    elif entries:
        shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        raise UserError(f"{option} {folder} is not empty and holds no {what.removeprefix('a ')} ({shown}): choose a new "
                        "or empty folder")
    ensure_writable_dir(folder if folder.exists() else folder.parent, option)
    return bool(entries)


@dataclass(frozen=True)
class Output:
    """What a command writes with --out: its kind in words, and a test of an existing file's first bytes that says
    whether it is such a file (one the command may replace without --force)."""

    what: str
    looks_like: Callable[[bytes], bool]


HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"%PDF", b"<?xml", b"<svg")
IMAGE = Output("PNG, SVG or PDF picture", lambda head: head.startswith(IMAGE_MAGIC))
HTML = Output("HTML page", lambda head: head.lstrip().lower().startswith((b"<!doctype html", b"<html")))


def csv_output(what: str, header: tuple[str, ...], columns: int = 4) -> Output:
    """A CSV this command writes: its first line starts with the first `columns` names of `header` (so that one an
    earlier version wrote, with fewer columns, is recognised too)."""
    first = ",".join(header[:columns]).encode()
    return Output(what, lambda head: head.split(b"\n", 1)[0].rstrip(b"\r").startswith(first))


def ensure_writable_file(path: Path, option: str, inputs: tuple = (), output: Output | None = None,
                         force: bool = False) -> None:
    """`path` can be created or replaced: its folder is writable, it is not a folder itself, it is none of the
    command's `inputs` (files, or folders whose files must not be replaced: a run folder). For a command's report
    (`output`): its folder exists, and unless `force` an existing file there is what the command writes, never a
    feature cache, a run's file, or a file of another kind."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{option} {path} is a folder, expected a file name")
    if path.exists() and not path.is_file():  # opening a FIFO waits for a reader for ever; a device is not a report
        raise UserError(f"{option} {path} is not a regular file (a FIFO, socket or device): choose a file name")
    for given in map(Path, inputs):
        if path.resolve() == given.resolve() or (given.is_dir() and given.resolve() in path.resolve().parents):
            raise UserError(f"{option} {path} would overwrite {given}, which this command reads: choose another file")
    if output is not None and not path.parent.exists():  # a report goes into a folder that exists (a cache's folder,
        raise UserError(f"{option} {path}: the folder {path.parent} does not exist")  # features/, is made for it)
    if output is not None and path.exists() and not force:
        _ensure_replaceable(path, option, output)
    ensure_writable_dir(path.parent, option)
    if path.exists():
        try:
            open(path, "ab").close()  # opens for writing without changing a byte
        except OSError as e:
            raise UserError(f"{option}: cannot write {path} ({e.strerror or type(e).__name__})") from None


def _ensure_replaceable(path: Path, option: str, output: Output) -> None:
    """An existing file may be replaced only when it is what the command writes (else --force)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as e:
        raise UserError(f"{option}: cannot read {path} ({e.strerror or type(e).__name__})") from None
    if head.startswith(HDF5_MAGIC):
        found = "an HDF5 file (a feature cache?)"
    elif (path.parent / "run.json").is_file():
        found = "a file of a run folder"
    elif not output.looks_like(head):
        found = f"not {_a(output.what)}"
    else:
        return
    raise UserError(f"{option} {path} exists and is {found}: this command writes {_a(output.what)}; choose another "
                    "file, or pass --force to replace it")


def _a(what: str) -> str:
    return f"{'an' if what[0].lower() in 'aeiou' else 'a'} {what}"


def ensure_free_space(folder: Path, need_bytes: int, what: str) -> None:
    """Refuse to start work whose output cannot fit on the disk holding `folder`."""
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise UserError(f"not enough disk space in {folder}: {what} needs about {human_bytes(need_bytes)}, "
                        f"{human_bytes(free)} free")


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC or EDQUOT, raised by Python or reported inside an HDF5 error message."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left on device" in str(e) or "Disk quota exceeded" in str(e)


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()
