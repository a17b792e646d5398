"""A cache's fingerprint never changes with the code: it is computed from CANONICAL's declared names, pinned here
(as Hugging Face datasets pins its hashes), and equal to what the version before the typed config computed."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields

import pytest
from conftest import extract_config, read_header

from pipeline.cache.identity import CANONICAL, FeatureConfig
from pipeline.extraction.config import feature_config
from pipeline.extraction.runner import extract

IMAGENET = "torchvision:VGG16_Weights.IMAGENET1K_V1"
RECIPE = "RRC(0.35-1)+hflip"

# (config, fingerprint, canonical JSON) computed by vggcache 0.1.0 before FeatureConfig was typed (commit 61a4ff1)
PINNED = {
    "imagenet-avg-224": (dict(weights_id=IMAGENET, pool="avg", image_size=224, resize_size=256), "6e7618ce6bea",
                         '{"antialias": true, "backbone": "torchvision.models.vgg16.features", "dtype": "float16", '
                         '"image_size": 224, "interpolation": "bilinear", "mean": [0.485, 0.456, 0.406], "pool": "avg", '
                         '"resize_size": 256, "std": [0.229, 0.224, 0.225], "weights": "torchvision:VGG16_Weights.'
                         'IMAGENET1K_V1"}'),
    "random-map-64": (dict(weights_id="random:seed=0,torch=2.14.1", pool="map", image_size=64, resize_size=73,
                           dtype="float32"), "e761f16ff5b3", None),
    "file-flip-scales": (dict(weights_id="sha256:" + "ab" * 32, pool="avgmax", image_size=224, resize_size=256,
                              flip=True, scales=(256, 384)), "75b189be1ce1", None),
    "pool4-map-augment": (dict(weights_id=IMAGENET, pool="map", image_size=224, resize_size=256, layer="pool4",
                               augment=4, augment_seed=7, augment_recipe=RECIPE), "c6db9d35cd94", None),
    "flatten-before-views": (dict(weights_id="sha256:" + "ab" * 32, pool="flatten", image_size=64, resize_size=73,
                                  dtype="float32"), "b5c4ab485172", None),
}


@pytest.mark.parametrize("name", list(PINNED))
def test_fingerprints_are_pinned(name):
    values, fingerprint, canonical = PINNED[name]
    fcfg = FeatureConfig(**values)
    assert fcfg.fingerprint() == fingerprint
    if canonical:
        assert json.dumps(fcfg.to_dict(), sort_keys=True) == canonical


@pytest.mark.parametrize("name", list(PINNED))
def test_the_canonical_form_reads_back_as_the_same_config(name):
    fcfg = FeatureConfig(**PINNED[name][0])
    assert FeatureConfig.from_dict(json.loads(json.dumps(fcfg.to_dict()))) == fcfg


def test_every_field_has_exactly_one_canonical_name():
    assert sorted(c.attribute for c in CANONICAL) == sorted(f.name for f in fields(FeatureConfig))
    assert len({c.name for c in CANONICAL}) == len(CANONICAL)


@dataclass(frozen=True)
class LegacyFeatureConfig:
    """FeatureConfig as the version before the typed config defined it: its fingerprint hashed `asdict`."""

    weights: str
    pool: str
    image_size: int
    resize_size: int
    mean: tuple = (0.485, 0.456, 0.406)
    std: tuple = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"
    antialias: bool = True
    dtype: str = "float16"
    backbone: str = "torchvision.models.vgg16.features"
    views: str = "none"
    scales: tuple = ()
    layer: str = "pool5"
    augment: int = 0
    augment_seed: int = 0
    augment_recipe: str = ""

    def fingerprint(self) -> str:
        later = {"views": "none", "scales": (), "layer": "pool5", "augment": 0, "augment_seed": 0, "augment_recipe": ""}
        d = {k: v for k, v in asdict(self).items() if not (k in later and v == later[k])}
        return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:12]


OPTIONS = {  # extract options -> (the typed feature_config's arguments, the legacy config's)
    "plain": ({}, {}),
    "map-pool4": ({"pool": "map", "layer": "pool4"}, {"pool": "map", "layer": "pool4"}),
    "flip": ({"flip": True}, {"views": "flip"}),
    "scales": ({"scales": (48, 64)}, {"scales": (48, 64)}),
    "augment": ({"augment": 2, "augment_seed": 5}, {"augment": 2, "augment_seed": 5}),
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_a_config_has_the_fingerprint_the_legacy_code_gave_it(name):
    from pipeline.extraction.augment import RECIPE as recipe

    typed, legacy = OPTIONS[name]
    fcfg = feature_config("none", typed.get("pool", "avg"), 64, "float32",
                          **{k: v for k, v in typed.items() if k != "pool"})
    extra = {"augment_recipe": recipe} if legacy.get("augment") else {}
    old = LegacyFeatureConfig(weights=fcfg.weights_id, image_size=64, resize_size=73, dtype="float32",
                              **{"pool": "avg"} | legacy | extra)
    assert fcfg.fingerprint() == old.fingerprint()


def test_an_extracted_cache_stores_the_legacy_config_and_fingerprint(image_folder, tmp_path):
    s = extract(extract_config(image_folder, tmp_path / "f.h5", pool="map", layer="pool4"))
    header = read_header(s.out)
    old = LegacyFeatureConfig(weights=header.config.weights_id, pool="map", image_size=32, resize_size=37,
                              dtype="float16", layer="pool4")
    assert header.fingerprint == s.fingerprint == old.fingerprint()
    stored = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(old).items()
              if k not in ("views", "scales", "augment", "augment_seed", "augment_recipe")}
    assert header.config_dict == stored
