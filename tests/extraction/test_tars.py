"""WebDataset tar shards as input (extraction/tars.py, reader.TarSamples): the same features as a folder of the same
images, splits and classes as WebDataset users keep them, resume after kill -9, and one line for what is wrong."""

from __future__ import annotations

import functools
import http.server
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import extract_config, interruptible
from typer.testing import CliRunner

from pipeline.cache.store import open_cache
from pipeline.cli import app
from pipeline.errors import UserError
from pipeline.extraction import tars
from pipeline.extraction.runner import extract
from pipeline.extraction.tars import expand_braces
from pipeline.synthetic import make_image_folder

PER_SHARD = 5


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("tars") / "images", {"train": 4, "val": 2}, size=(48, 40))


def pack(folder: Path, out: Path, label: str = "json", split_in: str = "name", per_shard: int = PER_SHARD) -> list[Path]:
    """The folder's images as shards, in the folder's order: `<split>-NNN.tar` (split_in "name": the split given on
    the command line) or `all-NNN.tar` with the split in each .json (split_in "json"); the class as `label`."""
    out.mkdir(parents=True, exist_ok=True)
    classes = sorted(p.name for p in (folder / "train").iterdir())
    files = sorted(folder.rglob("*.jpg"))
    groups = {}
    for f in files:
        split = f.parts[-3]
        groups.setdefault(split if split_in == "name" else "all", []).append(f)
    shards = []
    for name, members in groups.items():
        for start in range(0, len(members), per_shard):
            shard = out / f"{name}-{start // per_shard:03d}.tar"
            with tarfile.open(shard, "w") as tar:
                for f in members[start:start + per_shard]:
                    split, cls = f.parts[-3], f.parts[-2]
                    key = f"{cls}_{f.stem}"
                    meta = {"split": split} if split_in == "json" else {}
                    sides = {"json": json.dumps({"label": cls, **meta}).encode(), "txt": cls.encode(),
                             "cls": str(classes.index(cls)).encode()}
                    add(tar, f"{key}.jpg", f.read_bytes())
                    if label != "json" and meta:
                        add(tar, f"{key}.json", json.dumps(meta).encode())
                    add(tar, f"{key}.{label}", sides[label])
            shards.append(shard)
    return shards


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 1_700_000_000
    tar.addfile(info, io.BytesIO(data))


def features_by_image(out: Path) -> dict[tuple[str, int, str], np.ndarray]:
    """(split, label, file stem) -> feature row, for a folder cache or a shard cache of the same images."""
    rows = {}
    with open_cache(out) as cache:
        for split in cache.splits:
            X, y, paths = cache.load(split)
            for x, label, path in zip(X, y, paths):
                stem = path.rsplit("/", 1)[-1].rsplit(".", 1)[0].split("_")[-1]
                rows[split, int(label), stem] = x
    return rows


def shard_specs(shards: list[Path]) -> list[str]:
    return [f"{p.name.split('-')[0]}={p}" for p in shards]


@pytest.mark.parametrize("label", ["json", "txt", "cls"])
def test_shards_extract_the_same_features_and_labels_as_the_folder_bit_for_bit(folder, tmp_path, label):
    reference = extract(extract_config(folder, tmp_path / "folder.h5", dtype="float32")).out
    shards = pack(folder, tmp_path / "shards", label=label)
    s = extract(extract_config(shard_specs(shards), tmp_path / "tars.h5", dtype="float32"))
    assert s.rows == {"train": 12, "val": 6} and s.failed == []
    ours, theirs = features_by_image(s.out), features_by_image(reference)
    assert sorted(ours) == sorted(theirs)
    assert all(np.array_equal(ours[key], theirs[key]) for key in theirs)  # bit for bit at fp32
    with open_cache(s.out) as cache:
        names = ["0", "1", "2"] if label == "cls" else ["checks", "circle", "stripes"]
        assert cache.class_names == names and cache.header.source.kind == "webdataset"
        assert cache.load("train").paths[0] == "train-000.tar/checks_00000.jpg"


def test_the_split_can_come_from_each_samples_json(folder, tmp_path):
    shards = pack(folder, tmp_path / "shards", split_in="json")
    s = extract(extract_config(str(tmp_path / "shards" / "all-{000..003}.tar"), tmp_path / "f.h5"))
    assert s.rows == {"train": 12, "val": 6}


def test_an_unchanged_rerun_is_up_to_date_without_reading_the_images(folder, tmp_path, monkeypatch):
    specs = shard_specs(pack(folder, tmp_path / "shards"))
    extract(extract_config(specs, tmp_path / "f.h5"))
    monkeypatch.setattr(tars, "stream_members", lambda *a: pytest.fail("a shard's images were read"))
    assert extract(extract_config(specs, tmp_path / "f.h5")).up_to_date


def test_a_rewritten_shard_is_hashed_again_and_only_changed_images_extracted(folder, tmp_path):
    shards = pack(folder, tmp_path / "shards")
    extract(extract_config(shard_specs(shards), tmp_path / "f.h5"))
    time.sleep(0.01)
    pack(folder, tmp_path / "shards")  # the same bytes, a new mtime
    s = extract(extract_config(shard_specs(shards), tmp_path / "f.h5"))
    assert s.extracted == 0 and s.reused == 18


def test_a_bad_image_in_a_shard_is_recorded_as_in_a_folder(folder, tmp_path):
    shards = pack(folder, tmp_path / "shards")
    with tarfile.open(shards[0], "a") as tar:
        add(tar, "zz_bad.jpg", b"%!PS-Adobe-3.0 EPSF-3.0\n0 1 150000000 {pop} for\n")
        add(tar, "zz_bad.json", b'{"label": "circle"}')
    s = extract(extract_config(shard_specs(shards), tmp_path / "f.h5"))
    assert [(r.path, r.reason) for r in s.failed] == [
        ("train-000.tar/zz_bad.jpg", "not a JPEG, PNG, BMP, GIF, TIFF or WebP image (48 bytes)")]


def test_parts_of_a_job_array_take_whole_shards_and_make_the_same_cache(folder, tmp_path):
    specs = shard_specs(pack(folder, tmp_path / "shards"))
    whole = features_by_image(extract(extract_config(specs, tmp_path / "whole.h5", dtype="float32")).out)
    first = extract(extract_config(specs, tmp_path / "parts.h5", dtype="float32", shard="0/2"))
    assert not first.wrote_cache and first.extracted == 8  # shards 0, 2 and 4 of 5 (5 + 2 + 1 images)
    extract(extract_config(specs, tmp_path / "parts.h5", dtype="float32", shard="1/2"))
    parts = features_by_image(tmp_path / "parts.h5")
    assert sorted(parts) == sorted(whole) and all(np.array_equal(parts[k], whole[k]) for k in whole)


def test_kill_9_during_a_shard_extraction_resumes_to_the_same_cache(folder, tmp_path):
    specs = shard_specs(pack(folder, tmp_path / "shards", per_shard=9))
    args = [*specs, "--out", str(tmp_path / "f.h5"), "--weights", "none", "--image-size", "48", "--batch-size", "1",
            "--workers", "1", "--precision", "fp32", "--dtype", "float32"]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "-q", "extract", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=dict(os.environ, VGGCACHE_COMMIT_EVERY_S="0"),
                            preexec_fn=interruptible)
    deadline = time.time() + 120
    while proc.poll() is None and len(list((tmp_path / "f.h5.partial").glob("*-0*.json"))) < 3 and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL and not (tmp_path / "f.h5").exists()
    resumed = extract(extract_config(specs, tmp_path / "f.h5", dtype="float32", batch_size=1, image_size=48))
    assert resumed.resumed >= 3 and resumed.extracted + resumed.resumed == 18
    straight = extract(extract_config(specs, tmp_path / "straight.h5", dtype="float32", batch_size=1, image_size=48)).out
    ours, theirs = features_by_image(resumed.out), features_by_image(straight)
    assert sorted(ours) == sorted(theirs) and all(np.array_equal(ours[k], theirs[k]) for k in theirs)


def test_shards_written_by_webdataset_itself_are_read(folder, tmp_path):
    wds = pytest.importorskip("webdataset")
    (tmp_path / "shards").mkdir()
    with wds.ShardWriter(str(tmp_path / "shards" / "train-%03d.tar"), maxcount=7) as sink:
        for f in sorted((folder / "train").rglob("*.jpg")):
            sink.write({"__key__": f"{f.parts[-2]}_{f.stem}", "jpg": f.read_bytes(), "cls": f.parts[-2]})
    s = extract(extract_config(f"train={tmp_path}/shards/train-{{000..001}}.tar", tmp_path / "f.h5"))
    assert s.rows == {"train": 12}
    with open_cache(s.out) as cache:
        assert cache.class_names == ["checks", "circle", "stripes"]


def test_remote_shards_are_read_through_fsspec_from_a_local_server(folder, tmp_path):
    pytest.importorskip("fsspec")
    pytest.importorskip("aiohttp")
    shards = pack(folder, tmp_path / "shards")
    local = features_by_image(extract(extract_config(shard_specs(shards), tmp_path / "local.h5", dtype="float32")).out)
    handler = functools.partial(QuietHandler, directory=str(tmp_path / "shards"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        specs = [f"train={url}/train-{{000..002}}.tar", f"val={url}/val-{{000..001}}.tar"]
        remote = extract(extract_config(specs, tmp_path / "remote.h5", dtype="float32"))
        with pytest.raises(UserError, match=r"^tar shard not found: http://127\.0\.0\.1:\d+/train-009\.tar$"):
            extract(extract_config([f"train={url}/train-009.tar"], tmp_path / "missing.h5"))
    finally:
        server.shutdown()
    theirs = features_by_image(remote.out)
    assert sorted(theirs) == sorted(local) and all(np.array_equal(theirs[k], local[k]) for k in local)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.mark.parametrize("pattern, expanded", [
    ("s-{000..002}.tar", ["s-000.tar", "s-001.tar", "s-002.tar"]),
    ("s-{8..10}.tar", ["s-8.tar", "s-9.tar", "s-10.tar"]),
    ("{train,val}-{0..1}.tar", ["train-0.tar", "train-1.tar", "val-0.tar", "val-1.tar"]),
    ("plain.tar", ["plain.tar"]),
], ids=["zero-padded", "unpadded", "list-and-range", "no-brace"])
def test_brace_patterns_expand_as_bash_and_webdataset_do(pattern, expanded):
    assert expand_braces(pattern) == expanded


@pytest.mark.parametrize("pattern", ["s-{0..1000000}.tar", "{0..9}{0..9}{0..9}{0..9}{0..9}{0..9}{0..9}.tar"],
                         ids=["one-range", "a-product"])
def test_a_pattern_of_over_a_million_shards_is_one_line_before_any_name_is_made(pattern):
    with pytest.raises(UserError, match=r"expands to over 1,000,000 shards$"):
        expand_braces(pattern)


def malformed(tmp_path: Path) -> list[str]:
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar file at all" * 40)
    return [str(tmp_path / "junk.tar")]


def truncated(tmp_path: Path) -> list[str]:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        add(tar, "a.jpg", b"\xff\xd8\xff" + b"0" * 3000)
        add(tar, "a.txt", b"circle")
    (tmp_path / "cut.tar").write_bytes(buffer.getvalue()[:1800])
    return [str(tmp_path / "cut.tar")]


def classless(tmp_path: Path) -> list[str]:
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        add(tar, "a.jpg", b"x")
        add(tar, "a.txt", b"circle")
        add(tar, "b.jpg", b"y")
    return [str(tmp_path / "s.tar")]


def missing(tmp_path: Path) -> list[str]:
    classless(tmp_path)
    return [str(tmp_path / "{s,t}.tar")]


@pytest.mark.parametrize("make, message", [
    (malformed, r"tar shard .*junk\.tar is not a readable tar file \(ReadError: "),
    (truncated, r"tar shard .*cut\.tar is not a readable tar file \("),
    (classless, r"tar shard .*s\.tar: sample b has no class \(a \.txt member, as the first sample has\)"),
    (missing, r"tar shard not found: .*/t\.tar"),
], ids=["malformed", "truncated", "sample-without-class", "missing-shard"])
def test_what_is_wrong_with_shards_is_one_line_and_exit_2(tmp_path, make, message):
    result = CliRunner().invoke(app, ["extract", *make(tmp_path), "--out", str(tmp_path / "f.h5"), "--weights",
                                      "none", "--image-size", "32"])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert __import__("re").search(message, result.output), result.output
    assert not (tmp_path / "f.h5").exists()


def test_a_member_named_outside_the_shard_is_skipped_never_a_path(tmp_path):
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        add(tar, "../../evil.jpg", b"x")
        add(tar, "../../evil.txt", b"circle")
        add(tar, "ok.jpg", b"y")
        add(tar, "ok.txt", b"circle")
    found = tars.list_shards([(None, str(tmp_path / "s.tar"))])
    assert [path for _, path, _ in found.items] == ["s.tar/ok.jpg"]


def test_two_torchrun_ranks_take_whole_shards_and_make_the_single_process_cache(folder, tmp_path):
    specs = shard_specs(pack(folder, tmp_path / "shards"))
    single = features_by_image(extract(extract_config(specs, tmp_path / "single.h5", dtype="float32")).out)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "pipeline", "-q", "extract", *specs, "--out", str(tmp_path / "ranks.h5"), "--weights",
                           "none", "--image-size", "32", "--batch-size", "4", "--workers", "0", "--precision", "fp32",
                           "--dtype", "float32"], env=dict(os.environ, VGGCACHE_COMMIT_EVERY_S="0", OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    ranks = features_by_image(tmp_path / "ranks.h5")
    assert sorted(ranks) == sorted(single) and all(np.array_equal(ranks[k], single[k]) for k in single)


def test_a_worker_takes_whole_shards_every_nth_from_its_index():
    from pipeline.extraction.distributed import Worker, WorkerKind

    items = [(shard, i) for shard in range(5) for i in range(3)]
    shares = [Worker(WorkerKind.RANK, rank, 2).take_by(items, lambda item: item[0]) for rank in (0, 1)]
    assert [sorted({s for s, _ in share}) for share in shares] == [[0, 2, 4], [1, 3]]
    assert sorted(shares[0] + shares[1]) == items


def test_a_cached_image_of_a_local_shard_is_read_back_for_thumbnails(folder, tmp_path):
    from pipeline.look.gallery import thumbnail

    shards = pack(folder, tmp_path / "shards")
    member = tars.read_member(tmp_path / "shards" / "train-000.tar" / "checks_00000.jpg")
    assert member == (folder / "train" / "checks" / "00000.jpg").read_bytes()
    assert tars.read_member(tmp_path / "shards" / "train-000.tar" / "absent.jpg") is None
    assert thumbnail(shards[0] / "checks_00000.jpg").shape[2] == 3
