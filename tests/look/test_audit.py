"""`pipeline audit`: exact copies by hash, near-duplicates and neighbours by exact blocked similarity, likely
mislabelled images; and the one-line summaries in info and train-head."""

import csv
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import extract_config
from PIL import Image

from pipeline.cache.header import Header
from pipeline.cache.identity import generated_config
from pipeline.cache.record import Record
from pipeline.cache.summary import describe_copies
from pipeline.cache.writer import write_atomic
from pipeline.extraction.runner import extract
from pipeline.heads.config import HeadConfig
from pipeline.look.audit import CSV_HEADER, AuditReport, Entry, Pair, Suspect, audit, summary, write_csv
from pipeline.look.config import AuditConfig
from pipeline.look.neighbours import similar_pairs_and_neighbours
from pipeline.train.config import TrainConfig
from pipeline.train.runner import train_head

CLI = [sys.executable, "-m", "pipeline"]


def write_cache(path, rows: list[tuple[str, str, int, str]], X: np.ndarray, names=("a", "b")):
    """A cache of hand-made rows (split, path, label, sha256) and features."""
    records = [Record(split, p, label, 1, 1, sha) for split, p, label, sha in rows]
    value = {p: X[i] for i, (_, p, _, _) in enumerate(rows)}
    header = Header(fingerprint=generated_config().fingerprint(), config=generated_config(), class_names=list(names), feature_dim=X.shape[1])
    write_atomic(path, header, records, lambda rs: np.stack([value[r.path] for r in rs]), "float32")
    return path


@pytest.fixture
def planted(tmp_path):
    """40 distinct random rows in two clusters, plus: an exact copy across splits, a relabelled exact copy, a
    near copy (the same row, slightly perturbed), and a row labelled against its cluster."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((2, 64)) * 2  # distinct rows: centred cosines about 0.7 within a cluster
    X = np.stack([centres[i % 2] + rng.standard_normal(64) for i in range(40)])
    rows = [("train" if i < 30 else "val", f"{i:02d}.jpg", i % 2, f"{i:064x}") for i in range(40)]
    rows += [("val", "copy-of-03.jpg", 1, f"{3:064x}"),  # cross-split copy of train 03
             ("train", "relabelled-04.jpg", 1, f"{4:064x}"),  # the bytes of 04 (class a), labelled b
             ("test", "near-05.jpg", 1, "e" * 64),  # 05's features, nudged
             ("train", "wrong-label.jpg", 1, "f" * 64)]  # in cluster a, labelled b
    extra = np.stack([X[3], X[4], X[5] + 0.02 * rng.standard_normal(64), centres[0] + rng.standard_normal(64)])
    return write_cache(tmp_path / "c.h5", rows, np.concatenate([X, extra]).astype(np.float32))


def test_audit_finds_each_planted_copy_and_no_false_pair(planted, tmp_path):
    report = audit(AuditConfig(planted, out=tmp_path / "a.csv"))
    exact = {(p.a.path, p.b.path) for p in report.exact}
    assert exact == {("03.jpg", "copy-of-03.jpg"), ("04.jpg", "relabelled-04.jpg")}
    assert [(p.a.path, p.b.path) for p in report.near] == [("05.jpg", "near-05.jpg")]
    assert report.near[0].crosses and report.near[0].similarity > 0.99
    assert report.counts(report.exact) == {("train", "val"): 1, ("train", "train"): 1}


def test_a_row_whose_neighbours_all_carry_another_label_is_suspected(planted, tmp_path):
    report = audit(AuditConfig(planted, out=tmp_path / "a.csv"))
    suspects = {s.entry.path: s.suggested for s in report.suspects}
    assert suspects == {"wrong-label.jpg": "a", "relabelled-04.jpg": "a"}


def test_the_csv_lists_every_finding(planted, tmp_path):
    report = audit(AuditConfig(planted, out=tmp_path / "a.csv"))
    with open(tmp_path / "a.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CSV_HEADER
    assert [r["kind"] for r in rows] == ["exact"] * 2 + ["near"] + ["mislabel?"] * len(report.suspects)


def test_the_csv_quotes_text_a_spreadsheet_would_evaluate(tmp_path):
    a, b = Entry("train", "=cmd|' /C calc'!A0.jpg", "+cats"), Entry("val", "@b.jpg", "-dogs")
    report = AuditReport(rows=2, threshold=0.95, neighbours=5, near=[Pair("near", -0.5, a, b)],
                         suspects=[Suspect(a, "-dogs", 0.9)])
    write_csv(report, tmp_path / "a.csv")
    with open(tmp_path / "a.csv", newline="") as f:
        rows = list(csv.reader(f))[1:]
    assert rows == [["near", "-0.5000", "train", "'=cmd|' /C calc'!A0.jpg", "'+cats", "val", "'@b.jpg", "'-dogs"],
                    ["mislabel?", "0.9000", "train", "'=cmd|' /C calc'!A0.jpg", "'+cats", "", "", "'-dogs"]]


@pytest.mark.parametrize("screen_bf16", [False, True], ids=["float32", "bf16-screened"])
@pytest.mark.parametrize("n, dim, block", [(150, 8, 7), (150, 8, 64), (150, 8, 1000), (2000, 64, 256)],
                         ids=["many-blocks", "three-blocks-padded", "one-block", "pruned-folds"])
def test_blocked_pairs_and_neighbours_equal_brute_force(n, dim, block, screen_bf16):
    rng = np.random.default_rng(1)
    X = rng.standard_normal((n, dim)).astype(np.float32)
    X[-5:] = X[:5] + 0.1 * rng.standard_normal((5, dim))  # near copies, in the first and the last block
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    (i, j, s), idx, sim = similar_pairs_and_neighbours(X, 0.8, 4, block=block, screen_bf16=screen_bf16)
    S = X @ X.T
    np.fill_diagonal(S, -2)
    want = {(a, b) for a, b in zip(*np.nonzero(S >= 0.8)) if a < b}
    assert {(a, n - 5 + a) for a in range(5)} <= want
    assert set(zip(i.tolist(), j.tolist())) == want and len(i) == len(want)
    np.testing.assert_allclose(sim, -np.sort(-S, axis=1)[:, :4], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.take_along_axis(S, idx, 1), sim, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("screen_bf16", [False, True], ids=["float32", "bf16-screened"])
def test_identical_rows_pair_with_each_other_and_are_each_others_neighbours(screen_bf16):
    """Ties everywhere (a cache of one placeholder image repeated): every pair of copies, no row its own neighbour."""
    rng = np.random.default_rng(2)
    X = np.concatenate([np.tile(rng.standard_normal((1, 16)), (40, 1)), rng.standard_normal((30, 16))])
    X = (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)
    (i, j, s), idx, sim = similar_pairs_and_neighbours(X, 0.99, 3, block=32, screen_bf16=screen_bf16)
    assert sorted(zip(i.tolist(), j.tolist())) == [(a, b) for a in range(40) for b in range(a + 1, 40)]
    np.testing.assert_allclose(sim[:40], 1.0, atol=1e-5)
    assert (idx[:40] < 40).all() and (idx != np.arange(70)[:, None]).all()


@pytest.fixture
def images_with_copies(image_folder):
    """The tiny image folder with a cross-split copy, a resized copy and a relabelled copy planted."""
    train, val = image_folder / "train", image_folder / "val"
    shutil.copyfile(train / "circle" / "00000.jpg", val / "circle" / "copy.jpg")
    Image.open(train / "checks" / "00001.jpg").resize((80, 72)).save(val / "checks" / "resized.jpg", quality=95)
    shutil.copyfile(train / "stripes" / "00002.jpg", train / "circle" / "relabelled.jpg")
    return image_folder


def test_audit_on_images_finds_the_planted_copies(images_with_copies, tmp_path):
    out = extract(extract_config(images_with_copies, tmp_path / "f.h5")).out
    # seeded random weights on 32 px images: the resized copy scores 0.957, the closest distinct pair 0.881
    report = audit(AuditConfig(out, threshold=0.92, out=tmp_path / "a.csv"))
    exact = {(p.a.path, p.b.path) for p in report.exact}
    assert exact == {("train/circle/00000.jpg", "val/circle/copy.jpg"),
                     ("train/circle/relabelled.jpg", "train/stripes/00002.jpg")}
    near = {(p.a.path, p.b.path) for p in report.near}
    assert near == {("train/checks/00001.jpg", "val/checks/resized.jpg")}


def test_info_and_train_head_say_when_copies_cross_splits(images_with_copies, tmp_path, caplog):
    out = extract(extract_config(images_with_copies, tmp_path / "f.h5")).out
    line = describe_copies(out)
    assert line.startswith("2 images are byte-identical copies of another (train/val 1, train/train 1); 1 across splits")
    train_head(TrainConfig(features=out, out=tmp_path / "run", head=HeadConfig("logreg", C=1.0)))
    assert "1 image of 'val' is a byte-identical copy of images of 'train'" in caplog.text


@pytest.mark.parametrize("args, message", [
    (["--threshold", "1.5"], "--threshold 1.5 is not valid (expected a number in [-1, 1])"),
    (["--neighbours", "0"], "--neighbours 0 is not valid (expected an integer in [1, 1000])"),
    (["--out", "{tmp}"], "is a folder"),
    (["--out", "{tmp}/c.h5"], "would overwrite"),
    (["--out", "{tmp}/nowhere/a.csv"], "the folder {tmp}/nowhere does not exist"),
    (["--out", "{tmp}/notes.txt"], "exists and is not an audit CSV"),
], ids=["threshold", "neighbours", "out-is-a-folder", "out-is-the-cache", "missing-folder", "another-file"])
def test_bad_audit_options_are_one_line_and_exit_2(planted, tmp_path, args, message):
    (tmp_path / "notes.txt").write_text("mine")
    args = [a.format(tmp=tmp_path) for a in args]
    r = subprocess.run(CLI + ["audit", str(planted), *args], capture_output=True, text=True)
    assert r.returncode == 2 and message.format(tmp=tmp_path) in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "nowhere").exists() and (tmp_path / "notes.txt").read_text() == "mine"


def test_a_name_with_a_newline_stays_on_one_line_and_neighbours_are_at_most_the_others(tmp_path):
    X = np.eye(3, 8, dtype=np.float32)
    path = write_cache(tmp_path / "c.h5", [("train", "a\nb.jpg", 0, "1" * 64), ("train", "c.jpg", 1, "1" * 64),
                                           ("train", "d.jpg", 1, "2" * 64)], X)
    report = audit(AuditConfig(path, neighbours=50, out=tmp_path / "a.csv"))
    lines = summary(report)
    assert report.neighbours == 2 and any("a\\x0ab.jpg" in line for line in lines)
    assert not any(line.strip() == "b.jpg == train/c.jpg" for line in lines)


def test_the_cli_prints_counts_and_writes_the_csv(planted, tmp_path):
    r = subprocess.run(CLI + ["audit", str(planted)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "exact duplicates: 2 pairs (train/val 1 (across splits: leakage), train/train 1)" in r.stdout
    assert "labels differ: a / b" in r.stdout
    assert (tmp_path / "c.h5.audit.csv").is_file()
