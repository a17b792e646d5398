"""Multinomial L2 logistic regression along a grid of C, in torch (the same code on the CPU and on CUDA).

The problem is scikit-learn's: for each C, minimise mean cross-entropy + ||W||^2 / (2 C n) over the weights W and an
unpenalised intercept (two classes: one weight row, as scikit-learn fits them), stopping when no gradient entry
exceeds `tol`. What makes the protocol's 45-value grid cheap:

- **Few coordinates.** With fewer rows than features (a flattened or pyramid-pooled map), the solution lies in the
  span of the rows (representer theorem; the penalty is rotation invariant), so the problem is solved on rows
  Z = L (n x n) with L L^T = X X^T, the Cholesky factor of the Gram matrix: the same inner products as the rows,
  in n coordinates instead of d. The weights are mapped back at the end (W = (L^-T beta)^T X).
- **Line searches for free.** The logits along a search direction are linear in the step: Z (w + t p) = Zw + t Zp,
  so an L-BFGS iteration costs two products with Z (the direction's logits, the new gradient), whatever the number
  of trial steps.
- **Warm starts along the path.** C increases; each fit starts from the previous one's weights, as scikit-learn's
  path does (`LogRegHead` before), so neighbouring C cost a few iterations each.
- **Scaled coordinates.** L-BFGS starts each iteration from a diagonal preconditioner (the columns' second moments
  times the softmax's curvature, plus the penalty) instead of the identity.

`fit_path` returns one `Solution` per C. scikit-learn's lbfgs stays the reference (`LogRegHead(solver="sklearn")`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from pipeline.heads.normalise import row_normalised

log = logging.getLogger(__name__)
HISTORY = 10  # L-BFGS correction pairs
OBJECTIVE_ROWS = 65536  # rows per float64 chunk of the objective: bounds its temporaries
ARMIJO = 1e-4
WOLFE_DELTA, WOLFE_SIGMA = 0.1, 0.9  # approximate Wolfe conditions (Hager and Zhang 2005)
FLOAT_NOISE = 1e-6  # the objective, from float32 logits, is known to about this relative precision
MAX_HALVINGS = 30
CURVATURE = 0.25  # the softmax Hessian's scale in the diagonal preconditioner (p (1 - p) at p = 1/2)
JITTER = 1e-6  # of the Gram matrix's mean diagonal, added so that repeated rows still have a Cholesky factor
MAP_BACK_BYTES = 256 << 20  # the float64 weights of the C mapped back to the features together


@dataclass
class Solution:
    """One C's fit: weights (rows: classes; one row for two classes) and intercepts in float64, as scikit-learn's."""

    C: float
    coef: np.ndarray
    intercept: np.ndarray
    n_iter: int
    converged: bool


def fit_path(X, y: np.ndarray, n_classes: int, Cs, tol: float = 1e-4, max_iter: int = 2000, device: str = "cpu",
             factor: bool | None = None):
    """Yield a `Solution` for every C of `Cs`, in increasing C, fitted on rows X (n, d) (float32, normalised) with
    labels `y` in 0..n_classes-1; `factor`: solve on the Gram matrix's Cholesky factor (default: when rows are fewer
    than features)."""
    import torch

    X = torch.as_tensor(X, dtype=torch.float32, device=device)
    n, d = X.shape
    if not (d > n if factor is None else factor):
        yield from path_on(InMemory(X), y, n_classes, Cs, tol, max_iter)
        return
    Z, L = _factored(X)
    # the weights are mapped back to the features a chunk of C at a time: one product with X serves the chunk
    chunk = max(1, MAP_BACK_BYTES // (8 * d * n_classes))
    pending = []
    for solution in path_on(InMemory(Z), y, n_classes, Cs, tol, max_iter, raw=True):
        pending.append(solution)
        if len(pending) == chunk:
            yield from _mapped_back(pending, L, X)
            pending = []
    yield from _mapped_back(pending, L, X)


def path_on(rows, y: np.ndarray, n_classes: int, Cs, tol: float, max_iter: int, raw: bool = False):
    """`fit_path` on `rows`, anything with `device`, `dim`, `moments`, `forward(P)` = rows @ P and
    `backward(R)` = rows^T @ R (`InMemory`, or a split streamed from the file); `raw`: each Solution's coef is the
    (dim, k) weights on the rows' own coordinates, as a tensor (for `_mapped_back`)."""
    import torch

    labels = torch.as_tensor(np.asarray(y), device=rows.device).long()
    problem = _Problem(rows, labels, n_classes)
    W, b = torch.zeros(rows.dim, n_classes, device=rows.device), torch.zeros(n_classes, device=rows.device)
    for C in sorted(float(c) for c in Cs):
        # two classes: the softmax of two rows at C/2 is scikit-learn's one-row binary problem at C (w = w1 - w0)
        lam = 1.0 / ((C / 2 if n_classes == 2 else C) * len(labels))
        W, b, n_iter, converged = problem.solve(W, b, lam, tol, max_iter)
        solution = Solution(C, W, b, n_iter, converged)
        yield solution if raw else _finished(solution, W.T.double())


def _finished(solution: "Solution", coef) -> "Solution":
    """The solution as scikit-learn keeps it: float64 arrays, one row for two classes (the second's, w1 - w0)."""
    intercept = solution.intercept.double()
    if len(intercept) == 2:
        coef, intercept = coef[1:] - coef[:1], intercept[1:] - intercept[:1]
    return Solution(solution.C, coef.cpu().numpy(), intercept.cpu().numpy(), solution.n_iter, solution.converged)


class InMemory:
    """Rows held as one tensor, for `path_on`. Both products read the rows row-major, as the few-column products
    of a solver's iterations run fastest on a CPU (2x over `Z @ P`): the rows and their transpose are kept."""

    def __init__(self, Z):
        self.Z, self.Zt = Z.contiguous(), Z.T.contiguous()  # a Cholesky factor comes back column-major
        self.device, self.dim = Z.device, Z.shape[1]
        self.moments = (self.Z * self.Z).mean(0)  # the diagonal of Z^T Z / n, for the preconditioner

    def forward(self, P):
        return (P.T @ self.Zt).T

    def backward(self, R):
        return (R.T @ self.Z).T


def _factored(X):
    """(L, L): the rows' coordinates in an orthonormal basis of their span, L L^T = X X^T (+ a jitter)."""
    import torch

    gram = _gram(X)
    jitter = JITTER * float(gram.diagonal().mean().clamp(min=1e-30))
    for _ in range(6):  # float32 products can leave the Gram matrix a hair from positive definite
        L, info = torch.linalg.cholesky_ex(gram + jitter * torch.eye(len(gram), dtype=gram.dtype, device=gram.device))
        if int(info) == 0:
            return L.float(), L
        jitter *= 10
    raise ValueError("the Gram matrix of the rows has no Cholesky factor")


def _gram(X):
    """X X^T in float64 (its lower triangle: what the Cholesky factorisation reads). On a CPU, BLAS's symmetric
    rank-k update computes the one triangle: 3x faster than torch's general product on a wide map."""
    import torch

    if X.device.type != "cpu":
        return (X @ X.T).double()
    from scipy.linalg.blas import ssyrk

    rows = X.numpy()
    return torch.from_numpy(np.asarray(ssyrk(1.0, rows.T, trans=1, lower=1), np.float64))  # rows.T: Fortran order


def _mapped_back(solutions: list["Solution"], L, X) -> list["Solution"]:
    """Weights on the factor's coordinates -> weights on the features: Z = L = X Q^T with Q = L^-1 X, so
    w . z = (Q^T w) . x, and Q^T w = X^T (L^-T w); every solution of the chunk in one product with X."""
    import torch

    if not solutions:
        return []
    A = torch.linalg.solve_triangular(L.T, torch.cat([s.coef.double() for s in solutions], 1), upper=True)  # (n, m k)
    coefs = (A.T.float() @ X).double().split(solutions[0].coef.shape[1])
    return [_finished(s, coef) for s, coef in zip(solutions, coefs)]


class _Problem:
    """One L2 logistic regression on `rows` (n, r) with integer `labels` (n,): L-BFGS from a warm start. What it keeps
    per row is a few (n, k) float32 arrays (logits, the step's logits, residuals, the one-hot targets); the float64
    sums of the objective run over chunks of rows, so that a streamed split of millions of rows stays within its
    memory budget."""

    def __init__(self, rows, labels, n_classes: int):
        import torch

        self.rows, self.labels, self.n = rows, labels, len(labels)
        # float32 one-hot targets: a subtraction, 1.5x faster than putting -1 at each row's label, for 4 bytes a cell
        self.Y32 = torch.nn.functional.one_hot(labels, n_classes).float()

    def _chunks(self, *arrays):
        for start in range(0, self.n, OBJECTIVE_ROWS):
            yield tuple(a[start:start + OBJECTIVE_ROWS] for a in arrays)

    def _loss(self, logits) -> float:
        """Mean cross-entropy, summed in float64: a line search compares values 1e-7 apart near the optimum."""
        import torch

        total = 0.0
        for part, labels in self._chunks(logits, self.labels):
            part = part.double()
            total += float((torch.logsumexp(part, 1) - part.gather(1, labels[:, None])[:, 0]).sum())
        return total / self.n

    def _gradient(self, logits, W, lam):
        import torch

        R = (torch.softmax(logits, dim=1) - self.Y32) / self.n
        return self.rows.backward(R) + lam * W, R.sum(0)

    def solve(self, W, b, lam: float, tol: float, max_iter: int):
        """(W, b, iterations, converged) from the warm start (W, b) at penalty `lam`."""
        logits = self.rows.forward(W) + b
        f = self._loss(logits) + 0.5 * lam * float((W.double() * W).sum())
        g = self._gradient(logits, W, lam)
        precondition = (CURVATURE * self.rows.moments + lam)[:, None], CURVATURE
        history = []
        for it in range(max_iter + 1):
            if _max_abs(g) <= tol:
                return W, b, it, True
            if it == max_iter:
                break
            p, slope = _direction(g, history, precondition)
            dlogits = self.rows.forward(p[0]) + p[1]
            step = self._line_search(logits, dlogits, W, p, f, slope, lam)
            if step is None:  # no step decreases the objective: as far as float32 goes
                return W, b, it, False
            t, f = step
            s = (t * p[0], t * p[1])
            W, b, logits = W + s[0], b + s[1], logits + t * dlogits
            new = self._gradient(logits, W, lam)
            yv = (new[0] - g[0], new[1] - g[1])
            sy = _dot(s, yv)
            if sy > 1e-10 * float(_dot(s, s) * _dot(yv, yv)) ** 0.5:
                history = (history + [(s, yv, 1.0 / sy)])[-HISTORY:]
            g = new
        return W, b, max_iter, False

    def _line_search(self, logits, dlogits, W, p, f: float, slope: float, lam: float):
        """Backtracking from the unit step: (step, objective there), or None. A step is taken when it decreases the
        objective enough (Armijo), or, near the optimum where float32 logits cannot resolve that decrease, when the
        slope along the line there shows it is no worse (Hager and Zhang's approximate Wolfe conditions)."""
        ww, wp, pp = (float((a.double() * c).sum()) for a, c in ((W, W), (W, p[0]), (p[0], p[0])))
        t = 1.0
        for _ in range(MAX_HALVINGS):
            value, derivative = self._along(logits, dlogits, t, lam, (ww, wp, pp))
            if value <= f + ARMIJO * t * slope:
                return t, value
            flat = value <= f + FLOAT_NOISE * abs(f)
            if flat and WOLFE_SIGMA * slope <= derivative <= (2 * WOLFE_DELTA - 1) * slope:
                return t, value
            t *= 0.5
        return None

    def _along(self, logits, dlogits, t: float, lam: float, norms) -> tuple[float, float]:
        """The objective and its derivative at step t along the line (from the logits alone: no product with Z)."""
        import torch

        loss = slope = 0.0
        for part, step, labels in self._chunks(logits, dlogits, self.labels):
            logp = torch.log_softmax((part + t * step).double(), dim=1)
            step = step.double()
            loss -= float(logp.gather(1, labels[:, None]).sum())
            slope += float((logp.exp() * step).sum() - step.gather(1, labels[:, None]).sum())
        ww, wp, pp = norms
        value = loss / self.n + 0.5 * lam * (ww + 2 * t * wp + t * t * pp)
        return value, slope / self.n + lam * (wp + t * pp)


def _dot(a, b) -> float:
    return float((a[0] * b[0]).sum() + (a[1] * b[1]).sum())


def _max_abs(g) -> float:
    return max(float(g[0].abs().max()), float(g[1].abs().max()))


def _direction(g, history, precondition):
    """-H g by L-BFGS's two-loop recursion, H0 the diagonal preconditioner scaled by the last pair's curvature;
    steepest preconditioned descent when that is not a descent direction."""
    scale_w, scale_b = precondition
    q, alphas = g, []
    for s, y, rho in reversed(history):
        a = rho * _dot(s, q)
        alphas.append(a)
        q = (q[0] - a * y[0], q[1] - a * y[1])
    r = (q[0] / scale_w, q[1] / scale_b)
    if history:
        s, y, _ = history[-1]
        gamma = _dot(s, y) / max(_dot(y, (y[0] / scale_w, y[1] / scale_b)), 1e-30)
        r = (r[0] * gamma, r[1] * gamma)
    for (s, y, rho), a in zip(history, reversed(alphas)):
        beta = rho * _dot(y, r)
        r = (r[0] + (a - beta) * s[0], r[1] + (a - beta) * s[1])
    p = (-r[0], -r[1])
    slope = _dot(g, p)
    if slope >= 0:
        p = (-g[0] / scale_w, -g[1] / scale_b)
        slope = _dot(g, p)
    return p, slope


class Streamed:
    """A split read from the cache block by block (`stream.SplitRows`), normalised as a head normalises its rows,
    for `path_on`: standardisation statistics and the preconditioner's moments from one pass, then every product a
    pass; memory holds one block and the (n, k) results."""

    def __init__(self, rows, norm: str, device: str = "cpu"):
        import torch

        self.rows, self.norm, self.device, self.dim = rows, norm, torch.device(device), rows.dim
        total, squares, n = np.zeros(rows.dim), np.zeros(rows.dim), 0
        for X, _ in rows.blocks():
            X64 = row_normalised(X, norm).astype(np.float64)
            total, squares, n = total + X64.sum(0), squares + (X64 * X64).sum(0), n + len(X)
        mean, second = total / max(n, 1), squares / max(n, 1)
        if norm == "standard":
            std = np.sqrt(np.maximum(second - mean * mean, 0))
            self.mean, self.scale = mean, np.where(std < 10 * np.finfo(np.float64).eps, 1.0, std)
            moments = (std / self.scale) ** 2
        else:
            self.mean, self.scale, moments = np.zeros(rows.dim), np.ones(rows.dim), second
        self.moments = torch.as_tensor(moments, dtype=torch.float32, device=self.device)

    def _blocks(self):
        import torch

        for X, local in self.rows.blocks():
            Z = ((row_normalised(X, self.norm) - self.mean) / self.scale).astype(np.float32)
            yield torch.from_numpy(Z).to(self.device), torch.from_numpy(local).to(self.device)

    def forward(self, P):
        import torch

        out = torch.empty(len(self.rows), P.shape[1], device=self.device)
        for Z, local in self._blocks():
            out[local] = Z @ P
        return out

    def backward(self, R):
        import torch

        out = torch.zeros(self.dim, R.shape[1], device=self.device)
        for Z, local in self._blocks():
            out += (R[local].T @ Z).T
        return out
