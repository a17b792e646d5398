"""`pipeline export-features`: a cache's rows as Parquet files that pandas, DuckDB, Spark and Hugging Face
`datasets` read without this package.

What is written (docs/export-features.md has the whole story):

- one row per image of the selected splits (its own row: augmented views and failed files are not exported), in
  the cache's order: path, split, label, class_name, sha256, and the embedding as a fixed-size list of float32
  (a map cache's rows pooled at export time, by `--pool`, default avg);
- per split, parts named as the Hugging Face Hub names its own Parquet shards, `<split>-00000-of-00003.parquet`,
  each about `--part-mb` MB of embeddings, one row group per block read from the cache;
- in every part's key-value metadata: `vggcache` (the cache's fingerprint, config and class names, the pooling, the
  part's place) and `huggingface` (the `datasets` features, so that `label` loads as a ClassLabel).

It streams: a block of rows (BLOCK_BYTES of float32 rows) is read, converted and written at a time, whatever the
size of the cache. Parts are written under hidden temporary names and shown only once every part is complete;
until then a hidden mark says the folder is being written (or that a write was killed), so a folder never looks
complete when it is not, and `--force` recognises it as this command's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.cache.schema import Damaged, decode_path
from pipeline.cache.store import Cache, open_cache
from pipeline.errors import EXIT_CTRL_C, EXIT_SIGTERM, Interrupted, Terminated, UserError, first_line, sigterm_as_ctrl_c
from pipeline.files import DiskFull, ensure_free_space, ensure_output_folder, is_disk_full
from pipeline.hub.config import ExportConfig
from pipeline.progress import Progress
from pipeline.text import valid_utf8

log = logging.getLogger(__name__)

FORMAT, FORMAT_VERSION = "vggcache-features", 1  # the `vggcache` metadata says what it is, for later readers
METADATA_KEY, HF_KEY = b"vggcache", b"huggingface"
COLUMNS = ("path", "split", "label", "class_name", "sha256", "embedding")
EMBEDDING_LEAF = "embedding.list.element"  # the Parquet column of the embedding's values
# Measured on hymenoptera and on synthetic caches (docs/export-features.md): the float32 values of a float16 cache
# keep 13 zero mantissa bits, which BYTE_STREAM_SPLIT gathers into runs that zstd removes (about the float16 size);
# snappy and lz4 find nothing in plain float bytes.
COMPRESSION, EMBEDDING_ENCODING = "zstd", "BYTE_STREAM_SPLIT"
# Rows read, pooled, converted and written together (one row group): the memory an export holds, a few times over
# (raw rows, float32 rows, the Arrow table), whatever the size of the cache. Tests lower it.
BLOCK_BYTES = 16 << 20
MARK = ".vggcache-export"  # hidden: pandas, DuckDB, Spark and `datasets` skip names starting with a dot
MARK_TEXT = "an export-features write in progress, or killed: export-features --force replaces this folder\n"
PART_NAME = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5,})-of-(?P<count>\d{5,})\.parquet$")
TEMP_NAME = re.compile(r"^\.(?P<final>.+-\d{5,}-of-\d{5,}\.parquet)\.tmp$")
SAFE_STEM = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # a split name usable as it is in a file name


@dataclass(frozen=True)
class ExportSummary:
    out: Path  # the folder
    files: tuple[Path, ...]  # the Parquet parts, in order
    rows: int
    dim: int
    bytes: int  # on disk, all parts together
    seconds: float
    pool: str = ""  # the pooling of the exported embeddings (the cache's own, or the one applied to a map cache)


@dataclass(frozen=True)
class Part:
    """One Parquet file: rows start..stop of a split."""

    split: str
    start: int
    stop: int
    index: int
    count: int  # parts of this split
    name: str


@dataclass(frozen=True)
class Plan:
    """Everything decided before a byte is written: which rows, pooled how, in which files."""

    splits: tuple[str, ...]
    pool: str | None  # applied to a map cache's rows; None: the rows as stored
    pooled_name: str  # what the embeddings are: the cache's pooling, or `pool`
    dim: int
    block_rows: dict[str, int]  # rows per block (row group), per split
    parts: tuple[Part, ...]

    @property
    def rows(self) -> int:
        return sum(p.stop - p.start for p in self.parts)


def export_features(cfg: ExportConfig) -> ExportSummary:
    """Write the cache's rows as Parquet parts into `cfg.out` (see the module's docstring). Every refusal (unknown
    split, nothing to export, a damaged cache, an --out that is a file or a folder of someone else's) is one
    UserError before anything is written; Ctrl-C or SIGTERM ends in errors.Interrupted, --out as it was."""
    pa, pq = _pyarrow()
    start = time.perf_counter()
    out = Path(cfg.out)
    with open_cache(cfg.features) as cache:
        plan = plan_export(cache, cfg)
        replacing = ensure_output_folder(out, "--out", is_export_folder, "a Parquet export of features", cfg.force)
        _refuse_foreign_names(out, plan, replacing)
        ensure_free_space(_existing(out), plan.rows * plan.dim * 4 + (1 << 20), "the export")
        stage = {"now": "write"}
        try:
            with sigterm_as_ctrl_c():
                files = _export(pa, pq, cache, plan, out, replacing, stage)
        except KeyboardInterrupt as e:
            raise Interrupted(_what_is_left(out, stage), EXIT_SIGTERM if isinstance(e, Terminated) else EXIT_CTRL_C) \
                from None
        except OSError as e:
            if is_disk_full(e):
                raise DiskFull(f"the disk filled while writing into {out}: {_what_is_left(out, stage)}") from None
            raise UserError(f"cannot write into {out} ({first_line(e)}): {_what_is_left(out, stage)}") from None
    size = sum(f.stat().st_size for f in files)
    seconds = time.perf_counter() - start
    log.debug("exported %d rows x %d in %.1f s (%.0f rows/s), %d bytes", plan.rows, plan.dim, seconds,
             plan.rows / max(seconds, 1e-9), size)
    return ExportSummary(out, tuple(files), plan.rows, plan.dim, size, seconds, plan.pooled_name)


def _pyarrow():
    """pyarrow, imported here and not at start-up (`python -m pipeline --help` never loads it)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("export-features writes Parquet with pyarrow, which is not installed: "
                        "pip install 'vggcache[hub]'") from None
    return pa, pq


# ---------------------------------------------------------------------------------------------------- the plan

def plan_export(cache: Cache, cfg: ExportConfig) -> Plan:
    """The rows to export, their pooling and their files; refuses what cannot be exported, in one line."""
    config = cache.header.feature_config(cache.path)  # a config this version cannot read is refused, as elsewhere
    splits = _selected_splits(cache, cfg.splits)
    pool = _pooling(cache, cfg)
    dim = cache.pooled_dim(pool)
    stems = _file_stems(cache.splits)
    block_rows, parts = {}, []
    for split in splits:
        n, file_dim, chunk_rows = cache.split_shape(split)
        block_rows[split], part_rows = _sizes(file_dim, dim, chunk_rows, cfg.part_mb)
        count = -(-n // part_rows)
        parts += [Part(split, i * part_rows, min(n, (i + 1) * part_rows), i, count,
                       f"{stems[split]}-{i:05d}-of-{count:05d}.parquet") for i in range(count)]
    if not parts:
        raise UserError(f"{cache.path} has no rows in {', '.join(splits) or 'any split'}: nothing to export "
                        "(failed files have no row; `pipeline info` lists them)")
    for split in sorted(set(splits) - {p.split for p in parts}):
        log.info("split %s has no rows: no file for it", split)
    return Plan(tuple(splits), pool, config.pooled_name(pool), dim, block_rows, tuple(parts))


def _selected_splits(cache: Cache, asked: tuple[str, ...]) -> list[str]:
    """The splits asked for (each once, in the order given), or every split of the cache."""
    splits = list(dict.fromkeys(asked)) or list(cache.splits)
    for split in splits:
        cache.split_shape(split)  # an unknown split: one line naming the cache's splits
    return splits


def _pooling(cache: Cache, cfg: ExportConfig) -> str | None:
    """A map cache's rows are pooled (avg unless --pool says); a pooled cache's rows are exported as stored, and
    --pool may only name the pooling they have."""
    config = cache.header.feature_config(cache.path)
    if config.is_map:
        return cfg.pool or "avg"
    if cfg.pool not in (None, config.pool):
        raise UserError(f"{cfg.features} holds {config.pool}-pooled features, so --pool {cfg.pool} cannot be computed "
                        f"from them: leave --pool out, or extract a map cache (extract --pool map) to choose the "
                        "pooling at export time")
    return None


def _sizes(file_dim: int, dim: int, chunk_rows: int, part_mb: int) -> tuple[int, int]:
    """(rows per block, rows per part). A block is BLOCK_BYTES of float32 rows (raw or pooled, the larger), whole
    storage chunks when it holds one (reads then follow the file's layout); a part is a whole number of blocks."""
    block = max(1, BLOCK_BYTES // (max(file_dim, dim) * 4))
    if block >= chunk_rows:
        block -= block % chunk_rows
    part = max(1, (part_mb << 20) // (dim * 4))
    if part < block:
        return part, part
    return block, part - part % block


def _file_stems(splits: list[str]) -> dict[str, str]:
    """The start of each split's file names: the split's own name when it is a plain file name (what `datasets`
    maps train, val and test to its splits by), else split<k> (its place in the cache). A name that starts with a
    dot or an underscore would hide the files from every reader; the split column keeps the true name."""
    stems = {s: s if SAFE_STEM.match(s) else f"split{k}" for k, s in enumerate(splits)}
    if len(set(stems.values())) < len(stems):  # e.g. a split named split1 beside one renamed split1
        stems = {s: f"split{k}" for k, s in enumerate(splits)}
    for split, stem in stems.items():
        if stem != split:
            log.warning("split %r is written as %s-*.parquet (its rows keep their split name)", split, stem)
    return stems


def _existing(folder: Path) -> Path:
    return next(p for p in (folder, *folder.parents) if p.exists())


# --------------------------------------------------------------------------------------- whose folder is this

def is_export_folder(folder: Path) -> bool:
    """A folder export-features wrote: it holds the mark a write leaves until it is complete (a write in progress
    or killed), or a Parquet part whose metadata says export-features wrote it. Files only named like parts are
    not enough: they may be the user's."""
    folder = Path(folder)
    mark = folder / MARK
    if mark.is_file() and not mark.is_symlink():
        return True
    return any(_is_our_part(p) for p in _entries(folder) if PART_NAME.match(p.name))


def _entries(folder: Path) -> list[Path]:
    return sorted(folder.iterdir()) if folder.is_dir() else []


def _is_our_part(path: Path) -> bool:
    """The file is a Parquet part export-features wrote (read from its footer; anything unreadable is not)."""
    if path.is_symlink() or not path.is_file():
        return False
    try:
        import pyarrow.parquet as pq

        metadata = pq.read_schema(path).metadata or {}
        return json.loads(metadata[METADATA_KEY]).get("format") == FORMAT
    except Exception:  # not Parquet, not ours, damaged: in every case not a part this command may replace
        return False


def _refuse_foreign_names(out: Path, plan: Plan, replacing: bool) -> None:
    """A part is never renamed over a file this command did not write (one left by the user in our folder)."""
    for part in plan.parts:
        path = out / part.name
        if (path.exists() or path.is_symlink()) and not (replacing and _is_our_part(path)):
            raise UserError(f"--out {out} holds {part.name}, which export-features did not write: move it, or choose "
                            "another --out")


# ----------------------------------------------------------------------------------------------- the writing

def _export(pa, pq, cache: Cache, plan: Plan, out: Path, replacing: bool, stage: dict) -> list[Path]:
    """Mark the folder, write every part under a hidden name, then swap: the earlier export's parts out, the new
    ones in, the mark last. On any failure before the swap the folder is left as it was."""
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    mark = out / MARK
    had_mark = mark.is_file()
    mark.write_text(MARK_TEXT)
    staged: list[Path] = []
    try:
        if replacing:
            _remove(p for p in _entries(out) if TEMP_NAME.match(p.name))  # what a killed export left
        header = _header_metadata(cache, plan)
        with Progress(plan.rows, "export-features", unit="rows") as progress:
            for part in plan.parts:
                staged.append(out / f".{part.name}.tmp")
                _write_part(pa, pq, cache, plan, part, header, staged[-1], progress)
                log.debug("wrote %s (%d rows)", part.name, part.stop - part.start)
        stage["now"] = "swap"  # from here the folder is neither the old export nor the new one until the mark goes
        if replacing:
            _remove(p for p in _entries(out) if PART_NAME.match(p.name) and _is_our_part(p))
        files = []
        for tmp in staged:
            files.append(out / TEMP_NAME.match(tmp.name)["final"])
            os.replace(tmp, files[-1])
        _fsync_folder(out)
        mark.unlink()
        _fsync_folder(out)
        stage["now"] = "done"
        return files
    except BaseException:
        if stage["now"] == "write":
            _remove(staged)
            if not had_mark:
                mark.unlink(missing_ok=True)
            if created:
                with contextlib.suppress(OSError):
                    out.rmdir()
        raise


def _what_is_left(out: Path, stage: dict) -> str:
    if stage["now"] == "swap":
        return (f"stopped while publishing the parts: {out} is incomplete (its {MARK} mark says so); rerun with "
                "--force to replace it")
    return f"stopped before any part was published: {out} is as it was"


def _remove(paths) -> None:
    for path in list(paths):
        Path(path).unlink(missing_ok=True)


def _fsync_folder(folder: Path) -> None:
    """The renames reach the disk before the mark goes (a power cut cannot leave a complete-looking mix)."""
    with contextlib.suppress(OSError):  # a file system without directory fsync: nothing more to do
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_part(pa, pq, cache: Cache, plan: Plan, part: Part, header: dict, path: Path, progress: Progress) -> None:
    """One part, a block (one row group) at a time, fsynced before it may be renamed into place."""
    names = [valid_utf8(name) for name in cache.class_names]
    schema = _schema(pa, plan.dim, header, part, names)
    transform = cache.pooling(plan.pool)
    step = plan.block_rows[part.split]
    # the system allocator gives a finished block's buffers back at once; Arrow's default (mimalloc) keeps them, and
    # a command's peak memory grew by a block's worth more (measured: bench/parquet_export.py)
    with pq.ParquetWriter(path, schema, compression=COMPRESSION, use_dictionary=list(COLUMNS[:-1]),
                          column_encoding={EMBEDDING_LEAF: EMBEDDING_ENCODING}, write_statistics=list(COLUMNS[:-1]),
                          memory_pool=pa.system_memory_pool()) as writer:
        for start in range(part.start, part.stop, step):
            stop = min(start + step, part.stop)
            writer.write_table(_block(pa, cache, part.split, start, stop, transform, schema, names))
            progress.advance(stop - start)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _block(pa, cache: Cache, split: str, start: int, stop: int, transform, schema, names: list[str]):
    """Rows start..stop of a split as an Arrow table of the export's schema (`names`: the class names as written)."""
    rows = cache.read_rows(split, start, stop)
    embedding = np.ascontiguousarray(rows if transform is None else transform(rows), dtype=np.float32)
    labels = _column(cache, split, "labels", start, stop).astype(np.int64)
    paths = [valid_utf8(decode_path(p)) for p in _column(cache, split, "paths", start, stop)]
    sha256 = [h.decode("ascii") for h in _column(cache, split, "sha256", start, stop)]
    values = pa.array(embedding.reshape(-1))  # float16 -> float32 above is exact: the cache's values, unchanged
    return pa.Table.from_arrays([
        pa.array(paths, pa.string()),
        pa.repeat(split, stop - start).cast(pa.string()),
        pa.array(labels, pa.int64()),
        pa.array(names, pa.string()).take(pa.array(labels)),
        pa.array(sha256, pa.string()),
        pa.FixedSizeListArray.from_arrays(values, type=schema.field("embedding").type),
    ], schema=schema)


def _column(cache: Cache, split: str, dataset: str, start: int, stop: int) -> np.ndarray:
    """Rows start..stop of a per-row dataset of the cache (labels, paths, sha256), read as a slice: per-row text is
    held a block at a time too, never a whole split's."""
    try:
        return cache.rows(split, np.arange(start, stop), dataset)
    except (KeyError, OSError, RuntimeError, ValueError) as e:  # damaged bytes inside the dataset
        raise Damaged(f"{cache.path} is damaged: {split}/{dataset} cannot be read ({first_line(e)[:200]}); rebuild "
                      "it with extract --force") from None


# ------------------------------------------------------------------------------------------ schema, metadata

def _schema(pa, dim: int, header: dict, part: Part, class_names: list[str]):
    """Nullable fields, as `datasets` makes them: its features in the metadata apply only to fields equal to its own."""
    fields = [pa.field("path", pa.string()), pa.field("split", pa.string()), pa.field("label", pa.int64()),
              pa.field("class_name", pa.string()), pa.field("sha256", pa.string()),
              pa.field("embedding", pa.list_(pa.float32(), dim))]
    ours = {**header, "split": part.split, "part": part.index, "parts": part.count, "first_row": part.start,
            "rows": part.stop - part.start}
    return pa.schema(fields).with_metadata({METADATA_KEY: json.dumps(ours),
                                            HF_KEY: json.dumps(_hf_features(dim, class_names))})


def _header_metadata(cache: Cache, plan: Plan) -> dict:
    """What every part says of the cache it came from (no absolute paths: an export is made to be shared)."""
    header = cache.header
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "fingerprint": header.fingerprint,
            "config": header.config_dict, "class_names": [valid_utf8(name) for name in header.class_names],
            "dataset": header.source.name and valid_utf8(header.source.name),
            "cache_dim": header.feature_dim, "cache_dtype": str(_stored_dtype(cache, plan.splits[0])),
            "pool": plan.pool, "embedding_pool": plan.pooled_name, "dim": plan.dim, "columns": list(COLUMNS),
            "vggcache": _vggcache_version()}


def _stored_dtype(cache: Cache, split: str):
    return cache.read_rows(split, 0, 0).dtype


def _hf_features(dim: int, class_names: list[str]) -> dict:
    """`datasets`' own description of the columns (what its ArrowWriter stores under `huggingface`): `label` a
    ClassLabel of the cache's class names, `embedding` a fixed-length Sequence of float32 (a name every `datasets`
    version reads; 4.x turns it into its List)."""
    text = {"dtype": "string", "_type": "Value"}
    return {"info": {"features": {
        "path": text, "split": text, "label": {"names": list(class_names), "_type": "ClassLabel"}, "class_name": text,
        "sha256": text, "embedding": {"feature": {"dtype": "float32", "_type": "Value"}, "length": dim,
                                      "_type": "Sequence"}}}}


def _vggcache_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vggcache")
    except PackageNotFoundError:
        return "unknown"


