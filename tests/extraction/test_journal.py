"""The journal's lock: one writer at a time, and a killed writer never keeps the next run out."""

import subprocess
import sys

import numpy as np
import pytest

from pipeline.cache.record import Record
from pipeline.errors import UserError
from pipeline.extraction.journal import Journal

HOLD = """
import os, sys, time
from pipeline.extraction.journal import Journal
j = Journal(sys.argv[1], "fp").__enter__()
child = os.fork()
if child == 0:  # like a DataLoader worker: forked while the lock is held, so it inherits the descriptor
    time.sleep(60)
    os._exit(0)
print(child, flush=True)
if sys.argv[2] == "die":
    os._exit(0)  # no cleanup, as under kill -9; the forked child lives on
time.sleep(60)
"""


def hold(directory, mode):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(directory), mode], stdout=subprocess.PIPE, text=True)
    return proc, int(proc.stdout.readline())


def test_a_second_writer_is_refused(tmp_path):
    proc, child = hold(tmp_path / "j", "stay")
    try:
        with pytest.raises(UserError, match="another extraction is writing"):
            Journal(tmp_path / "j", "fp").__enter__()
    finally:
        proc.kill()
        subprocess.run(["kill", "-9", str(child)])


def test_orphaned_forked_workers_do_not_hold_the_lock(tmp_path):
    proc, child = hold(tmp_path / "j", "die")
    proc.wait()
    try:
        with Journal(tmp_path / "j", "fp") as journal:
            assert journal.resume().entries == {}
    finally:
        subprocess.run(["kill", "-9", str(child)])


def test_shards_survive_reopening_and_another_fingerprint_discards_them(tmp_path):
    records = [Record("train", "a.jpg", 0, 1, 1, "x"), Record("train", "b.jpg", -1, 1, 1, "", "empty file (0 bytes)")]
    with Journal(tmp_path / "j", "fp") as journal:
        journal.resume().append(records, np.ones((1, 4), np.float16))
    with Journal(tmp_path / "j", "fp") as journal:
        journal.resume()
        assert journal.entries["a.jpg"] == (records[0], "main-000000", 0) and journal.entries["b.jpg"] == (records[1], "main-000000", -1)
        assert journal.rows("main-000000", np.array([0])).tolist() == [[1.0] * 4]
    with Journal(tmp_path / "j", "other") as journal:
        assert journal.resume().entries == {}
    with Journal(tmp_path / "j", "fp") as journal:  # and the folder is now the other config's: nothing to adopt
        assert journal.resume().entries == {}


def test_a_forced_restart_keeps_the_folder_tied_to_its_config(tmp_path):
    records = [Record("train", "a.jpg", 0, 1, 1, "x")]
    with Journal(tmp_path / "j", "fp") as journal:
        journal.resume().clear()
        journal.append(records, np.ones((1, 4), np.float16))
    with Journal(tmp_path / "j", "other") as journal:  # shards written after a --force belong to "fp" only
        assert journal.resume().entries == {}
