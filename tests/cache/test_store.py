"""The HDF5 schema: a round trip through write_atomic, read back with the library and with plain h5py."""

import json
import re

import h5py
import numpy as np
import pytest
from conftest import read_header, read_records, read_split

from pipeline.cache.header import Header
from pipeline.cache.identity import generated_config
from pipeline.cache.record import Record, view_key
from pipeline.cache.schema import SCHEMA_VERSION, STR, VIEWS_SCHEMA, Damaged
from pipeline.cache.store import open_cache, row_positions
from pipeline.cache.summary import describe
from pipeline.cache.writer import write_atomic
from pipeline.errors import UserError


def write_example(path, dim=4, config=generated_config()):
    records = [Record("train", "b.jpg", 1, 10, 100, "f" * 64), Record("train", "a.jpg", 0, 11, 101, "e" * 64),
               Record("train", "bad.jpg", -1, 3, 102, "", "empty file (0 bytes)"), Record("val", "c.jpg", 1, 12, 103, "d" * 64)]
    values = {"a.jpg": 1.0, "b.jpg": 2.0, "c.jpg": 3.0}
    header = Header(fingerprint=config.fingerprint(), config=config, class_names=["ant", "bee"], feature_dim=dim,
                    created="t0", updated="t1")
    write_atomic(path, header, records, lambda rows: np.array([[values[r.path]] * dim for r in rows]), "float16")
    return header, records


def test_round_trip(tmp_path):
    path = tmp_path / "c.h5"
    header, records = write_example(path)
    got_header, got_records = read_records(path)
    assert got_header == header
    assert set(got_records) == set(records)
    train = read_split(path, "train")
    assert train.paths == ["a.jpg", "b.jpg"]  # rows are sorted by path
    assert train.labels.tolist() == [0, 1]
    assert train.features.dtype == np.float16 and train.features[:, 0].tolist() == [1.0, 2.0]
    assert not (tmp_path / "c.h5.tmp").exists()


@pytest.mark.parametrize("read", [lambda c: c.load("train"), lambda c: c.read_paths("train"), lambda c: c.records(),
                                  lambda c: c.nonfinite_keys()], ids=["load", "paths", "records", "verify"])
def test_a_closed_cache_says_it_is_closed(tmp_path, read):
    path = tmp_path / "c.h5"
    write_example(path)
    with open_cache(path) as cache:
        pass
    with pytest.raises(ValueError, match=f"^the cache {path} is closed: read it inside "):
        read(cache)


def test_plain_h5py_sees_the_documented_schema(tmp_path):
    path = tmp_path / "c.h5"
    write_example(path)
    with h5py.File(path) as f:
        assert f.attrs["schema_version"] == 1  # no views: an older vggcache still reads it
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


def write_with_views(path, k=2, dim=3, config=generated_config()):
    """train rows a, b with k views each (value: 10 * row value + view index), val row c without views."""
    header, records = write_example(path, dim, config)
    rows = [r for r in records if r.ok and r.split == "train"]
    views = [Record(r.split, view_key(r.path, j), r.label, r.size, r.mtime_ns, r.sha256) for r in rows for j in range(k)]
    value = {"a.jpg": 1.0, "b.jpg": 2.0, "c.jpg": 3.0} | {v.path: 10 * {"a.jpg": 1, "b.jpg": 2}[v.view[0]] + v.view[1] for v in views}
    write_atomic(path, header, records + views[::-1], lambda rs: np.array([[value[r.path]] * dim for r in rs]), "float16")
    return records + views


def test_views_are_stored_after_their_row_in_row_order(tmp_path):
    path = tmp_path / "c.h5"
    records = write_with_views(path, dim=512, config=generated_config(pool="map", image_size=32))  # 1 x 1 pool5 maps
    with h5py.File(path) as f:
        assert f.attrs["schema_version"] == VIEWS_SCHEMA
        assert f["train"]["views"][:, 0].tolist() == [10, 11, 20, 21]  # rows a, b (sorted); views 0, 1 of each
        assert "views" not in f["val"]
    with open_cache(path) as cache:
        assert set(cache.records()) == set(records)
        assert cache.views_per_row("train") == 2 and cache.views_per_row("val") == 0
        assert cache.read_views("train", "max")[:, 0].tolist() == [10, 11, 20, 21]  # pooled at head time
        positions = row_positions(cache.records())
        assert positions[view_key("b.jpg", 1)] == ("train", 3)
        assert cache.rows("train", np.array([3, 0]), "views")[:, 0].tolist() == [21, 10]
    assert describe(path).splits["train"].views == 4


def test_a_row_without_all_its_views_is_refused_at_writing(tmp_path):
    header, records = write_example(tmp_path / "c.h5")
    one_view = Record("train", view_key("a.jpg", 1), 0, 11, 101, "e" * 64)
    with pytest.raises(ValueError, match=r"no view row for a.jpg \(view 0\)"):
        write_atomic(tmp_path / "d.h5", header, records + [one_view], lambda rs: np.zeros((len(rs), 4)), "float16")


@pytest.mark.parametrize("shape", [(3, 3), (4, 2)], ids=["not-a-multiple-of-the-rows", "wrong-dim"])
def test_views_of_the_wrong_shape_are_damage(tmp_path, shape):
    path = tmp_path / "c.h5"
    write_with_views(path)
    with h5py.File(path, "r+") as f:
        del f["train"]["views"]
        f["train"].create_dataset("views", data=np.zeros(shape, np.float16))
    with pytest.raises(Damaged, match=r"train/views is \(\d, \d\) float16, expected \(N x K, 3\)"):
        open_cache(path)


def test_a_split_whose_every_image_failed_is_written_and_read_back_empty(tmp_path):
    header = Header(fingerprint=generated_config().fingerprint(), config=generated_config(), class_names=["a", "b"], feature_dim=4)
    records = [Record("train", "x.jpg", -1, 5, 1, "", "not a decodable image (5 bytes)")]
    write_atomic(tmp_path / "c.h5", header, records, lambda rs: np.zeros((len(rs), 4)), "float16")
    with open_cache(tmp_path / "c.h5") as cache:
        assert cache.read_split("train").features.shape == (0, 4) and cache.split_shape("train")[2] >= 1
        assert cache.records() == records


def test_describe_counts_rows_per_class_and_failures(tmp_path):
    write_example(tmp_path / "c.h5")
    d = describe(tmp_path / "c.h5").to_json()
    assert d["splits"]["train"]["per_class"] == {"ant": 1, "bee": 1}
    assert d["splits"]["train"]["failed"] == [{"path": "bad.jpg", "reason": "empty file (0 bytes)"}]
    assert d["splits"]["val"]["rows"] == 1


def test_rows_are_gathered_by_position(tmp_path):
    write_example(tmp_path / "c.h5")
    with open_cache(tmp_path / "c.h5") as cache:
        assert cache.rows("train", np.array([1, 0]))[:, 0].tolist() == [2.0, 1.0]


def test_a_name_that_is_not_utf8_round_trips_as_its_bytes(tmp_path):
    name = b"train/a/\xff\xfe.jpg".decode("utf-8", "surrogateescape")  # as os.listdir returns it
    records = [Record("train", name, 0, 1, 2, "a" * 64), Record("train", name + "2", -1, 3, 4, "", "cannot read (x)")]
    header = Header(fingerprint=generated_config().fingerprint(), config=generated_config(), class_names=["a"], feature_dim=2)
    write_atomic(tmp_path / "c.h5", header, records, lambda rows: np.ones((len(rows), 2)), "float16")
    assert set(read_records(tmp_path / "c.h5")[1]) == set(records)
    assert read_split(tmp_path / "c.h5", "train").paths == [name]
    with h5py.File(tmp_path / "c.h5") as f:  # plain h5py sees the file name's own bytes
        assert f["train/paths"][0] == b"train/a/\xff\xfe.jpg"


def _drop(name):
    def damage(f):
        del f[name]
    return damage


def _set_attr(key, value):
    def damage(f):
        f.attrs[key] = value
    return damage


def _del_attr(key):
    def damage(f):
        del f.attrs[key]
    return damage


def _add_root_dataset(f):
    f["stray"] = [1, 2, 3]


def _set_paths(*paths):
    def damage(f):
        f["train/paths"][...] = np.array([p.encode() for p in paths], dtype=object)
    return damage


def _set_digest(value):
    def damage(f):
        f["train/sha256"][0] = value
    return damage


def _short_labels(f):
    del f["train/labels"]
    f["train/labels"] = np.array([0], dtype="<i8")


def _label_out_of_range(f):
    f["train/labels"][0] = 7


@pytest.mark.parametrize("damage, message", [
    (_drop("train/paths"), "split 'train' has no paths dataset"),
    (_drop("val/failed"), "split 'val' has no failed dataset"),
    (_drop("train/features"), "split 'train' has no features dataset"),
    (_del_attr("config"), "the root attribute 'config' is missing"),
    (_del_attr("fingerprint"), "the root attribute 'fingerprint' is missing"),
    (_set_attr("config", "{not json"), "the root attribute 'config' is not JSON"),
    (_set_attr("class_names", "[]"), "class_names is not a non-empty list"),
    (_set_attr("schema_version", "one"), "schema_version is 'one', expected a positive integer"),
    (_set_attr("feature_dim", 5), "train/features is (2, 4) float16, expected (N, 5)"),
    (_add_root_dataset, "unexpected dataset /stray at the root"),
    (_short_labels, "train/labels has shape (1,), expected (2,)"),
    (_label_out_of_range, "train/labels are not indices into the 2 class names"),
    (_set_attr("class_names", '["ant", "ant"]'), "class_names names a class twice"),
    (_set_paths("/etc/a.jpg", "b.jpg"), "train/paths row 0 ('/etc/a.jpg') is not relative to the dataset root"),
    (_set_paths("a.jpg", "x/../../b.jpg"), "train/paths row 1 ('x/../../b.jpg') is not relative to the dataset root"),
    (_set_paths("b.jpg", "a.jpg"), "train/paths are not sorted and distinct (row 1: 'a.jpg')"),
    (_set_paths("a.jpg", "a.jpg"), "train/paths are not sorted and distinct (row 1: 'a.jpg')"),
    (_set_digest(b"z" * 64), "train/sha256 row 0 is not a hex digest"),
], ids=["no-paths", "no-failed", "no-features", "no-config", "no-fingerprint", "config-not-json", "no-classes",
        "schema-version-text", "dim-mismatch", "root-dataset", "short-column", "label-range", "class-twice",
        "absolute-path", "parent-path", "unsorted-paths", "repeated-path", "digest-not-hex"])
def test_a_damaged_cache_is_one_line_naming_what_is_wrong(tmp_path, damage, message):
    write_example(tmp_path / "c.h5")
    with h5py.File(tmp_path / "c.h5", "a") as f:
        damage(f)
    with pytest.raises(Damaged, match=re.escape(message)):
        read_header(tmp_path / "c.h5")


def _edit_config(**changes):
    def damage(f):
        f.attrs["config"] = json.dumps(json.loads(f.attrs["config"]) | changes)
    return damage


@pytest.mark.parametrize("damage, problem", [
    (_edit_config(future_field=3), "its config: unknown field 'future_field'"),
    (_edit_config(antialias=1), "its config: antialias 1 is not valid (expected true or false)"),
    (_edit_config(mean=[0.5, 0.5]), "its config: mean (0.5, 0.5) is not valid (expected three numbers)"),
    (_edit_config(pool="map", layer="pool9"), "its config: layer 'pool9' is not valid (expected one of pool5, pool4)"),
    (_edit_config(image_size=64), "its config hashes to"),
], ids=["unknown-field", "int-for-bool", "two-means", "unknown-layer", "edited"])
def test_a_config_this_version_cannot_use_leaves_the_file_readable_and_says_why(tmp_path, damage, problem):
    write_example(tmp_path / "c.h5")
    with h5py.File(tmp_path / "c.h5", "a") as f:
        damage(f)
    header = read_header(tmp_path / "c.h5")  # info still shows the file
    assert header.config is None and header.config_problem.startswith(problem)
    with pytest.raises(UserError, match=re.escape(f"cannot use ({problem}")):
        header.feature_config(tmp_path / "c.h5")


@pytest.mark.parametrize("key, value", [("extraction", {"device": 3, "batch_size": True, "future": 1}),
                                        ("source", {"root": 5, "kind": "folder"})], ids=["extraction", "source"])
def test_informational_attributes_of_the_wrong_type_are_read_as_absent_and_kept_as_they_were(tmp_path, key, value):
    write_example(tmp_path / "c.h5")
    with h5py.File(tmp_path / "c.h5", "a") as f:
        f.attrs[key] = json.dumps(value)
    header = read_header(tmp_path / "c.h5")
    assert header.config is not None and header.attribute(key) == value
    typed = header.extraction if key == "extraction" else header.source
    assert {k: v for k, v in vars(typed).items() if v is not None} == ({} if key == "extraction" else {"kind": "folder"})
    assert describe(tmp_path / "c.h5").to_json()[key] == value


@pytest.mark.parametrize("rows", [10**9, 10**10], ids=["1e9", "1e10"])
def test_a_cache_declaring_more_rows_than_its_bytes_is_refused_before_anything_is_read(tmp_path, rows):
    """Chunked datasets are allocated lazily: a small file can declare 10^10 consistent rows. Refused from the sizes
    alone, before a label is read (reading them would allocate the declared array)."""
    write_example(tmp_path / "c.h5")
    with h5py.File(tmp_path / "c.h5", "a") as f:
        g = f["train"]
        for name in ("features", "labels", "paths", "sizes", "mtimes_ns", "sha256"):
            dtype, shape = g[name].dtype, (rows,) + g[name].shape[1:]
            del g[name]
            g.create_dataset(name, shape, dtype=STR if name == "paths" else dtype, chunks=(1024,) + shape[1:])
    with pytest.raises(Damaged, match=r"is damaged: its splits declare [0-9.]+ [GT]B of data in a file of [0-9.]+ KB"):
        read_header(tmp_path / "c.h5")


def test_foreign_corrupt_missing_and_newer_files_are_refused(tmp_path):
    with pytest.raises(UserError, match="feature file not found"):
        read_header(tmp_path / "none.h5")
    (tmp_path / "junk.h5").write_bytes(b"\x89HDF junk")
    with pytest.raises(UserError, match="is not a readable HDF5 file"):
        read_header(tmp_path / "junk.h5")
    with h5py.File(tmp_path / "foreign.h5", "w") as f:
        f["x"] = [1]
    with pytest.raises(UserError, match="not a vggcache feature file"):
        read_header(tmp_path / "foreign.h5")
    write_example(tmp_path / "new.h5")
    with h5py.File(tmp_path / "new.h5", "a") as f:
        f.attrs["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(UserError, match="upgrade"):
        read_header(tmp_path / "new.h5")
    write_example(tmp_path / "c.h5")
    with pytest.raises(UserError, match="no split 'test'"):
        read_split(tmp_path / "c.h5", "test")


def _hash_not_ascii(f):
    f["train/sha256"][0] = b"\xff" * 64


def _nan_feature(f):
    f["train/features"][0, 0] = np.nan


@pytest.mark.parametrize("damage, read, message", [
    (_hash_not_ascii, read_records, "train/sha256 row 0 is not a hex digest"),
    (_nan_feature, lambda p: read_split(p, "train"), "1 rows of train/features are not finite (NaN or inf)"),
], ids=["hash-bytes", "nan"])
def test_damaged_values_are_one_line_when_read(tmp_path, damage, read, message):
    write_example(tmp_path / "c.h5")
    with h5py.File(tmp_path / "c.h5", "a") as f:
        damage(f)
    with pytest.raises(Damaged, match=re.escape(message)):
        read(tmp_path / "c.h5")


@pytest.mark.parametrize("seed", range(8))
def test_random_bytes_overwritten_anywhere_give_one_line_or_a_good_read(tmp_path, seed):
    path = tmp_path / "c.h5"
    write_example(path, dim=64)
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(seed)
    for start in rng.integers(0, len(data) - 64, 3):
        data[start:start + 64] = rng.integers(0, 256, 64, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    try:
        header, records = read_records(path)
        for split in {r.split for r in records}:
            read_split(path, split)
    except UserError as e:
        assert "\n" not in str(e)
