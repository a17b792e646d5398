"""How a (B, C, h, w) convolutional map becomes one vector per image: each pooling is one registry entry.

An entry names the pooling and says how many C-sized vectors it yields for a map of side `side`, so a cache's row
size is known without torch; it computes the pooling in numpy, at head time, from a cached map (`extract --pool
map`), so that one extraction serves every pooling. The same poolings in torch, run at extraction, are
backbone/torch_pools.py's, by the same names; the two agree to float rounding (a test). The layers a cache can hold
(pool5, pool4) are declared here too.

Adaptive pooling cuts an h-long axis into n bins as torch does: bin i covers [floor(i*h/n), ceil((i+1)*h/n)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

FLATTEN_GRID = 7  # torchvision's VGG avgpool: AdaptiveAvgPool2d((7, 7)), the input of the original classifier
SPP_LEVELS = (1, 2, 4)  # spatial pyramid: average over the whole map, a 2x2 and a 4x4 grid (1 + 4 + 16 cells)


@dataclass(frozen=True)
class Layer:
    """A layer of VGG16's body a cache can hold: where it is taken and what it feeds."""

    name: str
    stride: int  # after n 2x2 max-pools a crop of side s gives a map of side s // 2**n
    end: int | None  # its output is that of torchvision's vgg16().features[:end] (None: the whole body)
    feeds_block5: bool  # the input of block 5: a map of it is what the block5 head fine-tunes on
    description: str


LAYERS: dict[str, Layer] = {l.name: l for l in (
    Layer("pool5", 32, None, False, "the body's output"),
    # torchvision's vgg16().features: blocks 1-4 end with the max-pool at index 23; block 5 is 24..30
    Layer("pool4", 16, 24, True, "the input of block 5 (512 x 14 x 14 at 224)"),
)}
BLOCK5_INPUT = next(layer for layer in LAYERS.values() if layer.feeds_block5)


@dataclass(frozen=True)
class Pool:
    name: str
    cells: Callable[[int], int]  # map side -> output size / channels
    description: str
    numpy_apply: Callable | None  # (B, C, h, w) float32 array -> (B, cells * C); None: not computable from a map
    keeps_map: bool = False  # the map itself, pooled later (at head time) by any entry that is `at_head`

    def dim(self, channels: int, side: int = FLATTEN_GRID) -> int:
        return self.cells(side) * channels

    @property
    def at_head(self) -> bool:
        """Can be computed at head time from a map cache."""
        return self.numpy_apply is not None


def map_side(image_size: int, layer: str = "pool5") -> int:
    """Side of the layer's map for a square crop (floor-halvings: floor(s / 32) at pool5, floor(s / 16) at pool4)."""
    return image_size // LAYERS[layer].stride


def _bins(length: int, n: int) -> list[tuple[int, int]]:
    return [((i * length) // n, math.ceil((i + 1) * length / n)) for i in range(n)]


def adaptive_avg(fmap: np.ndarray, n: int) -> np.ndarray:
    """torch's adaptive_avg_pool2d(fmap, n) in numpy: (B, C, h, w) -> (B, C, n, n), float32, as one matrix product
    of the maps, flattened, with the bins' averaging weights (`cells`): every bin of every map at once, at the speed
    of one large product (a 4,000-row pyramid pooled in 0.1 s, not the 0.9 s of a product per map)."""
    h, w = fmap.shape[2:]
    fmap = np.asarray(fmap, np.float32)
    if (h, w) == (n, n):  # one cell per bin (a 7 x 7 map flattened): the map itself
        return fmap
    b, c = fmap.shape[:2]
    return (fmap.reshape(b * c, h * w) @ cells(h, w, n).T).reshape(b, c, n, n)


def cells(h: int, w: int, n: int) -> np.ndarray:
    """(n * n, h * w): row (i, j) averages bin i of the rows and bin j of the columns of an h x w map."""
    return np.kron(averaging(h, n), averaging(w, n))


def averaging(length: int, n: int) -> np.ndarray:
    """(n, length): row i averages bin i of `_bins`."""
    matrix = np.zeros((n, length), np.float32)
    for i, (start, stop) in enumerate(_bins(length, n)):
        matrix[i, start:stop] = 1.0 / (stop - start)
    return matrix


def _np_avg(fmap):
    b, c, h, w = fmap.shape  # a product with the averaging weights: 8x the speed of .mean
    return (np.asarray(fmap, np.float32).reshape(b * c, h * w) @ np.full(h * w, 1 / (h * w), np.float32)).reshape(b, c)


def _np_max(fmap):
    b, c = fmap.shape[:2]
    return np.asarray(fmap, np.float32).reshape(b, c, -1).max(-1)


def _np_avgmax(fmap):
    return np.concatenate([_np_avg(fmap), _np_max(fmap)], 1)


def _np_flatten(fmap):
    return adaptive_avg(fmap, FLATTEN_GRID).reshape(len(fmap), -1)


def _np_spp(fmap):
    return np.concatenate([adaptive_avg(fmap, n).reshape(len(fmap), -1) for n in SPP_LEVELS], 1)


POOLS: dict[str, Pool] = {p.name: p for p in (
    Pool("avg", lambda s: 1, "global average", _np_avg),
    Pool("max", lambda s: 1, "global max", _np_max),
    Pool("avgmax", lambda s: 2, "global average and max, concatenated", _np_avgmax),
    Pool("flatten", lambda s: FLATTEN_GRID**2, "7x7 adaptive average, flattened: the input of VGG16's classifier",
         _np_flatten),
    Pool("spp", lambda s: sum(n * n for n in SPP_LEVELS), "spatial pyramid: averages over 1x1, 2x2 and 4x4 grids",
         _np_spp),
    Pool("map", lambda s: s * s, "the pool5 map itself (C x h x w, h = w = crop / 32): pool at head time", None,
         keeps_map=True),
)}
HEAD_POOLS = tuple(name for name, p in POOLS.items() if p.at_head)  # what a map cache can be pooled to


def get(name: str) -> Pool:
    return POOLS[name]


def from_map(name: str, channels: int, side: int) -> Callable[[np.ndarray], np.ndarray]:
    """Rows of a map cache (N, channels * side * side) -> rows pooled by `name`, as float32."""
    apply = POOLS[name].numpy_apply

    def transform(rows: np.ndarray) -> np.ndarray:
        return apply(np.asarray(rows, np.float32).reshape(len(rows), channels, side, side))

    return transform
