"""The frozen VGG16 convolutional body: weights (ImageNet, a local file, or seeded random), normalisation, pooling;
and the `Extractor` that runs it on a device: uint8 image batches in, float32 numpy rows out."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.models import VGG16_Weights, vgg16
from torchvision.models.vgg import cfgs, make_layers

from pipeline.backbone.torch_pools import TORCH_POOLS
from pipeline.backbone.weights import IMAGENET_WEIGHTS, RANDOM_SEED, weights_identity, weights_spec
from pipeline.cache import pools
from pipeline.cache.identity import IMAGENET_CROP, IMAGENET_MEAN, IMAGENET_RESIZE, IMAGENET_STD, FeatureConfig
from pipeline.device import autocast, resolve_device, resolve_precision
from pipeline.errors import UserError, first_line

log = logging.getLogger(__name__)


class VGG16Body(nn.Module):
    """uint8 images (B, 3, H, W) -> pooled pool5 features (B, D), with the ImageNet normalisation built in.

    `flip`: each row is the mean of the image's features and its mirror's (the VGG paper's test-time views).
    """

    def __init__(self, features: nn.Sequential, pool: str, mean, std, flip: bool = False):
        super().__init__()
        self.features = features
        self.pooling, self.flip = TORCH_POOLS[pool], flip  # export swaps in torch_pools.exportable(pool)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() - self.mean) / self.std  # == convert_image_dtype then normalize, in one pass
        y = self.pooling(self.features(x))
        if self.flip:
            y = (y + self.pooling(self.features(x.flip(-1)))) / 2
        return y


def vgg16_features(weights: str) -> nn.Sequential:
    """The 31 layers of torchvision's `vgg16().features`, with the requested weights loaded."""
    if weights == "imagenet":
        return _imagenet_features()
    with torch.random.fork_rng(devices=[]):  # layer construction draws from the RNG too: keep the caller's intact
        torch.manual_seed(RANDOM_SEED)
        layers = make_layers(cfgs["D"], batch_norm=False)
        if weights == "none":
            _vgg_init(layers)
    if weights != "none":
        _load_state_dict(layers, Path(weights))
    return layers


def _vgg_init(layers: nn.Sequential) -> None:
    """torchvision's VGG initialisation of the convolutions (its constructor applies the same)."""
    for m in layers.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)


def _imagenet_features() -> nn.Sequential:
    weights = VGG16_Weights.IMAGENET1K_V1
    _check_imagenet_transforms(weights)
    try:
        return vgg16(weights=weights).features
    except Exception as e:  # no network, proxy, disk full: torch.hub raises many types
        raise UserError(f"could not download {IMAGENET_WEIGHTS} ({type(e).__name__}: {e}); offline, use "
                        "--weights PATH (a local VGG16 state dict) or --weights none (random init)") from None


def _check_imagenet_transforms(weights: VGG16_Weights) -> None:
    """The fast path plans with the constants of cache/identity.py; they must be what torchvision says."""
    t = weights.transforms()
    found = (list(t.resize_size), list(t.crop_size), tuple(t.mean), tuple(t.std))
    expected = ([IMAGENET_RESIZE], [IMAGENET_CROP], IMAGENET_MEAN, IMAGENET_STD)
    if found != expected:
        raise RuntimeError(f"torchvision's {IMAGENET_WEIGHTS} transforms changed: {found} != {expected}")


def _load_state_dict(layers: nn.Sequential, path: Path) -> None:
    """A full VGG16 state dict, or one holding only `features.*` (or the bare Sequential's keys)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"--weights {path}: not a loadable torch state dict ({_load_failure(e, path)})") from None
    if not isinstance(state, dict):
        raise UserError(f"--weights {path}: expected a state dict, found a {type(state).__name__}")
    body = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")} or state
    try:
        layers.load_state_dict(body, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise UserError(f"--weights {path}: not VGG16 convolution weights ({first})") from None


def _load_failure(e: Exception, path: Path) -> str:
    """One line on why torch.load refused a file; never torch's advice to retry with weights_only=False."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save writes a zip archive (a pickle before torch 1.6)
        return "it is not a torch file (torch.save writes a zip archive)" if head else "the file is empty"
    if "Weights only load failed" in str(e):
        return ("it is not a plain state dict of tensors: a file holding other pickled Python objects is never "
                "loaded, as they could run code")
    return f"{type(e).__name__}: {first_line(e, 'the file is empty or truncated')[:200]}"


def build_body(feature_cfg: FeatureConfig, weights: str) -> VGG16Body:
    """The frozen, eval-mode body for a feature config; `weights` is the user's spec (imagenet|none|path)."""
    identity = weights_identity(weights)
    if identity != feature_cfg.weights_id:
        raise UserError(f"weights {weights!r} are {identity}, but the features were made with {feature_cfg.weights_id}")
    layers = vgg16_features(weights)[:pools.LAYERS[feature_cfg.layer].end]
    body = VGG16Body(layers, feature_cfg.pool, feature_cfg.mean, feature_cfg.std, flip=feature_cfg.flip)
    body.requires_grad_(False)
    return body.eval()


def rebuilt_extractor(fcfg: FeatureConfig, weights_file: str | None, weights: str | None, extracted_at: str | None,
                      device: str = "auto", precision: str = "auto") -> "Extractor":
    """The extractor that made features of `fcfg`, made again for new images (predict, serve, similar): the same
    weights (`weights` when the recorded `weights_file` has moved; checked by hash) and, unless `precision` says
    otherwise, the precision the features were extracted at (fp32 or bf16), so that a cached image gives its own
    row again."""
    if precision == "auto" and extracted_at in ("fp32", "bf16"):
        precision = extracted_at
    return Extractor(build_body(fcfg, weights_spec(fcfg.weights_id, weights_file, weights)), device, precision)


def as_stored(rows: np.ndarray, fcfg: FeatureConfig) -> np.ndarray:
    """Feature rows rounded through the cache's storage dtype, as float32: what a cache holds of such an image."""
    return rows.astype(fcfg.dtype).astype(np.float32)


class Extractor:
    """A body placed on its device: uint8 image batches in, float32 numpy features out."""

    def __init__(self, body: VGG16Body, device: str = "auto", precision: str = "auto", fixed_shapes: bool = True):
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        if self.device.type == "cuda" and fixed_shapes:  # multi-scale views change shape with every image
            torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels once
        self.body = body.to(self.device, memory_format=torch.channels_last).eval()

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor | list[list[torch.Tensor]]) -> np.ndarray:
        """A batch (B, 3, H, W) -> (B, D); or, for multi-scale features, per image its list of whole images at each
        scale (shapes differ: one forward each) -> the mean of their pooled features."""
        if isinstance(images, list):
            return np.stack([np.mean([self._forward(scaled[None])[0] for scaled in views], 0) for views in images])
        return self._forward(images)

    def _forward(self, images: torch.Tensor) -> np.ndarray:
        x = images.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.precision):
            y = self.body(x)
        return y.float().cpu().numpy()
