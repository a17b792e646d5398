"""The linear head: a torch linear layer (or one hidden layer with dropout) on standardised features, AdamW, a
cosine schedule and early stopping on a held-out `validation_fraction` of the training rows; the settings of a
sweep trained together as one wide module (wide.py).
"""

from __future__ import annotations

import numpy as np
from sklearn.base import clone
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from pipeline.heads.base import Head, checked_array, fit_inputs, softmax_rows
from pipeline.heads.holdout import hold_out, streamed_hold_out, with_views
from pipeline.heads.normalise import moments, row_normalised, standardised32


class LinearHead(Head):
    """A torch `nn.Linear` (or Linear-ReLU-Dropout-Linear with `hidden`) on features standardised with train stats.

    Early stopping holds out a stratified `validation_fraction` of the training rows and keeps the weights of the
    epoch with the lowest loss on them, stopping after `patience` epochs without a better one
    (`patience=None`: no hold-out, all `epochs` on every row).
    """

    def __init__(self, hidden: int = 0, dropout: float = 0.5, lr: float = 1e-3, weight_decay: float = 1e-2,
                 norm: str = "standard", epochs: int = 200, batch_size: int = 256, patience: int | None = 15,
                 validation_fraction: float = 0.1, seed: int = 0, device: str = "auto"):
        self.hidden, self.dropout, self.lr, self.weight_decay, self.norm = hidden, dropout, lr, weight_decay, norm
        self.epochs, self.batch_size, self.seed, self.device = epochs, batch_size, seed, device
        self.patience, self.validation_fraction = patience, validation_fraction

    def fit(self, X, y, views=None) -> "LinearHead":
        self._fit_together([self], X, y, views)
        return self

    def fit_many(self, X, y, settings: list[dict], views=None):
        """(settings, fitted head) for each of `settings` (learning rate, weight decay: what a sweep varies), the
        heads trained together as one wide module (wide.py): one matrix product of each batch serves them all."""
        heads = [clone(self).set_params(**params) for params in settings]
        self._fit_together(heads, X, y, views)
        yield from zip(settings, heads)

    def fit_rows(self, rows) -> "LinearHead":
        next(self.fit_rows_many(rows, [{}]))
        return self

    def fit_rows_many(self, rows, settings: list[dict]):
        """`fit_many` for a split read from the cache as it trains (`stream.SplitRows`): memory stays one block, the
        held-out set (for early stopping) is at most `MAX_HELD_OUT_BYTES`, statistics take one streaming pass; every
        configuration trains on each block as it is read."""
        heads = [self] if settings == [{}] else [clone(self).set_params(**params) for params in settings]
        y = rows.labels
        check_classification_targets(y)
        classes = np.unique(y)
        if len(classes) < 2:
            raise ValueError(f"{type(self).__name__} needs samples of at least 2 classes, got one class")
        fraction = None if self.patience is None else self.validation_fraction
        train, held = streamed_hold_out(y, rows.dim, fraction, self.seed)
        mean, scale = self._fitted_statistics(lambda: rows.moments(train), rows.dim)
        for head in heads:
            head.classes_, head.n_features_in_, head.mean_, head.scale_ = classes, rows.dim, mean, scale
        device, tensor, labels = self._converters(mean, scale, classes)
        rng = np.random.default_rng(self.seed)
        batches = lambda: ((tensor(X), labels(y[i])) for X, i in rows.shuffled(train, self.batch_size, rng))
        held_out = None if held is None else (tensor(rows.take(held)), labels(y[held]))
        _train_together(heads, len(train), batches, held_out, device)
        yield from zip(settings, heads)

    def _fit_together(self, heads: list["LinearHead"], X, y, views) -> None:
        """Fit `heads` (this head's settings but for learning rate and weight decay) on the same rows."""
        import torch

        X, y = fit_inputs(self, X, y)
        X, Xv, y, yv = self._hold_out(X, y, views)
        mean, scale = self._fitted_statistics(lambda: moments(row_normalised(X, self.norm)), X.shape[1])
        for head in heads:
            head.classes_, head.n_features_in_, head.mean_, head.scale_ = self.classes_, X.shape[1], mean, scale
        device, tensor, labels = self._converters(mean, scale, self.classes_)
        Xt, yt = tensor(X), labels(y)  # the whole split on the device, standardised once
        gen = torch.Generator().manual_seed(self.seed)
        batches = lambda: ((Xt[i], yt[i]) for i in torch.randperm(len(Xt), generator=gen).to(device).split(self.batch_size))
        _train_together(heads, len(X), batches, (tensor(Xv), labels(yv)) if Xv is not None else None, device)

    def _fitted_statistics(self, moments_of, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """(mean, scale) after the row-wise normalisation: `moments_of()` the training rows for `standard`."""
        if self.norm != "standard":
            row_normalised(np.zeros((1, 1), np.float32), self.norm)  # an unknown norm is refused before training
            return np.zeros(dim), np.ones(dim)
        mean, std = moments_of()
        return mean, std + 1e-6

    def _converters(self, mean, scale, classes):
        import torch

        from pipeline.device import resolve_device

        device = resolve_device(self.device)
        tensor = lambda a: torch.from_numpy(standardised32(row_normalised(a, self.norm), mean, scale)).to(device)
        labels = lambda a: torch.from_numpy(np.searchsorted(classes, a)).long().to(device)
        return device, tensor, labels

    def _hold_out(self, X, y, views):
        if self.patience is None:
            X, y = with_views(X, y, views)
            return X, None, y, None
        return hold_out(X, y, self.validation_fraction, self.seed, views)

    def _logits(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=[np.float32, np.float64])
        return self._logits_of_normalised(row_normalised(X, self.norm))

    def proba_of_normalised(self, R: np.ndarray) -> np.ndarray:
        """predict_proba of rows already validated and row-normalised by `norm` (a sweep normalises its validation
        rows once)."""
        return softmax_rows(self._logits_of_normalised(R))

    def _logits_of_normalised(self, R: np.ndarray) -> np.ndarray:
        x = (np.asarray(R, np.float64) - self.mean_) / self.scale_
        for k, (w, b) in enumerate(self.layers_):
            x = x @ w.T + b
            if k < len(self.layers_) - 1:
                x = np.maximum(x, 0)  # dropout is the identity at inference
        return x

    def predict_proba(self, X) -> np.ndarray:
        return softmax_rows(self._logits(X))

    def as_module(self):
        """predict_proba as a torch module (float32), for `pipeline export`."""
        check_is_fitted(self)
        first_w, first_b = self.layers_[0]  # the standardisation folded into the first layer
        folded = [(first_w / self.scale_, first_b - (first_w / self.scale_) @ self.mean_), *self.layers_[1:]]
        from pipeline.heads.exported import AffineHead

        return AffineHead(self.norm, folded)

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {"mean": self.mean_, "scale": self.scale_, "n_iter": np.array(self.n_iter_),
               "best_epoch": np.array(self.best_epoch_), "best_val_loss": np.array(self.best_val_loss_)}
        for k, (w, b) in enumerate(self.layers_):
            out[f"layer{k}_weight"], out[f"layer{k}_bias"] = w, b
        return out

    def set_arrays(self, a: dict[str, np.ndarray]) -> None:
        d, k = self.n_features_in_, len(self.classes_)
        self.mean_, self.scale_ = checked_array(a, "mean", (d,)), checked_array(a, "scale", (d,), positive=True)
        self.n_iter_, self.best_epoch_ = int(checked_array(a, "n_iter", ())), int(checked_array(a, "best_epoch", ()))
        self.best_val_loss_ = float(checked_array(a, "best_val_loss", (), finite=False))
        widths = [d, self.hidden, k] if self.hidden else [d, k]
        self.layers_ = [(checked_array(a, f"layer{i}_weight", (n_out, n_in)), checked_array(a, f"layer{i}_bias", (n_out,)))
                        for i, (n_in, n_out) in enumerate(zip(widths, widths[1:]))]


def mlp_module(n_in: int, hidden: int, dropout: float, n_out: int):
    from torch import nn

    if not hidden:
        return nn.Linear(n_in, n_out)
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, n_out))


def _train_together(heads: list[LinearHead], n_rows: int, batches, held_out, device) -> None:
    """Train `heads` (the same but for lr and weight decay) as one wide module (wide.py): AdamW + cosine decay over
    `batches()` each epoch, early stopping per head on the held-out set; sets each head's layers_ and counters."""
    import torch

    from pipeline.heads import wide

    first = heads[0]
    torch.manual_seed(first.seed)
    template = mlp_module(first.n_features_in_, first.hidden, first.dropout, len(first.classes_))  # every head's start
    model = wide.WideModel(template.to(device), len(heads), first.dropout)
    total = first.epochs * -(-n_rows // first.batch_size)
    opt = wide.WideAdamW(model.params, np.array([h.lr for h in heads]), np.array([h.weight_decay for h in heads]), total)
    results = wide.train(model, opt, batches, held_out, first.epochs, first.patience)
    for head, (layers, ran, best_epoch, best_loss) in zip(heads, results):
        head.layers_, head.n_iter_, head.best_epoch_, head.best_val_loss_ = layers, ran, best_epoch, best_loss
