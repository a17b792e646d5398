"""How logreg solves a path: chosen in one place for the problem's shape and device, recorded in run.json."""

import json
import subprocess
import sys

import pytest
from conftest import feature_file

from pipeline.heads.config import HeadConfig
from pipeline.heads.logreg import choose_method
from pipeline.train.config import TrainConfig
from pipeline.train.runner import train_head


@pytest.mark.parametrize("rows, dim, classes, device, solver, method", [
    (245, 512, 2, "cpu", "auto", "newton"),  # hymenoptera's default cache: 246 unknowns in the rows' span
    (1000, 512, 6, "cpu", "auto", "lbfgs"),  # 3,077 unknowns: the Hessian would cost more than the iterations
    (245, 512, 2, "cuda:0", "auto", "lbfgs"),  # a GPU asked for: the batched path there
    (4000, 512, 6, "cpu", "newton", "newton"),  # a forced solver is the solver
    (245, 512, 2, "cpu", "torch", "lbfgs"),  # lbfgs's former name
], ids=["small-cpu", "large-cpu", "cuda", "forced-newton", "torch-alias"])
def test_the_method_follows_the_problems_shape_and_device(rows, dim, classes, device, solver, method):
    chosen, why = choose_method(rows, dim, classes, device, solver)
    assert chosen == method and f"{rows} rows x {dim} features, {classes} classes" in why


def test_run_json_says_how_each_path_was_solved_and_why(tmp_path):
    run = train_head(TrainConfig(features=feature_file(tmp_path / "f.h5"), out=tmp_path / "a"))
    forced = train_head(TrainConfig(features=tmp_path / "f.h5", out=tmp_path / "b", head=HeadConfig(solver="lbfgs")))
    assert list(run.record.head.methods) == ["avg/standard"]
    assert run.record.head.methods["avg/standard"].startswith("newton: 90 rows x 16 features, 3 classes")
    assert forced.record.head.methods["avg/standard"].startswith("lbfgs: --solver lbfgs")
    assert json.loads((tmp_path / "a" / "run.json").read_text())["head"]["methods"] == run.record.head.methods


def test_a_small_default_train_head_never_imports_torch(tmp_path):
    """Newton on the CPU needs no torch: not importing it saves a second or more of a few-second command."""
    feature_file(tmp_path / "f.h5")
    code = ("import sys; from pipeline.train.config import TrainConfig; from pipeline.train.runner import train_head; "
            f"train_head(TrainConfig(features={str(tmp_path / 'f.h5')!r}, out={str(tmp_path / 'run')!r})); "
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip().splitlines()[-1] == "False", done.stderr[-2000:]
