"""Classifier heads on cached features, both with scikit-learn's estimator contract, and their save/load.

`LogRegHead`: StandardScaler + LogisticRegression. `LinearHead`: a torch linear layer (or one hidden layer with
dropout) trained with AdamW, a cosine schedule and early stopping on validation loss.
"""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path

import joblib
import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

log = logging.getLogger(__name__)

HEADS = ("logreg", "linear")


class LogRegHead(ClassifierMixin, BaseEstimator):
    """Multinomial logistic regression on standardised features."""

    def __init__(self, C: float = 1.0, max_iter: int = 2000, tol: float = 1e-4):
        self.C, self.max_iter, self.tol = C, max_iter, tol

    def fit(self, X, y, eval_set=None) -> "LogRegHead":  # eval_set: accepted for a common signature, unused
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            self.pipeline_ = Pipeline([("scale", StandardScaler()),
                                       ("clf", LogisticRegression(C=self.C, max_iter=self.max_iter, tol=self.tol))])
            self.pipeline_.fit(np.asarray(X, np.float32), y)
        self.converged_ = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        self.classes_ = self.pipeline_.classes_
        self.n_iter_ = int(self.pipeline_[-1].n_iter_.max())
        return self

    def predict_proba(self, X) -> np.ndarray:
        proba = self.pipeline_.predict_proba(np.asarray(X, np.float32)).astype(np.float64)
        return proba / proba.sum(1, keepdims=True)  # float32 rows miss 1 by more than scikit-learn's metrics tolerate

    def predict(self, X) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(1)]


class LinearHead(ClassifierMixin, BaseEstimator):
    """A torch `nn.Linear` (or Linear-ReLU-Dropout-Linear with `hidden`) on features standardised with train stats."""

    def __init__(self, hidden: int = 0, dropout: float = 0.5, lr: float = 1e-3, weight_decay: float = 1e-2,
                 epochs: int = 200, batch_size: int = 256, patience: int = 15, seed: int = 0, device: str = "auto"):
        self.hidden, self.dropout, self.lr, self.weight_decay = hidden, dropout, lr, weight_decay
        self.epochs, self.batch_size, self.patience, self.seed, self.device = epochs, batch_size, patience, seed, device

    def _module(self, n_in: int, n_out: int):
        from torch import nn

        if not self.hidden:
            return nn.Linear(n_in, n_out)
        return nn.Sequential(nn.Linear(n_in, self.hidden), nn.ReLU(), nn.Dropout(self.dropout), nn.Linear(self.hidden, n_out))

    def fit(self, X, y, eval_set=None) -> "LinearHead":
        """Train on (X, y); stop early on the loss of `eval_set` (or of a stratified 10% of X when none is given)."""
        import torch

        from pipeline.device import resolve_device

        X, y = np.asarray(X, np.float32), np.asarray(y)
        if eval_set is None:
            X, Xv, y, yv = train_test_split(X, y, test_size=0.1, stratify=y, random_state=self.seed)
        else:
            Xv, yv = np.asarray(eval_set[0], np.float32), np.asarray(eval_set[1])
        self.classes_ = np.unique(y)
        self.mean_, self.scale_ = X.mean(0), X.std(0) + 1e-6
        device = resolve_device(self.device)
        torch.manual_seed(self.seed)
        self.module_ = self._module(X.shape[1], len(self.classes_)).to(device)
        history = _train(self, self._tensor(X, device), _encode(self.classes_, y, device),
                         self._tensor(Xv, device), _encode(self.classes_, yv, device))
        self.n_epochs_, self.best_epoch_, self.best_val_loss_ = history
        self.module_ = self.module_.cpu().eval()
        return self

    def _tensor(self, X, device):
        import torch

        return torch.from_numpy((np.asarray(X, np.float32) - self.mean_) / self.scale_).to(device)

    def predict_proba(self, X) -> np.ndarray:
        import torch

        with torch.inference_mode():
            # softmax in float64: float32 rows miss summing to 1 by more than scikit-learn's metrics tolerate
            return torch.softmax(self.module_(self._tensor(X, "cpu")).double(), dim=1).numpy()

    def predict(self, X) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(1)]


def _encode(classes: np.ndarray, y: np.ndarray, device):
    import torch

    return torch.from_numpy(np.searchsorted(classes, y)).long().to(device)


def _train(head: LinearHead, X, y, Xv, yv) -> tuple[int, int, float]:
    """AdamW + cosine decay; keep the weights of the epoch with the lowest validation loss."""
    import torch
    import torch.nn.functional as F

    module = head.module_
    opt = torch.optim.AdamW(module.parameters(), lr=head.lr, weight_decay=head.weight_decay)
    steps_per_epoch = -(-len(X) // head.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=head.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(head.seed)
    best = (float("inf"), 0, copy.deepcopy(module.state_dict()))
    for epoch in range(1, head.epochs + 1):
        module.train()
        for idx in torch.randperm(len(X), generator=gen).split(head.batch_size):
            idx = idx.to(X.device)
            loss = F.cross_entropy(module(X[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        module.eval()
        with torch.inference_mode():
            val_loss = F.cross_entropy(module(Xv), yv).item()
        if val_loss < best[0] - 1e-5:
            best = (val_loss, epoch, copy.deepcopy(module.state_dict()))
        elif epoch - best[1] >= head.patience:
            break
    module.load_state_dict(best[2])
    return epoch, best[1], best[0]


def full_proba(head, X, n_classes: int) -> np.ndarray:
    """Probabilities over all `n_classes` label indices, 0 for classes the head never saw in training."""
    proba = np.zeros((len(X), n_classes))
    proba[:, head.classes_] = head.predict_proba(X)
    return proba


def make_head(kind: str, **params):
    return {"logreg": LogRegHead, "linear": LinearHead}[kind](**params)


def save_head(head, folder: Path) -> Path:
    """joblib for the scikit-learn head; a plain tensor dict for the torch head (loadable with weights_only=True)."""
    if isinstance(head, LogRegHead):
        path = Path(folder) / "head.joblib"
        joblib.dump(head, path)
        return path
    import torch

    path = Path(folder) / "head.pt"
    state = {f"module.{k}": v for k, v in head.module_.state_dict().items()}
    state |= {"mean": torch.from_numpy(head.mean_), "scale": torch.from_numpy(head.scale_),
              "classes": torch.from_numpy(np.asarray(head.classes_))}
    torch.save(state, path)
    return path


def load_head(kind: str, params: dict, path: Path):
    """Rebuild a head saved by `save_head`; `params` are its constructor arguments (from run.json)."""
    if kind == "logreg":
        return joblib.load(path)
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    head = LinearHead(**params)
    head.mean_, head.scale_, head.classes_ = state["mean"].numpy(), state["scale"].numpy(), state["classes"].numpy()
    head.module_ = head._module(len(head.mean_), len(head.classes_))
    head.module_.load_state_dict({k[len("module."):]: v for k, v in state.items() if k.startswith("module.")})
    head.module_.eval()
    return head
