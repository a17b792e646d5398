"""The HDF5 schema: a round trip through write_atomic, read back with the library and with plain h5py."""

import json

import h5py
import numpy as np
import pytest

from pipeline import store
from pipeline.errors import UserError
from pipeline.store import Header, Record


def write_example(path, dim=4):
    records = [Record("train", "b.jpg", 1, 10, 100, "f" * 64), Record("train", "a.jpg", 0, 11, 101, "e" * 64),
               Record("train", "bad.jpg", -1, 3, 102, "", "empty file (0 bytes)"), Record("val", "c.jpg", 1, 12, 103, "d" * 64)]
    values = {"a.jpg": 1.0, "b.jpg": 2.0, "c.jpg": 3.0}
    header = Header(fingerprint="abc", config={"pool": "avg"}, class_names=["ant", "bee"], feature_dim=dim,
                    created="t0", updated="t1")
    store.write_atomic(path, header, records, lambda rows: np.array([[values[r.path]] * dim for r in rows]), "float16")
    return header, records


def test_round_trip(tmp_path):
    path = tmp_path / "c.h5"
    header, records = write_example(path)
    got_header, got_records = store.read_records(path)
    assert got_header == header
    assert set(got_records) == set(records)
    train = store.read_split(path, "train")
    assert train.paths == ["a.jpg", "b.jpg"]  # rows are sorted by path
    assert train.labels.tolist() == [0, 1]
    assert train.features.dtype == np.float16 and train.features[:, 0].tolist() == [1.0, 2.0]
    assert not (tmp_path / "c.h5.tmp").exists()


def test_plain_h5py_sees_the_documented_schema(tmp_path):
    path = tmp_path / "c.h5"
    write_example(path)
    with h5py.File(path) as f:
        assert f.attrs["schema_version"] == store.SCHEMA_VERSION
        assert json.loads(f.attrs["class_names"]) == ["ant", "bee"]
        assert {"config", "fingerprint", "versions", "created", "updated", "source", "extraction"} <= set(f.attrs)
        g = f["train"]
        assert set(g) == {"features", "labels", "paths", "sizes", "mtimes_ns", "sha256", "failed"}
        assert g["features"].shape == (2, 4) and g["features"].chunks[1] == 4
        assert g["labels"].dtype == np.int64
        assert [p.decode() for p in g["paths"][:]] == ["a.jpg", "b.jpg"]
        failed = g["failed"][:]
        assert failed["path"][0].decode() == "bad.jpg" and failed["reason"][0].decode() == "empty file (0 bytes)"
        assert f["val"]["failed"].shape == (0,)


def test_describe_counts_rows_per_class_and_failures(tmp_path):
    write_example(tmp_path / "c.h5")
    d = store.describe(tmp_path / "c.h5")
    assert d["splits"]["train"]["per_class"] == {"ant": 1, "bee": 1}
    assert d["splits"]["train"]["failed"] == [{"path": "bad.jpg", "reason": "empty file (0 bytes)"}]
    assert d["splits"]["val"]["rows"] == 1


def test_row_reader_gathers_by_position(tmp_path):
    write_example(tmp_path / "c.h5")
    reader = store.RowReader(tmp_path / "c.h5")
    assert reader.rows("train", np.array([1, 0]))[:, 0].tolist() == [2.0, 1.0]
    reader.close()


def test_foreign_corrupt_missing_and_newer_files_are_refused(tmp_path):
    with pytest.raises(UserError, match="feature file not found"):
        store.read_header(tmp_path / "none.h5")
    (tmp_path / "junk.h5").write_bytes(b"\x89HDF junk")
    with pytest.raises(UserError, match="is not a readable HDF5 file"):
        store.read_header(tmp_path / "junk.h5")
    with h5py.File(tmp_path / "foreign.h5", "w") as f:
        f["x"] = [1]
    with pytest.raises(UserError, match="not a vggcache feature file"):
        store.read_header(tmp_path / "foreign.h5")
    write_example(tmp_path / "new.h5")
    with h5py.File(tmp_path / "new.h5", "a") as f:
        f.attrs["schema_version"] = store.SCHEMA_VERSION + 1
    with pytest.raises(UserError, match="upgrade"):
        store.read_header(tmp_path / "new.h5")
    write_example(tmp_path / "c.h5")
    with pytest.raises(UserError, match="no split 'test'"):
        store.read_split(tmp_path / "c.h5", "test")
