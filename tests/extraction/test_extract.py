"""The extract stage end to end: values, bad images, incremental updates, no-op reruns, and resume after kill -9."""

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import SIZE, extract_config, interruptible, read_header, read_records, read_split
from PIL import Image

from pipeline import files
from pipeline.backbone import vgg16 as backbone
from pipeline.backbone.vgg16 import Extractor, build_body
from pipeline.cache import writer
from pipeline.cache.writer import GuardedFile
from pipeline.errors import Interrupted, UserError
from pipeline.extraction import embed
from pipeline.extraction import runner as extract_module
from pipeline.extraction.config import feature_config
from pipeline.extraction.reader import preprocess
from pipeline.extraction.runner import extract
from pipeline.images import open_image
from pipeline.synthetic import make_image_folder


def read_all(path: Path) -> dict:
    """Every dataset of every split, as numpy arrays, plus the root attrs that do not depend on time."""
    with h5py.File(path) as f:
        out = {f"{s}/{k}": f[s][k][:] for s in f for k in f[s]}
        out["class_names"] = f.attrs["class_names"]
        out["config"] = f.attrs["config"]
    return out


def assert_same_cache(a: Path, b: Path) -> None:
    x, y = read_all(a), read_all(b)
    assert x.keys() == y.keys()
    for key in x:
        if key.endswith("mtimes_ns"):
            continue
        assert np.array_equal(x[key], y[key]), key


def test_rows_equal_a_direct_forward_of_each_image(image_folder, tmp_path, weights_file):
    out = tmp_path / "f.h5"
    s = extract(extract_config(image_folder, out, weights=str(weights_file), dtype="float32", batch_size=5,
                               precision="fp32"))
    assert s.rows == {"train": 12, "val": 6} and s.extracted == 18 and not s.failed
    fcfg = feature_config(str(weights_file), "avg", SIZE, "float32")
    extractor = Extractor(build_body(fcfg, str(weights_file)), "cpu", "fp32")
    for split in ("train", "val"):
        got = read_split(out, split)
        images = torch.stack([preprocess(open_image((image_folder / p).read_bytes(), fcfg.resize_size),
                                         fcfg.resize_size, SIZE) for p in got.paths])
        np.testing.assert_allclose(got.features, extractor(images), rtol=1e-5, atol=1e-6)
        names = ["checks", "circle", "stripes"]
        assert [names[i] for i in got.labels] == [p.split("/")[1] for p in got.paths]


def test_bad_images_are_skipped_and_recorded(image_folder, tmp_path):
    (image_folder / "train/circle/zero.jpg").write_bytes(b"")
    (image_folder / "train/circle/text.PNG").write_bytes(b"plain text")
    good = (image_folder / "train/checks/00000.jpg").read_bytes()
    (image_folder / "val/checks/cut.jpg").write_bytes(good[: len(good) // 3])
    Image.new("L", (40, 40), 7).save(image_folder / "train/stripes/grey.png")
    Image.new("CMYK", (40, 40)).save(image_folder / "train/stripes/cmyk.jpg")
    (image_folder / "train/circle/program.jpg").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n0 1 150000000 {pop} for\n")
    Image.new("RGB", (2000, 1)).save(image_folder / "train/circle/strip.jpg")
    s = extract(extract_config(image_folder, tmp_path / "f.h5"))
    reasons = {r.path: r.reason for r in s.failed}
    assert set(reasons) == {"train/circle/zero.jpg", "train/circle/text.PNG", "val/checks/cut.jpg",
                            "train/circle/program.jpg", "train/circle/strip.jpg"}
    assert reasons["train/circle/zero.jpg"] == "empty file (0 bytes)"
    assert reasons["train/circle/program.jpg"] == "not a JPEG, PNG, BMP, GIF, TIFF or WebP image (48 bytes)"
    assert reasons["train/circle/strip.jpg"].startswith("2000x1 px: its sides are more than 20:1 apart")
    assert s.rows == {"train": 14, "val": 6}
    train = read_split(tmp_path / "f.h5", "train")
    assert len(train.paths) == len(train.labels) == train.features.shape[0] == 14
    assert np.isfinite(train.features).all()


def test_a_fifo_or_a_device_named_like_an_image_is_recorded_not_waited_on(image_folder, tmp_path):
    os.mkfifo(image_folder / "train/circle/pipe.jpg")  # with no writer, reading it would wait for ever
    os.symlink("/dev/zero", image_folder / "train/circle/zeros.jpg")  # reading it would never end
    s = extract(extract_config(image_folder, tmp_path / "f.h5"))
    assert {r.path: r.reason for r in s.failed} == {"train/circle/pipe.jpg": "not a regular file (a FIFO)",
                                                    "train/circle/zeros.jpg": "not a regular file (a character device)"}
    assert s.rows == {"train": 12, "val": 6}
    assert extract(extract_config(image_folder, tmp_path / "f.h5")).up_to_date  # and the rerun does not wait either


def test_rerun_is_a_no_op_without_loading_the_model(image_folder, tmp_path, monkeypatch):
    out = tmp_path / "f.h5"
    extract(extract_config(image_folder, out))
    before = out.stat().st_mtime_ns
    monkeypatch.setattr(backbone, "build_body", lambda *a: pytest.fail("the model was loaded"))
    s = extract(extract_config(image_folder, out))
    assert s.up_to_date and s.extracted == 0 and out.stat().st_mtime_ns == before
    assert not Path(f"{out}.partial").exists()


def test_added_removed_changed_and_touched_files(image_folder, tmp_path):
    out = tmp_path / "f.h5"
    extract(extract_config(image_folder, out))
    old = read_split(out, "train")
    make_image_folder(tmp_path / "more", {"train": 1}, size=(40, 36), seed=9)
    (tmp_path / "more/train/circle/00000.jpg").rename(image_folder / "train/circle/new.jpg")
    (image_folder / "train/checks/00001.jpg").unlink()
    changed = image_folder / "train/stripes/00002.jpg"
    Image.new("RGB", (40, 36), (250, 10, 10)).save(changed)
    os.utime(image_folder / "train/circle/00000.jpg", ns=(1, 1))  # touched: same bytes, new mtime
    s = extract(extract_config(image_folder, out))
    assert (s.extracted, s.reused, s.resumed) == (2, 16, 0) and not s.up_to_date
    new = read_split(out, "train")
    assert "train/circle/new.jpg" in new.paths and "train/checks/00001.jpg" not in new.paths
    row = lambda split, p: split.features[split.paths.index(p)]
    assert not np.array_equal(row(old, "train/stripes/00002.jpg"), row(new, "train/stripes/00002.jpg"))
    assert np.array_equal(row(old, "train/circle/00000.jpg"), row(new, "train/circle/00000.jpg"))
    assert extract(extract_config(image_folder, out)).up_to_date
    fresh = tmp_path / "fresh.h5"
    extract(extract_config(image_folder, fresh))
    assert_same_cache(out, fresh)


def test_other_config_never_writes_into_an_existing_cache(image_folder, tmp_path):
    out = tmp_path / "f.h5"
    extract(extract_config(image_folder, out))
    with pytest.raises(UserError, match=r"holds features of extractor config .*pool: 'avg' -> 'max'.*--force") as e:
        extract(extract_config(image_folder, out, pool="max"))
    assert "mean" not in str(e.value)  # only what changed: the tuples read back from JSON as lists are the same
    s = extract(extract_config(image_folder, None, pool="max", features_dir=tmp_path))
    assert s.out.name.startswith("data-") and s.out != out and s.feature_dim == 512
    s = extract(extract_config(image_folder, out, pool="avgmax", force=True))
    assert read_header(out).config.pool == "avgmax" and s.extracted == 18


def test_default_name_carries_the_fingerprint(image_folder, tmp_path):
    s = extract(extract_config(image_folder, None, features_dir=tmp_path / "features"))
    assert s.out == tmp_path / "features" / f"data-{s.fingerprint}.h5"
    assert read_header(s.out).fingerprint == feature_config("none", "avg", SIZE, "float16").fingerprint()


def test_damaged_shards_are_ignored_and_redone(image_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(embed, "COMMIT_EVERY_S", 0.0)
    out = tmp_path / "f.h5"
    real = extract_module._write

    def crash_before_writing(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(extract_module, "_write", crash_before_writing)
    with pytest.raises(Interrupted, match="interrupted: 18 images are saved"):
        extract(extract_config(image_folder, out))
    partial = Path(f"{out}.partial")
    (partial / "main-000001.json").write_text("{ truncated")
    (partial / "main-000002.npy").unlink()
    monkeypatch.setattr(extract_module, "_write", real)
    s = extract(extract_config(image_folder, out))
    assert (s.extracted, s.resumed) == (8, 10) and not partial.exists()  # shards 1 and 2 (4 images each) redone
    reference = tmp_path / "ref.h5"
    extract(extract_config(image_folder, reference))
    assert_same_cache(out, reference)


CLI = [sys.executable, "-m", "pipeline", "-q", "extract"]


def run_until(args, env, condition, sig=signal.SIGKILL, timeout=60):
    proc = subprocess.Popen(CLI + args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=interruptible)
    deadline = time.time() + timeout
    while proc.poll() is None and not condition() and time.time() < deadline:
        time.sleep(0.005)
    if proc.poll() is None:
        proc.send_signal(sig)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out + err


def test_resume_after_kill_9_at_several_points_matches_an_uninterrupted_run(tmp_path):
    data = make_image_folder(tmp_path / "data", {"train": 12, "val": 4}, size=(48, 40))
    env = dict(os.environ, VGGCACHE_COMMIT_EVERY_S="0")
    args = lambda out: [str(data), "--out", str(out), "--weights", "none", "--image-size", "48",
                        "--batch-size", "4", "--workers", "0", "--dtype", "float32", "--precision", "fp32"]
    reference = extract(extract_config(data, tmp_path / "ref.h5", image_size=48, dtype="float32")).out
    out = tmp_path / "f.h5"
    partial = Path(f"{out}.partial")
    shards = lambda n: (lambda: len(list(partial.glob("*-0*.json"))) >= n)
    codes = []
    for condition in (shards(1), shards(5), lambda: Path(f"{out}.tmp").exists()):
        codes.append(run_until(args(out), env, condition)[0])
        if codes[-1] == 0:
            break
    assert codes[0] == -signal.SIGKILL and set(codes) <= {-signal.SIGKILL, 0}
    code, output = run_until(args(out), env, lambda: False)
    assert code == 0, output
    assert_same_cache(out, reference)
    assert not partial.exists() and not Path(f"{out}.tmp").exists()


def test_ctrl_c_exits_130_and_says_how_to_resume(tmp_path):
    data = make_image_folder(tmp_path / "data", {"train": 12}, size=(48, 40))
    out = tmp_path / "f.h5"
    env = dict(os.environ, VGGCACHE_COMMIT_EVERY_S="0")
    args = [str(data), "--out", str(out), "--weights", "none", "--image-size", "48", "--batch-size", "4", "--workers", "0",
            "--precision", "fp32"]
    code, output = run_until(args, env, lambda: len(list(Path(f"{out}.partial").glob("*-0*.json"))) >= 1, signal.SIGINT)
    assert code == 130, output
    assert "rerun the same command to resume" in output and "Traceback" not in output
    s = extract(extract_config(data, out, image_size=48))
    assert s.resumed > 0 and len(read_split(out, "train").paths) == 36


def test_csv_manifest_relabel_keeps_features_and_missing_files_are_recorded(image_folder, tmp_path, monkeypatch):
    manifest = image_folder / "m.csv"
    manifest.write_text("path,label,split\ntrain/circle/00000.jpg,round,train\ntrain/checks/00000.jpg,grid,train\n"
                        "val/circle/00000.jpg,round,val\nval/gone.jpg,grid,val\n")
    out = tmp_path / "m.h5"
    s = extract(extract_config(manifest, out))
    assert s.rows == {"train": 2, "val": 1} and [(r.path, r.reason) for r in s.failed] == [
        ("val/gone.jpg", "FileNotFoundError: listed but missing")]
    before = read_split(out, "train")
    manifest.write_text(manifest.read_text().replace("train/checks/00000.jpg,grid", "train/checks/00000.jpg,round"))
    monkeypatch.setattr(backbone, "build_body", lambda *a: pytest.fail("relabelling must not run the model"))
    with pytest.raises(UserError, match="class 'grid' in split 'val' is not a class of 'train'"):
        extract(extract_config(manifest, out))
    manifest.write_text(manifest.read_text().replace("val/gone.jpg,grid", "val/gone.jpg,round"))
    s = extract(extract_config(manifest, out))
    after = read_split(out, "train")
    assert s.extracted == 0 and read_header(out).class_names == ["round"]
    assert after.labels.tolist() == [0, 0] and np.array_equal(after.features, before.features)


def test_verify_finds_content_changes_that_keep_size_and_mtime(image_folder, tmp_path):
    out = tmp_path / "f.h5"
    extract(extract_config(image_folder, out))
    before = read_split(out, "train")
    target = image_folder / "train/stripes/00001.jpg"
    st = target.stat()
    data = bytearray(target.read_bytes())
    other = (image_folder / "train/circle/00001.jpg").read_bytes()
    target.write_bytes(other[: len(data)].ljust(len(data), b"\0"))  # same size, new content
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert extract(extract_config(image_folder, out)).up_to_date  # size and mtime alone cannot see it
    s = extract(extract_config(image_folder, out, verify=True))
    assert (s.extracted, s.resumed, s.up_to_date) == (1, 0, False)
    records = {r.path: r for r in read_records(out)[1]}
    assert records["train/stripes/00001.jpg"].sha256 == hashlib.sha256(target.read_bytes()).hexdigest()
    fresh = tmp_path / "fresh.h5"
    extract(extract_config(image_folder, fresh))
    got, want = read_split(out, "train"), read_split(fresh, "train")
    row = got.paths.index("train/stripes/00001.jpg")
    assert got.paths == want.paths and not np.array_equal(got.features[row], before.features[row])
    # the new row, not the stale one: equal to rounding (it went through the model in a batch of its own)
    np.testing.assert_allclose(got.features[row], want.features[row], rtol=1e-2, atol=1e-3)
    assert extract(extract_config(image_folder, out, verify=True)).up_to_date


def test_a_name_that_is_not_utf8_is_extracted_and_kept(image_folder, tmp_path):
    odd = os.path.join(os.fsencode(image_folder / "train/circle"), b"\xff\xfe.jpg")
    with open(odd, "wb") as f:
        f.write((image_folder / "train/circle/00000.jpg").read_bytes())
    out = tmp_path / "f.h5"
    s = extract(extract_config(image_folder, out))
    name = os.fsdecode(b"train/circle/\xff\xfe.jpg")
    assert s.rows["train"] == 13 and not s.failed and name in read_split(out, "train").paths
    assert extract(extract_config(image_folder, out)).up_to_date


@pytest.fixture
def unreadable(monkeypatch):
    """Make files unreadable the way chmod 000 does for a non-root user (tests may run as root, which chmod
    cannot stop): opening them raises PermissionError until the returned set is emptied."""
    blocked: set[str] = set()

    def guarded(real_open):
        def guarded_open(file, *args, **kwargs):
            if os.fspath(file) in blocked:
                raise PermissionError(13, "Permission denied", os.fspath(file))
            return real_open(file, *args, **kwargs)
        return guarded_open

    monkeypatch.setattr("builtins.open", guarded(open))
    monkeypatch.setattr(os, "open", guarded(os.open))  # how images.read_image_file opens an image
    return blocked


def test_an_unreadable_file_is_recorded_then_retried_once_it_can_be_read(image_folder, tmp_path, unreadable, monkeypatch):
    out, target = tmp_path / "f.h5", image_folder / "train/checks/00002.jpg"
    unreadable.add(str(target))
    s = extract(extract_config(image_folder, out))
    assert [(r.path, r.reason) for r in s.failed] == [
        ("train/checks/00002.jpg", "cannot read (PermissionError: Permission denied)")]
    real_build = backbone.build_body
    monkeypatch.setattr(backbone, "build_body", lambda *a: pytest.fail("an unchanged, still unreadable file ran the model"))
    assert extract(extract_config(image_folder, out)).up_to_date
    unreadable.clear()  # chmod 644: neither size nor mtime changes
    monkeypatch.setattr(backbone, "build_body", real_build)
    s = extract(extract_config(image_folder, out))
    assert (s.extracted, s.failed) == (1, []) and "train/checks/00002.jpg" in read_split(out, "train").paths


def test_verify_retries_every_failed_file(image_folder, tmp_path):
    out, target = tmp_path / "f.h5", image_folder / "train/checks/00002.jpg"
    good, st = target.read_bytes(), target.stat()
    target.write_bytes(b"\0" * len(good))  # undecodable, same size
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert len(extract(extract_config(image_folder, out)).failed) == 1
    target.write_bytes(good)  # fixed in place, same size and mtime
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert extract(extract_config(image_folder, out)).up_to_date
    s = extract(extract_config(image_folder, out, verify=True))
    assert (s.extracted, s.failed) == (1, [])


def test_the_lock_is_taken_before_the_previous_cache_is_read(image_folder, tmp_path):
    out = tmp_path / "f.h5"
    out.write_bytes(b"a damaged cache")  # read first, this would be the error
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pipeline.extraction.journal import Journal; "
                               "j = Journal(sys.argv[1], 'x').__enter__(); print('locked', flush=True); time.sleep(60)",
                               f"{out}.partial"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match="another extraction is writing"):
            extract(extract_config(image_folder, out))
    finally:
        holder.kill()
        holder.wait()


def test_a_full_disk_while_extracting_says_what_is_saved(image_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(embed, "COMMIT_EVERY_S", 0.0)
    out, calls = tmp_path / "f.h5", []
    real_save = np.save

    def save_until_full(f, array):
        calls.append(1)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(f, array)

    monkeypatch.setattr(np, "save", save_until_full)
    with pytest.raises(files.DiskFull, match=r"is full: 8 images are saved in .*f\.h5\.partial; free some space"):
        extract(extract_config(image_folder, out))
    monkeypatch.setattr(np, "save", real_save)
    s = extract(extract_config(image_folder, out))
    assert (s.extracted, s.resumed) == (10, 8) and not list(tmp_path.glob("**/*.tmp"))


class DiskFillingAt4K(GuardedFile):
    """The file a cache is written through, on a disk with 4 KB free."""

    def _write_all(self, offset, data):
        if offset + len(data) > 4096:
            raise OSError(errno.ENOSPC, "No space left on device")
        super()._write_all(offset, data)


def test_a_full_disk_while_writing_the_cache_removes_the_partial_file(image_folder, tmp_path, monkeypatch):
    out = tmp_path / "f.h5"
    monkeypatch.setattr(writer, "GuardedFile", DiskFillingAt4K)
    with pytest.raises(files.DiskFull, match=r"is full; 18 images are saved in .*f\.h5\.partial: free some space and rerun"):
        extract(extract_config(image_folder, out))
    assert not out.exists() and not Path(f"{out}.tmp").exists() and Path(f"{out}.partial").is_dir()
    monkeypatch.undo()
    assert extract(extract_config(image_folder, out)).resumed == 18


def test_too_little_disk_space_is_refused_before_the_model_runs(image_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    monkeypatch.setattr(backbone, "build_body", lambda *a: pytest.fail("the model was loaded"))
    with pytest.raises(UserError, match=r"not enough disk space in .*: extracting 18 images needs about 1\.\d MB, 1000 B free"):
        extract(extract_config(image_folder, tmp_path / "f.h5"))


def test_another_batch_composition_is_equal_to_float16_rounding_not_bit_identical(image_folder, tmp_path):
    """What docs/cache.md promises: the same batches give the same bits (resume keeps them); other batches (another
    --batch-size, or one file re-extracted alone) give values equal to within one float16 step."""
    a, b, c = (extract(extract_config(image_folder, tmp_path / f"{i}.h5", batch_size=n, precision="fp32")).out
               for i, n in enumerate((4, 3, 4)))
    assert_same_cache(a, c)
    x, y = read_split(a, "train").features, read_split(b, "train").features
    step = np.spacing(np.maximum(np.abs(x), np.abs(y)))  # one float16 step at each value
    assert np.all(np.abs(x.astype(np.float32) - y.astype(np.float32)) <= step.astype(np.float32))


def test_features_that_overflow_float16_are_recorded_as_failures_not_stored(image_folder, tmp_path, monkeypatch):
    real_call = backbone.Extractor.__call__

    def huge_first_row(self, images):
        out = real_call(self, images)
        out[0, 0] = 1e6  # beyond float16's 65504
        return out

    monkeypatch.setattr(backbone.Extractor, "__call__", huge_first_row)
    s = extract(extract_config(image_folder, tmp_path / "f.h5", batch_size=6))
    assert [r.reason for r in s.failed] == ["features are not finite in float16 (over its range: try --dtype float32)"] * 3
    assert np.isfinite(read_split(tmp_path / "f.h5", "train").features).all()


def test_verify_extracts_non_finite_rows_again(image_folder, tmp_path):
    """A row holding NaN is refused by every reader ("repair it with extract --verify"); a plain extract trusts sizes
    and mtimes and reads no feature, so --verify, which reads every row, finds it and extracts it again."""
    out = extract(extract_config(image_folder, tmp_path / "f.h5")).out
    clean = read_split(out, "train").features.copy()
    with h5py.File(out, "a") as f:
        f["train/features"][2, 0] = np.nan
    with pytest.raises(UserError, match=r"1 rows of train/features are not finite \(NaN or inf\); repair it with "
                                        r"extract --verify"):
        read_split(out, "train")
    s = extract(extract_config(image_folder, out, verify=True))
    assert not s.up_to_date and s.extracted == 1
    np.testing.assert_array_equal(read_split(out, "train").features, clean)
    assert extract(extract_config(image_folder, out, verify=True)).up_to_date


def test_a_cache_whose_fingerprint_was_edited_is_not_overwritten(image_folder, tmp_path):
    out = extract(extract_config(image_folder, tmp_path / "f.h5")).out
    with h5py.File(out, "a") as f:
        f.attrs["fingerprint"] = "000000000000"
    with pytest.raises(UserError, match=r"holds features of extractor config 000000000000, this run's is \w+ \(the "
                                        r"same config under another fingerprint: the file was edited\); use another"):
        extract(extract_config(image_folder, out))


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _extract_args(data, out, workers: int) -> list[str]:
    return [str(data), "--out", str(out), "--weights", "none", "--image-size", "48", "--batch-size", "2",
            "--workers", str(workers), "--precision", "fp32"]


def test_sigterm_to_the_process_group_exits_143_saying_what_is_saved(tmp_path):
    """What a scheduler or `docker stop` sends: the batches embedded so far are committed, one line, exit 143; the
    decode workers ignore it and are shut down by the main process (no DataLoader traceback)."""
    data = make_image_folder(tmp_path / "data", {"train": 24}, size=(48, 40))
    out = tmp_path / "f.h5"
    proc = subprocess.Popen(CLI + _extract_args(data, out, 1), env=dict(os.environ, VGGCACHE_COMMIT_EVERY_S="0"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 60
    while proc.poll() is None and not list(Path(f"{out}.partial").glob("*-0*.json")) and time.time() < deadline:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGTERM)
    output = "".join(proc.communicate(timeout=60))
    assert proc.returncode == 143, output
    assert "interrupted by SIGTERM:" in output and "rerun the same command to resume" in output
    assert "Traceback" not in output and "Exception ignored" not in output
    assert extract(extract_config(data, out, image_size=48)).resumed > 0


def test_a_decode_worker_killed_by_the_oom_killer_ends_like_an_interruption(tmp_path):
    data = make_image_folder(tmp_path / "data", {"train": 60}, size=(48, 40))
    out = tmp_path / "f.h5"
    args = _extract_args(data, out, 1)
    args[args.index("--batch-size") + 1] = "1"  # the worker runs 4 images ahead: alive until the end
    proc = subprocess.Popen(CLI + args, env=dict(os.environ, VGGCACHE_COMMIT_EVERY_S="0"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=interruptible)
    deadline = time.time() + 60
    while proc.poll() is None and time.time() < deadline:
        if list(Path(f"{out}.partial").glob("*-0*.json")) and _children(proc.pid):
            os.kill(_children(proc.pid)[0], signal.SIGKILL)  # as the OOM killer does
            break
        time.sleep(0.005)
    output = "".join(proc.communicate(timeout=60))
    assert proc.returncode == 75, output
    assert "interrupted: a decode worker died (" in output and "images are saved in" in output
    assert "Traceback" not in output
    s = extract(extract_config(data, out, image_size=48))
    assert s.resumed > 0 and len(read_split(out, "train").paths) == 180
