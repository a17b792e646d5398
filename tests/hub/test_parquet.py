"""`pipeline export-features`: the cache's rows as Parquet, read back by pyarrow alone and compared with
`open_cache`; parts, metadata, bounded memory, --force, interruptions, and every refusal in one line."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipeline.api import export_features
from pipeline.cache.header import Header
from pipeline.cache.identity import generated_config
from pipeline.cache.record import Record, view_key
from pipeline.cache.store import Cache, open_cache
from pipeline.cache.writer import write_atomic
from pipeline.cli import app
from pipeline.errors import Interrupted, UserError
from pipeline.hub import parquet

runner = CliRunner()
CLASSES = ("ants", "bees", "wasps")


def make_cache(path: Path, rows: dict[str, int], dim: int = 16, dtype: str = "float16", config=None, views: int = 0,
               failed: tuple[str, ...] = (), names=None, seed: int = 0) -> Path:
    """A cache of random rows through the real writer: `rows` per split, each row's sha256 its own; `views`
    augmented views per training row; `failed` files (no row); `names(split, i)` the paths."""
    rng = np.random.default_rng(seed)
    config = config or generated_config()
    names = names or (lambda split, i: f"{split}/img {i:04d}.jpg")
    records, values = [], {}
    for split, n in rows.items():
        for i in range(n):
            sha256 = hashlib.sha256(f"{split}/{i}".encode()).hexdigest()
            r = Record(split, names(split, i), int(rng.integers(len(CLASSES))), 1, 1, sha256)
            records.append(r)
            keys = [r.path] + [view_key(r.path, j) for j in range(views if split == "train" else 0)]
            records += [Record(split, k, r.label, 1, 1, r.sha256) for k in keys[1:]]
            for k in keys:
                values[k] = rng.standard_normal(dim) * 3
    records += [Record(path.split("/")[0], path, 0, 1, 1, "", "cannot decode") for path in failed]
    header = Header(fingerprint=config.fingerprint(), config=config, class_names=list(CLASSES), feature_dim=dim)
    write_atomic(path, header, records, lambda rs: np.stack([values[r.path] for r in rs]), dtype)
    return path


@pytest.fixture(autouse=True)
def logging_restored():
    """The CLI points logging at CliRunner's stream, closed once the command ends: put the handlers back after each
    test, so that a later export's progress lines do not fail to print."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def map_config():
    return generated_config(pool="map", image_size=64)  # a 2x2 pool5 map: rows of 512 x 4


@pytest.fixture
def cache(tmp_path) -> Path:
    return make_cache(tmp_path / "c.h5", {"train": 40, "val": 15, "test": 12}, views=2, failed=("val/broken.jpg",))


def read_parts(folder: Path):
    """Every part of an export, in name order, as one pyarrow table (no vggcache involved)."""
    import pyarrow as pa

    return pa.concat_tables([pq.read_table(p) for p in sorted(folder.glob("*.parquet"))])


def embeddings(table) -> np.ndarray:
    column = table["embedding"].combine_chunks()
    return np.asarray(column.flatten()).reshape(len(table), column.type.list_size)


# ------------------------------------------------------------------------------------------------- the rows

READER = """
import json, os, sys
import numpy as np, pyarrow.parquet as pq
assert "pipeline" not in sys.modules
try:
    import pipeline
    raise SystemExit("pipeline is importable")
except ImportError:
    pass
folder, out = sys.argv[1], sys.argv[2]
table = pq.read_table(folder)  # the folder as a dataset, as pandas.read_parquet(folder) reads it
column = table["embedding"].combine_chunks()
np.save(out + "/embedding.npy", np.asarray(column.flatten()).reshape(len(table), column.type.list_size))
rest = {name: table[name].to_pylist() for name in ("path", "split", "label", "class_name", "sha256")}
rest["types"] = [str(f.type) for f in table.schema]
rest["metadata"] = json.loads(pq.read_schema(folder + "/" + sorted(os.listdir(folder))[0]).metadata[b"vggcache"])
json.dump(rest, open(out + "/rest.json", "w"))
"""


def test_an_export_read_by_pyarrow_alone_is_the_cache(cache, tmp_path):
    """Every column of every row, read back without vggcache, equals what open_cache gives: embeddings exactly."""
    out = tmp_path / "export"
    summary = export_features(cache, out)
    (tmp_path / "read").mkdir()
    site = os.pathsep.join(p for p in sys.path if p.endswith("site-packages"))
    done = subprocess.run([sys.executable, "-S", "-c", READER, str(out), str(tmp_path / "read")], capture_output=True,
                          text=True, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=site))
    assert done.returncode == 0, done.stderr
    got = json.loads((tmp_path / "read" / "rest.json").read_text())
    X = np.load(tmp_path / "read" / "embedding.npy", allow_pickle=False)
    assert got["types"] == ["string", "string", "int64", "string", "string", "fixed_size_list<element: float>[16]"]
    with open_cache(cache) as c:
        records = {(r.split, r.path): r for r in c.records()}
        order = ["test", "train", "val"]  # the cache's order; files are read in name order, the same here
        loaded = {split: c.load(split) for split in order}
        assert got["path"] == [p for s in order for p in loaded[s].paths]
        assert got["split"] == [s for s in order for _ in loaded[s].paths]
        assert got["label"] == [int(y) for s in order for y in loaded[s].labels]
        assert got["class_name"] == [CLASSES[y] for y in got["label"]]
        assert got["sha256"] == [records[(s, p)].sha256 for s, p in zip(got["split"], got["path"])]
        expected = np.concatenate([loaded[s].features.astype(np.float32) for s in order])
        assert loaded["train"].features.dtype == np.float16 and X.dtype == np.float32
        assert np.abs(X - expected).max() == 0 and X.shape == (67, 16)
        assert got["metadata"]["fingerprint"] == c.header.fingerprint
    assert (summary.rows, summary.dim, len(summary.files)) == (67, 16, 3)
    assert summary.bytes == sum(f.stat().st_size for f in summary.files)


def test_views_and_failed_files_have_no_row(cache, tmp_path):
    table = read_parts(export_features(cache, tmp_path / "e").out)
    assert len(table) == 67  # 40 + 15 + 12 images: not the 80 views, not the failed file
    assert "val/broken.jpg" not in table["path"].to_pylist()
    assert not any("\0" in p for p in table["path"].to_pylist())


def test_metadata_holds_the_fingerprint_config_and_class_names(cache, tmp_path):
    summary = export_features(cache, tmp_path / "e", splits=("train",))
    metadata = pq.read_schema(summary.files[0]).metadata
    ours = json.loads(metadata[b"vggcache"])
    header = open_cache(cache).header
    assert (ours["format"], ours["format_version"], ours["fingerprint"]) == ("vggcache-features", 1, header.fingerprint)
    assert ours["config"] == header.config_dict and ours["class_names"] == list(CLASSES)
    assert (ours["split"], ours["part"], ours["parts"], ours["first_row"], ours["rows"]) == ("train", 0, 1, 0, 40)
    assert (ours["pool"], ours["embedding_pool"], ours["dim"], ours["cache_dtype"]) == (None, "avg", 16, "float16")
    features = json.loads(metadata[b"huggingface"])["info"]["features"]
    assert features["label"] == {"names": list(CLASSES), "_type": "ClassLabel"}
    assert features["embedding"] == {"feature": {"dtype": "float32", "_type": "Value"}, "length": 16,
                                     "_type": "Sequence"}
    assert list(features) == list(parquet.COLUMNS)


def test_parts_hold_about_part_mb_and_are_named_per_split(tmp_path):
    """1 MB of 512 float32 a row: 512 rows a part; train's 1100 rows in three parts, val's 20 in one."""
    path = make_cache(tmp_path / "c.h5", {"train": 1100, "val": 20}, dim=512)
    summary = export_features(path, tmp_path / "e", part_mb=1)
    assert [f.name for f in summary.files] == ["train-00000-of-00003.parquet", "train-00001-of-00003.parquet",
                                               "train-00002-of-00003.parquet", "val-00000-of-00001.parquet"]
    assert [pq.read_metadata(f).num_rows for f in summary.files] == [512, 512, 76, 20]
    assert sorted(p.name for p in summary.out.iterdir()) == [f.name for f in summary.files]  # nothing else


def test_memory_holds_a_block_not_the_cache(tmp_path, monkeypatch):
    """A 12 MB (float32) cache exported with 256 KB blocks: no read, no row group and no numpy peak near its size."""
    path = make_cache(tmp_path / "c.h5", {"train": 6000}, dim=512)
    monkeypatch.setattr(parquet, "BLOCK_BYTES", 256 << 10)  # 128 rows of 512 float32
    largest = {"features": 0, "columns": 0}
    read_rows, rows = Cache.read_rows, Cache.rows

    def counted_read_rows(self, split, start, stop):
        largest["features"] = max(largest["features"], stop - start)
        return read_rows(self, split, start, stop)

    def counted_rows(self, split, positions, dataset="features"):
        largest["columns"] = max(largest["columns"], len(positions))
        return rows(self, split, positions, dataset)

    export_features(make_cache(tmp_path / "small.h5", {"train": 2}), tmp_path / "warm")  # imports are not the export
    monkeypatch.setattr(Cache, "read_rows", counted_read_rows)
    monkeypatch.setattr(Cache, "rows", counted_rows)
    tracemalloc.start()
    try:
        summary = export_features(path, tmp_path / "e")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert summary.rows == 6000 and largest == {"features": 128, "columns": 128}
    meta = pq.read_metadata(summary.files[0])
    assert meta.num_row_groups == 47 and max(meta.row_group(i).num_rows for i in range(47)) == 128
    assert peak < 3 << 20, peak  # the float32 rows alone are 12 MB (20 MB of peak with the whole cache as a block)


def test_a_map_cache_is_pooled_avg_by_default_or_as_asked(tmp_path):
    path = make_cache(tmp_path / "m.h5", {"train": 9, "val": 5}, dim=2048, config=map_config())
    with open_cache(path) as c:
        for pool in (None, "max", "avgmax"):
            out = tmp_path / f"e-{pool}"
            summary = export_features(path, out, **({"pool": pool} if pool else {}))
            table = read_parts(out)
            expected = np.concatenate([c.load(s, pool or "avg").features for s in ("train", "val")])
            assert summary.dim == expected.shape[1] == (1024 if pool == "avgmax" else 512)
            assert summary.pool == (pool or "avg") and np.abs(embeddings(table) - expected).max() == 0
            ours = json.loads(pq.read_schema(summary.files[0]).metadata[b"vggcache"])
            assert (ours["pool"], ours["embedding_pool"], ours["cache_dim"]) == (pool or "avg", pool or "avg", 2048)


def test_float32_caches_and_odd_names_are_exported_as_they_are(tmp_path):
    """float32 rows unchanged; a name that is not UTF-8 written with its odd byte as \\xNN; a split whose name is not
    a plain file name gets files of its own under split<k>, its rows keeping the name."""
    names = {0: "train/caf\u00e9.jpg", 1: "train/odd\udcff.jpg", 2: "train/=sum(1).jpg"}
    path = make_cache(tmp_path / "c.h5", {"my split": 3, "train": 3}, dtype="float32",
                      names=lambda s, i: names[i] if s == "train" else f"x/{i}.jpg")
    summary = export_features(path, tmp_path / "e")
    assert [f.name for f in summary.files] == ["split0-00000-of-00001.parquet", "train-00000-of-00001.parquet"]
    table = read_parts(summary.out)
    assert table["split"].to_pylist() == ["my split"] * 3 + ["train"] * 3
    assert table["path"].to_pylist()[3:] == ["train/=sum(1).jpg", "train/caf\u00e9.jpg", "train/odd\\xff.jpg"]
    with open_cache(path) as c:
        expected = np.concatenate([c.load(s).features for s in ("my split", "train")])
    assert expected.dtype == np.float32 and np.abs(embeddings(table) - expected).max() == 0


def test_a_split_without_rows_gets_no_file(tmp_path):
    path = make_cache(tmp_path / "c.h5", {"train": 4}, failed=("val/a.jpg",))
    summary = export_features(path, tmp_path / "e")
    assert [f.name for f in summary.files] == ["train-00000-of-00001.parquet"]


# --------------------------------------------------------------------------------------------------- the CLI

def test_the_command_writes_and_says_what(cache, tmp_path):
    out = tmp_path / "e"
    result = runner.invoke(app, ["export-features", str(cache), "--out", str(out), "--split", "val", "--split",
                                 "train"])
    assert result.exit_code == 0, result.output
    assert f"wrote 55 rows x 16 to {out}: 2 Parquet files" in result.output
    assert read_parts(out)["split"].to_pylist() == ["train"] * 40 + ["val"] * 15  # files in name order


def damaged(tmp_path, cache):
    path = tmp_path / "damaged.h5"
    path.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
    return path


def non_finite(tmp_path, cache):
    import h5py

    with h5py.File(cache, "r+") as f:
        f["train/features"][3, 2] = np.nan
    return cache


def empty_cache(tmp_path, cache):
    return make_cache(tmp_path / "empty.h5", {"train": 2}, failed=("val/a.jpg",))


REFUSALS = {  # id: (arguments after CACHE, what the one line says, how the cache is made)
    "unknown-split": (["--split", "nope"], "has no split 'nope' (splits: test, train, val)", None),
    "empty-selection": (["--split", "val"], "has no rows in val: nothing to export", empty_cache),
    "damaged-cache": ([], "damaged", damaged),
    "non-finite-row": ([], "are not finite", non_finite),
    "missing-cache": ([], "feature file not found", lambda tmp_path, cache: tmp_path / "nope.h5"),
    "pool-of-a-pooled-cache": (["--pool", "max"], "holds avg-pooled features, so --pool max cannot be computed", None),
    "part-mb-zero": (["--part-mb", "0"], "--part-mb 0 is not valid", None),
}


@pytest.mark.parametrize("case", REFUSALS, ids=list(REFUSALS))
def test_a_cache_that_cannot_be_exported_is_one_line(cache, tmp_path, case):
    args, says, make = REFUSALS[case]
    path = make(tmp_path, cache) if make else cache
    out = tmp_path / "e"
    result = runner.invoke(app, ["export-features", str(path), "--out", str(out), *args])
    assert result.exit_code == 2 and says in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not out.exists()


def foreign_parquet(folder: Path) -> Path:
    import pyarrow as pa

    folder.mkdir()
    pq.write_table(pa.table({"x": [1, 2]}), folder / "train-00000-of-00001.parquet")
    return folder / "train-00000-of-00001.parquet"


def a_file(path: Path) -> Path:
    path.write_text("mine")
    return path


def a_folder_of_notes(path: Path) -> Path:
    path.mkdir()
    (path / "notes.txt").write_text("mine")
    return path


OUTS = {  # id: (makes --out, what the one line says)
    "out-is-a-file": (a_file, "is a file, expected a folder"),
    "out-holds-the-users-files": (a_folder_of_notes,
                                  "is not empty and holds no Parquet export of features (notes.txt)"),
    "out-holds-parquet-named-like-parts": (lambda p: foreign_parquet(p).parent, "holds no Parquet export of features"),
}


@pytest.mark.parametrize("case", OUTS, ids=list(OUTS))
@pytest.mark.parametrize("force", [False, True], ids=["", "force"])
def test_an_out_of_someone_else_is_refused_and_untouched(cache, tmp_path, case, force):
    make, says = OUTS[case]
    out = make(tmp_path / "e")
    before = {p: p.read_bytes() for p in ([out] if out.is_file() else out.iterdir())}
    result = runner.invoke(app, ["export-features", str(cache), "--out", str(out)] + (["--force"] if force else []))
    assert result.exit_code == 2 and says in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert {p: p.read_bytes() for p in ([out] if out.is_file() else out.iterdir())} == before


def test_force_replaces_an_earlier_export_and_nothing_else(cache, tmp_path):
    out = tmp_path / "e"
    export_features(cache, out)
    with pytest.raises(UserError, match="already holds a Parquet export of features: choose another --out, or --force"):
        export_features(cache, out, splits=("val",))
    (out / "NOTES.md").write_text("mine")  # the user's file beside the parts: kept
    summary = export_features(cache, out, splits=("val",), force=True)
    assert sorted(p.name for p in out.iterdir()) == ["NOTES.md", "val-00000-of-00001.parquet"]
    assert [f.name for f in summary.files] == ["val-00000-of-00001.parquet"] and len(read_parts(out)) == 15


def test_force_never_renames_a_part_over_a_file_it_did_not_write(cache, tmp_path):
    out = tmp_path / "e"
    export_features(cache, out, splits=("train",))
    foreign = out / "val-00000-of-00001.parquet"
    foreign.write_bytes(b"the user's")
    result = runner.invoke(app, ["export-features", str(cache), "--out", str(out), "--force"])
    assert result.exit_code == 2
    assert "holds val-00000-of-00001.parquet, which export-features did not write" in result.output
    assert foreign.read_bytes() == b"the user's" and len(read_parts_named(out, "train")) == 40


def read_parts_named(folder: Path, split: str):
    return pq.read_table(next(folder.glob(f"{split}-*.parquet")))


# ---------------------------------------------------------------------------------------- interruptions

@pytest.mark.parametrize("signal_, code", [(KeyboardInterrupt, 130), (parquet.Terminated, 143)],
                         ids=["ctrl-c", "sigterm"])
def test_an_interrupted_export_leaves_out_as_it_was(cache, tmp_path, monkeypatch, signal_, code):
    out = tmp_path / "e"
    earlier = export_features(cache, out, splits=("train",))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    write_part, calls = parquet._write_part, []

    def stopped_at_the_second_part(*args):
        calls.append(1)
        if len(calls) == 2:
            raise signal_()
        write_part(*args)

    monkeypatch.setattr(parquet, "_write_part", stopped_at_the_second_part)
    with pytest.raises(Interrupted) as stop:
        export_features(cache, out, force=True)
    assert stop.value.exit_code == code and "is as it was" in str(stop.value)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and len(earlier.files) == 1
    calls.clear()
    with pytest.raises(Interrupted):
        export_features(cache, tmp_path / "new")
    assert not (tmp_path / "new").exists()  # a folder it made is removed with its files


def test_a_full_disk_is_one_line_and_out_as_it_was(cache, tmp_path, monkeypatch):
    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(parquet, "_write_part", full)
    with pytest.raises(UserError, match="the disk filled while writing into .*: stopped before any part was published"):
        export_features(cache, tmp_path / "e")
    assert not (tmp_path / "e").exists()


KILLER = """
import os, signal, sys
from pipeline.hub import parquet
from pipeline.api import export_features
when, calls = sys.argv[3], []
write_part, replace = parquet._write_part, os.replace
def write_then_die(*args):
    write_part(*args)
    if when == "writing":
        os.kill(os.getpid(), signal.SIGKILL)
def publish_then_die(*args):
    replace(*args)
    if when == "publishing":
        os.kill(os.getpid(), signal.SIGKILL)
parquet._write_part, parquet.os.replace = write_then_die, publish_then_die
export_features(sys.argv[1], sys.argv[2], force=True)
"""


@pytest.mark.parametrize("when", ["writing", "publishing"])
def test_kill_9_never_leaves_a_folder_that_looks_complete(cache, tmp_path, when):
    """Killed while writing: no part is visible (readers find nothing); while publishing: the mark is still there.
    Either way the folder is recognised as this command's, and --force replaces it with a complete export."""
    out = tmp_path / "e"
    done = subprocess.run([sys.executable, "-c", KILLER, str(cache), str(out), when], capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr
    names = sorted(p.name for p in out.iterdir())
    assert parquet.MARK in names
    visible = [n for n in names if not n.startswith(".")]
    assert visible == ([] if when == "writing" else ["test-00000-of-00001.parquet"])
    assert parquet.is_export_folder(out)
    result = runner.invoke(app, ["export-features", str(cache), "--out", str(out)])
    assert result.exit_code == 2 and "already holds a Parquet export of features" in result.output
    assert runner.invoke(app, ["export-features", str(cache), "--out", str(out), "--force"]).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == ["test-00000-of-00001.parquet", "train-00000-of-00001.parquet",
                                                     "val-00000-of-00001.parquet"]


def test_the_cli_starts_without_pyarrow():
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "pipeline", "export-features", "--help"],
                          capture_output=True, text=True)
    assert done.returncode == 0 and "--part-mb" in done.stdout, done.stderr[-2000:]
    assert "pyarrow" not in done.stderr and "typer" in done.stderr  # -X importtime lists every module imported


def test_a_class_name_that_is_not_utf8_is_written_with_its_odd_byte_shown(tmp_path):
    import os

    from conftest import feature_file

    odd = os.fsdecode(b"caf\xff")
    summary = export_features(feature_file(tmp_path / "c.h5", classes=("a", odd, "c")), tmp_path / "e")
    table = read_parts(summary.out)
    assert set(table["class_name"].to_pylist()) == {"a", "caf\\xff", "c"}
    assert json.loads(table.schema.metadata[b"vggcache"])["class_names"] == ["a", "caf\\xff", "c"]
