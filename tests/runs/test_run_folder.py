"""A run folder: what train-head writes into it (run.json last, nothing half-written, names as every vggcache reads
them), and everything a damaged or hostile run folder cannot do (name a file outside it, run a pickle, pass edited
arrays or records)."""

import json

import numpy as np
import pytest
from conftest import feature_file
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.heads.config import HeadConfig
from pipeline.runs.folder import SAVING_MARK, load_run
from pipeline.train.config import TrainConfig
from pipeline.train.runner import train_head

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


class Payload:
    """Unpickling this runs code: it creates the file named `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def tamper(run_folder, edit):
    info = json.loads((run_folder / "run.json").read_text())
    edit(info)
    (run_folder / "run.json").write_text(json.dumps(info))


@pytest.mark.parametrize("head_file, message", [
    ("../../outside.npz", "a run's head is always head.npz in its folder"),
    ("/tmp/anywhere.npz", "a run's head is always head.npz in its folder"),
    ("head.joblib", "a run's head is always head.npz in its folder"),
], ids=["parent", "absolute", "joblib"])
def test_a_run_names_no_file_outside_its_folder(tmp_path, head_file, message):
    run = train_head(TrainConfig(features=feature_file(tmp_path / "f.h5"), out=tmp_path / "run", head=HeadConfig(C=1.0)))
    tamper(run.folder, lambda info: info.update(head_file=head_file))
    result = invoke("evaluate", run.folder)
    assert result.exit_code == 2 and message in result.output, result.output


def test_a_pickle_payload_in_a_shared_run_folder_never_runs(tmp_path):
    import hashlib
    import pickle

    run = train_head(TrainConfig(features=feature_file(tmp_path / "f.h5"), out=tmp_path / "run", head=HeadConfig(C=1.0)))
    marker = tmp_path / "pwned"
    payload = pickle.dumps(Payload(marker))
    (run.folder / "head.npz").write_bytes(payload)  # whoever writes the folder also writes the hash
    tamper(run.folder, lambda info: info.update(head_sha256=hashlib.sha256(payload).hexdigest()))
    for command in (["evaluate", run.folder], ["predict", run.folder, tmp_path / "f.h5"]):
        result = invoke(*command)
        assert result.exit_code == 2 and "is not a logreg head saved by vggcache" in result.output, result.output
    assert not marker.exists()


def test_a_symlinked_head_file_is_refused(tmp_path):
    run = train_head(TrainConfig(features=feature_file(tmp_path / "f.h5"), out=tmp_path / "run", head=HeadConfig(C=1.0)))
    (run.folder / "head.npz").rename(tmp_path / "elsewhere.npz")
    (run.folder / "head.npz").symlink_to(tmp_path / "elsewhere.npz")
    result = invoke("evaluate", run.folder)
    assert result.exit_code == 2 and "missing its head file head.npz (or it is not a regular file)" in result.output


@pytest.mark.parametrize("edit, message", [
    (lambda info: info.update(schema_version=1), "made by an older vggcache, retrain it"),
    (lambda info: info["head"].update(kind="svm"), "head kind 'svm' is not one of logreg, linear"),
    (lambda info: info["features"].pop("fingerprint"), "features.fingerprint is missing"),
    (lambda info: info["splits"].update(n_val="12"), 'splits.n_val is "12", expected int'),
    (lambda info: info.update(head="logreg"), "head is not an object"),
    (lambda info: info["head"]["params"].update(patience=3, n_iter_no_change=3), "hold both 'n_iter_no_change' and 'patience'"),
    (lambda info: info["loading"].update(mode="teleport"), "loading.mode is 'teleport', expected memory or stream"),
    (lambda info: info["loading"].update(pools=[5]), "loading.pools are not head-time poolings"),
], ids=["old-schema", "unknown-head", "no-fingerprint", "text-for-int", "not-an-object", "both-names", "loading-mode",
        "loading-pools"])
def test_a_damaged_run_record_is_one_line(tmp_path, edit, message):
    run = train_head(TrainConfig(features=feature_file(tmp_path / "f.h5"), out=tmp_path / "run", head=HeadConfig(C=1.0)))
    tamper(run.folder, edit)
    result = invoke("evaluate", run.folder)
    assert result.exit_code == 2 and message in result.output and len(result.output.strip().splitlines()) == 1, result.output


@pytest.mark.parametrize("name", ["run.json", "metrics.json"])
def test_a_byte_that_is_not_utf8_in_a_run_file_is_damage(tmp_path, name):
    """Read strictly: a class `circ\xe9le` was read as `circ\ufffdle` and carried into the exported model."""
    run = train_head(TrainConfig(features=feature_file(tmp_path / "f.h5"), out=tmp_path / "run", head=HeadConfig(C=1.0)))
    path = run.folder / name
    text = path.read_bytes()
    at = text.index(b'"', text.index(b":")) + 1  # inside the first string value
    path.write_bytes(text[:at] + b"\xe9" + text[at:])
    result = invoke("export", run.folder, "--out", tmp_path / "m.onnx")
    assert result.exit_code == 2 and result.output.strip() == (f"error: {path} is damaged: byte 0xe9 at offset {at} is "
                                                               "not UTF-8"), result.output
    assert not (tmp_path / "m.onnx").exists()


def test_run_json_keeps_the_names_every_vggcache_reads(tmp_path):
    """`patience` in code and on the command line, `n_iter_no_change` in run.json (as ever): a run reads back."""
    run = train_head(TrainConfig(features=feature_file(tmp_path / "f.h5"), out=tmp_path / "run",
                                 head=HeadConfig(kind="linear", epochs=2, patience=3, lr=1e-2, weight_decay=1e-2, device="cpu")))
    info = json.loads((run.folder / "run.json").read_text())
    assert info["head"]["params"]["n_iter_no_change"] == 3 and "patience" not in info["head"]["params"]
    assert info["head"]["config"]["n_iter_no_change"] == 3 and "patience" not in info["sweep"][0]["params"]
    assert load_run(run.folder).record.head.params["patience"] == 3


def test_run_json_says_where_the_time_went_and_reads_back_without_the_newer_timings(tmp_path):
    run = train_head(TrainConfig(features=feature_file(tmp_path / "f.h5"), out=tmp_path / "run"))
    info = json.loads((run.folder / "run.json").read_text())
    assert set(info["timings"]) == {"load_seconds", "fit_seconds", "score_seconds", "save_seconds"}
    assert all(isinstance(v, float) and 0 <= v < 60 for v in info["timings"].values()), info["timings"]
    info["timings"] = {"load_seconds": 0.5, "fit_seconds": 1.5}  # a run saved before the breakdown was recorded
    (run.folder / "run.json").write_text(json.dumps(info))
    assert load_run(run.folder).record.timings.score_seconds is None


def test_an_out_folder_of_the_users_files_is_refused_and_left_as_it_was(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    for name, text in (("report.html", "my page"), ("errors.csv", "my sheet"), ("notes.txt", "mine")):
        (out / name).write_text(text)
    result = invoke("train-head", feature_file(tmp_path / "f.h5"), "--out", out)
    assert result.exit_code == 2 and result.output.strip() == (
        f"error: --out {out} is not empty and holds no run (errors.csv, notes.txt, report.html): choose a new or "
        "empty folder"), result.output
    assert {p.name: p.read_text() for p in out.iterdir()} == {"report.html": "my page", "errors.csv": "my sheet",
                                                               "notes.txt": "mine"}


def test_force_replaces_a_runs_files_and_nothing_else_of_the_folder(tmp_path):
    f = feature_file(tmp_path / "f.h5")
    first = train_head(TrainConfig(features=f, out=tmp_path / "run", head=HeadConfig(C=1.0)))
    (first.folder / "notes.txt").write_text("mine")
    again = invoke("train-head", f, "--out", first.folder, "--C", "0.01")
    assert again.exit_code == 2 and "already holds a run: choose another --out, or --force" in again.output
    replaced = invoke("train-head", f, "--out", first.folder, "--C", "0.01", "--force")
    assert replaced.exit_code == 0, replaced.output
    assert load_run(first.folder).record.head.params["C"] == 0.01 and (first.folder / "notes.txt").read_text() == "mine"


def test_an_empty_folder_and_an_interrupted_runs_leftovers_are_fine_outs(tmp_path):
    f = feature_file(tmp_path / "f.h5")
    (tmp_path / "empty").mkdir()
    assert invoke("train-head", f, "--out", tmp_path / "empty").exit_code == 0
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / SAVING_MARK).write_text("")  # a save killed before run.json: its mark and a file
    (tmp_path / "cut" / "head.npz").write_bytes(b"half")
    assert "already holds a run" in invoke("train-head", f, "--out", tmp_path / "cut").output
    assert invoke("train-head", f, "--out", tmp_path / "cut", "--force").exit_code == 0
    assert sorted(p.name for p in (tmp_path / "cut").iterdir() if p.name.startswith(".")) == []


def test_the_saving_mark_stands_until_run_json_is_written(tmp_path, monkeypatch):
    from pipeline.runs import folder as run_folder

    f = feature_file(tmp_path / "f.h5")
    seen, commit = [], run_folder.RunWriter.commit

    def watched(self, record, metrics):
        seen.append(sorted(p.name for p in self.folder.iterdir() if p.name.startswith(".")))
        return commit(self, record, metrics)

    monkeypatch.setattr(run_folder.RunWriter, "commit", watched)
    run = train_head(TrainConfig(features=f, out=tmp_path / "run", head=HeadConfig(C=1.0)))
    assert seen == [[SAVING_MARK]] and not (run.folder / SAVING_MARK).exists()


@pytest.mark.parametrize("files", [{"report.html": "<p>mine</p>", "errors.csv": "a,b\n"}, {"run.json": "mine"},
                                   {"run.json": '{"note": "my own json"}'}], ids=["run-named-files", "text-run-json",
                                                                                  "foreign-json"])
def test_force_never_replaces_a_folder_of_files_only_named_like_a_runs(tmp_path, files):
    f = feature_file(tmp_path / "f.h5")
    mine = tmp_path / "mine"
    mine.mkdir()
    for name, text in files.items():
        (mine / name).write_text(text)
    result = invoke("train-head", f, "--out", mine, "--force")
    assert result.exit_code == 2 and "is not empty and holds no run" in result.output
    assert {p.name: p.read_text() for p in mine.iterdir()} == files


def test_run_and_class_names_that_are_not_utf8(tmp_path):
    import os

    odd_class = os.fsdecode(b"caf\xe9")
    f = feature_file(tmp_path / "f.h5", classes=("a", odd_class, "c"))
    out = tmp_path / os.fsdecode(b"r\xffun")
    result = invoke("train-head", f, "--out", out, "--C", 1)
    assert result.exit_code == 0, result.output
    assert "caf\\xe9" in (out / "report.txt").read_text() and (out / "confusion_matrix.png").is_file()
    assert "caf\\xe9" in (out / "report.html").read_bytes().decode("utf-8")  # valid UTF-8, the name shown as ls -b does
    assert [r["name"] for r in json.loads(invoke("runs", tmp_path, "--json").stdout)] == [out.name]


def test_an_out_folder_holding_a_folder_named_like_a_run_file_is_refused_before_the_fit(tmp_path, monkeypatch):
    f = feature_file(tmp_path / "f.h5")
    (tmp_path / "run" / "head.npz").mkdir(parents=True)
    monkeypatch.setattr("pipeline.train.runner.sweep", lambda *a: pytest.fail("the head was fitted"))
    result = invoke("train-head", f, "--out", tmp_path / "run")
    assert result.exit_code == 2 and "is not empty and holds no run (head.npz)" in result.output, result.output


def test_a_failed_save_leaves_no_half_written_run(tmp_path, monkeypatch):
    f = feature_file(tmp_path / "f.h5")

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("pipeline.runs.folder.RunWriter.write_metrics", no_space)
    result = invoke("train-head", f, "--out", tmp_path / "run", "--C", 1)
    assert result.exit_code == 2 and "cannot write the run into" in result.output and "No space left" in result.output
    assert list((tmp_path / "run").iterdir()) == []


def _rewrite_head(run_folder, change):
    import hashlib

    with np.load(run_folder / "head.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    change(arrays)
    np.savez(run_folder / "head.npz", **arrays)
    digest = hashlib.sha256((run_folder / "head.npz").read_bytes()).hexdigest()
    tamper(run_folder, lambda info: info.update(head_sha256=digest))  # whoever edits the arrays re-syncs the hash


@pytest.mark.parametrize("change, message", [
    (lambda a: a.update(coef=a["coef"].T), "'coef' is float64 (16, 3), expected numbers of shape (3, 16)"),
    (lambda a: a["coef"].__setitem__((0, 0), np.nan), "'coef' holds non-finite values"),
    (lambda a: a.update(mean=np.array(["x"] * 16)), "'mean' is <U1 (16,), expected numbers of shape (16,)"),
    (lambda a: a.update(mean=a["mean"][:1]), "'mean' is float64 (1,), expected numbers of shape (16,)"),
    (lambda a: a.update(scale=np.zeros(16)), "'scale' holds non-positive values"),
    (lambda a: a.pop("intercept"), "it has no 'intercept' array"),
    (lambda a: a.update(classes=np.array([0.5, 1.5, 2.5])), "its 'classes' array is missing or not two or more"),
], ids=["transposed", "nan", "text", "short", "zero-scale", "missing", "float-classes"])
def test_edited_head_arrays_are_refused_in_one_line(tmp_path, change, message):
    run = train_head(TrainConfig(features=feature_file(tmp_path / "f.h5"), out=tmp_path / "run", head=HeadConfig(C=1.0)))
    _rewrite_head(run.folder, change)
    result = invoke("evaluate", run.folder)
    assert result.exit_code == 2 and message in result.output and len(result.output.strip().splitlines()) == 1, result.output


@pytest.mark.parametrize("kind, chosen", [("logreg", {"C", "norm", "pool"}), ("linear", {"weight_decay", "lr", "norm", "pool"})])
def test_the_choice_record_keeps_its_form(tmp_path, kind, chosen):
    """run.json's choice and sweep rows have the keys they had before the sweeps were batched (readers of run.json,
    `runs` and the plots rely on them)."""
    head = HeadConfig(kind=kind, device="cpu", **({"epochs": 2} if kind == "linear" else {}))
    run = train_head(TrainConfig(features=feature_file(tmp_path / "f.h5"), out=tmp_path / "run", head=head))
    info = json.loads((run.folder / "run.json").read_text())
    assert set(info["head"]["chosen"]) == chosen and info["head"]["chosen"]["pool"] == "avg"
    assert all(set(row) == {"pool", "val_accuracy", "val_log_loss", "params", "fit_seconds"} for row in info["sweep"])
    assert info["head"]["params"] in [row["params"] for row in info["sweep"]]
    assert set(info["head"]["chosen"]) - {"pool"} <= set(info["head"]["params"])


