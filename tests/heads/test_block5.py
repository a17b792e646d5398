"""Fine-tuning block 5 on a pool4 cache: the layer, the head's start, training, save/load, predict = evaluate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import extract_config, read_header

from pipeline.cache.identity import FeatureConfig
from pipeline.cache.store import open_cache
from pipeline.errors import UserError
from pipeline.extraction.runner import extract
from pipeline.heads.block5 import Block5Head, block5
from pipeline.heads.config import HeadConfig
from pipeline.heads.registry import HEAD_FILE, full_proba, load_head, save_head
from pipeline.train.config import EvaluateConfig, TrainConfig
from pipeline.train.evaluate import evaluate_run
from pipeline.train.runner import train_head

SIZE = 64  # pool4 4x4, pool5 2x2


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    from pipeline.synthetic import make_image_folder

    return make_image_folder(tmp_path_factory.mktemp("ft") / "data", {"train": 4, "val": 2, "test": 2}, size=(80, 64))


@pytest.fixture(scope="module")
def pool4(folder, weights_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("p4") / "pool4.h5"
    return extract(extract_config(folder, out, weights=str(weights_file), layer="pool4", pool="map", image_size=SIZE,
                                  dtype="float32", precision="fp32")).out


def test_pool4_cache_holds_the_map_and_says_so(pool4):
    header = read_header(pool4)
    fcfg = header.config
    assert header.config.layer == "pool4" and fcfg.map_shape == (512, 4, 4) and header.feature_dim == 512 * 16
    assert "layer" not in FeatureConfig(weights_id="random:w", pool="avg", image_size=224, resize_size=256).to_dict()


def test_block5_from_the_caches_weights_gives_the_pool5_of_a_direct_forward(folder, pool4, weights_file, tmp_path):
    import torch

    pool5 = extract(extract_config(folder, tmp_path / "p5.h5", weights=str(weights_file), pool="map", image_size=SIZE,
                                   dtype="float32", precision="fp32")).out
    with open_cache(pool4) as a, open_cache(pool5) as b:
        x, expected = a.read_split("train").features, b.read_split("train").features
    with torch.inference_mode():
        got = block5(str(weights_file))(torch.from_numpy(x).reshape(-1, 512, 4, 4)).flatten(1).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def _toy(n=120, side=2, classes=3, seed=0):
    """pool4-like rows: non-negative maps whose channels carry the class."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    means = rng.uniform(0, 2, (classes, 512, 1, 1)).astype(np.float32)
    X = np.maximum(means[y] + rng.normal(0, 0.5, (n, 512, side, side)), 0).astype(np.float32)
    return X.reshape(n, -1), y


def test_training_reduces_the_held_out_loss_on_a_separable_set():
    X, y = _toy(n=45)
    head = Block5Head(weights="none", epochs=3, batch_size=15, device="cpu").fit(X, y)
    assert head.best_val_loss_ < 0.5 * np.log(3)  # chance is log 3
    assert head.score(X, y) > 0.9


@pytest.mark.parametrize("freeze", [0, 3])
def test_frozen_convs_keep_their_pretrained_weights(freeze):
    X, y = _toy(n=48)
    head = Block5Head(weights="none", epochs=1, batch_size=16, freeze_convs=freeze, device="cpu").fit(X, y)
    start = [m.weight.detach().numpy() for m in block5("none") if hasattr(m, "weight")]
    same = [np.array_equal(w, s) for (w, _), s in zip(head.layers_[:3], start)]
    assert same == ([True] * 3 if freeze == 3 else [False] * 3)


def test_save_load_gives_identical_probabilities(tmp_path):
    X, y = _toy(n=48)
    head = Block5Head(weights="none", epochs=1, batch_size=16, device="cpu").fit(X, y)
    loaded = load_head("block5", {"weights": "none"}, save_head(head, tmp_path))
    assert (tmp_path / HEAD_FILE).is_file()
    np.testing.assert_array_equal(loaded.predict_proba(X), head.predict_proba(X))


def test_predict_equals_evaluate_on_the_same_images(folder, pool4, weights_file, tmp_path):
    from pipeline.serve.config import PredictConfig
    from pipeline.serve.predict import predict

    run = train_head(TrainConfig(features=pool4, out=tmp_path / "run", refit=False,
                                 head=HeadConfig(kind="block5", epochs=1, device="cpu")))
    assert run.record.head.params["weights"] == str(weights_file) and run.record.pool is None
    assert evaluate_run(EvaluateConfig(run=run.folder, split="test")).metrics == run.metrics["test"]
    rows = predict(PredictConfig(run=run.folder, images=(folder / "test",), device="cpu"))
    with open_cache(pool4) as cache:
        test = cache.read_split("test")
    cached = full_proba(run.load_head(), test.features, len(run.class_names))
    predicted = {Path(r["path"]).relative_to(folder).as_posix(): r["proba"] for r in rows}
    for path, proba in zip(test.paths, cached):
        np.testing.assert_allclose(predicted[path], proba, atol=1e-4)


@pytest.mark.parametrize("kw, message", [
    ({"layer": "pool5", "pool": "map"}, "trains VGG16's block 5 on pool4 maps"),
    ({"layer": "pool4", "pool": "avg"}, "holds pool4 avg features"),
], ids=["pool5-map", "pool4-avg"])
def test_block5_refuses_other_caches(kw, message, folder, tmp_path):
    f = extract(extract_config(folder, tmp_path / "f.h5", image_size=SIZE, **kw)).out
    with pytest.raises(UserError, match=message):
        train_head(TrainConfig(features=f, out=tmp_path / "run", head=HeadConfig(kind="block5")))


def test_block5_refuses_weights_other_than_the_caches(pool4, tmp_path):
    other = tmp_path / "other.pth"
    other.write_bytes(b"not the same weights")
    with pytest.raises(UserError, match="but the features were made with sha256:"):
        train_head(TrainConfig(features=pool4, out=tmp_path / "run", head=HeadConfig(kind="block5", weights=str(other))))


def test_a_streamed_block5_reads_the_split_from_the_file(pool4, tmp_path):
    run = train_head(TrainConfig(features=pool4, out=tmp_path / "run", stream=True,
                                 head=HeadConfig(kind="block5", epochs=1, device="cpu")))
    assert run.record.loading.mode == "stream" and not run.record.refit  # refit needs the splits in memory
    assert run.load_head().n_features_in_ == 512 * 16 and 0 <= run.metrics["val"]["accuracy"] <= 1
