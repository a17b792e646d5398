"""WebDataset tar shards as a dataset: which shards (brace patterns, globs, URLs), which samples they hold, the class
and split of each, and each shard's members streamed in order. No torch: planning an up-to-date rerun of a shard
dataset imports none (reader.py's `TarSamples` decodes what this streams, one shard per DataLoader worker).

A shard is a tar file; a sample is the run of consecutive members that share a key (the member's name up to the
first dot of its file name: `000123.jpg`, `000123.cls`, `000123.json`), as WebDataset writes them. Of a sample:
- **the image**: its first member with an image extension (`jpg`, `jpeg`, `png`, `webp`, `bmp`, `gif`, `tif`,
  `tiff`); a sample without one is skipped (counted in one warning);
- **the class**: `--label-from auto` takes what the first sample has, in this order: `.cls` (its text, e.g. `3`),
  `.json`'s `label` field, `.txt` (its text); every sample must then have it (one line naming the first without);
  `cls`, `txt` or `json:FIELD` ask for one;
- **the split**: the `SPLIT=` before the shard's pattern (`train=shards/train-{000..009}.tar`), else the `.json`'s
  `split` field, else `all`.
An image's path in the cache is `<shard name>/<member name>`, the shard named relative to the shards' common
folder (`train-000003.tar/000123.jpg`). Its size is the member's, its mtime the shard's: a rewritten shard has its
samples hashed again, and extracted again only if their bytes changed, as a folder's files are.

Local shards are listed by their headers only (tarfile seeks over the data); remote ones (`http://`, `s3://`...:
any URL fsspec opens) and compressed ones are read through once to list them, and once more to extract them.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import stat
from dataclasses import dataclass, field
from glob import glob
from pathlib import Path

from pipeline.cache.record import view_of
from pipeline.errors import UserError
from pipeline.images import MAX_FILE_BYTES, Refused

log = logging.getLogger(__name__)

IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
LABEL_MEMBERS = ("cls", "json", "txt")  # auto: the first of these the first sample has (json: its "label" field)
JSON_LABEL, JSON_SPLIT = "label", "split"
MAX_SIDE_BYTES = 1 << 20  # a .cls, .txt or .json read for a sample's class or split: at most this much
_RANGE = re.compile(r"\{(-?\d+)\.\.(-?\d+)\}")


MAX_SHARDS = 1_000_000  # what one DATA pattern may expand to: checked before any name is made


def expand_braces(pattern: str) -> list[str]:
    """`a-{000..003}.tar` -> a-000.tar ... a-003.tar (zero-padded as written), `{x,y}` -> both, as bash and
    WebDataset's braceexpand do; several braces multiply, refused in one line above MAX_SHARDS names."""
    parts = _parts(pattern)
    count = 1
    for choices in parts:
        count *= len(choices)
        if count > MAX_SHARDS:
            raise UserError(f"shard pattern {pattern!r} expands to over {MAX_SHARDS:,} shards")
    return ["".join(names) for names in itertools.product(*parts)]


def _parts(pattern: str) -> list[list[str]]:
    """The pattern as a sequence of choices: a literal is one choice, a brace group its expansions."""
    parts, rest = [], pattern
    while (start := rest.find("{")) >= 0:
        depth, end = 0, -1
        for i in range(start, len(rest)):
            depth += {"{": 1, "}": -1}.get(rest[i], 0)
            if depth == 0:
                end = i
                break
        if end < 0:
            raise UserError(f"shard pattern {pattern!r} has a '{{' without its '}}'")
        parts += [[rest[:start]], _choices(rest[start + 1:end], pattern)]
        rest = rest[end + 1:]
    return parts + [[rest]]


def _choices(body: str, pattern: str) -> list[str]:
    whole = _RANGE.fullmatch("{" + body + "}")
    if whole:
        first, last = whole[1], whole[2]
        width = len(first) if first.lstrip("-").startswith("0") and len(first.lstrip("-")) > 1 else 0
        a, b = int(first), int(last)
        if abs(b - a) >= MAX_SHARDS:
            raise UserError(f"shard pattern {pattern!r} expands to over {MAX_SHARDS:,} shards")
        step = 1 if b >= a else -1
        return [str(n).zfill(width) for n in range(a, b + step, step)]
    alternatives, depth, current = [], 0, ""
    for c in body:
        if c == "," and depth == 0:
            alternatives.append(current)
            current = ""
            continue
        depth += {"{": 1, "}": -1}.get(c, 0)
        current += c
    alternatives.append(current)
    expanded = [name for alternative in alternatives for name in expand_braces(alternative)]
    if len(expanded) > MAX_SHARDS:
        raise UserError(f"shard pattern {pattern!r} expands to over {MAX_SHARDS:,} shards")
    return expanded


def is_url(text: str) -> bool:
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", text) is not None and not text.startswith("file://")


@dataclass(frozen=True)
class TarShard:
    """One shard: where it is, its name in item paths, the split its spec gave (None: from each sample), and the
    stamp its samples take (its size and mtime; for a URL, what the server says of it)."""

    location: str
    name: str
    split: str | None
    size: int
    mtime_ns: int

    @property
    def seekable(self) -> bool:
        """Read by headers alone: a local, uncompressed tar."""
        return not is_url(self.location) and self.location.lower().endswith(".tar")


@dataclass(frozen=True)
class Sample:
    """The image of one sample: its shard (an index into `TarIndex.shards`), member, size and data offset (-1:
    unknown, the shard is streamed)."""

    shard: int
    member: str
    size: int
    offset: int


@dataclass(frozen=True)
class Found:
    """What listing the shards found: each image's (split, path, class) and where its bytes lie."""

    items: list[tuple[str, str, str]]
    index: "TarIndex"


@dataclass(frozen=True)
class TarIndex:
    """The shards of a dataset and where each image's bytes lie (`samples`: image path -> Sample)."""

    root: str
    shards: tuple[TarShard, ...]
    samples: dict[str, Sample] = field(compare=False, repr=False)
    _digests: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def stamp(self, path: str) -> tuple[int, int] | None:
        sample = self.samples.get(path)
        return None if sample is None else (sample.size, self.shards[sample.shard].mtime_ns)

    def sample_of(self, key: str) -> Sample:
        """The sample of an image's path, or of one of its augmented views' keys (cache.record.view_key)."""
        view = view_of(key)
        return self.samples[view[0] if view else key]

    def digest(self, path: str) -> str:
        """The sha256 of an image's bytes: read at its offset in a local tar, else from one pass over its shard
        (which hashes every image of it at once: a rewritten remote shard is read once, not once per image)."""
        if path not in self._digests:
            sample = self.samples[path]
            shard = self.shards[sample.shard]
            if shard.seekable and sample.offset >= 0:
                with open(shard.location, "rb") as f:
                    f.seek(sample.offset)
                    self._digests[path] = hashlib.sha256(f.read(sample.size)).hexdigest()
            else:
                names = {s.member: p for p, s in self.samples.items() if s.shard == sample.shard}
                for member, data in stream_members(shard, set(names)):
                    if isinstance(data, bytes):
                        self._digests[names[member]] = hashlib.sha256(data).hexdigest()
        return self._digests.get(path, "")


def list_shards(specs: list[tuple[str | None, str]], label_from: str = "auto") -> Found:
    """Every shard of `specs` ((split or None, pattern): dataset.py parses DATA's `[SPLIT=]PATTERN`), listed: its
    samples, their class and split. One line for a missing or malformed shard, a sample without a class, an image
    listed twice."""
    located = [(split, location) for split, pattern in specs for location in _expand_pattern(pattern)]
    seen = {}
    for split, location in located:
        if location in seen:
            raise UserError(f"tar shard {location} is given twice")
        seen[location] = split
    root = _common_root([location for _, location in located])
    shards = [_shard(location, root, split) for split, location in located]
    items, samples, labels = [], {}, _Labels(label_from)
    for number, shard in enumerate(shards):
        for found in _samples_of(shard, labels):
            key, member, size, offset, label, field_split = found
            path = f"{shard.name}/{member}"
            if path in samples:
                raise UserError(f"tar shard {shard.location} holds {member} twice")
            split = shard.split or field_split or "all"
            samples[path] = Sample(number, member, size, offset)
            items.append((split, path, label))
    if labels.skipped:
        log.warning("skipped %d samples without an image member (%s) in %s", labels.skipped,
                    ", ".join(IMAGE_MEMBERS), root)
    return Found(items, TarIndex(root, tuple(shards), samples))


def dataset_name(index: TarIndex) -> str:
    """The name the default cache file takes: the shards' common folder."""
    return Path(index.root.rstrip("/")).name or "shards"


def _expand_pattern(pattern: str) -> list[str]:
    locations = []
    for expanded in expand_braces(pattern):
        if not is_url(expanded) and any(c in expanded for c in "*?["):
            found = sorted(glob(expanded))
            if not found:
                raise UserError(f"no tar shards match {expanded}")
            locations += found
        else:
            locations.append(expanded.removeprefix("file://"))
    return locations


def _common_root(locations: list[str]) -> str:
    """The folder (or URL prefix) every shard lies under; shard names are relative to it."""
    folders = [location.rsplit("/", 1)[0] + "/" if "/" in location else "" for location in locations]
    if not any(is_url(location) for location in locations):
        folders = [os.path.dirname(os.path.abspath(location)) + os.sep for location in locations]
    prefix = os.path.commonprefix(folders)
    return prefix[:prefix.rfind("/") + 1] if "/" in prefix else prefix


def _shard(location: str, root: str, split: str | None) -> TarShard:
    where = location if is_url(location) else os.path.abspath(location)
    name = where[len(root):] if where.startswith(root) else os.path.basename(where)
    size, mtime_ns = _remote_stamp(location) if is_url(location) else _local_stamp(location)
    return TarShard(location, name, split, size, mtime_ns)


def _local_stamp(location: str) -> tuple[int, int]:
    try:
        st = os.stat(location)
    except FileNotFoundError:
        raise UserError(f"tar shard not found: {location}") from None
    except OSError as e:
        raise UserError(f"cannot read tar shard {location} ({e.strerror or type(e).__name__})") from None
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"tar shard {location} is not a regular file")
    return st.st_size, st.st_mtime_ns


def _remote_stamp(location: str) -> tuple[int, int]:
    """What a remote store says of a shard: its size, and a stamp from its mtime or ETag (0: none given, so a
    rewritten shard is noticed by its size only, or with --verify)."""
    fs, path = _filesystem(location)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise UserError(f"tar shard not found: {location}") from None
    except Exception as e:  # a store's client raises its own errors: whatever it says, in one line
        raise UserError(f"cannot reach tar shard {location} ({type(e).__name__}: {str(e)[:160]})") from None
    changed = info.get("mtime") or info.get("LastModified") or info.get("ETag") or info.get("etag") or ""
    return int(info.get("size") or 0), int(hashlib.sha256(str(changed).encode()).hexdigest()[:15], 16) if changed else 0


def _filesystem(location: str):
    try:
        import fsspec
    except ImportError:
        raise UserError(f"reading {location} needs fsspec: pip install 'vggcache[hub]'") from None
    try:
        return fsspec.core.url_to_fs(location)
    except (ImportError, ValueError) as e:  # a protocol whose package is missing (s3fs, gcsfs...)
        raise UserError(f"cannot open {location}: {e}") from None


class _Labels:
    """Where a sample's class comes from, fixed by the first sample under auto; counts samples without an image."""

    def __init__(self, label_from: str):
        self.source = None if label_from == "auto" else label_from
        self.skipped = 0

    def of(self, shard: TarShard, key: str, sides: dict[str, bytes]) -> str:
        if self.source is None:
            self.source = next((m if m != "json" else f"json:{JSON_LABEL}" for m in LABEL_MEMBERS if m in sides), None)
            if self.source is None:
                raise UserError(f"tar shard {shard.location}: sample {key} has no class (a .cls, a .json with "
                                f"{JSON_LABEL!r}, or a .txt member)")
        member, _, field_name = self.source.partition(":")
        value = _json_field(shard, key, sides, field_name) if member == "json" else _text(sides.get(member))
        if value is None or value == "":
            raise UserError(f"tar shard {shard.location}: sample {key} has no class ({self._where()}, as the first "
                            "sample has)")
        return value

    def _where(self) -> str:
        member, _, field_name = self.source.partition(":")
        return f"a .json with {field_name!r}" if member == "json" else f"a .{member} member"


def _text(data: bytes | None) -> str | None:
    return None if data is None else data.decode("utf-8", "surrogateescape").strip()


def _json_field(shard: TarShard, key: str, sides: dict[str, bytes], name: str) -> str | None:
    if "json" not in sides:
        return None
    try:
        value = json.loads(sides["json"]).get(name)
    except (ValueError, AttributeError):
        raise UserError(f"tar shard {shard.location}: sample {key}'s .json is not a JSON object") from None
    if value is None or isinstance(value, (dict, list)):
        return None
    return str(value).strip()


def _samples_of(shard: TarShard, labels: _Labels):
    """(key, image member, size, offset, class, split from the .json) of each sample of `shard` with an image."""
    for key, members in _grouped(shard):
        image = next(((name, size, offset) for name, ext, size, offset, _ in members if ext in IMAGE_MEMBERS), None)
        if image is None:
            labels.skipped += 1
            continue
        sides = {ext: data for _, ext, _, _, data in members if data is not None}
        split = _json_field(shard, key, sides, JSON_SPLIT) if "json" in sides else None
        yield key, image[0], image[1], image[2], labels.of(shard, key, sides), split


def _grouped(shard: TarShard):
    """Consecutive members of one key, as [(name, extension, size, offset, data of a side member)]."""
    key, members = None, []
    for info, read in _headers(shard):
        stem = info.name.rsplit("/", 1)
        base = stem[-1]
        if not info.isfile() or base.startswith(".") or "." not in base:
            continue  # folders, links (never followed), hidden files and names without an extension
        if info.name.startswith("/") or ".." in info.name.split("/"):
            log.warning("tar shard %s: skipped member %r (an absolute name or '..': never a path of the cache)",
                        shard.location, info.name)
            continue
        name_key = (stem[0] + "/" if len(stem) > 1 else "") + base.split(".", 1)[0]
        ext = base.split(".", 1)[1].lower()
        if name_key != key and members:
            yield key, members
            members = []
        key = name_key
        side = ext in LABEL_MEMBERS
        if side and info.size > MAX_SIDE_BYTES:
            raise UserError(f"tar shard {shard.location}: {info.name} is {info.size:,} bytes, over the "
                            f"{MAX_SIDE_BYTES:,} a .{ext} may have")
        members.append((info.name, ext, info.size, getattr(info, "offset_data", -1) if shard.seekable else -1,
                        read(info) if side else None))
    if members:
        yield key, members


def _headers(shard: TarShard):
    """(TarInfo, reader of its data) for each member of `shard`, in order; one line for a malformed tar."""
    import tarfile  # here: an up-to-date rerun of a folder never pays for it (nor for bz2, lzma, gzip)

    with _opened(shard) as f:
        try:
            with tarfile.open(fileobj=f, mode="r:" if shard.seekable else "r|*") as tar:
                for info in tar:
                    yield info, lambda i, tar=tar: tar.extractfile(i).read()
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:  # zlib and lzma errors are OSErrors too
            raise UserError(f"tar shard {shard.location} is not a readable tar file ({type(e).__name__}: "
                            f"{str(e)[:160] or 'truncated'})") from None


def _opened(shard: TarShard):
    if is_url(shard.location):
        fs, path = _filesystem(shard.location)
        return fs.open(path, "rb")
    try:
        return open(shard.location, "rb")
    except OSError as e:
        raise UserError(f"cannot read tar shard {shard.location} ({e.strerror or type(e).__name__})") from None


def read_member(path: Path) -> bytes | None:
    """The bytes of a cached image of a shard dataset, `<folder>/<shard>.tar/<member>`, read from the local shard
    (for thumbnails); None when `path` names no such member, or one over images.MAX_FILE_BYTES."""
    import tarfile

    path = Path(path)
    for shard in path.parents:
        if shard.is_file():  # the one component of the path that is a file: the shard
            member = path.relative_to(shard).as_posix()
            try:
                with tarfile.open(shard, "r:*") as tar:
                    info = tar.getmember(member)
                    if not info.isfile() or info.size > MAX_FILE_BYTES:
                        return None
                    return tar.extractfile(info).read()
            except (KeyError, OSError, tarfile.TarError, EOFError):
                return None
    return None


def stream_members(shard: TarShard, wanted: set[str]):
    """(member name, its bytes, or the exception that refused it) for each member of `shard` in `wanted`, in the
    shard's order, reading it once from start to end; a member over images.MAX_FILE_BYTES is refused unread. A
    shard that breaks mid-way raises OSError (its remaining images are then recorded as unreadable)."""
    import tarfile

    left = set(wanted)
    with _opened(shard) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for info in tar:
            if info.name not in left or not info.isfile():
                continue
            left.discard(info.name)
            if info.size > MAX_FILE_BYTES:
                yield info.name, Refused(f"{info.size:,} bytes: over the {MAX_FILE_BYTES:,}-byte limit of one image file")
            else:
                yield info.name, tar.extractfile(info).read()
            if not left:
                return
