"""Every pair of rows compared exactly, a block of rows against a block at a time (each pair once): the pairs
at or above a similarity, and each row's nearest neighbours, in memory of a few blocks whatever the number of
rows. What `audit` finds near-duplicates and likely mislabelled images with.
"""

from __future__ import annotations

import math

import numpy as np

BLOCK_ROWS = 4096  # rows per similarity block: a 4096 x 4096 float32 block is 64 MB
SCREEN_MARGIN = 0.01  # bf16 screening: pairs re-scored from this far under the threshold (bf16 errs < 0.003)
CHUNK = 32  # values per chunk whose maximum decides whether its values are looked at (_Best.fold)


# bf16 screening: neighbours re-scored among this many more than asked. bf16 ties are frequent (its spacing is
# 0.002 at 0.4); with 3, 9 of 100,000 synthetic rows got a 5th neighbour 0.001 worse than the exact one, with 5 none
SCREEN_EXTRA = 5


def similar_pairs_and_neighbours(X: np.ndarray, threshold: float, k: int, block: int = BLOCK_ROWS,
                                 screen_bf16: bool | None = None):
    """(pairs i < j with similarity >= threshold as three arrays, (n, k) nearest neighbours' indices and
    similarities), every pair of rows compared once, a block of rows against another at a time.

    Each block is compared with itself first, which gives every row good neighbours at once; after that, a
    block of products holds few values that beat a row's current worst kept neighbour or reach the threshold,
    and they are found from the maxima of short chunks (_Best.fold) instead of by sorting whole blocks.

    On CPUs with native bf16 the blocks are screened in bf16 (2x to 4x the float32 speed; its error on unit rows
    is under 0.003), then every candidate is scored again in float32: pairs from `threshold - SCREEN_MARGIN` up,
    neighbours among the k + SCREEN_EXTRA best. What is returned is float32 similarity, as without screening.
    """
    import torch

    from pipeline.device import cpu_has_native_bf16

    bf16 = cpu_has_native_bf16() if screen_bf16 is None else screen_bf16
    Xt = torch.from_numpy(np.ascontiguousarray(X, np.float32))
    n, k = len(X), min(k, max(len(X) - 1, 0))
    kept = min(k + SCREEN_EXTRA, max(n - 1, 0)) if bf16 else k
    floor = threshold - SCREEN_MARGIN if bf16 else threshold
    chunk = math.gcd(block, CHUNK)
    padded = -(-n // chunk) * chunk  # whole chunks; padding rows are set to -2 in every product
    Xs = torch.cat([Xt, Xt.new_zeros(padded - n, Xt.shape[1])]).to(torch.bfloat16 if bf16 else torch.float32)
    best, found = _Best(padded, kept, floor, chunk), []

    def product(i0: int, j0: int):
        S = Xs[i0:i0 + block] @ Xs[j0:j0 + block].T
        S[max(n - i0, 0):], S[:, max(n - j0, 0):] = -2.0, -2.0
        if i0 == j0:
            S.fill_diagonal_(-2.0)  # an image is not its own neighbour
        return S

    starts = range(0, padded, block)
    for i0 in starts:
        found.append(best.seed(i0, product(i0, i0)))
    for a, i0 in enumerate(starts):
        for j0 in starts[a + 1:]:
            found.append(best.fold(product(i0, j0), i0, j0))
    i, j = (torch.cat(column) for column in zip(*found)) if found else (torch.zeros(0, dtype=torch.int64),) * 2
    sims = _pair_similarities(Xt, i, j)  # float32, whatever the screening
    keep = sims >= threshold
    idx, sim = best.rescored(Xt, k)
    return (i[keep].numpy(), j[keep].numpy(), sims[keep].numpy()), idx, sim


def _pair_similarities(Xt, i, j, values: int = 1 << 24):
    """Float32 cosine of each pair (i, j), gathering rows a slice of pairs at a time (64 MB of them), so that a
    cache where most pairs are near-duplicates does not gather gigabytes at once."""
    import torch

    step = max(1, values // max(Xt.shape[1], 1))
    parts = [(Xt[i[s:s + step]] * Xt[j[s:s + step]]).sum(1) for s in range(0, len(i), step)]
    return torch.cat(parts) if parts else torch.zeros(0)


def _row_passing(S, w: int, bar):
    """_passing over the rows of block S. A row's chunk is every (C/w)-th column, not w consecutive ones: its
    maxima then reduce across rows of S, element by element, which vectorises (as a column's chunk does)."""
    R, C = S.shape
    by_row = S.view(R, w, C // w)
    return _passing(by_row.transpose(1, 2), by_row.amax(1), bar, (1, C // w))


def _passing(chunks, maxima, bar, steps: tuple[int, int]):
    """(owner, position, value) of every value at or above its owner's bar, looked for only in the chunks whose
    maximum reaches it. chunks: (owner, chunk, offset) view of a block; maxima: (owner, chunk); a value's position
    along its owner is chunk * steps[0] + offset * steps[1]."""
    owner, c = (maxima.float() >= bar[:, None]).nonzero().T
    values = chunks[owner, c].float()  # (live chunks, chunk length)
    m, o = (values >= bar[owner, None]).nonzero().T
    return owner[m], c[m] * steps[0] + o * steps[1], values[m, o]


class _Best:
    """The running `kept` best neighbours of every row: indices and their (screening) similarities. An empty
    slot holds -3: below any cosine, and below the -2 of padding and of a row with itself."""

    def __init__(self, n: int, kept: int, floor: float, chunk: int):
        import torch

        self.sim = torch.full((n, kept), -3.0)
        self.idx = torch.zeros((n, kept), dtype=torch.int64)
        self.kept, self.floor, self.chunk = kept, floor, chunk

    def seed(self, row0: int, S):
        """The best neighbours of rows row0.. within their own block (S: the block against itself); return the
        block's pairs i < j at or above the floor."""
        import torch

        top = S.topk(min(self.kept, S.shape[1]), dim=1)
        real = top.values > -1.5  # not padding, not the row itself
        rows, slots = slice(row0, row0 + len(S)), slice(0, top.values.shape[1])
        self.sim[rows, slots] = top.values.float().where(real, -3.0)
        self.idx[rows, slots] = (top.indices + row0).where(real, 0)
        i, j, _ = _row_passing(S, self.chunk, torch.full((len(S),), self.floor))
        return i[j > i] + row0, j[j > i] + row0

    def bar(self, start: int, count: int):
        """What a value must reach to matter to rows start..: just above their worst kept similarity (a tie
        changes nothing, and ties are everywhere in a cache of identical or blank images), or the floor when
        lower (a pair to report); never below -1.5, where padding and a row's own product lie."""
        import torch

        worst = self.sim[start:start + count, -1] if self.kept else torch.full((count,), float("inf"))
        return torch.nextafter(worst, torch.tensor(float("inf"))).clamp(min=-1.5, max=self.floor)

    def fold(self, S, row0: int, col0: int):
        """Fold block S (rows row0.., columns col0.. with col0 > row0) into the neighbours of its rows and of its
        columns; return its pairs at or above the floor."""
        w, (R, C) = self.chunk, S.shape
        rows, cols, values = _row_passing(S, w, self.bar(row0, R))
        self.merge(rows + row0, cols + col0, values)
        hits = values >= self.floor
        by_col = S.view(R // w, w, C)  # a column's chunk: w consecutive rows
        c_cols, c_rows, c_values = _passing(by_col.permute(2, 0, 1), by_col.amax(1).T, self.bar(col0, C), (w, 1))
        self.merge(c_cols + col0, c_rows + row0, c_values)
        return rows[hits] + row0, cols[hits] + col0

    def merge(self, rows, cols, values) -> None:
        """Fold candidates (row, neighbour, similarity), each (row, neighbour) new, into the kept best: sort each
        affected row's kept and candidates together, keep the first `kept`. Candidates that only reached the
        pair floor, not the row's worst kept, are left out first."""
        import torch

        if not self.kept or not len(rows):
            return
        better = values > self.sim[rows, -1]
        rows, cols, values = rows[better], cols[better], values[better]
        if not len(rows):
            return
        owners, counts = rows.unique(return_counts=True)
        rows = torch.cat([owners.repeat_interleave(self.kept), rows])
        values = torch.cat([self.sim[owners].flatten(), values])
        cols = torch.cat([self.idx[owners].flatten(), cols])
        # one sort, by row then best first: similarities lie in [-3, 1], so row * 8 - similarity never overlaps
        order = (rows.double() * 8 - values.double()).argsort()
        counts = counts + self.kept
        rank = torch.arange(len(order)) - (counts.cumsum(0) - counts).repeat_interleave(counts)
        first = rank < self.kept
        keep = order[first]
        self.sim[rows[keep], rank[first]] = values[keep]
        self.idx[rows[keep], rank[first]] = cols[keep]

    def rescored(self, Xt, k: int, step: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """The k best of the kept candidates, by float32 similarity, a block of rows at a time."""
        import torch

        n = len(Xt)
        idx, sim = np.zeros((n, k), np.int64), np.zeros((n, k), np.float32)
        for start in range(0, n, step):
            rows = slice(start, min(start + step, n))  # self holds padding rows past n
            cand = self.idx[rows]
            exact = torch.einsum("rd,rkd->rk", Xt[rows], Xt[cand])
            exact[self.sim[rows] < -2.5] = -3.0  # slots never filled (fewer rows than kept)
            top = exact.topk(k, dim=1)
            idx[rows], sim[rows] = cand.gather(1, top.indices).numpy(), top.values.numpy()
        return idx, sim
