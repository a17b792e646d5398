"""The heads registry: each head is one entry (name, estimator, swept hyperparameters and grids); save and load.

A head is saved as its learned arrays in one `.npz`, read back with `allow_pickle=False`, so a run folder can
never run code. Estimators live in their own modules (logreg.py, linear.py, knn.py, block5.py), imported on first
use: scikit-learn and torch take seconds to import, and the CLI (which reads this registry for its help and
defaults) must start fast.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HEAD_FILE = "head.npz"


# The linear-probe protocol's L2 grid (Kornblith et al. 2019; the CLIP and DINOv2 evaluations): 45 log-spaced C.
LOGREG_C = tuple(float(c) for c in np.logspace(-6, 5, 45))


@dataclass(frozen=True)
class HeadSpec:
    """One head: where its estimator is, the hyperparameters the sweep varies and their grids (tried as a product),
    the HeadConfig fields passed to it as they are, its default normalisation, a line for --help."""

    name: str
    estimator_path: str  # "module:Class"
    grid: dict  # hyperparameter -> values; the first is the x axis of sweep.png
    fixed: tuple[str, ...]  # HeadConfig fields passed unchanged
    default_norm: str | None  # None: the head takes no normalisation (block5 feeds raw maps to conv5_1)
    description: str
    streams: bool  # can train on a split read from the file as it goes (stream.SplitRows): caches over memory
    memory_copies: float  # float32 copies of its rows it holds at its peak when fitting in memory (measured, rounded up)
    # hyperparameters whose values the estimator fits together in one call (`fit_many`, `fit_rows_many`): logreg's C
    # along a warm-started path, linear's learning rates and weight decays as one wide module
    together: tuple[str, ...] = ()
    defaults: dict = field(default_factory=dict)  # its own defaults of HeadConfig fields left unset (None)
    takes_map: bool = False  # trains on a pool4 map cache's rows as they are (no head-time pooling)

    @property
    def swept(self) -> tuple[str, ...]:
        return tuple(self.grid)

    @property
    def estimator(self) -> type:
        module, name = self.estimator_path.split(":")
        return getattr(importlib.import_module(module), name)


_LINEAR_FIXED = ("hidden", "dropout", "epochs", "batch_size", "patience", "validation_fraction", "seed", "device")
_TRAINING = {"epochs": 200, "batch_size": 256, "patience": 15}
HEADS: dict[str, HeadSpec] = {h.name: h for h in (
    HeadSpec("logreg", "pipeline.heads.logreg:LogRegHead", {"C": LOGREG_C}, ("solver", "device"), "standard",
             "multinomial logistic regression, C swept over 45 values 1e-6..1e5 along a warm-started path (Newton "
             "for a small problem, torch L-BFGS otherwise, on the GPU when there is one; --solver sklearn: "
             "scikit-learn's, the reference)",
             streams=True, memory_copies=6.0,  # measured 5.2-6: the split, float32 and float64 normalised copies
             together=("C",), defaults={"solver": "auto"}),
    HeadSpec("linear", "pipeline.heads.linear:LinearHead", {"weight_decay": (1e-6, 1e-4, 1e-2, 1.0), "lr": (1e-3, 1e-2)},
             _LINEAR_FIXED, "standard",
             "torch linear layer (optionally one hidden layer), AdamW, early stopping; its 8 settings trained together",
             streams=True, memory_copies=2.5,  # measured 2.0: the split as read, then standardised in float32
             together=("weight_decay", "lr"), defaults=_TRAINING),
    HeadSpec("knn", "pipeline.heads.knn:KnnHead", {"k": (1, 3, 5, 10, 20, 50)}, (), "l2",
             "cosine k-nearest neighbours, weighted votes (no training; keeps the training rows)", streams=False,
             memory_copies=4.0),  # its float64 copy of the training rows, then the split as read
    HeadSpec("block5", "pipeline.heads.block5:Block5Head", {"lr": (1e-4,)},
             ("weights", "weight_decay", "epochs", "batch_size", "patience", "validation_fraction",
              "freeze_convs", "seed", "device"), None,
             "fine-tune VGG16's block 5 + a linear layer on a pool4 cache (extract --layer pool4 --pool map)",
             streams=True, memory_copies=3.0, takes_map=True,
             defaults={"epochs": 30, "batch_size": 32, "patience": 5, "weight_decay": 1e-4}),
)}


def make_head(kind: str, **params):
    return HEADS[kind].estimator(**params)


def full_proba(head, X, n_classes: int) -> np.ndarray:
    """Probabilities over all `n_classes` label indices, 0 for classes the head never saw in training.

    `X`: an array, or rows read from the cache block by block (`stream.SplitRows`).
    """
    proba = np.zeros((len(X), n_classes))
    if hasattr(X, "blocks"):
        for block, rows in X.blocks():
            proba[np.ix_(rows, head.classes_)] = head.predict_proba(block)
    else:
        proba[:, head.classes_] = head.predict_proba(X)
    return proba


def save_head(head, folder: Path) -> Path:
    """The head's learned arrays, and its classes, in one `.npz` (no pickle: object arrays are refused)."""
    path = Path(folder) / HEAD_FILE
    arrays = head.to_arrays() | {"classes": np.asarray(head.classes_), "n_features_in": np.array(head.n_features_in_)}
    if any(a.dtype == object for a in arrays.values()):
        raise TypeError("a head array holds Python objects; only numeric and text arrays are saved")
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def load_head(kind: str, params: dict, path: Path):
    """Rebuild a head saved by `save_head`; `params` are its constructor arguments (from run.json)."""
    head = make_head(kind, **params)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except ValueError as e:  # numpy's message would advise allow_pickle=True: never for a file someone gave you
        detail = "it holds pickled Python objects, which are never loaded" if "pickle" in str(e) else str(e)
        raise ValueError(detail) from None
    classes, n_features = arrays.pop("classes", None), arrays.pop("n_features_in", None)
    if classes is None or classes.ndim != 1 or classes.dtype.kind not in "iu" or len(classes) < 2:
        raise ValueError("its 'classes' array is missing or not two or more class indices")
    if n_features is None or n_features.shape != () or n_features.dtype.kind not in "iu" or n_features < 1:
        raise ValueError("its 'n_features_in' is missing or not a positive integer")
    head.classes_, head.n_features_in_ = classes, int(n_features)
    head.set_arrays(arrays)
    return head
