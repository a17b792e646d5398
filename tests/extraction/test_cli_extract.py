"""The extract and info commands through typer's CliRunner: outputs, and exit code 2 with one line for user errors."""

import json

from conftest import SIZE
from typer.testing import CliRunner

from pipeline.cli import app

runner = CliRunner()
FAST = ["--weights", "none", "--image-size", str(SIZE), "--batch-size", "8", "--workers", "0", "--precision", "fp32"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_extract_then_info(image_folder, tmp_path):
    out = tmp_path / "f.h5"
    (image_folder / "train/circle/broken.jpg").write_bytes(b"\xff\xd8 not really")
    result = invoke("extract", image_folder, "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    assert "18 images (train 12, val 6), 1 failed, dim 512" in result.output
    assert "failed train/circle/broken.jpg" in result.output
    again = invoke("extract", image_folder, "--out", out, *FAST)
    assert again.exit_code == 0 and "up to date" in again.output
    info = invoke("info", out, "--json")
    d = json.loads(info.stdout)
    assert d["splits"]["train"]["per_class"] == {"checks": 4, "circle": 4, "stripes": 4}
    assert d["splits"]["train"]["failed"][0]["path"] == "train/circle/broken.jpg"
    text = invoke("info", out)
    assert "split train: 12 rows (checks 4, circle 4, stripes 4), 1 failed" in text.output


def error_cases(tmp_path, image_folder):
    (tmp_path / "empty").mkdir()
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.jpg").write_bytes(b"x")
    (tmp_path / "bad.csv").write_text("only-one-column\n")
    (image_folder / "val" / "zebra").mkdir()
    (image_folder / "val" / "zebra" / "z.jpg").write_bytes(b"z")
    return [
        ([tmp_path / "missing"], "data path not found"),
        ([tmp_path / "empty"], "no class folders"),
        ([tmp_path / "flat"], "no class folders"),
        ([tmp_path / "bad.csv"], "line 1: expected 'path,label[,split]'"),
        ([image_folder], "class 'zebra' in split 'val' is not a class of 'train'"),
    ]


def test_every_input_error_exits_2_with_one_line(tmp_path, image_folder):
    for args, message in error_cases(tmp_path, image_folder):
        result = invoke("extract", *args, *FAST)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1, result.output




def test_info_refuses_a_file_that_is_not_ours(tmp_path):
    (tmp_path / "x.h5").write_bytes(b"nope")
    result = invoke("info", tmp_path / "x.h5")
    assert result.exit_code == 2 and "is not a readable HDF5 file" in result.output
