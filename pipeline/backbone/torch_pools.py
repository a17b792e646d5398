"""The poolings of the registry (cache/pools.py) in torch, by the same names: what the body runs at extraction.

`TORCH_POOLS[name]` maps a (B, C, h, w) map to (B, cells * C) rows, as `pools.POOLS[name].numpy_apply` does at
head time from a cached map (they agree to float rounding: a test). `exportable(name)` is the same computation with
every adaptive average written as two products with bin-averaging matrices: the same values, and exportable to
ONNX, whose AveragePool needs bins that divide the map.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from pipeline.cache.pools import FLATTEN_GRID, POOLS, SPP_LEVELS, averaging


def _avg(fmap):
    return F.adaptive_avg_pool2d(fmap, 1).flatten(1)


def _max(fmap):
    return F.adaptive_max_pool2d(fmap, 1).flatten(1)


def _avgmax(fmap):
    return torch.cat([_avg(fmap), _max(fmap)], dim=1)


def _flatten(fmap):
    return F.adaptive_avg_pool2d(fmap, FLATTEN_GRID).flatten(1)  # torchvision's own avgpool + flatten


def _spp(fmap):
    return torch.cat([F.adaptive_avg_pool2d(fmap, n).flatten(1) for n in SPP_LEVELS], dim=1)


def _map(fmap):
    return fmap.flatten(1)  # row-major (C, h, w): a row reshapes to the map


TORCH_POOLS: dict[str, Callable] = {"avg": _avg, "max": _max, "avgmax": _avgmax, "flatten": _flatten, "spp": _spp,
                                    "map": _map}
assert set(TORCH_POOLS) == set(POOLS), "every pooling of the registry has its torch computation"


def _adaptive_by_products(fmap, n: int):
    h, w = fmap.shape[2:]
    if (h, w) == (n, n):
        return fmap
    rows, cols = (torch.from_numpy(averaging(length, n)).to(fmap.dtype) for length in (h, w))
    return rows @ (fmap @ cols.T)


def exportable(name: str) -> Callable:
    """`TORCH_POOLS[name]` with every adaptive average as two products with bin-averaging matrices."""
    grids = {"flatten": (FLATTEN_GRID,), "spp": SPP_LEVELS}
    if name not in grids:
        return TORCH_POOLS[name]
    return lambda fmap: torch.cat([_adaptive_by_products(fmap, n).flatten(1) for n in grids[name]], dim=1)
