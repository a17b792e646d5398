"""Fine-tuning VGG16's last block on a cached pool4 map: the `block5` head.

Blocks 1-4 are frozen anyway, so their output (pool4, 512 x 14 x 14 at 224 px) is cached once (`extract --layer
pool4 --pool map`) and block 5 (conv5_1..conv5_3, initialised from the very weights the cache was made with) plus
global average pooling and a linear classifier are trained on it: about a tenth of a VGG16 forward-backward per
image per epoch, instead of the whole network every epoch.

Training: AdamW (the new classifier at 10x the learning rate of the pretrained convolutions), a linear warm-up
over the first epoch then cosine decay, early stopping on a held-out `validation_fraction` of the training rows
(the weights of the epoch with the lowest held-out loss are kept), `freeze_convs` of the three convolutions kept
frozen, bf16 autocast where the device has it (as extract). The learned state is plain arrays (`to_arrays`).
A cache over the memory budget is streamed (`fit_rows`): a pool4 row is 200 KB in float16 at 224 px.
"""

from __future__ import annotations

import contextlib
import copy
import math

import numpy as np
from sklearn.utils.validation import check_is_fitted, validate_data

from pipeline.cache.identity import VGG16_CHANNELS
from pipeline.heads.base import Head, checked_array, fit_inputs, softmax_rows
from pipeline.heads.holdout import hold_out, streamed_hold_out, with_views

HEAD_LR_FACTOR = 10  # the new classifier learns from scratch: 10x the pretrained convolutions' learning rate
PREDICT_ROWS = 64


def block5(weights: str):
    """VGG16's block 5 (conv5_1, relu, conv5_2, relu, conv5_3, relu, pool5) with the weights `weights` names."""
    from pipeline.backbone.vgg16 import vgg16_features
    from pipeline.cache.pools import BLOCK5_INPUT

    return vgg16_features(weights)[BLOCK5_INPUT.end:]


class Block5Head(Head):
    """Block 5 + global average pooling + a linear layer, trained on pool4 rows (flattened (512, s, s) maps)."""

    def __init__(self, weights: str = "none", lr: float = 1e-4, weight_decay: float = 1e-4, epochs: int = 30,
                 batch_size: int = 32, patience: int | None = 5, validation_fraction: float = 0.1,
                 freeze_convs: int = 0, seed: int = 0, device: str = "auto"):
        self.weights, self.lr, self.weight_decay, self.epochs, self.batch_size = weights, lr, weight_decay, epochs, batch_size
        self.patience, self.validation_fraction, self.freeze_convs = patience, validation_fraction, freeze_convs
        self.seed, self.device = seed, device

    def fit(self, X, y, views=None) -> "Block5Head":
        """`views`: augmented views of X's first rows (n, K, D) (`extract --augment`), trained on beside their source."""
        import torch

        X, y = fit_inputs(self, X, y)
        side = _side(X.shape[1])
        held = None
        if self.patience is not None:
            X, Xv, y, yv = hold_out(X, y, self.validation_fraction, self.seed, views)
            held = (Xv, yv)
        else:
            X, y = with_views(X, y, views)
        device, precision, module = self.mlp_module(side)
        gen = np.random.default_rng(self.seed)
        labels = np.searchsorted(self.classes_, y)

        def batches():
            for rows in np.array_split(gen.permutation(len(X)), max(1, math.ceil(len(X) / self.batch_size))):
                yield _tensor(X[rows], side, device), torch.from_numpy(labels[rows]).to(device)

        held_out = None if held is None else (_tensor(held[0], side, device),
                                              torch.from_numpy(np.searchsorted(self.classes_, held[1])).to(device))
        self.n_iter_, self.best_epoch_, self.best_val_loss_ = _train(self, module, len(X), batches, held_out, device, precision)
        self.layers_ = _arrays_of(module)
        return self

    def fit_rows(self, rows) -> "Block5Head":
        """`fit` for a pool4 split read from the cache as it trains (`stream.SplitRows`): memory holds one block of
        rows and the held-out set (at most `MAX_HELD_OUT_BYTES`), never the split."""
        import torch

        y = rows.labels
        self.classes_, self.n_features_in_ = np.unique(y), rows.dim
        if len(self.classes_) < 2:
            raise ValueError(f"{type(self).__name__} needs samples of at least 2 classes, got one class")
        side, labels = _side(rows.dim), np.searchsorted(self.classes_, y)
        fraction = None if self.patience is None else self.validation_fraction
        train, held = streamed_hold_out(y, rows.dim, fraction, self.seed)
        device, precision, module = self.mlp_module(side)
        rng = np.random.default_rng(self.seed)
        batches = lambda: ((_tensor(X, side, device), torch.from_numpy(labels[i]).to(device))
                           for X, i in rows.shuffled(train, self.batch_size, rng))
        held_out = None if held is None else (_tensor(rows.take(held), side, device), torch.from_numpy(labels[held]).to(device))
        self.n_iter_, self.best_epoch_, self.best_val_loss_ = _train(self, module, len(train), batches, held_out, device, precision)
        self.layers_ = _arrays_of(module)
        return self

    def mlp_module(self, side: int):
        import torch

        from pipeline.device import resolve_device, resolve_precision

        device = resolve_device(self.device)
        torch.manual_seed(self.seed)
        module = torch.nn.Sequential(block5(self.weights), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                     torch.nn.Linear(VGG16_CHANNELS, len(self.classes_)))
        convs = [m for m in module[0] if isinstance(m, torch.nn.Conv2d)]
        for conv in convs[:self.freeze_convs]:
            conv.requires_grad_(False)
        return device, resolve_precision("auto", device), module.to(device)

    def predict_proba(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=[np.float32, np.float64])
        return softmax_rows(self._logits(np.asarray(X, np.float32)))

    def _logits(self, X: np.ndarray) -> np.ndarray:
        """numpy in, numpy out: the forward of the learned arrays, in float32 on the CPU."""
        import torch
        import torch.nn.functional as F

        side, out = _side(X.shape[1]), []
        w = [torch.from_numpy(np.asarray(a, np.float32)) for pair in self.layers_ for a in pair]
        with torch.inference_mode():
            for start in range(0, len(X), PREDICT_ROWS):
                x = _tensor(X[start:start + PREDICT_ROWS], side, "cpu")
                for k in range(3):
                    x = F.relu(F.conv2d(x, w[2 * k], w[2 * k + 1], padding=1))
                x = F.max_pool2d(x, 2).mean((2, 3))
                out.append((x @ w[6].T + w[7]).double().numpy())
        return np.concatenate(out) if out else np.empty((0, len(self.classes_)))

    def as_module(self):
        """predict_proba as a torch module on flattened pool4 rows (block 5, pooling, the classifier), for export."""
        from pipeline.heads.exported import Block5Module

        check_is_fitted(self)
        return Block5Module(self.layers_, _side(self.n_features_in_))

    def to_arrays(self) -> dict[str, np.ndarray]:
        names = ("conv5_1", "conv5_2", "conv5_3", "fc")
        out = {"n_iter": np.array(self.n_iter_), "best_epoch": np.array(self.best_epoch_),
               "best_val_loss": np.array(self.best_val_loss_)}
        for name, (w, b) in zip(names, self.layers_):
            out[f"{name}_weight"], out[f"{name}_bias"] = w, b
        return out

    def set_arrays(self, a: dict[str, np.ndarray]) -> None:
        c, k = VGG16_CHANNELS, len(self.classes_)
        _side(self.n_features_in_)
        shapes = {"conv5_1": (c, c, 3, 3), "conv5_2": (c, c, 3, 3), "conv5_3": (c, c, 3, 3), "fc": (k, c)}
        self.layers_ = [(checked_array(a, f"{n}_weight", s).astype(np.float32), checked_array(a, f"{n}_bias", s[:1]).astype(np.float32))
                        for n, s in shapes.items()]
        self.n_iter_, self.best_epoch_ = int(checked_array(a, "n_iter", ())), int(checked_array(a, "best_epoch", ()))
        self.best_val_loss_ = float(checked_array(a, "best_val_loss", (), finite=False))


def _side(dim: int) -> int:
    side = math.isqrt(dim // VGG16_CHANNELS)
    if side < 2 or VGG16_CHANNELS * side * side != dim:
        raise ValueError(f"rows of {dim} features are not pool4 maps (512 x s x s, s >= 2): extract --layer pool4 --pool map")
    return side


def _tensor(rows: np.ndarray, side: int, device):
    import torch

    return torch.from_numpy(np.ascontiguousarray(rows, np.float32).reshape(-1, VGG16_CHANNELS, side, side)).to(device)


def _arrays_of(module) -> list[tuple[np.ndarray, np.ndarray]]:
    import torch

    layers = [m for m in module.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    return [(m.weight.detach().float().cpu().numpy(), m.bias.detach().float().cpu().numpy()) for m in layers]


def _train(head: Block5Head, module, n_rows: int, batches, held_out, device, precision) -> tuple[int, int, float]:
    """AdamW (the classifier at HEAD_LR_FACTOR x lr), warm-up then cosine, early stopping (`run_epochs`)."""
    import torch

    from pipeline.device import autocast

    convs = [p for p in module[0].parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": convs, "lr": head.lr},
                             {"params": module[3].parameters(), "lr": head.lr * HEAD_LR_FACTOR}],
                            weight_decay=head.weight_decay)
    steps_per_epoch = max(1, math.ceil(n_rows / head.batch_size))
    total, warmup = head.epochs * steps_per_epoch, steps_per_epoch
    schedule = lambda step: (step + 1) / warmup if step < warmup else \
        0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    return run_epochs(module, opt, sched, batches, held_out, head.epochs, head.patience,
                      lambda: autocast(device, precision))


def run_epochs(module, opt, sched, batches, held_out, epochs: int, patience: int | None,
               context=contextlib.nullcontext) -> tuple[int, int, float]:
    """The block5 head's training loop: `batches()` each epoch, a step of `sched` per batch, `context()` around
    every forward (autocast); with a held-out set, keep the weights of the epoch with its lowest loss and stop after
    `patience` epochs without a better one. Returns (epochs run, best epoch, its held-out loss)."""
    import torch
    import torch.nn.functional as F

    best, epoch = (float("inf"), 0, copy.deepcopy(module.state_dict())), 0
    for epoch in range(1, epochs + 1):
        module.train()
        for xb, yb in batches():
            with context():
                loss = F.cross_entropy(module(xb).float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if held_out is None:
            continue
        module.eval()
        with torch.inference_mode(), context():
            val_loss = F.cross_entropy(module(held_out[0]).float(), held_out[1]).item()
        if val_loss < best[0] - 1e-5:
            best = (val_loss, epoch, copy.deepcopy(module.state_dict()))
        elif epoch - best[1] >= patience:
            break
    if held_out is None:
        return epoch, epoch, float("nan")
    module.load_state_dict(best[2])
    return epoch, best[1], best[0]
