"""Rows held out of a training split for early stopping (stratified, seeded), in memory or streamed, and the
augmented views that join their source image on the training side, never the held-out one.
"""

from __future__ import annotations

import os

import numpy as np

# The early-stopping rows of a streamed split are kept in memory: at most this many, and this many bytes of them (as
# float32), so that memory does not grow with the split (tests lower the bytes to see that at small sizes).
MAX_HELD_OUT_ROWS = 10_000
MAX_HELD_OUT_BYTES = int(os.environ.get("VGGCACHE_HELD_OUT_BYTES", str(64 << 20)))


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
    from sklearn.model_selection import train_test_split  # here: only the heads that stop early hold rows out

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
