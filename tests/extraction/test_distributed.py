"""Extraction on many processes, for real: torchrun with 2 gloo ranks on the CPU, job-array parts, kill -9 of a rank.

Every result is compared, dataset by dataset, with a single-process run of the same command.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import extract_config, interruptible, read_split
from test_extract import assert_same_cache

from pipeline.backbone import vgg16 as backbone
from pipeline.cache.record import Record
from pipeline.errors import Interrupted, UserError
from pipeline.extraction import embed
from pipeline.extraction.config import feature_config
from pipeline.extraction.journal import Journal
from pipeline.extraction.runner import extract
from pipeline.synthetic import make_image_folder

ENV = dict(os.environ, VGGCACHE_COMMIT_EVERY_S="0", OMP_NUM_THREADS="1")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def args(data: Path, out: Path) -> list[str]:
    return ["-m", "pipeline", "-q", "extract", str(data), "--out", str(out), "--weights", "none", "--image-size", "64",
            "--batch-size", "4", "--workers", "0", "--precision", "fp32"]


def single(data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args(data, out), *extra], env=ENV, capture_output=True, text=True)


def torchrun(data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([*TORCHRUN, *args(data, out), *extra], env=ENV, capture_output=True, text=True)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """80 images (two with errors), and the cache a single process makes of them: the reference."""
    root = tmp_path_factory.mktemp("dist")
    data = make_image_folder(root / "data", {"train": 20, "val": 6}, size=(72, 64))
    (data / "train/circle/empty.jpg").write_bytes(b"")
    (data / "val/checks/text.jpg").write_bytes(b"not an image")
    reference = extract(extract_config(data, root / "reference.h5", image_size=64, precision="fp32")).out
    return data, reference


def test_two_ranks_make_the_single_process_cache_bit_for_bit(dataset, tmp_path):
    data, reference = dataset
    out = tmp_path / "f.h5"
    done = torchrun(data, out, "--force")  # --force: rank 0 clears the journal before the others open it
    assert done.returncode == 0, done.stderr
    assert_same_cache(out, reference)
    assert not Path(f"{out}.partial").exists()
    assert "wrote" in done.stdout and done.stdout.count("wrote") == 1  # rank 0 alone speaks for the job


def children_of(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of a torchrun worker by its RANK (workers are the launcher's children)."""
    for pid in children_of(launcher):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"-m\0pipeline" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
    return None


def run_and_kill(command: list[str], partial: Path, victim, min_shards: int = 2, timeout: float = 90) -> tuple[int, str]:
    """Start `command`, kill -9 `victim(proc)` once `min_shards` shards are committed; (exit code, stderr)."""
    proc = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=interruptible)
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if len(list(partial.glob("*-0*.json"))) >= min_shards and (pid := victim(proc)):  # victim may wait
            os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def test_kill_9_of_one_rank_then_resume_with_one_process_then_with_two(dataset, tmp_path):
    data, reference = dataset
    out, partial = tmp_path / "f.h5", tmp_path / "f.h5.partial"
    # rank 1 dies while rank 0 is still embedding (each has 10 batches, one shard each)
    busy = lambda proc: (len(list(partial.glob("rank1-0*.json"))) >= 2 and len(list(partial.glob("rank0-0*.json"))) <= 6
                         and rank_pid(proc.pid, 1))
    code, err = run_and_kill([*TORCHRUN, *args(data, out)], partial, busy)
    assert code != 0 and not out.exists() and list(partial.glob("rank*-0*.json"))  # the job stopped, work was kept
    assert "rank 0 of 2: interrupted by SIGTERM:" in err and "images are saved in" in err  # the survivor commits
    assert "Exception ignored" not in err and "[rank0]: Traceback" not in err  # ... and says so, in one line
    assert "rank      : 1 (local_rank: 1)" in err and "SIGKILL" in err  # torchrun names the rank that died
    done = single(data, out)
    assert done.returncode == 0, done.stderr
    assert_same_cache(out, reference)
    assert int(re.search(r"resumed (\d+)", done.stdout)[1]) > 0  # it continued the ranks' work

    out2, partial2 = tmp_path / "g.h5", tmp_path / "g.h5.partial"
    code, _ = run_and_kill([sys.executable, *args(data, out2)], partial2, lambda proc: proc.pid)
    assert code == -signal.SIGKILL and list(partial2.glob("main-0*.json"))
    done = torchrun(data, out2)
    assert done.returncode == 0, done.stderr
    assert_same_cache(out2, reference)


def test_job_array_parts_then_a_plain_extract(dataset, tmp_path, monkeypatch):
    data, reference = dataset
    out = tmp_path / "f.h5"
    first = single(data, out, "--shard", "1/2")
    assert first.returncode == 0 and "part 1/2: extracted 40 images;" in first.stdout and not out.exists(), first.stderr
    # the last part to finish writes the cache, with its own share only
    last = extract(extract_config(data, out, image_size=64, precision="fp32", shard="0/2"))
    assert last.wrote_cache and (last.extracted, last.resumed) == (40, 40)  # 40 by part 1
    assert_same_cache(out, reference)
    monkeypatch.setattr(backbone, "build_body", lambda *a: pytest.fail("the final step ran the model"))
    assert extract(extract_config(data, out, image_size=64, precision="fp32")).up_to_date


@pytest.mark.parametrize("shard", ["3/2", "0/0", "2/2", "a/b", "1", "-1/2", " 0/2", "0 /2"])
def test_a_bad_shard_is_one_line(dataset, shard):
    from typer.testing import CliRunner

    from pipeline.cli import app

    result = CliRunner().invoke(app, ["extract", str(dataset[0]), "--shard", shard, "--weights", "none"])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert f"--shard {shard!r} is not valid (expected I/N with 0 <= I < N, e.g. 0/4)" in result.output


def test_a_part_restarted_after_a_stop_takes_its_own_batches_again(dataset, tmp_path, monkeypatch):
    data, reference = dataset
    out = tmp_path / "f.h5"
    monkeypatch.setattr(embed, "COMMIT_EVERY_S", 0.0)
    real_append, calls = Journal.append, []

    def stop_after_one_commit(self, records, features):
        real_append(self, records, features)
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(Journal, "append", stop_after_one_commit)
    with pytest.raises(Interrupted, match="part 0/2: interrupted: 4 images are saved"):
        extract(extract_config(data, out, image_size=64, precision="fp32", shard="0/2"))
    monkeypatch.setattr(Journal, "append", real_append)
    again = extract(extract_config(data, out, image_size=64, precision="fp32", shard="0/2"))
    assert (again.extracted, again.remaining, again.wrote_cache) == (36, 40, False)  # its 9 other batches, no more
    last = extract(extract_config(data, out, image_size=64, precision="fp32", shard="1/2"))
    assert last.wrote_cache and last.extracted == 40
    assert_same_cache(out, reference)


def test_parts_must_cut_the_same_batches(dataset, tmp_path):
    data, _ = dataset
    out = tmp_path / "f.h5"
    extract(extract_config(data, out, image_size=64, precision="fp32", shard="1/2", batch_size=4))
    with pytest.raises(UserError, match=r"the other parts in .* use --batch-size 4, this one 8: pass --batch-size 4"):
        extract(extract_config(data, out, image_size=64, precision="fp32", shard="0/2", batch_size=8))


def test_a_later_row_from_another_writer_wins_over_an_earlier_one(dataset, tmp_path):
    data, reference = dataset
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    out = tmp_path / "f.h5"
    bad = copy / "train/circle/empty.jpg"
    st = bad.stat()
    with Journal(Path(f"{out}.partial"), feature_config("none", "avg", 64, "float16").fingerprint(), "rank1") as j:
        j.resume().append([Record("train", "train/circle/empty.jpg", -1, st.st_size, st.st_mtime_ns, "", "empty file (0 bytes)")],
                          np.empty((0, 512), np.float16))  # a killed torchrun job's rank 1 had recorded it as failed
    bad.write_bytes((copy / "train/circle/00000.jpg").read_bytes())  # the user fixes the file
    s = extract(extract_config(copy, out, image_size=64))
    assert not any(r.path == "train/circle/empty.jpg" for r in s.failed)
    assert "train/circle/empty.jpg" in read_split(out, "train").paths


def test_a_stop_outside_the_embedding_loop_says_what_is_saved(dataset, tmp_path, monkeypatch):
    from pipeline.extraction import runner as extract_module

    def stopped(*args):
        raise KeyboardInterrupt  # e.g. torchrun's SIGTERM while the cache is being written

    monkeypatch.setattr(extract_module, "_write", stopped)
    with pytest.raises(Interrupted, match=r"^interrupted: 80 images are saved in .*f\.h5\.partial; rerun"):
        extract(extract_config(dataset[0], tmp_path / "f.h5", image_size=64, precision="fp32"))
