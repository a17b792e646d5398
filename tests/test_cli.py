"""Every bad value of every command, through the CLI: exit 2, one line naming the value and what was expected."""

import os

import pytest
from conftest import SIZE, extract_config
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.extraction.runner import extract
from pipeline.heads.config import HeadConfig
from pipeline.train.config import TrainConfig
from pipeline.train.runner import train_head

runner = CliRunner()
FAST = ["--weights", "none", "--image-size", str(SIZE), "--batch-size", "8", "--workers", "0", "--precision", "fp32"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A feature cache, a run trained on it, an image folder, and a regular file to put paths under."""
    from pipeline.synthetic import make_image_folder

    root = tmp_path_factory.mktemp("cli")
    images = make_image_folder(root / "data", {"train": 2, "val": 2})
    features = extract(extract_config(images, root / "f.h5")).out
    run = train_head(TrainConfig(features=features, out=root / "run", head=HeadConfig(C=1.0)))
    (root / "a-file").write_text("not a folder")
    return {"features": features, "run": run.folder, "images": images, "file": root / "a-file"}


# (command, arguments after the command's positional ones, expected message); {x} is filled from `made`
CASES = {
    "extract-pool": ("extract", ["--pool", "mean"], "--pool 'mean' is not valid (expected one of avg, max, avgmax, flatten, spp, map)"),
    "extract-dtype": ("extract", ["--dtype", "int8"], "--dtype 'int8' is not valid (expected one of float16, float32)"),
    "extract-device": ("extract", ["--device", "tpu"], "--device 'tpu' is not valid (expected one of auto, cpu, cuda, mps)"),
    "extract-precision": ("extract", ["--precision", "xyz"], "--precision 'xyz' is not valid (expected one of auto, fp32, bf16, fp16)"),
    "extract-decode": ("extract", ["--decode", "nvjpeg"], "--decode 'nvjpeg' is not valid (expected one of cpu, gpu)"),
    "extract-size-small": ("extract", ["--image-size", "16"], "--image-size 16 is not valid (expected an integer in [32, 1024])"),
    "extract-size-large": ("extract", ["--image-size", "4096"], "--image-size 4096 is not valid (expected an integer in [32, 1024])"),
    "extract-size-text": ("extract", ["--image-size", "big"], "Invalid value for '--image-size'"),
    "extract-batch": ("extract", ["--batch-size", "-1"], "--batch-size -1 is not valid (expected an integer in [0, 65536])"),
    "extract-workers": ("extract", ["--workers", "-2"], "--workers -2 is not valid (expected an integer in [-1, 256])"),
    "extract-weights": ("extract", ["--weights", "nowhere.pth"], "is not 'imagenet', 'none' or an existing state-dict file"),
    "extract-out": ("extract", ["--out", "{file}/f.h5"], "--out: {file} is a file, not a folder"),
    "extract-unknown": ("extract", ["--colour", "red"], "No such option: --colour"),
    "extract-views": ("extract", ["--views", "crops"], "--views 'crops' is not valid (expected one of none, flip)"),
    "extract-scales": ("extract", ["--scales", "256,abc"], "--scales '256,abc' is not valid (expected sizes from 32 to 2048"),
    "extract-scales-repeat": ("extract", ["--scales", "256,256"], "--scales '256,256' is not valid"),
    "extract-map-views": ("extract", ["--pool", "map", "--views", "flip"], "--pool map keeps one centre-crop view"),
    "extract-augment": ("extract", ["--augment", "-1"], "--augment -1 is not valid (expected an integer in [0, 64])"),
    "extract-augment-seed": ("extract", ["--augment-seed", "-1"], "--augment-seed -1 is not valid"),
    "train-views": ("train-head", ["--views"], "--views: {features} holds no augmented views of 'train'"),
    "train-pool": ("train-head", ["--pool", "gem"], "--pool 'gem' is not valid (expected one of auto, avg, max, avgmax, flatten, spp)"),
    "train-pool-pooled": ("train-head", ["--pool", "max"], "holds avg-pooled features, so --pool max cannot be computed from it"),
    "train-norm": ("train-head", ["--norm", "zscore"], "--norm 'zscore' is not valid (expected one of standard, l2, power, auto)"),
    "train-foreign": ("train-head", ["--head", "knn", "--C", "5"], "--C applies to --head logreg, not to --head knn"),
    "train-layer": ("extract", ["--layer", "conv4"], "--layer 'conv4' is not valid (expected one of pool5, pool4)"),
    "train-block5-pooled": ("train-head", ["--head", "block5"], "trains VGG16's block 5 on pool4 maps"),
    "train-block5-norm": ("train-head", ["--head", "block5", "--norm", "l2"], "--norm does not apply to --head block5"),
    "train-freeze": ("train-head", ["--freeze-convs", "4"], "--freeze-convs 4 is not valid (expected an integer in [0, 3])"),
    "train-k": ("train-head", ["--head", "knn", "--k", "0"], "--k 0 is not valid (expected an integer in [1, 1048576])"),
    "train-head": ("train-head", ["--head", "svm"], "--head 'svm' is not valid (expected one of logreg, linear, knn, block5)"),
    "train-C-zero": ("train-head", ["--C", "0"], "--C 0.0 is not valid (expected a number > 0)"),
    "train-C-text": ("train-head", ["--C", "abc"], "Invalid value for '--C'"),
    "train-hidden": ("train-head", ["--hidden", "-1"], "--hidden -1 is not valid (expected an integer in [0, 65536])"),
    "train-dropout": ("train-head", ["--dropout", "1"], "--dropout 1.0 is not valid (expected a number in [0, 1))"),
    "train-lr": ("train-head", ["--lr", "0"], "--lr 0.0 is not valid (expected a number > 0)"),
    "train-lr-nan": ("train-head", ["--lr", "nan"], "--lr nan is not valid (expected a number > 0)"),
    "train-wd": ("train-head", ["--weight-decay", "-1"], "--weight-decay -1.0 is not valid (expected a number >= 0)"),
    "train-epochs": ("train-head", ["--epochs", "0"], "--epochs 0 is not valid (expected an integer in [1, 100000])"),
    "train-batch": ("train-head", ["--batch-size", "0"], "--batch-size 0 is not valid (expected an integer in [1, 1048576])"),
    "train-patience": ("train-head", ["--patience", "0"], "--patience 0 is not valid (expected an integer in [1, 100000])"),
    "train-early-stop": ("train-head", ["--early-stop-fraction", "1"], "--early-stop-fraction 1.0 is not valid (expected a number in (0, 1))"),
    "train-seed": ("train-head", ["--seed", "-1"], "--seed -1 is not valid (expected an integer in [0, 4294967295])"),
    "train-device": ("train-head", ["--head", "linear", "--device", "tpu"], "--device 'tpu' is not valid (expected one of auto, cpu, cuda, mps)"),
    "train-val-fraction": ("train-head", ["--val-fraction", "7"], "--val-fraction 7.0 is not valid (expected a number in (0, 1))"),
    "train-val-fraction-zero": ("train-head", ["--val-fraction", "0"], "--val-fraction 0.0 is not valid (expected a number in (0, 1))"),
    "train-out": ("train-head", ["--out", "{file}/run"], "--out: {file} is a file, not a folder"),
    "train-out-run": ("train-head", ["--out", "{run}"], "--out {run} already holds a run: choose another --out, or --force to replace it"),
    "predict-top-k": ("predict", ["--top-k", "0"], "--top-k 0 is not valid (expected an integer in [1, 1048576])"),
    "predict-precision": ("predict", ["--precision", "xyz"], "--precision 'xyz' is not valid (expected one of auto, fp32, bf16, fp16)"),
    "predict-device": ("predict", ["--device", "tpu"], "--device 'tpu' is not valid (expected one of auto, cpu, cuda, mps)"),
    "predict-batch": ("predict", ["--batch-size", "0"], "--batch-size 0 is not valid (expected an integer in [1, 65536])"),
    "predict-workers": ("predict", ["--workers", "-1"], "--workers -1 is not valid (expected an integer in [0, 256])"),
    "predict-out": ("predict", ["--out", "{file}/p.csv"], "--out: {file} is a file, not a folder"),
    "predict-out-run": ("predict", ["--out", "{run}/head.npz"], "would overwrite {run}, which this command reads"),
    "predict-report-no-out": ("predict", ["--report"], "--report draws its picture beside the predictions: pass --out"),
    "predict-missing": ("predict", ["{file}-missing.jpg"], "image path not found: {file}-missing.jpg"),
    "evaluate-split": ("evaluate", ["--split", "nope"], "has no split 'nope'"),
    "info-missing": ("info", ["{file}.h5"], None),  # replaced below: info takes only the file
    "demo-data": ("make-demo-data", ["{file}-demo", "--train", "0"], "Invalid value for '--train'"),
    "demo-data-file": ("make-demo-data", ["{file}"], "OUT {file} is a file, expected a folder"),
    "demo-data-foreign": ("make-demo-data", ["{run}"], "OUT {run} is not empty and holds no demo data (confusion_matrix.png, "),
}
CASES["info-missing"] = ("info", [], "feature file not found: {file}.h5")


def positional(command: str, made: dict) -> list:
    return {"extract": [made["images"]], "train-head": [made["features"]], "predict": [made["run"], made["images"]],
            "evaluate": [made["run"]], "info": [f"{made['file']}.h5"], "make-demo-data": []}[command]


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_every_bad_value_exits_2_with_one_line(made, case):
    command, args, message = CASES[case]
    fill = lambda text: str(text).format(**{k: str(v) for k, v in made.items()})
    rest = (FAST if command == "extract" else []) + [fill(a) for a in args]  # the case's value comes last and wins
    if command == "predict" and case == "predict-missing":
        argv = [command, str(made["run"]), *rest]
    else:
        argv = [command, *map(str, positional(command, made)), *rest]
    result = runner.invoke(app, argv)
    assert result.exit_code == 2, result.output
    assert fill(message) in result.output and "Traceback" not in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder: the 'a-file' cases cover the check")
@pytest.mark.parametrize("command", ["extract", "train-head", "predict"])
def test_a_read_only_out_folder_is_refused_before_any_work(made, tmp_path, command):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    out = locked / ("run" if command == "train-head" else "out.h5" if command == "extract" else "p.csv")
    argv = [command, *map(str, positional(command, made)), "--out", str(out)] + (FAST if command == "extract" else [])
    result = runner.invoke(app, argv)
    assert result.exit_code == 2 and f"--out: cannot write in {locked} (Permission denied)" in result.output, result.output


@pytest.mark.parametrize("command", ["info", "train-head", "extract"])
def test_a_damaged_cache_is_one_line_for_every_command(made, tmp_path, command):
    import shutil

    import h5py

    damaged = tmp_path / "damaged.h5"
    shutil.copy(made["features"], damaged)
    with h5py.File(damaged, "a") as f:
        del f["train/paths"]
    argv = {"info": ["info", damaged], "train-head": ["train-head", damaged],
            "extract": ["extract", made["images"], "--out", damaged, *FAST]}[command]
    result = runner.invoke(app, list(map(str, argv)))
    assert result.exit_code == 2 and "is damaged: split 'train' has no paths dataset" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and ("--force" in result.output) == (command == "extract")


def test_predict_writes_a_name_that_is_not_utf8_as_its_bytes(made, tmp_path):
    import csv

    folder = tmp_path / "new"
    folder.mkdir()
    odd = os.path.join(os.fsencode(folder), b"\xff\xfe.jpg")
    with open(odd, "wb") as f:
        f.write(next((made["images"] / "train/circle").iterdir()).read_bytes())
    result = runner.invoke(app, ["predict", str(made["run"]), str(folder), "--out", str(tmp_path / "p.csv")])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(tmp_path / "p.csv", encoding="utf-8", errors="surrogateescape", newline="")))
    assert [os.fsencode(r["path"]) for r in rows] == [odd] and rows[0]["predicted"] in ("checks", "circle", "stripes")
    stdout = runner.invoke(app, ["predict", str(made["run"]), str(folder)])
    assert stdout.exit_code == 0 and odd in stdout.stdout_bytes


def test_predict_writes_a_name_that_looks_like_a_formula_as_text(made, tmp_path, monkeypatch):
    """OWASP's CSV injection advice: a cell a spreadsheet would evaluate starts with a quote it hides."""
    import csv

    image = next((made["images"] / "train/circle").iterdir()).read_bytes()
    names = ("=HYPERLINK(1).jpg", "@SUM(A1).jpg", "-2+3.jpg", "'quoted.jpg", "plain.jpg")
    for name in names:
        (tmp_path / name).write_bytes(image)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["predict", str(made["run"]), "--out", "p.csv", "--", *names])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(tmp_path / "p.csv", encoding="utf-8", newline="")))
    assert sorted(r["path"] for r in rows) == ["''quoted.jpg", "'-2+3.jpg", "'=HYPERLINK(1).jpg", "'@SUM(A1).jpg",
                                              "plain.jpg"]


COMMANDS = ["extract", "info", "train-head", "evaluate", "predict", "report", "export", "serve", "runs", "audit",
            "export-features", "similar", "projection", "map", "make-demo-data"]  # in order (map: projection's old name)


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    listed = [line.split()[0] for line in result.output.split("Commands:")[1].splitlines() if line.strip()]
    assert result.exit_code == 0 and listed == COMMANDS


def test_make_demo_data_makes_its_folder_again_with_force_only(tmp_path):
    out = tmp_path / "demo"
    assert runner.invoke(app, ["make-demo-data", str(out), "--train", "2", "--val", "1", "--test", "1"]).exit_code == 0
    again = runner.invoke(app, ["make-demo-data", str(out)])
    assert again.exit_code == 2 and f"OUT {out} already holds demo data: choose another OUT, or --force" in again.output
    forced = runner.invoke(app, ["make-demo-data", str(out), "--force", "--train", "1", "--val", "1", "--test", "1"])
    assert forced.exit_code == 0 and len(list(out.rglob("*.jpg"))) == 9  # 3 classes x 3 splits, none left of before


@pytest.mark.parametrize("odd", ["linked-class-folder", "linked-image", "foreign-folder"])
def test_make_demo_data_force_never_deletes_what_it_did_not_make(tmp_path, odd):
    out, elsewhere = tmp_path / "demo", tmp_path / "elsewhere"
    assert runner.invoke(app, ["make-demo-data", str(out), "--train", "1", "--val", "1", "--test", "1"]).exit_code == 0
    elsewhere.mkdir()
    (elsewhere / "00000.jpg").write_bytes(b"mine")
    if odd == "linked-class-folder":
        (out / "train" / "circle").rename(tmp_path / "moved")
        (out / "train" / "circle").symlink_to(elsewhere, target_is_directory=True)
    elif odd == "linked-image":
        (out / "val" / "circle" / "00001.jpg").symlink_to(elsewhere / "00000.jpg")
    else:
        (out / "train" / "notes").mkdir()
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    forced = runner.invoke(app, ["make-demo-data", str(out), "--force"])
    assert forced.exit_code == 2 and "is not empty and holds no demo data" in forced.output, forced.output
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before
    assert (elsewhere / "00000.jpg").read_bytes() == b"mine"


def test_info_shows_a_class_and_a_failed_file_with_control_characters_escaped(tmp_path):
    from pipeline.synthetic import make_image_folder

    data = make_image_folder(tmp_path / "data", {"train": 2, "val": 1}, size=(40, 40))
    for split in ("train", "val"):
        os.rename(data / split / "circle", data / split / "ci\x1b[31mrcle")
    (data / "train" / "checks" / "bad\nname.jpg").write_bytes(b"not an image")
    extract(extract_config(data, tmp_path / "f.h5"))
    result = runner.invoke(app, ["info", str(tmp_path / "f.h5")])
    assert result.exit_code == 0 and "\x1b" not in result.output
    assert "ci\\x1b[31mrcle 2" in result.output and "  failed train/checks/bad\\x0aname.jpg: not a JPEG" in result.output


@pytest.mark.parametrize("command", ["predict", "audit"])
def test_an_out_that_is_a_fifo_is_refused_not_waited_on(made, tmp_path, command):
    os.mkfifo(tmp_path / "p.csv")  # opening it to write would wait for a reader for ever
    argv = {"predict": ["predict", made["run"], made["images"] / "val"], "audit": ["audit", made["features"]]}[command]
    result = runner.invoke(app, [*map(str, argv), "--out", str(tmp_path / "p.csv"), "--force"])
    assert result.exit_code == 2 and result.output.strip() == (
        f"error: --out {tmp_path / 'p.csv'} is not a regular file (a FIFO, socket or device): choose a file name")


def test_an_empty_image_path_is_refused_not_read_as_the_working_folder(made):
    result = runner.invoke(app, ["predict", str(made["run"]), ""])
    assert result.exit_code == 2 and result.output.strip() == (
        "error: an image path is empty (expected image files or folders)")


def test_extract_warns_of_a_bad_file_with_its_control_characters_escaped(tmp_path, caplog):
    from pipeline.synthetic import make_image_folder

    data = make_image_folder(tmp_path / "data", {"train": 1}, size=(40, 40))
    (data / "train" / "circle" / "bad\x1b]0;t\x07.jpg").write_bytes(b"junk")
    extract(extract_config(data, tmp_path / "f.h5"))
    assert [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()] == [
        "skipped train/circle/bad\\x1b]0;t\\x07.jpg: not a JPEG, PNG, BMP, GIF, TIFF or WebP image (4 bytes)"]


def test_a_ctrl_c_python_wrapped_while_a_class_was_made_is_still_an_interruption():
    from pipeline.errors import interruption_in

    stop = KeyboardInterrupt()
    wrapped = RuntimeError("Error calling __set_name__ on 'cached_property' instance")
    wrapped.__cause__ = stop
    assert interruption_in(wrapped) is stop and interruption_in(stop) is stop
    assert interruption_in(RuntimeError("CUDA out of memory")) is None


def test_a_handled_ctrl_c_in_a_string_eval_keeps_the_exit_code_under_python_m(tmp_path):
    """CPython remembers a KeyboardInterrupt that ended an exec'd string (as dataclasses run while a lazy import
    defines classes) and, under `python -m`, ends the process by SIGINT after it chose its exit code."""
    import subprocess
    import sys

    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "__main__.py").write_text(
        "import sys\nfrom pipeline.errors import forget_interrupted_string_evals\n"
        "try:\n    exec('raise KeyboardInterrupt')\nexcept KeyboardInterrupt:\n"
        "    if sys.argv[1:] == ['forget']:\n        forget_interrupted_string_evals()\n    sys.exit(130)\n")
    run = lambda *args: subprocess.run([sys.executable, "-m", "probe", *args], cwd=tmp_path).returncode
    assert run("forget") == 130  # without it: -2 on CPython 3.11 to 3.13
