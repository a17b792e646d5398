"""Multinomial L2 logistic regression along a grid of C by Newton's method, in float64 numpy: the method for small
problems on a CPU (a few hundred unknowns), where L-BFGS's hundreds of cheap iterations cost more in bookkeeping
than a few Newton steps cost in algebra.

The problem is logreg_solver.py's (scikit-learn's objective); the same row-space coordinates (the Cholesky factor
of the Gram matrix, with fewer rows than features) and the same warm starts extrapolated along the path. Each step
solves the Hessian's system and backtracks on the float64 objective; quadratic convergence near the
optimum makes a tight tolerance (TOLERANCE) nearly free, so the solutions are the exact optimum's, weakly
regularised ones included, where a float32 L-BFGS stopped at 1e-5 can be far from it.

Two classes: scikit-learn's one-row binary problem, r + 1 unknowns. More classes: the k weight rows and k - 1
intercepts (the last class's is 0: the softmax is the same for intercepts shifted together, and the weights are
penalised, so every other unknown is determined), k (r + 1) - 1 unknowns.
"""

from __future__ import annotations

import numpy as np

from pipeline.heads.logreg_solver import Solution, extrapolated

TOLERANCE = 1e-9  # on every gradient entry: float64 Newton reaches it in a step or two more than 1e-5
MAX_HALVINGS = 40
ARMIJO = 1e-4
ROUNDING = 1e-13  # a promised decrease below this fraction of the objective cannot be measured in float64


def unknowns(rows: int, dim: int, n_classes: int) -> int:
    """How many unknowns Newton's system has for these rows (in row-space coordinates when fewer than features)."""
    r = min(rows, dim)
    return r + 1 if n_classes == 2 else n_classes * (r + 1) - 1


def fit_path(X: np.ndarray, y: np.ndarray, n_classes: int, Cs, tol: float = TOLERANCE, max_iter: int = 200):
    """Yield a `Solution` (weights on X's features) for every C of `Cs`, in increasing C, fitted on rows X (n, d)
    (normalised) with labels `y` in 0..n_classes-1."""
    X = np.asarray(X, np.float64)
    n, d = X.shape
    L = _factor(X) if d > n else None
    Z = X if L is None else L
    back = None if L is None else np.linalg.inv(L) @ X  # L^-1 X: weights on Z's coordinates -> the features
    problem = (_Binary if n_classes == 2 else _Multinomial)(Z, np.asarray(y), n_classes)
    solved: list[tuple[float, np.ndarray]] = []
    for C in sorted(float(c) for c in Cs):
        theta = extrapolated(solved, np.log(C), np.zeros(problem.size))
        theta, n_iter, converged = _newton(problem, theta, 1.0 / (C * n), tol, max_iter)
        coef, intercept = problem.parameters(theta)
        if back is not None:  # X = L Q with Q = L^-1 X, so z . w = x . (Q^T w): the features' weights are w Q
            coef = coef @ back
        yield Solution(C, coef, intercept, n_iter, converged)
        solved = (solved + [(float(np.log(C)), theta)])[-3:]


def _factor(X: np.ndarray) -> np.ndarray:
    """L, the rows in n coordinates with L L^T = X X^T (the Cholesky factor of the Gram matrix, plus a jitter
    that lets repeated rows factor)."""
    gram = X @ X.T
    jitter = 1e-10 * max(float(np.mean(np.diag(gram))), 1e-30)
    while True:
        try:
            return np.linalg.cholesky(gram + jitter * np.eye(len(gram)))
        except np.linalg.LinAlgError:  # rounding left it a hair from positive definite
            jitter *= 10


class _Binary:
    """log(1 + e^eta) - y eta, eta = Z w + b, plus ||w||^2 lam / 2: w and b in one vector (w first)."""

    def __init__(self, Z: np.ndarray, y: np.ndarray, n_classes: int):
        self.Z, self.y, self.n = Z, (y == 1).astype(np.float64), len(y)
        self.Z1 = np.hstack([Z, np.ones((len(Z), 1))])
        self.size = Z.shape[1] + 1

    def parameters(self, theta):
        return theta[None, :-1], theta[-1:]

    def _terms(self, theta, lam):
        eta = self.Z1 @ theta
        loss = np.logaddexp(0.0, eta).sum() - self.y @ eta
        w = theta[:-1]
        return loss / self.n + 0.5 * lam * (w @ w), eta

    def gradient(self, theta, eta, lam):
        p = 0.5 * (1.0 + np.tanh(0.5 * eta))  # the logistic function, without overflow
        g = self.Z1.T @ (p - self.y) / self.n
        g[:-1] += lam * theta[:-1]
        return g, p

    def hessian(self, p, lam):
        # float64: at a large C the penalty (1e-8 and below) is under float32's rounding of the loss's Hessian, which
        # would leave it indefinite
        H = (self.Z1.T * (p * (1.0 - p) / self.n)) @ self.Z1
        H[np.arange(self.size - 1), np.arange(self.size - 1)] += lam
        return H

    def objective(self, theta, lam):
        return self._terms(theta, lam)


class _Multinomial:
    """Softmax cross-entropy of Z W^T + b, plus ||W||^2 lam / 2: W (k, r) row by row, then b's first k - 1."""

    def __init__(self, Z: np.ndarray, y: np.ndarray, n_classes: int):
        self.Z, self.k, self.n, self.r = Z, n_classes, len(y), Z.shape[1]
        self.Z1 = np.hstack([Z, np.ones((len(Z), 1))])
        self.Y = np.eye(n_classes)[y]
        self.size = n_classes * (self.r + 1) - 1

    def parameters(self, theta):
        W = theta[:self.k * self.r].reshape(self.k, self.r)
        return W, np.append(theta[self.k * self.r:], 0.0)

    def objective(self, theta, lam):
        W, b = self.parameters(theta)
        logits = self.Z @ W.T + b
        top = logits.max(1, keepdims=True)
        loss = (np.log(np.exp(logits - top).sum(1)) + top[:, 0]).sum() - (self.Y * logits).sum()
        return loss / self.n + 0.5 * lam * (W * W).sum(), logits

    def gradient(self, theta, logits, lam):
        k, r, n = self.k, self.r, self.n
        P = np.exp(logits - logits.max(1, keepdims=True))
        P /= P.sum(1, keepdims=True)
        G = (P - self.Y).T @ self.Z1 / n  # (k, r + 1): weights, then the intercept's column
        G[:, :r] += lam * theta[:k * r].reshape(k, r)
        return np.concatenate([G[:, :r].ravel(), G[:-1, r]]), P

    def hessian(self, P, lam):
        k, r, n, Z1 = self.k, self.r, self.n, self.Z1
        # blocks (j, l) of Z1^T diag(p_j (delta_jl - p_l)) Z1 / n, in the order of the unknowns
        full = np.empty((k, r + 1, k, r + 1))
        for j in range(k):
            for l in range(j, k):
                block = (Z1.T * (P[:, j] * ((j == l) - P[:, l]) / n)) @ Z1
                full[j, :, l, :] = block
                full[l, :, j, :] = block.T
        order = [j * (r + 1) + c for j in range(k) for c in range(r)] + [j * (r + 1) + r for j in range(k - 1)]
        H = full.reshape(k * (r + 1), k * (r + 1))[np.ix_(order, order)]
        H[np.arange(k * r), np.arange(k * r)] += lam
        return H


def _newton(problem, theta: np.ndarray, lam: float, tol: float, max_iter: int) -> tuple[np.ndarray, int, bool]:
    """(theta, iterations, converged): Newton steps from `theta`, each backtracked until the objective decreases
    (Armijo), until no gradient entry exceeds `tol`."""
    f, state = problem.objective(theta, lam)
    for it in range(max_iter + 1):
        g, probabilities = problem.gradient(theta, state, lam)
        if np.abs(g).max() <= tol:
            return theta, it, True
        if it == max_iter:
            break
        step = -_solved(problem.hessian(probabilities, lam), g)
        slope, t = float(g @ step), 1.0
        if slope >= 0:  # not a descent direction (a Hessian singular to rounding): the gradient's instead
            step, slope = -g, -float(g @ g)
        for _ in range(MAX_HALVINGS):
            trial, trial_state = problem.objective(theta + t * step, lam)
            # near the optimum the decrease a step promises is below float64's resolution of the objective: the
            # full Newton step is taken there (it converges quadratically), no comparison could judge it
            if trial <= f + ARMIJO * t * slope or (slope < 0 and -slope <= ROUNDING * max(abs(f), 1.0)):
                break
            t *= 0.5
        else:  # no step decreases the objective: as far as float64 goes
            return theta, it, False
        theta, f, state = theta + t * step, trial, trial_state
    return theta, max_iter, False


def _solved(H: np.ndarray, g: np.ndarray) -> np.ndarray:
    """H^-1 g (H is positive definite: the loss's Hessian plus the penalty; one LU solve costs what a Cholesky
    factorisation and its two triangular solves cost in numpy); a least-squares solve when it is singular to
    rounding (an intercept of a class no row is near)."""
    try:
        return np.linalg.solve(H, g)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(H, g, rcond=None)[0]
