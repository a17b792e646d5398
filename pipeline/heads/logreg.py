"""The logreg head: normalisation + multinomial L2 logistic regression, fitted along the protocol's grid of C
with warm starts: Newton's method for small problems (logreg_newton.py, float64), L-BFGS for the others
(logreg_solver.py, torch, on the GPU when there is one), chosen in one place (`choose_method`); scikit-learn's
lbfgs is the reference they are tested against.
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from pipeline.heads.base import Head, checked_array, fit_inputs, softmax_rows
from pipeline.heads.holdout import with_views
from pipeline.heads.normalise import norm_statistics, normalised_array, normalised_tensor, prepared, row_normalised

NEWTON_HESSIAN_BYTES = 256 << 20  # the reference solver uses Newton steps in the row space while its Hessian is this small
NEWTON_FLOPS = 6e7  # auto: Newton while building its Hessian (rows x unknowns^2) costs about 3 L-BFGS iterations
# L-BFGS on a CPU: one intra-op thread while the rows it multiplies are this small (a 245-row fit took 5x longer with
# two on a busy machine); above, two threads made the 4,000 x 512 paths of the bench 1.2x faster on an idle one
ONE_THREAD_BYTES = 4 << 20
SOLVERS = ("auto", "newton", "lbfgs", "sklearn", "torch")  # torch: lbfgs's name before the others existed


def newton_sized(rows: int, dim: int, n_classes: int) -> bool:
    """Whether Newton's Hessian (rows x unknowns^2 to build) costs less than L-BFGS's iterations on this problem."""
    from pipeline.heads.logreg_newton import unknowns

    return rows * unknowns(rows, dim, n_classes) ** 2 <= NEWTON_FLOPS


def choose_method(rows: int, dim: int, n_classes: int, device: str, solver: str = "auto") -> tuple[str, str]:
    """(method, why) for a logreg path on `rows` x `dim` normalised rows of `n_classes` on `device`: the one place
    where the solver is chosen. `solver` other than auto forces it (torch: lbfgs)."""
    from pipeline.heads.logreg_newton import unknowns

    u = unknowns(rows, dim, n_classes)
    size = f"{rows} rows x {dim} features, {n_classes} classes: {u} unknowns"
    if solver in ("newton", "lbfgs", "torch"):
        return ("lbfgs" if solver == "torch" else solver), f"--solver {solver}; {size}"
    if device != "cpu":
        return "lbfgs", f"{size}, on {device}: L-BFGS in float32, the whole C path one batched problem"
    if newton_sized(rows, dim, n_classes):
        return "newton", (f"{size} (in the rows' span): Newton in float64 on the CPU, a few Cholesky solves of the "
                          f"{u}x{u} Hessian a C, fewer operations than L-BFGS's hundreds of iterations")
    return "lbfgs", (f"{size}: L-BFGS in float32 on the CPU, one C at a time, each started from the path extrapolated "
                     f"(Newton's Hessian, {u}x{u} from {rows} rows, would cost more)")


def _device_of_path(head, rows: int, dim: int, n_classes: int) -> str:
    """The device a path is solved on. With --device auto and --solver auto, a problem Newton solves in a fraction
    of a second stays on the CPU, GPU or not: without resolving the device, so without importing torch (a second
    or more of a small train-head's few)."""
    if head.device == "cpu" or (head.device == "auto" and head.solver == "auto" and newton_sized(rows, dim, n_classes)):
        return "cpu"
    return _solver_device(head)


class LogRegHead(Head):
    """Multinomial logistic regression on normalised features.

    `solver="auto"` picks the method for the problem's shape and device (`choose_method`: Newton in float64 for a
    small problem on a CPU, float32 L-BFGS in torch otherwise, on `device`) and records it in `method_`;
    `solver="sklearn"` is the reference they are tested against: scikit-learn's lbfgs (Newton steps in row-space
    coordinates when their Hessian is small), in float64 on the CPU. `tol` (None: each method's default,
    TOLERANCE) bounds every gradient entry.
    """

    # float32 L-BFGS stopped at scikit-learn's 1e-4 lands farther from the optimum than scikit-learn's float64 lbfgs
    # does, enough to flip a validation image next to a near-tie (hymenoptera, max pooling, C=0.018); at 1e-5 its
    # accuracies are the exact optimum's (scikit-learn at 1e-8) on the bench data. Newton, in float64, reaches 1e-9
    # in a step or two more: the optimum itself, weakly regularised C included.
    TOLERANCE = {"lbfgs": 1e-5, "newton": 1e-9, "sklearn": 1e-4}

    def __init__(self, C: float = 1.0, norm: str = "standard", max_iter: int = 2000, tol: float | None = None,
                 solver: str = "auto", device: str = "auto"):
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
        labels, k = np.searchsorted(self.classes_, y), len(self.classes_)
        device = _device_of_path(self, len(X), X.shape[1], k)
        method, why = choose_method(len(X), X.shape[1], k, device, self.solver)
        self.method_ = f"{method}: {why}"
        if method == "newton":
            from pipeline.heads import logreg_newton

            rows, self.mean_, self.scale_ = normalised_array(X, self.norm)
            u = logreg_newton.unknowns(*rows.shape, k)
            with threads_for(len(rows) * u * 4, torch_too=False):
                solutions = logreg_newton.fit_path(rows, labels, k, Cs, self._tol("newton"), self.max_iter)
                yield from (self._with(s) for s in solutions)
            return
        from pipeline.heads import logreg_solver

        rows, self.mean_, self.scale_ = normalised_tensor(X, self.norm, device)
        batch = len(Cs) if device != "cpu" else 1
        with threads_for(rows.shape[0] * min(rows.shape) * 4):
            solutions = logreg_solver.fit_path(rows, labels, k, Cs, self._tol("lbfgs"), self.max_iter, rows.device,
                                               batch=batch)
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
        self.method_ = "lbfgs: streamed from the file, every iteration two passes over the rows"
        by_c = {float(s["C"]): s for s in settings}
        labels = np.searchsorted(self.classes_, y)
        for solution in logreg_solver.path_on(streamed, labels, len(self.classes_), list(by_c), self._tol("lbfgs"),
                                              self.max_iter):
            head = self._with(solution)
            yield by_c[head.C], head

    def fit_rows(self, rows) -> "LogRegHead":
        return next(self.fit_rows_many(rows, [{"C": self.C}]))[1]

    def _tol(self, method: str) -> float:
        return self.TOLERANCE[method] if self.tol is None else self.tol

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
        clf = LogisticRegression(max_iter=self.max_iter, tol=self._tol("sklearn"), warm_start=True,
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
        return self._decision(row_normalised(X, self.norm))

    def _decision(self, R: np.ndarray) -> np.ndarray:
        # the standardisation folded into the weights: one matmul, no standardised copy of X (a sweep scores 45 heads)
        weights = self.coef_ / self.scale_
        z = R @ weights.T + (self.intercept_ - weights @ self.mean_)
        return z[:, 0] if z.shape[1] == 1 else z

    def predict_proba(self, X) -> np.ndarray:
        return _probabilities(self.decision_function(X))

    def proba_of_normalised(self, R: np.ndarray) -> np.ndarray:
        """predict_proba of rows already validated and row-normalised by `norm` (a sweep normalises its validation
        rows once for the 45 C of a path)."""
        return _probabilities(self._decision(R))

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


def _probabilities(z: np.ndarray) -> np.ndarray:
    if z.ndim == 1:  # two classes: scikit-learn keeps one weight row, for the second class
        p = 1 / (1 + np.exp(-z))
        return np.stack([1 - p, p], axis=1)
    return softmax_rows(z)


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


@contextlib.contextmanager
def threads_for(product_bytes: int, torch_too: bool = True):
    """The threads of a solve whose every iteration multiplies arrays of `product_bytes`: one below ONE_THREAD_BYTES
    (small products: a second thread only spins, and on a busy machine waits for a core: a 245-row fit took 5x
    longer with two), all the cores above (large products split well). torch's intra-op threads (`torch_too`)
    and the BLAS of numpy (threadpoolctl, which scikit-learn brings)."""
    from threadpoolctl import threadpool_limits

    one = product_bytes < ONE_THREAD_BYTES
    with threadpool_limits(1 if one else None, user_api="blas"):
        if not torch_too:
            yield
            return
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(1 if one else before)
        try:
            yield
        finally:
            torch.set_num_threads(before)
