"""How a (B, C, h, w) convolutional map becomes one vector per image: each pooling is one registry entry.

An entry names the pooling, says how many C-sized vectors it yields (so its output size is known without torch)
and computes it. torch is imported inside the functions only: planning an extraction must not import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

FLATTEN_GRID = 7  # torchvision's VGG avgpool: AdaptiveAvgPool2d((7, 7)), the input of the original classifier


@dataclass(frozen=True)
class Pool:
    name: str
    cells: int  # output size = cells * channels
    description: str
    apply: Callable  # (B, C, h, w) tensor -> (B, cells * C) tensor

    def dim(self, channels: int) -> int:
        return self.cells * channels


def _avg(fmap):
    import torch.nn.functional as F

    return F.adaptive_avg_pool2d(fmap, 1).flatten(1)


def _max(fmap):
    import torch.nn.functional as F

    return F.adaptive_max_pool2d(fmap, 1).flatten(1)


def _avgmax(fmap):
    import torch

    return torch.cat([_avg(fmap), _max(fmap)], dim=1)


def _flatten(fmap):
    import torch.nn.functional as F

    return F.adaptive_avg_pool2d(fmap, FLATTEN_GRID).flatten(1)  # torchvision's own avgpool + flatten


POOLS: dict[str, Pool] = {p.name: p for p in (
    Pool("avg", 1, "global average", _avg),
    Pool("max", 1, "global max", _max),
    Pool("avgmax", 2, "global average and max, concatenated", _avgmax),
    Pool("flatten", FLATTEN_GRID**2, "7x7 adaptive average, flattened: the input of VGG16's classifier", _flatten),
)}


def get(name: str) -> Pool:
    return POOLS[name]
