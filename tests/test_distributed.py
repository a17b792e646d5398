"""Extraction on many processes, for real: torchrun with 2 gloo ranks on the CPU, job-array parts, kill -9 of a rank.

Every result is compared, dataset by dataset, with a single-process run of the same command.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import extract_config
from pipeline import backbone, store
from pipeline.extract import extract
from pipeline.synthetic import make_image_folder
from test_extract import assert_same_cache

ENV = dict(os.environ, VGGCACHE_COMMIT_EVERY_S="0", OMP_NUM_THREADS="1")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def args(data: Path, out: Path) -> list[str]:
    return ["-m", "pipeline", "-q", "extract", str(data), "--out", str(out), "--weights", "none", "--image-size", "64",
            "--batch-size", "4", "--workers", "0", "--precision", "fp32"]


def single(data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args(data, out), *extra], env=ENV, capture_output=True, text=True)


def torchrun(data: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*TORCHRUN, *args(data, out)], env=ENV, capture_output=True, text=True)


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
    done = torchrun(data, out)
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
    proc = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if len(list(partial.glob("*-0*.json"))) >= min_shards and (pid := victim(proc)):
            os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def test_kill_9_of_one_rank_then_resume_with_one_process_then_with_two(dataset, tmp_path):
    data, reference = dataset
    out, partial = tmp_path / "f.h5", tmp_path / "f.h5.partial"
    code, err = run_and_kill([*TORCHRUN, *args(data, out)], partial, lambda proc: rank_pid(proc.pid, 1))
    assert code != 0 and not out.exists() and list(partial.glob("rank*-0*.json"))  # the job stopped, work was kept
    assert "rank 0 of 2: interrupted:" in err and "images are saved in" in err  # the survivor commits and says so
    assert "rank      : 1 (local_rank: 1)" in err and "SIGKILL" in err  # torchrun names the rank that died
    done = single(data, out)
    assert done.returncode == 0, done.stderr
    assert_same_cache(out, reference)
    assert "resumed 0" not in done.stdout  # it continued the ranks' work

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


@pytest.mark.parametrize("shard", ["3/2", "0/0", "2/2", "a/b", "1", "-1/2"])
def test_a_bad_shard_is_one_line(dataset, shard):
    from typer.testing import CliRunner

    from pipeline.cli import app

    result = CliRunner().invoke(app, ["extract", str(dataset[0]), "--shard", shard, "--weights", "none"])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert f"--shard {shard!r} is not valid (expected I/N with 0 <= I < N, e.g. 0/4)" in result.output
