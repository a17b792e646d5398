"""Heads: scikit-learn's contract, accuracy on separable clusters, and save/load that changes nothing."""

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.datasets import make_blobs

from pipeline.heads import LinearHead, LogRegHead, load_head, save_head

HEADS = [LogRegHead(), LinearHead(device="cpu")]


def blobs(n=600, seed=0):
    X, y = make_blobs(n_samples=n, centers=4, n_features=32, cluster_std=2.0, random_state=seed)
    return X.astype(np.float32), y


@pytest.mark.parametrize("head", HEADS, ids=["logreg", "linear"])
def test_contract_and_accuracy_on_separable_clusters(head):
    X, y = blobs()
    X_train, y_train, X_test, y_test = X[:400], y[:400], X[400:], y[400:]
    head = clone(head)
    assert head.fit(X_train, y_train) is head
    assert list(head.classes_) == [0, 1, 2, 3]
    proba = head.predict_proba(X_test)
    assert proba.shape == (200, 4) and np.allclose(proba.sum(1), 1, atol=1e-9)
    assert np.array_equal(head.predict(X_test), proba.argmax(1))
    assert head.score(X_test, y_test) > 0.95
    assert all(k.endswith("_") for k in vars(head) if k not in head.get_params())


@pytest.mark.parametrize("head", HEADS, ids=["logreg", "linear"])
def test_save_load_gives_identical_probabilities(head, tmp_path):
    X, y = blobs()
    head = clone(head).fit(X, y)
    path = save_head(head, tmp_path)
    kind = "logreg" if isinstance(head, LogRegHead) else "linear"
    loaded = load_head(kind, head.get_params(), path)
    assert np.array_equal(loaded.predict_proba(X), head.predict_proba(X))


def test_linear_head_is_seeded_and_stops_early():
    X, y = blobs()
    a = LinearHead(epochs=300, patience=5, device="cpu").fit(X[:400], y[:400], eval_set=(X[400:], y[400:]))
    b = LinearHead(epochs=300, patience=5, device="cpu").fit(X[:400], y[:400], eval_set=(X[400:], y[400:]))
    assert np.array_equal(a.predict_proba(X), b.predict_proba(X))
    assert a.n_epochs_ < 300 and a.best_epoch_ <= a.n_epochs_


def test_linear_head_with_a_hidden_layer_learns_xor():
    rng = np.random.default_rng(0)
    X = rng.uniform(-1, 1, (800, 2)).astype(np.float32)
    y = (X[:, 0] * X[:, 1] > 0).astype(int)
    head = LinearHead(hidden=64, dropout=0.1, lr=1e-2, epochs=300, patience=30, device="cpu").fit(X[:600], y[:600])
    assert head.score(X[600:], y[600:]) > 0.9
