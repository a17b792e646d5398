"""One image as a cache knows it (`Record`): a feature row, or a recorded failure; and the keys of augmented
views. No h5py: stage one names its rows with these before any file is written.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.text import printable

UNREADABLE = "cannot read"  # how the reason of a file that could not be read at all starts (see Record.unreadable)


@dataclass(frozen=True, slots=True)  # slots: one per image in memory, ~40% smaller
class Record:
    """One image as the cache knows it: a feature row when `reason` is empty, else a recorded failure."""

    split: str
    path: str
    label: int
    size: int
    mtime_ns: int
    sha256: str = ""
    reason: str = ""

    @property
    def ok(self) -> bool:
        return not self.reason

    @property
    def view(self) -> tuple[str, int] | None:
        """(source path, view index) of an augmented view's record (see `view_key`), None for an image's own row."""
        return view_of(self.path)

    @property
    def unreadable(self) -> bool:
        """The file could not be read at all (permissions, I/O): a failure that may go away without the file changing."""
        return self.reason.startswith(UNREADABLE)


VIEW_SEP = "\0"  # no file name holds a NUL byte (and manifests refuse one), so a view's key never names a file


def view_key(path: str, index: int) -> str:
    """The key of view `index` of the image at `path`: its record's path in a plan, a journal and `Cache.records`
    (the file itself stores views by row, in /<split>/views, never by this key)."""
    return f"{path}{VIEW_SEP}{index}"


def view_of(key: str) -> tuple[str, int] | None:
    """(source path, view index) of a view's key, None for an image's own path: the one reader of `view_key`."""
    source, sep, index = key.partition(VIEW_SEP)
    return (source, int(index)) if sep else None


def shown(path: str) -> str:
    """A record's path as a person reads it: 'a/b.jpg (view 2)' for a view."""
    view = view_of(path)
    return printable(f"{view[0]} (view {view[1]})" if view else path)


def unreadable_reason(e: Exception) -> str:
    """The recorded reason of a file that could not be read at all (see Record.unreadable)."""
    detail = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    return f"{UNREADABLE} ({type(e).__name__}: {detail})"[:300]
