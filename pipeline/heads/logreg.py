"""The logreg head: normalisation + multinomial L2 logistic regression, fitted along the protocol's grid of C
with warm starts (logreg_solver.py in torch; scikit-learn's lbfgs as the reference).
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from pipeline.heads.base import Head, checked_array, fit_inputs, softmax_rows
from pipeline.heads.holdout import with_views
from pipeline.heads.normalise import norm_statistics, normalised_tensor, prepared, row_normalised

NEWTON_HESSIAN_BYTES = 256 << 20  # logreg in the row space uses Newton steps while their Hessian stays this small


class LogRegHead(Head):
    """Multinomial logistic regression on normalised features.

    `solver="torch"` (logreg_solver.py) fits the C path in float32 with torch, on `device`; `solver="sklearn"` is the
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
        X, y = fit_inputs(self, *with_views(X, y, views))
        if self.solver == "sklearn":
            self.mean_, self.scale_ = norm_statistics(row_normalised(X, self.norm), self.norm)
            yield from self._sklearn_path(X, y, Cs)
            return
        from pipeline.heads import logreg_solver

        rows, self.mean_, self.scale_ = normalised_tensor(X, self.norm, _solver_device(self))
        labels = np.searchsorted(self.classes_, y)
        solutions = logreg_solver.fit_path(rows, labels, len(self.classes_), Cs, self._tol(), self.max_iter, rows.device)
        yield from (self._with(s) for s in solutions)

    def fit_rows_many(self, rows, settings: list[dict]):
        """`fit_many` for a split read from the cache as it trains (`stream.SplitRows`): standardisation statistics
        from one streaming pass, then every L-BFGS iteration two passes (the direction's logits, the gradient); memory
        holds one block and n x classes logits, whatever the number of rows."""
        from pipeline.heads import logreg_solver

        y = rows.labels
        check_classification_targets(y)
        self.classes_, self.n_features_in_ = np.unique(y), rows.dim
        if len(self.classes_) < 2:
            raise ValueError(f"{type(self).__name__} needs samples of at least 2 classes, got one class")
        streamed = logreg_solver.Streamed(rows, self.norm, _solver_device(self))
        self.mean_, self.scale_ = streamed.mean, streamed.scale
        by_c = {float(s["C"]): s for s in settings}
        labels = np.searchsorted(self.classes_, y)
        for solution in logreg_solver.path_on(streamed, labels, len(self.classes_), list(by_c), self._tol(), self.max_iter):
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

        Xn, basis = _row_space(prepared(X, self.mean_, self.scale_, self.norm))
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
        return softmax_rows(z)

    def as_module(self):
        """predict_proba as a torch module (float32), for `pipeline export`."""
        check_is_fitted(self)
        weights = self.coef_ / self.scale_
        from pipeline.heads.exported import AffineHead

        return AffineHead(self.norm, [(weights, self.intercept_ - weights @ self.mean_)])

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean_, "scale": self.scale_, "coef": self.coef_, "intercept": self.intercept_,
                "n_iter": np.array(self.n_iter_), "converged": np.array(self.converged_)}

    def set_arrays(self, a: dict[str, np.ndarray]) -> None:
        d, k = self.n_features_in_, len(self.classes_)
        rows = 1 if k == 2 else k
        self.mean_, self.scale_ = checked_array(a, "mean", (d,)), checked_array(a, "scale", (d,), positive=True)
        self.coef_, self.intercept_ = checked_array(a, "coef", (rows, d)), checked_array(a, "intercept", (rows,))
        self.n_iter_, self.converged_ = int(checked_array(a, "n_iter", ())), bool(checked_array(a, "converged", ()))


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
