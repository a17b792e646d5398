"""The feature normalisations every head takes (`NORMS`), once: `standard` (per-feature standardisation with
training statistics), `l2` (unit rows) or `power` (signed square root, then unit rows), the usual fixes for
the skewed, non-negative ReLU features. The same row-wise math in numpy (fitting, predicting) and in torch (the
solver's rows, an exported head's input).
"""

from __future__ import annotations

import numpy as np

NORMS = ("standard", "l2", "power")


def moments(X: np.ndarray, rows_per_step: int = 1 << 14) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation over rows, in float64 sums taken a slice at a time (no full float64 copy)."""
    total, squares = np.zeros(X.shape[1]), np.zeros(X.shape[1])
    for start in range(0, len(X), rows_per_step):
        part = X[start:start + rows_per_step].astype(np.float64)
        total += part.sum(0)
        squares += (part * part).sum(0)
    mean = total / max(len(X), 1)
    return mean, np.sqrt(np.maximum(squares / max(len(X), 1) - mean * mean, 0))


def standardised32(X: np.ndarray, mean: np.ndarray, scale: np.ndarray, rows_per_step: int = 1 << 14) -> np.ndarray:
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


def norm_statistics(X: np.ndarray, norm: str) -> tuple[np.ndarray, np.ndarray]:
    """(mean, scale) applied after the row-wise part: the training rows' own for `standard`, the identity else."""
    from sklearn.preprocessing import StandardScaler

    if norm != "standard":
        return np.zeros(X.shape[1]), np.ones(X.shape[1])
    scaler = StandardScaler().fit(X)
    return scaler.mean_.astype(np.float64), scaler.scale_.astype(np.float64)


def prepared(X, mean, scale, norm: str) -> np.ndarray:
    return _standardise(row_normalised(X, norm), mean, scale)


def row_normalised_tensor(T, norm: str):
    """`row_normalised` in torch (the solver's rows, an exported head's input): `power` takes signed square
    roots, then `l2` and `power` scale each row to unit length; `standard` leaves rows as they are."""
    if norm == "power":
        T = T.sign() * T.abs().sqrt()
    if norm in ("l2", "power"):
        T = T / T.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return T


def normalised_tensor(X: np.ndarray, norm: str, device: str = "cpu", rows_per_step: int = 4096):
    """(rows as a float32 tensor on `device`, mean, scale): the rows normalised as `row_normalised`, then
    standardised by their own statistics (`standard`, as scikit-learn's StandardScaler: float64 sums, a constant
    feature's scale 1), on the device and in float32 (the numpy path takes 3x longer on a wide map)."""
    import torch

    T = row_normalised_tensor(torch.as_tensor(X, dtype=torch.float32).to(device), norm)
    if norm in ("l2", "power"):
        return T, np.zeros(T.shape[1]), np.ones(T.shape[1])
    if norm != "standard":
        raise ValueError(f"norm {norm!r} is not one of standard, l2, power")
    total = torch.zeros(T.shape[1], dtype=torch.float64, device=T.device)
    for part in T.split(rows_per_step):
        total += part.double().sum(0)
    mean = total / max(len(T), 1)
    squares = torch.zeros_like(total)
    for part in T.split(rows_per_step):
        squares += ((part.double() - mean) ** 2).sum(0)
    std = (squares / max(len(T), 1)).sqrt()
    scale = torch.where(std < 10 * torch.finfo(torch.float64).eps, torch.ones_like(std), std)
    return (T - mean.float()) / scale.float(), mean.cpu().numpy(), scale.cpu().numpy()


def normalised_array(X: np.ndarray, norm: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`normalised_tensor` in numpy float64: (rows, mean, scale), the rows normalised by `row_normalised` then
    standardised by their own statistics (`standard`: a constant feature's scale 1, as scikit-learn's)."""
    Z = np.asarray(row_normalised(X, norm), np.float64)
    if norm in ("l2", "power"):
        return Z, np.zeros(Z.shape[1]), np.ones(Z.shape[1])
    if norm != "standard":
        raise ValueError(f"norm {norm!r} is not one of {', '.join(NORMS)}")
    mean = Z.mean(0)
    std = np.sqrt(((Z - mean) ** 2).mean(0))
    scale = np.where(std < 10 * np.finfo(np.float64).eps, 1.0, std)
    return (Z - mean) / scale, mean, scale
