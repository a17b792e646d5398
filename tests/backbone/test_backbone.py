"""The frozen body: weights loading, pooling, and equality with a direct torchvision forward."""

from urllib.error import URLError

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.models import VGG16_Weights, vgg16

from pipeline.backbone import vgg16 as backbone
from pipeline.backbone.vgg16 import Extractor, build_body, vgg16_features
from pipeline.cache.identity import IMAGENET_MEAN, IMAGENET_STD
from pipeline.errors import UserError
from pipeline.extraction.config import feature_config


def test_imagenet_preprocessing_constants_match_torchvision():
    backbone._check_imagenet_transforms(VGG16_Weights.IMAGENET1K_V1)  # raises when they drift
    fcfg = feature_config("imagenet", "avg", 224, "float16")
    assert (fcfg.resize_size, fcfg.image_size) == (256, 224)
    assert fcfg.weights_id == "torchvision:VGG16_Weights.IMAGENET1K_V1"


@pytest.mark.parametrize("pool, dim", [("avg", 512), ("max", 512), ("avgmax", 1024), ("flatten", 25088)])
def test_body_equals_direct_torchvision_forward(weights_file, pool, dim):
    reference = vgg16(weights=None).eval()
    reference.features.load_state_dict({k[9:]: v for k, v in torch.load(weights_file).items()})
    body = build_body(feature_config(str(weights_file), pool, 64, "float32"), str(weights_file))
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    x = (images.float() / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.inference_mode():
        fmap = reference.features(x)
        expected = {"avg": F.adaptive_avg_pool2d(fmap, 1).flatten(1), "max": F.adaptive_max_pool2d(fmap, 1).flatten(1),
                    "avgmax": torch.cat([F.adaptive_avg_pool2d(fmap, 1).flatten(1), F.adaptive_max_pool2d(fmap, 1).flatten(1)], 1),
                    "flatten": torch.flatten(reference.avgpool(fmap), 1)}[pool]
    got = Extractor(body, "cpu", "fp32")(images)
    assert got.shape == (3, dim)
    torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-4, atol=1e-5)


def test_body_is_frozen_and_in_eval_mode(weights_file):
    body = build_body(feature_config("none", "avg", 32, "float16"), "none")
    assert not body.training and not any(p.requires_grad for p in body.parameters())


def test_random_init_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    a, b = vgg16_features("none"), vgg16_features("none")
    assert torch.equal(torch.rand(1), before)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_full_and_bare_state_dicts_load(tmp_path, weights_file):
    state = torch.load(weights_file)
    full = vgg16(weights=None).state_dict() | state
    torch.save(full, tmp_path / "full.pth")
    torch.save({k[9:]: v for k, v in state.items()}, tmp_path / "bare.pth")
    for name in ("full.pth", "bare.pth"):
        layers = vgg16_features(str(tmp_path / name))
        assert torch.equal(layers[0].weight, state["features.0.weight"])


class NotATensor:
    pass


@pytest.mark.parametrize("content, reason", [
    (b"junk", "not a loadable torch state dict (it is not a torch file (torch.save writes a zip archive))"),
    (b"hello, a text file\n", "not a loadable torch state dict (it is not a torch file (torch.save writes a zip archive))"),
    (b"{\"a\": 1}", "not a loadable torch state dict (it is not a torch file (torch.save writes a zip archive))"),
    (b"", "not a loadable torch state dict (the file is empty)"),
    ({"features.0.weight": np.zeros(3)}, "it is not a plain state dict of tensors: a file holding other pickled Python objects is never loaded"),
    ({"features.0.weight": NotATensor()}, "it is not a plain state dict of tensors: a file holding other pickled Python objects is never loaded"),
], ids=["junk", "text", "json", "empty", "numpy-array", "custom-object"])
def test_an_unloadable_weights_file_is_one_line_without_torchs_advice(tmp_path, content, reason):
    path = tmp_path / "w.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(UserError) as caught:
        vgg16_features(str(path))
    message = str(caught.value)
    assert reason in message and "\n" not in message and "weights_only" not in message


def test_bad_weights_files_are_user_errors(tmp_path):
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(UserError, match="not VGG16 convolution weights"):
        vgg16_features(str(tmp_path / "wrong.pth"))
    with pytest.raises(UserError, match="is not 'imagenet', 'none' or an existing state-dict file"):
        feature_config(str(tmp_path / "absent.pth"), "avg", 224, "float16")


def test_weights_that_do_not_match_the_config_are_refused(weights_file):
    with pytest.raises(UserError, match="but the features were made with random"):
        build_body(feature_config("none", "avg", 32, "float16"), str(weights_file))


def test_imagenet_download_failure_names_the_offline_options(monkeypatch):
    def offline(**kwargs):
        raise URLError("no network")

    monkeypatch.setattr(backbone, "vgg16", offline)
    with pytest.raises(UserError, match=r"--weights PATH .* --weights none"):
        vgg16_features("imagenet")


def test_bf16_autocast_features_are_close_to_fp32(weights_file):
    body = build_body(feature_config(str(weights_file), "avg", 64, "float32"), str(weights_file))
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    fp32, bf16 = Extractor(body, "cpu", "fp32")(images), Extractor(body, "cpu", "bf16")(images)
    cosine = (fp32 * bf16).sum(1) / (np.linalg.norm(fp32, axis=1) * np.linalg.norm(bf16, axis=1))
    assert cosine.min() > 0.999 and not np.array_equal(fp32, bf16)
