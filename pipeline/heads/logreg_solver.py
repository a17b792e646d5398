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
  path does, so neighbouring C cost a few iterations each.
- **Scaled coordinates.** L-BFGS starts each iteration from a diagonal preconditioner (the columns' second moments
  times the softmax's curvature, plus the penalty) instead of the identity.
- **Few operations an iteration.** The logits are kept as (classes, rows), so that the softmax and its logarithm
  reduce along contiguous memory (20x faster than across a row of 2 to 10 classes); the weights and intercepts are
  one flat vector for the L-BFGS bookkeeping; a whole iteration is a few dozen tensor operations.
- **Several C at once** (`batch`): the C of a batch are solved together, every operation batched over them (one
  product a side per iteration for all of them, each C stopping at its own tolerance), and each batch starts from
  the last solution of the one before. One C a batch is the fastest on a CPU, where a product's time grows with its
  columns; a GPU takes the whole path as one batch (`method.choose` decides).

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
             factor: bool | None = None, batch: int = 1):
    """Yield a `Solution` for every C of `Cs`, in increasing C, fitted on rows X (n, d) (float32, normalised) with
    labels `y` in 0..n_classes-1; `factor`: solve on the Gram matrix's Cholesky factor (default: when rows are fewer
    than features); `batch`: how many C are solved together."""
    import torch

    X = torch.as_tensor(X, dtype=torch.float32, device=device)
    n, d = X.shape
    if not (d > n if factor is None else factor):
        yield from path_on(InMemory(X), y, n_classes, Cs, tol, max_iter, batch=batch)
        return
    Z, L = _factored(X)
    # the weights are mapped back to the features a chunk of C at a time: one product with X serves the chunk
    chunk = max(1, MAP_BACK_BYTES // (8 * d * n_classes))
    pending = []
    for solution in path_on(InMemory(Z), y, n_classes, Cs, tol, max_iter, raw=True, batch=batch):
        pending.append(solution)
        if len(pending) == chunk:
            yield from _mapped_back(pending, L, X)
            pending = []
    yield from _mapped_back(pending, L, X)


def path_on(rows, y: np.ndarray, n_classes: int, Cs, tol: float, max_iter: int, raw: bool = False, batch: int = 1):
    """`fit_path` on `rows`, anything with `device`, `dim`, `moments`, `forward(W)` = W @ rows^T (the logits,
    classes first) and `backward(R)` = R @ rows (`InMemory`, or a split streamed from the file); `raw`: each
    Solution's coef is the (classes, dim) weights on the rows' own coordinates, as a tensor (for `_mapped_back`)."""
    import torch

    labels = torch.as_tensor(np.asarray(y), device=rows.device).long()
    problem = _Problem(rows, labels, n_classes)
    Cs = sorted(float(c) for c in Cs)
    solved: list[tuple[float, object]] = []  # (log C, solution) of the C solved so far
    for start in range(0, len(Cs), batch):
        group = Cs[start:start + batch]
        # two classes: the softmax of two rows at C/2 is scikit-learn's one-row binary problem at C (w = w1 - w0)
        lams = torch.tensor([1.0 / ((C / 2 if n_classes == 2 else C) * len(labels)) for C in group],
                            dtype=torch.float64, device=rows.device)
        theta = problem.better_start(solved, np.log(group[0]), lams[:1])
        thetas, n_iter, converged = problem.solve(theta.expand(len(group), -1).clone(), lams, tol, max_iter)
        for j, C in enumerate(group):
            W, b = problem.split(thetas[j])
            solution = Solution(C, W, b, int(n_iter[j]), bool(converged[j]))
            yield solution if raw else _finished(solution, W.double())
        solved = (solved + [(float(np.log(group[-1])), thetas[-1])])[-3:]


def extrapolated(solved: list, x: float, zero):
    """Where the fit at log C = x starts: `zero` first, then the last solution, then the solution path extrapolated
    through the last two (a line) or three (a parabola, in log C) solutions of `solved` ((log C, solution) pairs,
    numpy arrays or tensors). Along the protocol's log-spaced grid the path is smooth: a parabola through the three
    before lands 3 to 4 times closer (in L-BFGS iterations) than the last solution does (measured on the bench's
    synthetic map caches)."""
    start = zero * 0
    xs = [point for point, _ in solved]
    for j, (xj, theta) in enumerate(solved):  # Lagrange's polynomial through the points, evaluated at x
        start = start + float(np.prod([(x - xi) / (xj - xi) for i, xi in enumerate(xs) if i != j])) * theta
    return start


def _finished(solution: "Solution", coef) -> "Solution":
    """The solution as scikit-learn keeps it: float64 arrays, one row for two classes (the second's, w1 - w0)."""
    intercept = solution.intercept.double()
    if len(intercept) == 2:
        coef, intercept = coef[1:] - coef[:1], intercept[1:] - intercept[:1]
    return Solution(solution.C, coef.cpu().numpy(), intercept.cpu().numpy(), solution.n_iter, solution.converged)


class InMemory:
    """Rows held as one tensor, for `path_on`. Both products read the rows row-major, as the few-column products
    of a solver's iterations run fastest on a CPU: the rows and their transpose are kept."""

    def __init__(self, Z):
        self.Z, self.Zt = Z.contiguous(), Z.T.contiguous()  # a Cholesky factor comes back column-major
        self.device, self.dim, self.n = Z.device, Z.shape[1], Z.shape[0]
        self.moments = (self.Z * self.Z).mean(0)  # the diagonal of Z^T Z / n, for the preconditioner

    def forward(self, W):
        """(m, k, dim) weights -> (m, k, n) logits."""
        return (W.reshape(-1, self.dim) @ self.Zt).reshape(*W.shape[:-1], self.n)

    def backward(self, R):
        """(m, k, n) residuals -> (m, k, dim)."""
        return (R.reshape(-1, self.n) @ self.Z).reshape(*R.shape[:-1], self.dim)


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
    A = torch.linalg.solve_triangular(L.T, torch.cat([s.coef.double().T for s in solutions], 1), upper=True)
    coefs = (A.T.float() @ X).double().split(solutions[0].coef.shape[0])
    return [_finished(s, coef) for s, coef in zip(solutions, coefs)]


class _Problem:
    """L2 logistic regressions on `rows` (n, r) with integer `labels` (n,), a batch of penalties at a time: L-BFGS
    from warm starts. The parameters of each problem are one flat float64 vector: the (k, r) weights, then the k
    intercepts; the products with the rows run in float32, the rest in float64 on (m, k, n) and (m, size) arrays,
    a few dozen operations an iteration. The float64 sums of the objective run over chunks of rows, so that a
    streamed split of millions of rows stays within its memory budget."""

    def __init__(self, rows, labels, n_classes: int):
        import torch

        self.rows, self.labels, self.n, self.k = rows, labels, len(labels), n_classes
        self.weights = n_classes * rows.dim  # the flat vector's weights, then its k intercepts
        self.size = self.weights + n_classes
        self.Y = torch.nn.functional.one_hot(labels, n_classes).T.double().contiguous()  # (k, n), classes first

    def split(self, theta):
        """A flat parameter vector (or a batch of them) -> (weights (..., k, r), intercepts (..., k))."""
        lead = theta.shape[:-1]
        return theta[..., :self.weights].reshape(*lead, self.k, self.rows.dim), theta[..., self.weights:]

    def _chunks(self, *arrays):
        for start in range(0, self.n, OBJECTIVE_ROWS):
            yield tuple(a[..., start:start + OBJECTIVE_ROWS] for a in arrays)

    def logits(self, theta):
        """(m, size) parameters -> (m, k, n) float64 logits (the product in float32)."""
        W, b = self.split(theta)
        return self.rows.forward(W.float()).double() + b[..., None]

    def _loss(self, logits):
        """Mean cross-entropy of each problem, (m,) float64: a line search compares values 1e-7 apart near the
        optimum."""
        import torch

        total = torch.zeros(logits.shape[0], dtype=torch.float64, device=logits.device)
        for part, labels in self._chunks(logits, self.labels):
            total += (torch.logsumexp(part, 1) - part.gather(1, labels.expand(len(part), 1, -1))[:, 0]).sum(-1)
        return total / self.n

    def _gradient(self, logits, theta, lams):
        import torch

        R = torch.softmax(logits, dim=1).sub_(self.Y).div_(self.n)  # (m, k, n)
        gW = self.rows.backward(R.float()).double().reshape(len(theta), -1)
        gW.add_(theta[:, :self.weights] * lams[:, None])
        return torch.cat([gW, R.sum(-1)], dim=1)

    def _preconditioner(self, lams):
        """The diagonal that L-BFGS's first guess of the inverse Hessian inverts: (m, size)."""
        import torch

        weights = (CURVATURE * self.rows.moments.double())[None, :] + lams[:, None]  # (m, r)
        weights = weights[:, None, :].expand(-1, self.k, -1).reshape(len(lams), -1)
        return torch.cat([weights, torch.full((len(lams), self.k), CURVATURE, dtype=torch.float64,
                                              device=weights.device)], dim=1)

    def better_start(self, solved: list, x: float, lam):
        """Of the path extrapolated to log C = x and the last solution (zero first), the start with the lower
        objective at penalty `lam`: an extrapolation from solutions a float32 solve left far from their optimum (a
        streamed split's, a weakly regularised C's) can land anywhere, and one product tells."""
        import torch

        zero = torch.zeros(self.size, dtype=torch.float64, device=self.rows.device)
        if len(solved) < 2:
            return extrapolated(solved, x, zero)
        starts = torch.stack([extrapolated(solved, x, zero), solved[-1][1].double()])
        lams = lam.expand(2)
        f = self._loss(self.logits(starts)) + 0.5 * lams * self._squares(starts, starts)
        return starts[int(torch.argmin(f))]

    def _squares(self, a, b):
        """The dot products of the weights (not the intercepts: they are not penalised), (m,)."""
        return torch_vecdot(a[:, :self.weights], b[:, :self.weights])

    def solve(self, theta, lams, tol: float, max_iter: int):
        """(thetas, iterations, converged) of a batch of problems, from warm starts `theta` (m, size), at penalties
        `lams` (m,); each problem stops on its own (no gradient entry over `tol`), the others go on."""
        import torch

        m, device = len(lams), theta.device
        theta = theta.double()
        logits = self.logits(theta)
        f = self._loss(logits) + 0.5 * lams * self._squares(theta, theta)
        g = self._gradient(logits, theta, lams)
        precondition = self._preconditioner(lams)
        history = _History(m, self.size, device)
        n_iter = torch.full((m,), max_iter, dtype=torch.long, device=device)
        converged = torch.zeros(m, dtype=torch.bool, device=device)
        done = torch.zeros(m, dtype=torch.bool, device=device)
        for it in range(max_iter + 1):
            small = g.abs().amax(1) <= tol
            if bool(small.any()):
                small &= ~done
                converged |= small
                n_iter[small] = it
                done |= small
                if bool(done.all()):
                    break
            if it == max_iter:
                break
            p, slope = history.direction(g, precondition)
            dlogits = self.logits(p)
            t, f_new, failed = self._line_search(logits, dlogits, theta, p, f, slope, lams, ~done)
            if bool(failed.any()):  # no step decreases the objective: as far as float32 goes
                n_iter[failed] = it
                done |= failed
                if bool(done.all()):
                    break
                t = torch.where(done, torch.zeros_like(t), t)  # the finished problems stay where they are
            s = p.mul_(t[:, None])
            theta = theta + s
            logits.add_(dlogits.mul_(t[:, None, None]))
            f = torch.where(done, f, f_new)
            new = self._gradient(logits, theta, lams)
            history.add(s, new - g, ~done)
            g = torch.where(done[:, None], g, new)
        return theta, n_iter.cpu(), converged.cpu()

    def _line_search(self, logits, dlogits, theta, p, f, slope, lams, active):
        """Backtracking from the unit step, every problem at once: (steps, objectives there, failed). A step is taken
        when it decreases the objective enough (Armijo), or, near the optimum where float32 logits cannot resolve
        that decrease, when the slope along the line there shows it is no worse (Hager and Zhang's approximate
        Wolfe conditions); a problem whose every step failed is `failed`."""
        import torch

        norms = (self._squares(theta, theta), self._squares(theta, p), self._squares(p, p))
        t = torch.ones_like(f)
        value = f.clone()
        pending = active.clone()
        for _ in range(MAX_HALVINGS):
            trial, derivative = self._along(logits, dlogits, t, lams, norms)
            accept = (trial <= f + ARMIJO * t * slope) | (
                (trial <= f + FLOAT_NOISE * f.abs()) & (WOLFE_SIGMA * slope <= derivative)
                & (derivative <= (2 * WOLFE_DELTA - 1) * slope))
            accept &= pending
            value = torch.where(accept, trial, value)
            pending &= ~accept
            if not bool(pending.any()):
                break
            t = torch.where(pending, t * 0.5, t)
        return t, value, pending

    def _along(self, logits, dlogits, t, lams, norms):
        """Each problem's objective and its derivative at its step t along its line, (m,) each, from the logits
        alone: no product with the rows."""
        import torch

        loss = torch.zeros_like(t)
        slope = torch.zeros_like(t)
        steps = t[:, None, None]
        for part, step, labels in self._chunks(logits, dlogits, self.labels):
            logp = torch.log_softmax(torch.addcmul(part, steps, step), dim=1)
            index = labels.expand(len(part), 1, -1)
            loss -= logp.gather(1, index)[:, 0].sum(-1)
            slope += (logp.exp_().mul_(step)).sum((1, 2)) - step.gather(1, index)[:, 0].sum(-1)
        ww, wp, pp = norms
        value = loss / self.n + 0.5 * lams * (ww + 2 * t * wp + t * t * pp)
        return value, slope / self.n + lams * (wp + t * pp)


def torch_vecdot(a, b):
    """Row-wise dot products of two (m, p) tensors."""
    return (a * b).sum(-1)


class _History:
    """The L-BFGS correction pairs of a batch of problems, float64: a ring of HISTORY slots shared by the batch, a
    pair counting only for the problems that added it (a problem that skips a pair keeps its older ones)."""

    def __init__(self, m: int, size: int, device):
        import torch

        self.S = torch.zeros(HISTORY, m, size, dtype=torch.float64, device=device)
        self.Y = torch.zeros(HISTORY, m, size, dtype=torch.float64, device=device)
        self.rho = torch.zeros(HISTORY, m, dtype=torch.float64, device=device)  # 0: no pair in this slot
        self.gamma = torch.ones(m, dtype=torch.float64, device=device)  # s.y / y.H0 y of each newest pair
        self.count = 0

    def add(self, s, y, live) -> None:
        """Keep (s, y) for the problems where `live` and the curvature s.y is safely positive."""
        import torch

        sy = torch_vecdot(s, y)
        keep = live & (sy > 1e-10 * (torch_vecdot(s, s) * torch_vecdot(y, y)).sqrt())
        slot = self.count % HISTORY
        self.S[slot], self.Y[slot] = s, y
        self.rho[slot] = torch.where(keep, 1.0 / sy.clamp(min=1e-300), torch.zeros_like(sy))
        self.count += 1
        self._new = (sy, y, keep)

    def direction(self, g, precondition):
        """(-H g, the slope g.(-H g)) of each problem by L-BFGS's two-loop recursion, H0 the diagonal
        preconditioner scaled by the newest pair's curvature; steepest preconditioned descent where that is not a
        descent direction."""
        import torch

        if self.count:  # the scaling of H0 from the newest pair each problem kept
            sy, y, keep = self._new
            gamma = sy / torch_vecdot(y, y / precondition).clamp(min=1e-30)
            self.gamma = torch.where(keep, gamma, self.gamma)
        q, alphas = g.clone(), []
        slots = [(self.count - 1 - j) % HISTORY for j in range(min(self.count, HISTORY))]  # newest first
        for slot in slots:
            a = self.rho[slot] * torch_vecdot(self.S[slot], q)
            alphas.append(a)
            q.sub_(self.Y[slot] * a[:, None])
        r = q.div_(precondition).mul_(self.gamma[:, None])
        for slot, a in zip(reversed(slots), reversed(alphas)):
            beta = self.rho[slot] * torch_vecdot(self.Y[slot], r)
            r.add_(self.S[slot] * (a - beta)[:, None])
        p = r.neg_()
        slope = torch_vecdot(g, p)
        steepest = slope >= 0
        if bool(steepest.any()):
            p = torch.where(steepest[:, None], -g / precondition, p)
            slope = torch_vecdot(g, p)
        return p, slope


class Streamed:
    """A split read from the cache block by block (`stream.SplitRows`), normalised as a head normalises its rows,
    for `path_on`: standardisation statistics and the preconditioner's moments from one pass, then every product a
    pass; memory holds one block and the (k, n) results."""

    def __init__(self, rows, norm: str, device: str = "cpu"):
        import torch

        self.rows, self.norm, self.device, self.dim, self.n = rows, norm, torch.device(device), rows.dim, len(rows)
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

    def forward(self, W):
        import torch

        out = torch.empty(*W.shape[:-1], self.n, device=self.device)
        flat = W.reshape(-1, self.dim)
        for Z, local in self._blocks():
            out.view(-1, self.n)[:, local] = flat @ Z.T
        return out

    def backward(self, R):
        import torch

        out = torch.zeros(*R.shape[:-1], self.dim, device=self.device)
        flat = R.reshape(-1, self.n)
        for Z, local in self._blocks():
            out.view(-1, self.dim).add_(flat[:, local] @ Z)
        return out
