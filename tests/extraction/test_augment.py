"""Augmented views (`extract --augment K`, `train-head --views`): seeded, equal to a direct forward of their crop,
cached beside their source in the training split only, resumed like rows, and never on the validation side."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SIZE, extract_config, interruptible, read_header
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from pipeline.backbone.vgg16 import Extractor, build_body
from pipeline.cache.store import open_cache
from pipeline.errors import UserError
from pipeline.extraction import augment
from pipeline.extraction.config import feature_config
from pipeline.extraction.runner import extract
from pipeline.heads.config import HeadConfig
from pipeline.heads.holdout import hold_out
from pipeline.images import open_image
from pipeline.synthetic import make_image_folder
from pipeline.train.config import TrainConfig
from pipeline.train.data import load_data
from pipeline.train.loading import plan_loading
from pipeline.train.runner import train_head

CLI = [sys.executable, "-m", "pipeline"]


@pytest.mark.parametrize("size", [(40, 36), (1, 1), (300, 2), (2, 300)], ids=["photo", "one-pixel", "wide", "tall"])
def test_view_params_are_seeded_and_inside_the_image(size):
    width, height = size
    params = [augment.view_params(0, "train/a/x.jpg", j, width, height) for j in range(20)]
    assert params == [augment.view_params(0, "train/a/x.jpg", j, width, height) for j in range(20)]
    for top, left, h, w, _ in params:
        assert 0 <= top and 0 <= left and 0 < h and 0 < w and top + h <= height and left + w <= width


def test_views_differ_by_index_seed_and_path():
    at = lambda seed, path, j: augment.view_params(seed, path, j, 400, 300)
    views = {at(0, "a.jpg", j) for j in range(8)}
    assert len(views) == 8
    assert at(1, "a.jpg", 0) != at(0, "a.jpg", 0) and at(0, "b.jpg", 0) != at(0, "a.jpg", 0)
    flips = [at(0, "a.jpg", j)[4] for j in range(200)]
    assert 70 < sum(flips) < 130  # p = 0.5


@pytest.fixture
def augmented(image_folder, tmp_path, weights_file):
    out = tmp_path / "aug.h5"
    s = extract(extract_config(image_folder, out, weights=str(weights_file), dtype="float32", precision="fp32",
                               augment=2, augment_seed=7))
    return image_folder, out, s


def test_views_are_cached_for_the_training_split_only(augmented):
    _, out, s = augmented
    assert s.rows == {"train": 12, "val": 6} and s.views == 24 and s.extracted == 12 + 24 + 6
    with open_cache(out) as cache:
        assert cache.views_per_row("train") == 2 and cache.views_per_row("val") == 0
        assert cache.read_views("train").shape == (24, 512)
        assert cache.header.config.augment == 2 and cache.header.config.augment_seed == 7
        assert cache.header.config.augment_recipe == augment.RECIPE


def test_each_view_equals_a_direct_forward_of_its_crop(augmented, weights_file):
    image_folder, out, _ = augmented
    fcfg = feature_config(str(weights_file), "avg", SIZE, "float32")
    extractor = Extractor(build_body(fcfg, str(weights_file)), "cpu", "fp32")
    with open_cache(out) as cache:
        paths, views = cache.read_split("train").paths, cache.read_views("train").reshape(12, 2, 512)
    crops = []
    for path in paths:
        img = open_image((image_folder / path).read_bytes())
        for j in range(2):
            top, left, h, w, flip = augment.view_params(7, path, j, img.width, img.height)
            crop = TF.resized_crop(img, top, left, h, w, [SIZE, SIZE], InterpolationMode.BILINEAR, antialias=True)
            crops.append(TF.pil_to_tensor(TF.hflip(crop) if flip else crop))
    np.testing.assert_allclose(views.reshape(24, 512), extractor(torch.stack(crops)), rtol=1e-5, atol=1e-6)
    assert not np.allclose(views[:, 0], views[:, 1])  # two views, not one copied


def test_views_do_not_depend_on_the_batch_but_on_the_seed(augmented, tmp_path, weights_file):
    image_folder, out, _ = augmented
    again = tmp_path / "again.h5"
    extract(extract_config(image_folder, again, weights=str(weights_file), dtype="float32", precision="fp32",
                           augment=2, augment_seed=7, batch_size=5))
    other_seed = tmp_path / "seed8.h5"
    extract(extract_config(image_folder, other_seed, weights=str(weights_file), dtype="float32", precision="fp32",
                           augment=2, augment_seed=8))
    views = {p: open_cache(p).read_views("train") for p in (out, again, other_seed)}
    np.testing.assert_allclose(views[again], views[out], rtol=1e-5, atol=1e-6)
    assert not np.allclose(views[other_seed], views[out], rtol=1e-2)


def test_a_new_image_adds_its_row_and_its_views_only(augmented, weights_file):
    image_folder, out, _ = augmented
    before = open_cache(out).read_views("train")
    Image.new("RGB", (40, 36), (200, 10, 10)).save(image_folder / "train" / "circle" / "zz-new.jpg")
    s = extract(extract_config(image_folder, out, weights=str(weights_file), dtype="float32", precision="fp32",
                               augment=2, augment_seed=7))
    assert s.extracted == 3 and s.views == 26
    with open_cache(out) as cache:
        paths, views = cache.read_split("train").paths, cache.read_views("train")
    new = paths.index("train/circle/zz-new.jpg")
    np.testing.assert_array_equal(np.delete(views, [2 * new, 2 * new + 1], axis=0), before)


def test_a_bad_training_image_is_recorded_once_and_has_no_views(image_folder, tmp_path):
    (image_folder / "train" / "circle" / "broken.jpg").write_bytes(b"not an image")
    s = extract(extract_config(image_folder, tmp_path / "f.h5", augment=3))
    assert [r.path for r in s.failed] == ["train/circle/broken.jpg"] and s.views == 36
    again = extract(extract_config(image_folder, tmp_path / "f.h5", augment=3))
    assert again.up_to_date and again.extracted == 0


def test_resume_after_kill_9_caches_the_same_views(tmp_path):
    data = make_image_folder(tmp_path / "data", {"train": 6, "val": 2}, size=(48, 40))
    args = [str(data), "--weights", "none", "--image-size", "32", "--batch-size", "4", "--workers", "0",
            "--dtype", "float32", "--augment", "2", "--precision", "fp32"]
    reference = extract(extract_config(data, tmp_path / "ref.h5", dtype="float32", augment=2)).out
    out, env = tmp_path / "f.h5", dict(os.environ, VGGCACHE_COMMIT_EVERY_S="0")
    proc = subprocess.Popen(CLI + ["extract", *args, "--out", str(out)], env=env, preexec_fn=interruptible,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and len(list(Path(f"{out}.partial").glob("*-0*.json"))) < 3:
        pass
    proc.kill()
    proc.wait()
    done = subprocess.run(CLI + ["extract", *args, "--out", str(out)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    with open_cache(out) as got, open_cache(reference) as ref:
        assert got.read_split("train").paths == ref.read_split("train").paths
        np.testing.assert_allclose(got.read_views("train"), ref.read_views("train"), rtol=1e-5, atol=1e-6)


def test_held_out_rows_take_their_views_with_them():
    X = np.arange(20, dtype=np.float32)[:, None]  # row i holds the value i; its views hold 100 i + j
    y = np.arange(20) % 2
    views = (100 * np.arange(20)[:, None] + np.arange(3)[None, :]).astype(np.float32)[:, :, None]
    X_fit, X_held, y_fit, _ = hold_out(X, y, 0.25, seed=0, views=views)
    held = set(X_held.ravel().astype(int))
    fit_rows, fit_views = X_fit[:-45].ravel().astype(int), X_fit[-45:].ravel().astype(int)
    assert len(held) == 5 and held.isdisjoint(fit_rows) and set(fit_rows) | held == set(range(20))
    assert sorted(fit_views) == sorted(100 * i + j for i in fit_rows for j in range(3))
    assert (y_fit[-45:] == (fit_views // 100) % 2).all()  # each view keeps its source's label


def test_a_flat_dataset_validates_on_images_whose_views_are_not_trained_on(tmp_path):
    data = make_image_folder(tmp_path / "data", {"all": 8}, size=(40, 36))
    flat = tmp_path / "flat"
    (data / "all").rename(flat)
    out = extract(extract_config(flat, tmp_path / "f.h5", dtype="float32", augment=2)).out
    cfg = TrainConfig(features=out, train_split="all", head=HeadConfig("logreg"))
    with open_cache(out) as cache:
        rows, views = cache.read_split("all").features, cache.read_views("all").reshape(-1, 2, 512)
        data = load_data(cfg, cache, plan_loading(cfg, cache))
    index = {row.tobytes(): i for i, row in enumerate(rows)}
    fit = [index[r.tobytes()] for r in data.X_train]
    held = [index[r.tobytes()] for r in data.X_val]
    assert len(fit) + len(held) == 24 and not set(fit) & set(held)
    np.testing.assert_array_equal(data.V_train, views[fit])


def test_train_head_uses_the_views_and_records_it(augmented, tmp_path):
    _, out, _ = augmented
    run = train_head(TrainConfig(features=out, out=tmp_path / "run", head=HeadConfig("logreg", C=1.0)))
    assert run.record.splits.views_per_image == 2
    without = train_head(TrainConfig(features=out, out=tmp_path / "run2", views=False,
                                           head=HeadConfig("logreg", C=1.0)))
    assert without.record.splits.views_per_image == 0
    assert not np.allclose(run.load_head().coef_, without.load_head().coef_)


def test_views_asked_of_a_cache_without_them_are_refused(image_folder, tmp_path):
    out = extract(extract_config(image_folder, tmp_path / "f.h5")).out
    with pytest.raises(UserError, match=r"--views: .* holds no augmented views of 'train' \(extract --augment K"):
        train_head(TrainConfig(features=out, out=tmp_path / "run", views=True))


def test_views_that_do_not_fit_the_budget_are_left_out_or_refused(augmented, tmp_path, caplog):
    _, out, _ = augmented
    with open_cache(out) as cache:
        rows_only = plan_loading(TrainConfig(features=out, views=False), cache).needed_bytes
    budget = str(rows_only + 1000)
    run = train_head(TrainConfig(features=out, out=tmp_path / "run", memory_budget=budget))
    assert run.record.splits.views_per_image == 0 and "left out of training" in caplog.text
    with pytest.raises(UserError, match="--views trains on the augmented views in memory"):
        train_head(TrainConfig(features=out, out=tmp_path / "run2", memory_budget=budget, views=True))


def test_augment_without_a_training_split_says_so_and_makes_no_views(tmp_path, caplog):
    data = make_image_folder(tmp_path / "data", {"training": 2, "val": 1}, size=(40, 36))
    s = extract(extract_config(data, tmp_path / "f.h5", augment=2))  # a test set for a run trained with views
    assert s.views == 0 and read_header(s.out).config.augment == 2
    assert "--augment makes views of the training split (train or all)" in caplog.text and "training, val" in caplog.text


def test_going_back_to_no_views_names_what_changed(image_folder, tmp_path):
    extract(extract_config(image_folder, tmp_path / "f.h5", augment=1))
    with pytest.raises(UserError, match=r"\(augment: 1 -> 0, augment_recipe: 'random_resized_crop.*' -> ''\)"):
        extract(extract_config(image_folder, tmp_path / "f.h5"))


@pytest.mark.parametrize("args, message", [
    (["--augment", "65"], "--augment 65 is not valid (expected an integer in [0, 64])"),
    (["--augment", "2", "--scales", "64,96"], "--augment caches crops at --image-size, and --scales whole images"),
], ids=["too-many", "with-scales"])
def test_bad_augment_options_are_one_line_and_exit_2(image_folder, tmp_path, args, message):
    r = subprocess.run(CLI + ["extract", str(image_folder), "--weights", "none", "--out", str(tmp_path / "f.h5"), *args],
                       capture_output=True, text=True)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
