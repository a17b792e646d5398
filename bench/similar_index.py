"""The similar index, measured (docs/similar.md): build time, query time per query and recall@10 against exact
search, of the exact index (IndexFlatIP) and the approximate one (IVF-Flat, hub/index.py's settings), on clustered
synthetic rows (unit rows of 512 dims around 1,000 centres, as embeddings cluster, not uniform noise).

    python bench/similar_index.py [--rows 10000,100000] [--queries 200]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from pipeline.hub.index import approximate_index, cells_for, exact_search, faiss_module, unit_rows


def clustered(n: int, dim: int = 512, centres: int = 1000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    C = rng.standard_normal((centres, dim)).astype(np.float32) * 2
    X = C[rng.integers(0, centres, n)] + rng.standard_normal((n, dim)).astype(np.float32)
    return unit_rows(X, X.mean(0))


def timed(f):
    start = time.perf_counter()
    out = f()
    return out, time.perf_counter() - start


def measure(n: int, queries: int, faiss) -> list[str]:
    X = clustered(n)
    Q = X[np.random.default_rng(1).choice(n, queries, replace=False)]
    exact, t_build = timed(lambda: _filled(faiss.IndexFlatIP(X.shape[1]), X))
    (_, want), t_query = timed(lambda: _one_by_one(exact, Q))
    lines = [f"| {n:,} | exact (IndexFlatIP) | {t_build:.2f} | {t_query / queries * 1e3:.2f} | 1.000 |"]
    approx, t_build = timed(lambda: _filled(approximate_index(faiss, X), X))
    for share in (1 / 64, 1 / 32, 1 / 16, 1 / 8):
        approx.nprobe = max(1, math.ceil(approx.nlist * share))
        (_, got), t_query = timed(lambda: _one_by_one(approx, Q))
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(want, got)])
        lines.append(f"| {n:,} | IVF-Flat nlist {approx.nlist}, nprobe {approx.nprobe} | {t_build:.2f} | "
                     f"{t_query / queries * 1e3:.2f} | {recall:.3f} |")
    return lines


def bench_index(sizes=(10_000, 100_000), queries: int = 200) -> list[str]:
    """`make bench` row 18: the table rows of `measure` at each size."""
    faiss = faiss_module()
    return [line for n in sizes for line in measure(n, queries, faiss)]


def _filled(index, X):
    index.add(X)
    return index


def _one_by_one(index, Q):
    """Queries as `similar` and /similar send them: one at a time."""
    parts = [exact_search(index, Q[i:i + 1], 10) for i in range(len(Q))]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="10000,100000")
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()
    faiss = faiss_module()
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads; nlist at 100,000 rows: {cells_for(100_000)}")
    print("| rows | index | build s | ms per query | recall@10 |")
    print("| --- | --- | --- | --- | --- |")
    for n in map(int, args.rows.split(",")):
        for line in measure(n, args.queries, faiss):
            print(line, flush=True)


if __name__ == "__main__":
    main()
