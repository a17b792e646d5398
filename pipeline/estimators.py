"""The estimators behind the heads registry (heads.py): scikit-learn's contract, learned state as plain arrays.

`LogRegHead`: normalisation + multinomial logistic regression (scikit-learn's lbfgs fits it); `fit_path` fits a
whole grid of C along the regularisation path with warm starts, as the linear-probe protocol sweeps it.
`LinearHead`: a torch linear layer (or one hidden layer with dropout) trained with AdamW, a cosine schedule and
early stopping on a held-out `validation_fraction` of the training rows.
`KnnHead`: cosine k-nearest neighbours with similarity-weighted votes (no training: it keeps the training rows).

Every head takes a `norm` (NORMS): `standard` (per-feature standardisation with training statistics), `l2` (unit
rows) or `power` (signed square root, then unit rows): the usual fixes for the skewed, non-negative ReLU features.

Both predict with numpy from their learned arrays alone, so a head loaded from `head.npz` (read with
`allow_pickle=False`: a run folder can never run code) gives exactly the probabilities of the head that was fitted.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import warnings
import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from pipeline.heads import NORMS

log = logging.getLogger(__name__)

# The early-stopping rows of a streamed split are kept in memory: at most this many, and this many bytes of them (as
# float32), so that memory does not grow with the split (tests lower the bytes to see that at small sizes).
MAX_HELD_OUT_ROWS = 10_000
MAX_HELD_OUT_BYTES = int(os.environ.get("VGGCACHE_HELD_OUT_BYTES", str(64 << 20)))
NEWTON_HESSIAN_BYTES = 256 << 20  # logreg in the row space uses Newton steps while their Hessian stays this small


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def _moments(X: np.ndarray, rows_per_step: int = 1 << 14) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation over rows, in float64 sums taken a slice at a time (no full float64 copy)."""
    total, squares = np.zeros(X.shape[1]), np.zeros(X.shape[1])
    for start in range(0, len(X), rows_per_step):
        part = X[start:start + rows_per_step].astype(np.float64)
        total += part.sum(0)
        squares += (part * part).sum(0)
    mean = total / max(len(X), 1)
    return mean, np.sqrt(np.maximum(squares / max(len(X), 1) - mean * mean, 0))


def _standardised32(X: np.ndarray, mean: np.ndarray, scale: np.ndarray, rows_per_step: int = 1 << 14) -> np.ndarray:
    """(X - mean) / scale as float32, computed a slice at a time: training data is never copied in float64."""
    out = np.empty(X.shape, np.float32)
    for start in range(0, len(X), rows_per_step):
        out[start:start + rows_per_step] = _standardise(X[start:start + rows_per_step], mean, scale)
    return out


def _standardise(X: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return (np.asarray(X, np.float64) - mean) / scale



def row_normalised(X: np.ndarray, norm: str) -> np.ndarray:
    """The row-wise part of a normalisation: `l2` unit rows, `power` signed square root then unit rows, `standard`
    nothing (its per-feature statistics come from the training rows)."""
    if norm == "standard":
        return X
    if norm not in NORMS:
        raise ValueError(f"norm {norm!r} is not one of {', '.join(NORMS)}")
    X = np.asarray(X, np.float32)
    if norm == "power":
        X = np.sign(X) * np.sqrt(np.abs(X))
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def _statistics(X: np.ndarray, norm: str) -> tuple[np.ndarray, np.ndarray]:
    """(mean, scale) applied after the row-wise part: the training rows' own for `standard`, the identity else."""
    from sklearn.preprocessing import StandardScaler

    if norm != "standard":
        return np.zeros(X.shape[1]), np.ones(X.shape[1])
    scaler = StandardScaler().fit(X)
    return scaler.mean_.astype(np.float64), scaler.scale_.astype(np.float64)


def _prepared(X, mean, scale, norm: str) -> np.ndarray:
    return _standardise(row_normalised(X, norm), mean, scale)


def with_views(X, y, views):
    """X's rows, then the K augmented views of each of its first n rows (`views`: (n, K, D), `extract --augment`),
    with their source's label; X and y as they are when there are no views."""
    if views is None or not len(views):
        return X, y
    if views.ndim != 3 or views.shape[2] != X.shape[1] or len(views) > len(X):
        raise ValueError(f"views of shape {views.shape} do not go with {X.shape[0]} rows of {X.shape[1]} features "
                         "(expected (n <= rows, K, features))")
    n, k, d = views.shape
    return np.concatenate([np.asarray(X, np.float32), views.reshape(n * k, d)]), np.concatenate([y, np.repeat(y[:n], k)])


def hold_out(X, y, fraction: float, seed: int, views=None):
    """(X_fit, X_held, y_fit, y_held): a stratified, seeded `fraction` held out for early stopping (at random when a
    class has too few rows to stratify). `views` (of X's first rows, see `with_views`) join their source on the fit
    side, never the held-out one: the held-out set is centre crops of images the head does not train on."""
    rows = np.arange(len(y))
    try:
        fit, held = train_test_split(rows, test_size=fraction, stratify=y, random_state=seed)
    except ValueError:  # too few rows of a class to stratify: hold out at random
        fit, held = train_test_split(rows, test_size=fraction, random_state=seed)
    if views is not None:
        with_source = fit < len(views)
        fit = np.concatenate([fit[with_source], fit[~with_source]])  # rows with views first, as with_views pairs them
        views = views[fit[:with_source.sum()]]
    X_fit, y_fit = with_views(X[fit], y[fit], views)
    return X_fit, X[held], y_fit, y[held]


def streamed_hold_out(y: np.ndarray, dim: int, fraction: float | None, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Sorted row numbers to train on and to hold out (None: no early stopping) for a streamed split: the held-out
    rows are kept in memory, so at most MAX_HELD_OUT_ROWS and MAX_HELD_OUT_BYTES of them; the rest go back to
    training."""
    rows = np.arange(len(y))
    if fraction is None:
        return rows, None
    train, held, _, _ = hold_out(rows, y, fraction, seed)
    cap = max(1, min(MAX_HELD_OUT_ROWS, MAX_HELD_OUT_BYTES // (dim * 4)))
    return np.sort(np.concatenate([train, held[cap:]])), np.sort(held[:cap])


def run_epochs(module, opt, sched, batches, held_out, epochs: int, patience: int | None,
               context=contextlib.nullcontext) -> tuple[int, int, float]:
    """The training loop of the torch heads: `batches()` each epoch, a step of `sched` per batch, `context()` around
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


def _fit_inputs(head, X, y) -> tuple[np.ndarray, np.ndarray]:
    """Validated float32 features and labels; sets n_features_in_ and classes_ (two classes at least)."""
    X, y = validate_data(head, X, y, dtype=[np.float32, np.float64])
    check_classification_targets(y)
    head.classes_ = np.unique(y)
    if len(head.classes_) < 2:
        raise ValueError(f"{type(head).__name__} needs samples of at least 2 classes, got one class: {head.classes_[0]!r}")
    return np.asarray(X, np.float32), y


class Head(ClassifierMixin, BaseEstimator):
    """What every head shares: scikit-learn's classifier contract, `predict` the class of highest probability.
    A head defines `fit`, `predict_proba` and its learned state as arrays (`to_arrays`, `set_arrays`)."""

    def predict(self, X) -> np.ndarray:
        best = self.predict_proba(X).argmax(1)  # checks that the head is fitted before classes_ is read
        return self.classes_[best]


class LogRegHead(Head):
    """Multinomial logistic regression on normalised features.

    `solver="torch"` (solvers.py) fits the C path in float32 with torch, on `device`; `solver="sklearn"` is the
    reference it is tested against: scikit-learn's lbfgs (Newton steps in row-space coordinates when their Hessian
    is small), in float64 on the CPU. `tol` (None: each solver's default, TOLERANCE) bounds every gradient entry.
    """

    # float32 L-BFGS stopped at scikit-learn's 1e-4 lands farther from the optimum than scikit-learn's float64 lbfgs
    # does, enough to flip a validation image next to a near-tie (hymenoptera, max pooling, C=0.018); at 1e-5 its
    # accuracies are the exact optimum's (scikit-learn at 1e-8) on the bench data
    TOLERANCE = {"torch": 1e-5, "sklearn": 1e-4}

    def __init__(self, C: float = 1.0, norm: str = "standard", max_iter: int = 2000, tol: float | None = None,
                 solver: str = "torch", device: str = "auto"):
        self.C, self.norm, self.max_iter, self.tol, self.solver, self.device = C, norm, max_iter, tol, solver, device

    def fit(self, X, y, views=None) -> "LogRegHead":
        return self.fit_path(X, y, [self.C], views)[0]

    def fit_path(self, X, y, Cs, views=None) -> list["LogRegHead"]:
        """One fitted head per C of `Cs` (see `iter_path`), in the order of `Cs`."""
        fitted = {head.C: head for head in self.iter_path(X, y, Cs, views)}
        return [fitted[float(c)] for c in Cs]

    def fit_many(self, X, y, settings: list[dict], views=None):
        """(settings, fitted head) for each of `settings` (each a C: what a sweep varies), along the path."""
        by_c = {float(s["C"]): s for s in settings}
        for head in self.iter_path(X, y, list(by_c), views):
            yield by_c[head.C], head

    def iter_path(self, X, y, Cs, views=None):
        """Heads fitted in increasing C, each warm-started from the previous solution: the solutions of neighbouring
        C are close, so the 45-value protocol grid costs a few plain fits. A generator, so that a sweep can score
        each head and drop it (45 coefficient matrices of a wide, many-class problem would not fit in memory).
        The head fitted at `self.C` is `self`; the others are copies."""
        X, y = _fit_inputs(self, *with_views(X, y, views))
        if self.solver == "sklearn":
            self.mean_, self.scale_ = _statistics(row_normalised(X, self.norm), self.norm)
            yield from self._sklearn_path(X, y, Cs)
            return
        from pipeline import solvers

        rows, self.mean_, self.scale_ = solvers.normalised(X, self.norm, _solver_device(self))
        labels = np.searchsorted(self.classes_, y)
        solutions = solvers.fit_path(rows, labels, len(self.classes_), Cs, self._tol(), self.max_iter, rows.device)
        yield from (self._with(s) for s in solutions)

    def fit_rows_many(self, rows, settings: list[dict]):
        """`fit_many` for a split read from the cache as it trains (`stream.SplitRows`): standardisation statistics
        from one streaming pass, then every L-BFGS iteration two passes (the direction's logits, the gradient); memory
        holds one block and n x classes logits, whatever the number of rows."""
        from pipeline import solvers

        y = rows.labels
        check_classification_targets(y)
        self.classes_, self.n_features_in_ = np.unique(y), rows.dim
        if len(self.classes_) < 2:
            raise ValueError(f"{type(self).__name__} needs samples of at least 2 classes, got one class")
        streamed = solvers.Streamed(rows, self.norm, _solver_device(self))
        self.mean_, self.scale_ = streamed.mean, streamed.scale
        by_c = {float(s["C"]): s for s in settings}
        labels = np.searchsorted(self.classes_, y)
        for solution in solvers.path_on(streamed, labels, len(self.classes_), list(by_c), self._tol(), self.max_iter):
            head = self._with(solution)
            yield by_c[head.C], head

    def fit_rows(self, rows) -> "LogRegHead":
        return next(self.fit_rows_many(rows, [{"C": self.C}]))[1]

    def _tol(self) -> float:
        return self.TOLERANCE[self.solver] if self.tol is None else self.tol

    def _with(self, solution) -> "LogRegHead":
        head = copy.copy(self) if solution.C != self.C else self
        head.C, head.coef_, head.intercept_ = solution.C, solution.coef, solution.intercept
        head.n_iter_, head.converged_ = solution.n_iter, solution.converged
        return head

    def _sklearn_path(self, X, y, Cs):
        from sklearn.linear_model import LogisticRegression

        Xn, basis = _row_space(_prepared(X, self.mean_, self.scale_, self.norm))
        # in row-space coordinates the problem is small but badly conditioned: Newton steps do not mind that, where
        # lbfgs takes hundreds of iterations; but their Hessian is (r k)^2 floats, so only while that stays small
        newton = basis is not None and (Xn.shape[1] * len(self.classes_)) ** 2 * 8 <= NEWTON_HESSIAN_BYTES
        clf = LogisticRegression(max_iter=self.max_iter, tol=self._tol(), warm_start=True,
                                 solver="newton-cholesky" if newton else "lbfgs")
        for C in sorted(set(float(c) for c in Cs)):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                clf.set_params(C=C).fit(Xn, y)
            head = copy.copy(self) if C != self.C else self
            head.C, head.converged_ = C, not any(issubclass(w.category, ConvergenceWarning) for w in caught)
            head.n_iter_ = int(np.max(clf.n_iter_))
            coef = clf.coef_.astype(np.float64)
            head.coef_ = coef if basis is None else coef @ basis
            head.intercept_ = clf.intercept_.astype(np.float64)
            yield head

    def decision_function(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=[np.float32, np.float64])
        # the standardisation folded into the weights: one matmul, no standardised copy of X (a sweep scores 45 heads)
        weights = self.coef_ / self.scale_
        z = row_normalised(X, self.norm) @ weights.T + (self.intercept_ - weights @ self.mean_)
        return z[:, 0] if z.shape[1] == 1 else z

    def predict_proba(self, X) -> np.ndarray:
        z = self.decision_function(X)
        if z.ndim == 1:  # two classes: scikit-learn keeps one weight row, for the second class
            p = 1 / (1 + np.exp(-z))
            return np.stack([1 - p, p], axis=1)
        return _softmax(z)

    def as_module(self):
        """predict_proba as a torch module (float32), for `pipeline export`."""
        check_is_fitted(self)
        weights = self.coef_ / self.scale_
        return _TorchHead("logreg", self.norm, [(weights, self.intercept_ - weights @ self.mean_)])

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean_, "scale": self.scale_, "coef": self.coef_, "intercept": self.intercept_,
                "n_iter": np.array(self.n_iter_), "converged": np.array(self.converged_)}

    def set_arrays(self, a: dict[str, np.ndarray]) -> None:
        d, k = self.n_features_in_, len(self.classes_)
        rows = 1 if k == 2 else k
        self.mean_, self.scale_ = _real(a, "mean", (d,)), _real(a, "scale", (d,), positive=True)
        self.coef_, self.intercept_ = _real(a, "coef", (rows, d)), _real(a, "intercept", (rows,))
        self.n_iter_, self.converged_ = int(_real(a, "n_iter", ())), bool(_real(a, "converged", ()))


def _solver_device(head) -> str:
    """The torch device of a head's solver: its `device` resolved (MPS has no float64: the CPU there)."""
    from pipeline.device import resolve_device

    device = resolve_device(head.device)
    return "cpu" if device.type == "mps" else str(device)


def _row_space(X: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """With more features than rows (a flattened or pyramid-pooled map on a small set), the rows in coordinates of
    their own span, and that basis (rows of V^T); else the rows as they are and None.

    Exact for L2-penalised logistic regression: the optimal weights lie in the span of the rows (representer
    theorem) and the penalty is rotation invariant, so fitting on X V and mapping the weights back by V^T gives
    the same solution, at the cost of n-dimensional fits instead of d-dimensional ones.
    """
    n, d = X.shape
    if d <= 8 * n:  # lbfgs on the standardised features themselves converges fast enough
        return X, None
    # the thin SVD from the n x n Gram matrix: two n x n x d products instead of a d-wide SVD (50x faster here)
    eigenvalues, U = np.linalg.eigh(X @ X.T)
    keep = eigenvalues > max(eigenvalues.max(), 0) * 1e-10  # the row space: drop the null directions
    S = np.sqrt(eigenvalues[keep])
    return U[:, keep] * S, (U[:, keep] / S).T @ X


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
        mean, scale = self._statistics(lambda: rows.moments(train), rows.dim)
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

        X, y = _fit_inputs(self, X, y)
        X, Xv, y, yv = self._hold_out(X, y, views)
        mean, scale = self._statistics(lambda: _moments(row_normalised(X, self.norm)), X.shape[1])
        for head in heads:
            head.classes_, head.n_features_in_, head.mean_, head.scale_ = self.classes_, X.shape[1], mean, scale
        device, tensor, labels = self._converters(mean, scale, self.classes_)
        Xt, yt = tensor(X), labels(y)  # the whole split on the device, standardised once
        gen = torch.Generator().manual_seed(self.seed)
        batches = lambda: ((Xt[i], yt[i]) for i in torch.randperm(len(Xt), generator=gen).to(device).split(self.batch_size))
        _train_together(heads, len(X), batches, (tensor(Xv), labels(yv)) if Xv is not None else None, device)

    def _statistics(self, moments, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """(mean, scale) after the row-wise normalisation: `moments()` of the training rows for `standard`."""
        if self.norm != "standard":
            row_normalised(np.zeros((1, 1), np.float32), self.norm)  # an unknown norm is refused before training
            return np.zeros(dim), np.ones(dim)
        mean, std = moments()
        return mean, std + 1e-6

    def _converters(self, mean, scale, classes):
        import torch

        from pipeline.device import resolve_device

        device = resolve_device(self.device)
        tensor = lambda a: torch.from_numpy(_standardised32(row_normalised(a, self.norm), mean, scale)).to(device)
        labels = lambda a: torch.from_numpy(np.searchsorted(classes, a)).long().to(device)
        return device, tensor, labels

    def _hold_out(self, X, y, views):
        if self.patience is None:
            X, y = with_views(X, y, views)
            return X, None, y, None
        return hold_out(X, y, self.validation_fraction, self.seed, views)

    def _logits(self, X) -> np.ndarray:
        check_is_fitted(self)
        x = _prepared(validate_data(self, X, reset=False, dtype=[np.float32, np.float64]), self.mean_, self.scale_, self.norm)
        for k, (w, b) in enumerate(self.layers_):
            x = x @ w.T + b
            if k < len(self.layers_) - 1:
                x = np.maximum(x, 0)  # dropout is the identity at inference
        return x

    def predict_proba(self, X) -> np.ndarray:
        return _softmax(self._logits(X))

    def as_module(self):
        """predict_proba as a torch module (float32), for `pipeline export`."""
        check_is_fitted(self)
        first_w, first_b = self.layers_[0]  # the standardisation folded into the first layer
        folded = [(first_w / self.scale_, first_b - (first_w / self.scale_) @ self.mean_), *self.layers_[1:]]
        return _TorchHead("linear", self.norm, folded)

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {"mean": self.mean_, "scale": self.scale_, "n_iter": np.array(self.n_iter_),
               "best_epoch": np.array(self.best_epoch_), "best_val_loss": np.array(self.best_val_loss_)}
        for k, (w, b) in enumerate(self.layers_):
            out[f"layer{k}_weight"], out[f"layer{k}_bias"] = w, b
        return out

    def set_arrays(self, a: dict[str, np.ndarray]) -> None:
        d, k = self.n_features_in_, len(self.classes_)
        self.mean_, self.scale_ = _real(a, "mean", (d,)), _real(a, "scale", (d,), positive=True)
        self.n_iter_, self.best_epoch_ = int(_real(a, "n_iter", ())), int(_real(a, "best_epoch", ()))
        self.best_val_loss_ = float(_real(a, "best_val_loss", (), finite=False))
        widths = [d, self.hidden, k] if self.hidden else [d, k]
        self.layers_ = [(_real(a, f"layer{i}_weight", (n_out, n_in)), _real(a, f"layer{i}_bias", (n_out,)))
                        for i, (n_in, n_out) in enumerate(zip(widths, widths[1:]))]


class KnnHead(Head):
    """Cosine k-nearest neighbours: the `k` most similar training rows vote, each with weight exp(similarity / T).

    No training and nothing to tune but k, a baseline that shows what the features hold by themselves (the DINO
    k-NN evaluation uses T = 0.07). Rows are normalised by `norm`, then to unit length (cosine). The head keeps
    every training row: its file and memory grow with the training split.
    """

    STEP_BYTES = 128 << 20  # similarities computed a block of query rows at a time: at most this many bytes

    def __init__(self, k: int = 10, norm: str = "l2", temperature: float = 0.07):
        self.k, self.norm, self.temperature = k, norm, temperature

    def fit(self, X, y, views=None) -> "KnnHead":
        X, y = _fit_inputs(self, *with_views(X, y, views))
        self.mean_, self.scale_ = _statistics(row_normalised(X, self.norm), self.norm)
        self.train_ = self._unit(X).astype(np.float32).astype(np.float64)  # saved as float32: rounded alike
        self.train_labels_ = np.searchsorted(self.classes_, y).astype(np.int64)
        return self

    def _unit(self, X) -> np.ndarray:
        Z = _prepared(X, self.mean_, self.scale_, self.norm)
        return (Z / np.maximum(np.linalg.norm(Z, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    def predict_proba(self, X) -> np.ndarray:
        check_is_fitted(self)
        Q = self._unit(validate_data(self, X, reset=False, dtype=[np.float32, np.float64]))
        k = min(int(self.k), len(self.train_))
        proba = np.zeros((len(Q), len(self.classes_)))
        step = max(1, self.STEP_BYTES // (8 * len(self.train_)))
        for start in range(0, len(Q), step):  # float64 similarities: a row's votes do not depend on its batch
            sims = Q[start:start + step].astype(np.float64) @ self.train_.T
            top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
            weights = np.exp((np.take_along_axis(sims, top, 1) - 1) / self.temperature)  # -1: no overflow, same ratios
            block = proba[start:start + len(sims)]
            np.add.at(block, (np.arange(len(sims))[:, None], self.train_labels_[top]), weights)
        return proba / proba.sum(1, keepdims=True)

    def as_module(self):
        """predict_proba as a torch module, for `pipeline export`: it carries the training rows (float64, as here)."""
        check_is_fitted(self)
        return _TorchKnn(self.norm, self.mean_, self.scale_, self.train_, self.train_labels_, len(self.classes_),
                         min(int(self.k), len(self.train_)), self.temperature)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean_, "scale": self.scale_, "train": self.train_.astype(np.float32),
                "train_labels": self.train_labels_}

    def set_arrays(self, a: dict[str, np.ndarray]) -> None:
        d, k = self.n_features_in_, len(self.classes_)
        self.mean_, self.scale_ = _real(a, "mean", (d,)), _real(a, "scale", (d,), positive=True)
        n = a["train"].shape[0] if "train" in a and a["train"].ndim == 2 else 0
        train = _real(a, "train", (n, d)).astype(np.float32)
        if not np.isfinite(train).all():
            raise ValueError("'train' holds values beyond float32")
        self.train_ = train.astype(np.float64)
        labels = _real(a, "train_labels", (n,))
        if n < 1 or labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() >= k:
            raise ValueError(f"'train_labels' are not {n} indices into the {k} classes")
        self.train_labels_ = labels.astype(np.int64)


def register_layers(module, layers, dtype) -> None:
    """(weight, bias) pairs as the buffers w0, b0, w1, b1, ... of a torch module (an exported head's)."""
    import torch

    for k, (w, b) in enumerate(layers):
        module.register_buffer(f"w{k}", torch.as_tensor(np.asarray(w, dtype)))
        module.register_buffer(f"b{k}", torch.as_tensor(np.asarray(b, dtype)))


def _TorchHead(kind: str, norm: str, layers):
    """A logreg or linear head as a torch module: affine layers (ReLU between them), softmax (a sigmoid for
    logreg's one-row binary weights); in float64 after the row normalisation, as predict_proba computes it (the
    folded standardisation makes large weights, whose float32 products would be off by 1e-4)."""
    import torch

    from pipeline.solvers import row_normalised

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            register_layers(self, layers, np.float64)
            self.n = len(layers)

        def forward(self, x):
            x = row_normalised(x, norm).double()
            for k in range(self.n):
                x = x @ getattr(self, f"w{k}").T + getattr(self, f"b{k}")
                if k < self.n - 1:
                    x = torch.relu(x)
            if x.shape[1] == 1:  # scikit-learn's binary logistic regression: one row, for the second class
                p = torch.sigmoid(x)
                return torch.cat([1 - p, p], dim=1).float()
            return torch.softmax(x, dim=1).float()

    return Head()


def _TorchKnn(norm: str, mean, scale, train, train_labels, n_classes: int, k: int, temperature: float):
    """KnnHead.predict_proba as a torch module, in float64 as there (a neighbour's rank must not change)."""
    import torch

    from pipeline.solvers import row_normalised

    class Knn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.as_tensor(np.asarray(mean, np.float64)))
            self.register_buffer("scale", torch.as_tensor(np.asarray(scale, np.float64)))
            self.register_buffer("rows", torch.as_tensor(np.asarray(train, np.float64)))
            self.register_buffer("votes", torch.eye(n_classes, dtype=torch.float64)[torch.as_tensor(train_labels)])

        def forward(self, x):
            z = (row_normalised(x, norm).double() - self.mean) / self.scale
            q = (z / torch.linalg.vector_norm(z, dim=1, keepdim=True).clamp(min=1e-12)).float().double()
            sims, top = torch.topk(q @ self.rows.T, k, dim=1)
            weights = torch.exp((sims - 1) / temperature)  # (n, k)
            proba = (weights.unsqueeze(2) * self.votes[top]).sum(1)
            return (proba / proba.sum(1, keepdim=True)).float()

    return Knn()


def _real(arrays: dict, name: str, shape: tuple, positive: bool = False, finite: bool = True) -> np.ndarray:
    """A saved array, checked: present, real numbers of the expected shape, finite (and > 0 where asked)."""
    if name not in arrays:
        raise ValueError(f"it has no {name!r} array")
    a = arrays[name]
    if a.dtype.kind not in "fiub" or a.shape != shape:
        raise ValueError(f"{name!r} is {a.dtype} {a.shape}, expected numbers of shape {shape}")
    if (finite and not np.isfinite(a).all()) or (positive and not (a > 0).all()):
        raise ValueError(f"{name!r} holds {'non-positive' if positive else 'non-finite'} values")
    return a.astype(np.float64) if np.issubdtype(a.dtype, np.floating) else a


def _module(n_in: int, hidden: int, dropout: float, n_out: int):
    from torch import nn

    if not hidden:
        return nn.Linear(n_in, n_out)
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, n_out))


def _train_together(heads: list[LinearHead], n_rows: int, batches, held_out, device) -> None:
    """Train `heads` (the same but for lr and weight decay) as one wide module (wide.py): AdamW + cosine decay over
    `batches()` each epoch, early stopping per head on the held-out set; sets each head's layers_ and counters."""
    import torch

    from pipeline import wide

    first = heads[0]
    torch.manual_seed(first.seed)
    template = _module(first.n_features_in_, first.hidden, first.dropout, len(first.classes_))  # every head's start
    model = wide.WideModel(template.to(device), len(heads), first.dropout)
    total = first.epochs * -(-n_rows // first.batch_size)
    opt = wide.WideAdamW(model.params, np.array([h.lr for h in heads]), np.array([h.weight_decay for h in heads]), total)
    results = wide.train(model, opt, batches, held_out, first.epochs, first.patience)
    for head, (layers, ran, best_epoch, best_loss) in zip(heads, results):
        head.layers_, head.n_iter_, head.best_epoch_, head.best_val_loss_ = layers, ran, best_epoch, best_loss
