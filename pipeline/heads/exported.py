"""The heads as torch modules, for `pipeline export`: the same probabilities as their numpy `predict_proba`.

Imported only by a head's `as_module()` (torch is imported here at the top: nothing else needs this module).
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.cache.identity import VGG16_CHANNELS
from pipeline.heads.normalise import row_normalised_tensor


def register_layers(module: torch.nn.Module, layers, dtype) -> None:
    """(weight, bias) pairs as the buffers w0, b0, w1, b1, ... of a torch module (an exported head's)."""
    for k, (w, b) in enumerate(layers):
        module.register_buffer(f"w{k}", torch.as_tensor(np.asarray(w, dtype)))
        module.register_buffer(f"b{k}", torch.as_tensor(np.asarray(b, dtype)))


class AffineHead(torch.nn.Module):
    """A logreg or linear head: affine layers (ReLU between them), softmax (a sigmoid for logreg's one-row binary
    weights); in float64 after the row normalisation, as predict_proba computes it (the folded standardisation
    makes large weights, whose float32 products would be off by 1e-4)."""

    def __init__(self, norm: str, layers):
        super().__init__()
        register_layers(self, layers, np.float64)
        self.norm, self.n = norm, len(layers)

    def forward(self, x):
        x = row_normalised_tensor(x, self.norm).double()
        for k in range(self.n):
            x = x @ getattr(self, f"w{k}").T + getattr(self, f"b{k}")
            if k < self.n - 1:
                x = torch.relu(x)
        if x.shape[1] == 1:  # scikit-learn's binary logistic regression: one row, for the second class
            p = torch.sigmoid(x)
            return torch.cat([1 - p, p], dim=1).float()
        return torch.softmax(x, dim=1).float()


class KnnModule(torch.nn.Module):
    """KnnHead.predict_proba, in float64 as there (a neighbour's rank must not change); it carries the training
    rows."""

    def __init__(self, norm: str, mean, scale, train, train_labels, n_classes: int, k: int, temperature: float):
        super().__init__()
        self.norm, self.k, self.temperature = norm, k, temperature
        self.register_buffer("mean", torch.as_tensor(np.asarray(mean, np.float64)))
        self.register_buffer("scale", torch.as_tensor(np.asarray(scale, np.float64)))
        self.register_buffer("rows", torch.as_tensor(np.asarray(train, np.float64)))
        self.register_buffer("votes", torch.eye(n_classes, dtype=torch.float64)[torch.as_tensor(train_labels)])

    def forward(self, x):
        z = (row_normalised_tensor(x, self.norm).double() - self.mean) / self.scale
        q = (z / torch.linalg.vector_norm(z, dim=1, keepdim=True).clamp(min=1e-12)).float().double()
        sims, top = torch.topk(q @ self.rows.T, self.k, dim=1)
        weights = torch.exp((sims - 1) / self.temperature)  # (n, k)
        proba = (weights.unsqueeze(2) * self.votes[top]).sum(1)
        return (proba / proba.sum(1, keepdim=True)).float()


class Block5Module(torch.nn.Module):
    """Block5Head.predict_proba on flattened pool4 rows: block 5, global average pooling, the classifier."""

    def __init__(self, layers, side: int):
        super().__init__()
        register_layers(self, layers, np.float32)
        self.side = side

    def forward(self, rows):
        x = rows.reshape(-1, VGG16_CHANNELS, self.side, self.side)
        for k in range(3):
            x = torch.relu(torch.nn.functional.conv2d(x, getattr(self, f"w{k}"), getattr(self, f"b{k}"), padding=1))
        x = torch.nn.functional.max_pool2d(x, 2).mean((2, 3))
        return torch.softmax(x @ self.w3.T + self.b3, dim=1)
