"""train-head, evaluate, predict and runs: on synthetic feature files and end to end on tiny images (the run folder
itself: tests/runs/)."""

import csv
import json
import re

import h5py
import pytest
from conftest import SIZE, feature_file, read_split
from typer.testing import CliRunner

from pipeline.cache.identity import generated_config
from pipeline.cache.store import open_cache
from pipeline.cli import app
from pipeline.errors import UserError
from pipeline.heads.config import HeadConfig
from pipeline.runs.folder import load_run
from pipeline.train.config import EvaluateConfig, TrainConfig
from pipeline.train.evaluate import evaluate_run
from pipeline.train.runner import train_head

runner = CliRunner()


FINGERPRINT = generated_config().fingerprint()


@pytest.mark.parametrize("kind", ["logreg", "linear"])
def test_train_head_chooses_on_val_scores_test_and_saves_everything(tmp_path, kind):
    f = feature_file(tmp_path / "f.h5")
    run = train_head(TrainConfig(features=f, out=tmp_path / "run", head=HeadConfig(kind=kind, device="cpu")))
    assert {p.name for p in run.folder.iterdir()} == {"run.json", "metrics.json", "report.txt", "confusion_matrix.png",
                                                      "head.npz", "sweep.png", "errors.csv", "errors.png", "reference.npz",
                                                      "report.html"}
    assert run.metrics["val"]["accuracy"] > 0.95 and run.metrics["test"]["accuracy"] > 0.95
    info = json.loads((run.folder / "run.json").read_text())
    assert len(info["sweep"]) == {"logreg": 45, "linear": 8}[kind]  # the protocol's C grid; 4 weight decays x 2 lr
    best = max(info["sweep"], key=lambda s: (s["val_accuracy"], -s["val_log_loss"]))
    assert info["head"]["params"] == best["params"]
    assert info["features"]["fingerprint"] == FINGERPRINT and info["features"]["class_names"] == ["a", "b", "c"]
    assert set(run.metrics["test"]) >= {"accuracy", "balanced_accuracy", "macro_f1", "log_loss", "per_class", "confusion_matrix"}
    assert "macro-F1" in (run.folder / "report.txt").read_text()
    reloaded = load_run(run.folder).load_head()
    test = read_split(f, "test")
    assert (reloaded.predict(test.features) == test.labels).mean() == run.metrics["test"]["accuracy"]


def test_without_val_split_a_stratified_fraction_of_train_is_held_out(tmp_path):
    f = feature_file(tmp_path / "f.h5", splits=("train",), n=100)
    run = train_head(TrainConfig(features=f, out=tmp_path / "run", val_fraction=0.25, head=HeadConfig(C=1.0)))
    assert run.record.splits.n_val == 25 and run.record.splits.n_train == 75
    assert "0.25 of 'train', stratified, seed 0" == run.record.splits.val
    assert "test" not in run.metrics and len(run.record.sweep) == 1


def test_top5_reported_beyond_five_classes(tmp_path):
    f = feature_file(tmp_path / "f.h5", classes=tuple("abcdefg"), n=140)
    run = train_head(TrainConfig(features=f, out=tmp_path / "run", head=HeadConfig(C=1.0)))
    assert 0.95 < run.metrics["val"]["top5_accuracy"] <= 1.0


def test_evaluate_refuses_features_of_another_extractor(tmp_path):
    run = train_head(TrainConfig(features=feature_file(tmp_path / "f.h5"), out=tmp_path / "run"))
    other = feature_file(tmp_path / "other.h5", config=generated_config(image_size=64))
    with pytest.raises(UserError, match=rf"made by extractor config {generated_config(image_size=64).fingerprint()} .* "
                                        rf"trained on {FINGERPRINT}"):
        evaluate_run(EvaluateConfig(run.folder, other, "test"))
    e = evaluate_run(EvaluateConfig(run.folder))
    assert e.split == "test" and e.metrics["accuracy"] == run.metrics["test"]["accuracy"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_stage_two_errors_exit_2_with_one_line(tmp_path):
    good = feature_file(tmp_path / "f.h5")
    (tmp_path / "junk.h5").write_bytes(b"junk")
    with h5py.File(tmp_path / "foreign.h5", "w") as f:
        f["x"] = [1]
    one_class = feature_file(tmp_path / "one.h5", classes=("a",))
    cases = [
        (["train-head", tmp_path / "missing.h5"], "feature file not found"),
        (["train-head", tmp_path / "junk.h5"], "is not a readable HDF5 file"),
        (["train-head", tmp_path / "foreign.h5"], "not a vggcache feature file"),
        (["train-head", good, "--train-split", "nope"], "has no split 'nope'"),
        (["train-head", one_class], "has one class only ('a')"),
        (["train-head", good, "--head", "svm"], "--head 'svm' is not valid (expected one of logreg, linear, knn, block5)"),
        (["evaluate", tmp_path / "no-run"], "run folder not found"),
    ]
    run = train_head(TrainConfig(features=good, out=tmp_path / "run", head=HeadConfig(C=1.0)))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "run.json").write_text("{}")
    cases.append((["evaluate", tmp_path / "broken"], "missing metrics.json"))
    cases.append((["evaluate", run.folder, "--split", "nope"], "has no split 'nope'"))
    for args, message in cases:
        result = invoke(*args)
        assert result.exit_code == 2 and message in result.output, (args, result.output)
        assert len(result.output.strip().splitlines()) == 1, result.output
    (run.folder / "head.npz").write_bytes(b"tampered")
    result = invoke("evaluate", run.folder)
    assert result.exit_code == 2 and "does not match the sha256" in result.output
    (run.folder / "head.npz").unlink()
    result = invoke("evaluate", run.folder)
    assert result.exit_code == 2 and "missing its head file head.npz" in result.output


def test_runs_table_sorted_by_validation_score(tmp_path):
    f = feature_file(tmp_path / "f.h5")
    train_head(TrainConfig(features=f, out=tmp_path / "models" / "strong", head=HeadConfig(C=1.0)))
    train_head(TrainConfig(features=f, out=tmp_path / "models" / "weak", head=HeadConfig(C=1e-6)))
    result = invoke("runs", tmp_path / "models", "--json")
    rows = json.loads(result.stdout)
    assert [r["name"] for r in rows] == ["strong", "weak"] and rows[0]["val_accuracy"] > rows[1]["val_accuracy"]
    text = invoke("runs", tmp_path / "models").output
    assert text.index("strong") < text.index("weak") and "C=1e-06" in text


def test_runs_never_shortens_a_run_name_and_shortens_nothing_when_piped(tmp_path):
    from pipeline.cli import _fitted_columns

    name, features = "vehicles-3f2a9c1b7d4e-logreg-20261204-101500-" + "n" * 60, "vehicles-" + "f" * 70 + ".h5"
    header = ("name", "head", "features", "chosen", "test acc", "test F1", "val acc", "fit s")
    row = (name, "logreg", features, "C=0.01,norm=l2", "0.9000", "0.8900", "0.9100", "0.15")
    narrow = _fitted_columns(header, [row], 100)
    assert narrow[1].split()[0] == name and features not in narrow[1] and "..." in narrow[1]
    assert _fitted_columns(header, [row], None)[1].split()[:3] == [name, "logreg", features]
    f = feature_file(tmp_path / "f.h5")
    train_head(TrainConfig(features=f, out=tmp_path / "models" / name, head=HeadConfig(C=1.0)))
    assert invoke("runs", tmp_path / "models").output.splitlines()[1].split()[0] == name  # not a terminal: whole


def test_end_to_end_on_tiny_images(image_folder, tmp_path, weights_file):
    out = tmp_path / "f.h5"
    fast = ["--image-size", SIZE, "--batch-size", 8, "--workers", 0]
    assert invoke("extract", image_folder, "--out", out, "--weights", weights_file, *fast).exit_code == 0
    for kind in ("logreg", "linear"):
        result = invoke("train-head", out, "--head", kind, "--out", tmp_path / kind, "--device", "cpu")
        assert result.exit_code == 0, result.output
        assert "accuracy" in result.output and (tmp_path / kind / "confusion_matrix.png").stat().st_size > 10_000
        result = invoke("evaluate", tmp_path / kind, "--split", "train", "--json")
        assert result.exit_code == 0 and json.loads(result.stdout)["n"] == 12

        # predict on training images == the head applied to their cached rows
        train = read_split(out, "train")
        (image_folder / "bad.jpg").write_bytes(b"broken")
        images = [image_folder / p for p in train.paths[:3]] + [image_folder / "bad.jpg"]
        result = invoke("predict", tmp_path / kind, *images, "--out", tmp_path / "p.csv", "--top-k", 2, "--device", "cpu")
        assert result.exit_code == 0, result.output
        rows = list(csv.DictReader(open(tmp_path / "p.csv")))
        head = load_run(tmp_path / kind).load_head()
        expected = head.predict_proba(train.features[:3])
        names = ["checks", "circle", "stripes"]
        for row, p in zip(rows[:3], expected):
            assert row["predicted"] == names[p.argmax()]
            assert float(row["probability"]) == pytest.approx(p.max(), abs=1e-5)
            assert len(row["top_k"].split(";")) == 2
        assert rows[3]["error"] == "not a JPEG, PNG, BMP, GIF, TIFF or WebP image (6 bytes)" and rows[3]["predicted"] == ""
        (image_folder / "bad.jpg").unlink()


def test_predict_refuses_other_weights(image_folder, tmp_path, weights_file):
    out = tmp_path / "f.h5"
    invoke("extract", image_folder, "--out", out, "--weights", weights_file, "--image-size", SIZE, "--workers", 0)
    invoke("train-head", out, "--out", tmp_path / "run", "--C", 1)
    other = tmp_path / "other.pth"
    import torch

    state = torch.load(weights_file)
    state["features.0.bias"] = state["features.0.bias"] + 1
    torch.save(state, other)
    result = invoke("predict", tmp_path / "run", image_folder, "--weights", other)
    assert result.exit_code == 2 and "but the features were made with sha256:" in result.output


def test_train_head_opens_the_cache_once(tmp_path, monkeypatch):
    f = feature_file(tmp_path / "f.h5")
    opened = []
    real = open_cache
    monkeypatch.setattr("pipeline.train.runner.open_cache", lambda path: opened.append(path) or real(path))
    train_head(TrainConfig(features=f, out=tmp_path / "run", head=HeadConfig(C=1.0)))
    assert opened == [f]


def test_a_class_without_training_rows_is_refused_naming_its_failed_files(image_folder, tmp_path):
    from conftest import extract_config

    from pipeline.extraction.runner import extract

    for image in (image_folder / "train" / "circle").iterdir():
        image.write_bytes(b"not an image")
    out = extract(extract_config(image_folder, tmp_path / "f.h5")).out
    with pytest.raises(UserError, match=r"class 'circle' has no row in 'train' of .*\(4 images of 'train' failed: "
                                        r"train/circle/\S+\.jpg: .*: a head cannot learn it"):
        train_head(TrainConfig(features=out, out=tmp_path / "run"))


def test_track_mlflow_logs_params_sweep_metrics_and_files_to_a_local_store(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = train_head(TrainConfig(features=feature_file(tmp_path / "f.h5"), out=tmp_path / "run", track="mlflow"))
    client = mlflow.tracking.MlflowClient("file:./mlruns")
    logged = client.search_runs([client.get_experiment_by_name("vggcache").experiment_id])[0]
    assert logged.data.params["chosen.C"] == f"{run.record.head.chosen['C']:g}"
    assert logged.data.metrics["val.accuracy"] == run.metrics["val"]["accuracy"]
    assert logged.data.metrics["test.accuracy"] == run.metrics["test"]["accuracy"]
    assert len(client.get_metric_history(logged.info.run_id, "sweep.val_accuracy")) == 45
    assert {a.path for a in client.list_artifacts(logged.info.run_id, "run")} >= {"run/run.json", "run/head.npz"}
    assert logged.data.tags["vggcache.fingerprint"] == run.fingerprint


def test_track_without_the_extra_says_how_to_install_it_before_the_fit(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if the track extra were not installed
    with pytest.raises(UserError, match=r"--track mlflow needs MLflow: pip install -e '\.\[track\]'"):
        train_head(TrainConfig(features=feature_file(tmp_path / "f.h5"), out=tmp_path / "run", track="mlflow"))
    assert not (tmp_path / "run").exists()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("uri, says", [
    ("sqlite:///{tmp}/x.db", "is a database store, which needs the full mlflow package (pip install mlflow)"),
    ("http://127.0.0.1:{port}/", "the tracking server does not answer"),
    ("ftp://host/store", "'ftp' is not a store MLflow knows"),
], ids=["sqlite", "server-down", "unknown-scheme"])
def test_a_tracking_store_that_cannot_work_is_one_line_before_the_fit(tmp_path, monkeypatch, uri, says):
    pytest.importorskip("mlflow")
    try:
        import sqlalchemy  # noqa: F401
        if uri.startswith("sqlite"):
            pytest.skip("the full mlflow package is installed here: sqlite stores work")
    except ImportError:
        pass
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri.format(tmp=tmp_path, port=_free_port()))
    monkeypatch.setattr("pipeline.train.runner.sweep", lambda *a: pytest.fail("the head was fitted"))
    with pytest.raises(UserError, match=f"^MLFLOW_TRACKING_URI .*{re.escape(says)}"):
        train_head(TrainConfig(features=feature_file(tmp_path / "f.h5"), out=tmp_path / "run", track="mlflow"))


def test_a_file_store_uri_logs_there(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file://{tmp_path}/store")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    run = train_head(TrainConfig(features=feature_file(tmp_path / "f.h5"), out=tmp_path / "run", track="mlflow"))
    client = mlflow.tracking.MlflowClient(f"file://{tmp_path}/store")
    logged = client.search_runs([client.get_experiment_by_name("vggcache").experiment_id])[0]
    assert logged.data.params["chosen.C"] == f"{run.record.head.chosen['C']:g}"


def test_a_failure_while_logging_is_one_line_and_the_run_stays_saved(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr("pipeline.train.tracking._log", lambda run: (_ for _ in ()).throw(RuntimeError("quota\nmore")))
    with pytest.raises(UserError, match=r"^--track mlflow: logging to file:\./mlruns failed \(quota\); the run is saved in"):
        train_head(TrainConfig(features=feature_file(tmp_path / "f.h5"), out=tmp_path / "run", track="mlflow"))
    assert (tmp_path / "run" / "run.json").is_file()
