"""The index kept beside a cache: built once, loaded after, rebuilt when stale or damaged, in memory when the folder
cannot be written; the approximate index's recall against the exact one."""

import logging
import os

import numpy as np
import pytest
from conftest import feature_file

from pipeline.cache.store import open_cache
from pipeline.hub import index as hub_index
from pipeline.hub.index import Selection, approximate_index, exact_search, faiss_module, open_index, unit_rows

ALL = Selection(None, ())


@pytest.fixture
def cache_file(tmp_path):
    return feature_file(tmp_path / "c.h5", n=30)


def _open(path, **kw):
    with open_cache(path) as cache:
        return open_index(cache, ALL, **kw)


def test_the_second_call_loads_what_the_first_built(cache_file, monkeypatch):
    first = _open(cache_file)
    assert first.how == "built" and first.where.is_file() and first.index.ntotal == 90
    monkeypatch.setattr(hub_index, "build", lambda *a: pytest.fail("rebuilt an index that matches the cache"))
    second = _open(cache_file)
    assert second.how == "loaded" and np.array_equal(second.mean, first.mean)


def test_an_index_of_a_cache_made_again_with_more_rows_is_rebuilt(cache_file, tmp_path):
    first = _open(cache_file)
    feature_file(cache_file, n=31)  # same extractor, so the same fingerprint; one more row per split
    again = _open(cache_file)
    assert again.how == "built" and again.index.ntotal == 93 and again.where == first.where


@pytest.mark.parametrize("damage", ["truncated", "flipped", "json-garbage", "faiss-only"])
def test_a_damaged_index_is_rebuilt_not_trusted(cache_file, damage, caplog):
    built = _open(cache_file)
    faiss_file, json_file = built.where, built.where.with_suffix(".json")
    data = faiss_file.read_bytes()
    if damage == "truncated":  # what a kill mid-write would leave, were the file not renamed into place
        faiss_file.write_bytes(data[:len(data) // 2])
    elif damage == "flipped":
        faiss_file.write_bytes(data[:-100] + bytes([data[-100] ^ 1]) + data[-99:])
    elif damage == "json-garbage":
        json_file.write_text("{not json")
    else:
        json_file.unlink()  # killed between the two renames
    with caplog.at_level(logging.INFO):
        again = _open(cache_file)
    assert again.how == "built" and again.index.ntotal == 90
    assert _open(cache_file).how == "loaded"  # and the pair written again is whole


def test_an_index_file_replaced_by_a_fifo_is_never_read(cache_file, caplog):
    built = _open(cache_file)
    json_file = built.where.with_suffix(".json")
    json_file.unlink()
    os.mkfifo(json_file)  # reading it would wait for a writer for ever
    again = _open(cache_file)
    assert again.how != "loaded" and again.index.ntotal == 90
    assert "its files are not both regular files" in caplog.text


def test_rows_changed_in_place_are_caught_by_the_spot_checks(cache_file, caplog):
    import h5py

    built = _open(cache_file)
    with h5py.File(cache_file, "r+") as f:  # under the header's nose: same times, same paths and hashes
        f["train/features"][:] = f["train/features"][:] * -1
    with caplog.at_level(logging.WARNING):
        with open_cache(cache_file) as cache:
            again = open_index(cache, ALL, check_rows=tuple(range(30)))
    assert again.how == "built" and "no longer matches" in caplog.text
    assert not np.allclose(again.stored(0), built.stored(0))


def test_a_read_only_folder_gets_an_index_in_memory(cache_file, caplog, monkeypatch):
    if os.geteuid() == 0:  # root writes into read-only folders: the refusal it would get, made by hand
        def refused(path, data):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(hub_index, "_write_atomically", refused)
    os.chmod(cache_file.parent, 0o555)
    try:
        with caplog.at_level(logging.WARNING):
            built = _open(cache_file)
    finally:
        os.chmod(cache_file.parent, 0o755)
    assert built.how == "built in memory" and built.where is None and "in memory" in caplog.text


def test_a_file_in_the_index_folders_place_means_an_index_in_memory(cache_file, caplog):
    (cache_file.parent / f"{cache_file.name}.index").write_text("someone's notes")
    with caplog.at_level(logging.WARNING):
        built = _open(cache_file)
    assert built.how == "built in memory" and "in memory" in caplog.text
    assert (cache_file.parent / f"{cache_file.name}.index").read_text() == "someone's notes"


def test_the_mean_row_centres_every_split_whatever_is_searched(cache_file):
    with open_cache(cache_file) as cache:
        everything = np.concatenate([cache.read_split(s).features for s in cache.splits]).astype(np.float32)
        val = open_index(cache, Selection(None, ("val",)))
    assert val.index.ntotal == 30 and np.allclose(val.mean, everything.mean(0))
    assert {split for split, _ in val.rows} == {"val"}


def test_the_approximate_index_finds_nine_of_ten_exact_neighbours_on_clustered_rows():
    faiss = faiss_module()
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((40, 64)) * 3
    X = (centres[rng.integers(0, 40, 6000)] + rng.standard_normal((6000, 64))).astype(np.float32)
    X = unit_rows(X, X.mean(0))
    exact = faiss.IndexFlatIP(64)
    exact.add(X)
    approx = approximate_index(faiss, X)
    approx.add(X)
    queries = X[:300]
    _, want = exact_search(exact, queries, 10)
    _, got = exact_search(approx, queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(want, got)])
    assert recall >= 0.95 and approx.nprobe < approx.nlist
