"""Heads: scikit-learn's estimator contract (parametrize_with_checks), accuracy, and save/load as plain arrays."""

import json
import pickle

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.datasets import make_blobs
from sklearn.utils.estimator_checks import parametrize_with_checks

from pipeline.heads.knn import KnnHead
from pipeline.heads.linear import LinearHead
from pipeline.heads.logreg import LogRegHead
from pipeline.heads.registry import HEAD_FILE, HEADS, load_head, save_head

FAST_LINEAR = dict(lr=1e-2, epochs=60, device="cpu")


def blobs(n=600, seed=0):
    X, y = make_blobs(n_samples=n, centers=4, n_features=32, cluster_std=2.0, random_state=seed)
    return X.astype(np.float32), y


@parametrize_with_checks([LogRegHead(), LinearHead(**FAST_LINEAR), KnnHead(k=5)])
def test_sklearn_estimator_contract(estimator, check):
    # Every check of scikit-learn's suite applies to every head and none is excused by hand; the few that pytest
    # reports skipped are skipped by scikit-learn itself (pandas not installed, SCIPY_ARRAY_API not set).
    check(estimator)


@pytest.mark.parametrize("head", [LogRegHead(), LinearHead(device="cpu"), KnnHead()], ids=["logreg", "linear", "knn"])
def test_accuracy_on_separable_clusters(head):
    X, y = blobs()
    head = clone(head).fit(X[:400], y[:400])
    proba = head.predict_proba(X[400:])
    assert proba.shape == (200, 4) and np.allclose(proba.sum(1), 1, atol=1e-12)
    assert np.array_equal(head.predict(X[400:]), proba.argmax(1))
    assert head.score(X[400:], y[400:]) > 0.95 and head.n_features_in_ == 32


@pytest.mark.parametrize("n_classes", [2, 4])
def test_logreg_reference_probabilities_equal_scikit_learns_own(n_classes):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y = make_blobs(n_samples=300, centers=n_classes, n_features=8, cluster_std=4.0, random_state=1)
    ours = LogRegHead(C=0.5, solver="sklearn").fit(X, y)
    theirs = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=2000, tol=1e-4)).fit(X, y)
    # equal to float32 rounding: the head fits on float32 features, as the cache stores them
    np.testing.assert_allclose(ours.predict_proba(X), theirs.predict_proba(X), atol=1e-5)


@pytest.mark.parametrize("solver", ["lbfgs", "newton"])
@pytest.mark.parametrize("n_classes", [2, 4])
@pytest.mark.parametrize("features", [8, 600], ids=["primal", "gram-factor"])
def test_logreg_solvers_converge_to_the_reference_solution(n_classes, features, solver):
    """Run to a tight tolerance, every solver reaches the one optimum (the problem is strictly convex): the torch
    L-BFGS's and the float64 Newton's probabilities equal scikit-learn's to float32 rounding, with more features
    than rows too."""
    X, y = make_blobs(n_samples=300, centers=n_classes, n_features=features, cluster_std=4.0 * features ** 0.5 / 3,
                      random_state=1)
    ours = LogRegHead(C=0.5, tol=1e-7 if solver == "lbfgs" else 1e-9, solver=solver, device="cpu").fit(X, y)
    reference = LogRegHead(C=0.5, tol=1e-10, solver="sklearn").fit(X, y)
    assert ours.converged_ and ours.coef_.shape == reference.coef_.shape
    np.testing.assert_allclose(ours.predict_proba(X), reference.predict_proba(X), atol=2e-4)


@pytest.mark.parametrize("n_classes", [2, 4])
def test_logreg_objective_summed_over_chunks_of_rows_is_the_same_fit(n_classes, monkeypatch):
    """The float64 objective is summed over chunks of rows (its temporaries bounded on a split of millions of rows):
    chunks of 7 rows, the last one short, give the fit of one chunk to rounding."""
    from pipeline.heads import logreg_solver as solvers

    X, y = make_blobs(n_samples=300, centers=n_classes, n_features=8, cluster_std=3.0, random_state=2)
    whole = LogRegHead(C=0.5, tol=1e-6, solver="lbfgs", device="cpu").fit(X, y)
    monkeypatch.setattr(solvers, "OBJECTIVE_ROWS", 7)
    chunked = LogRegHead(C=0.5, tol=1e-6, solver="lbfgs", device="cpu").fit(X, y)
    assert chunked.converged_ and abs(chunked.n_iter_ - whole.n_iter_) <= 2
    np.testing.assert_allclose(chunked.predict_proba(X), whole.predict_proba(X), atol=1e-5)


@pytest.mark.parametrize("kind, params", [("logreg", {"C": 0.1}), ("linear", {**FAST_LINEAR, "hidden": 8}),
                                          ("linear", FAST_LINEAR), ("logreg", {"C": 0.1, "norm": "power"}),
                                          ("linear", {**FAST_LINEAR, "norm": "l2"}), ("knn", {"k": 5}),
                                          ("knn", {"k": 3, "norm": "standard"})],
                         ids=["logreg", "linear-hidden", "linear", "logreg-power", "linear-l2", "knn", "knn-standard"])
def test_save_load_gives_identical_probabilities_without_pickle(kind, params, tmp_path):
    X, y = blobs()
    head = HEADS[kind].estimator(**params).fit(X, y)
    path = save_head(head, tmp_path)
    assert path.name == HEAD_FILE
    with np.load(path, allow_pickle=False) as npz:  # plain arrays only: no object arrays anywhere
        assert all(npz[k].dtype != object for k in npz.files)
    loaded = load_head(kind, params, path)
    assert np.array_equal(loaded.predict_proba(X), head.predict_proba(X))
    assert list(loaded.classes_) == [0, 1, 2, 3] and loaded.n_features_in_ == 32


def test_a_pickle_in_place_of_the_head_is_never_unpickled(tmp_path):
    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(tmp_path / 'pwned')!r}, 'w').close()",))

    (tmp_path / HEAD_FILE).write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ValueError):
        load_head("logreg", {}, tmp_path / HEAD_FILE)
    assert not (tmp_path / "pwned").exists()


def test_linear_head_is_seeded_and_stops_early_on_a_held_out_fraction():
    X, y = blobs()
    a = LinearHead(epochs=300, patience=5, device="cpu").fit(X, y)
    b = LinearHead(epochs=300, patience=5, device="cpu").fit(X, y)
    assert np.array_equal(a.predict_proba(X), b.predict_proba(X))
    assert a.n_iter_ < 300 and a.best_epoch_ <= a.n_iter_
    full = LinearHead(epochs=7, patience=None, device="cpu").fit(X, y)
    assert full.n_iter_ == 7 and full.best_epoch_ == 7  # no early stopping: every epoch, every row


def test_linear_head_with_a_hidden_layer_learns_xor():
    rng = np.random.default_rng(0)
    X = rng.uniform(-1, 1, (800, 2)).astype(np.float32)
    y = (X[:, 0] * X[:, 1] > 0).astype(int)
    head = LinearHead(hidden=64, dropout=0.1, lr=1e-2, epochs=300, patience=30, device="cpu").fit(X[:600], y[:600])
    assert head.score(X[600:], y[600:]) > 0.9


SWEEP_SETTINGS = [{"weight_decay": wd, "lr": lr} for wd in (1e-6, 1e-2, 1.0) for lr in (1e-3, 3e-2)]


def torch_reference_fit(X, y, hidden: int, **settings):
    """A LinearHead's training done with torch's own nn.Linear, AdamW and CosineAnnealingLR, one setting at a time
    (as LinearHead trained before its sweep was one wide module): the held-out loss of each epoch and the epochs."""
    import torch

    from pipeline.heads.block5 import run_epochs
    from pipeline.heads.linear import mlp_module
    from pipeline.heads.normalise import moments, row_normalised

    head = LinearHead(hidden=hidden, dropout=0.0, epochs=40, patience=3, device="cpu", **settings)
    X, y = np.asarray(X, np.float32), np.asarray(y)
    head.classes_ = np.unique(y)
    X, Xv, y, yv = head._hold_out(X, y, None)
    mean, scale = head._fitted_statistics(lambda: moments(row_normalised(X, head.norm)), X.shape[1])
    device, tensor, labels = head._converters(mean, scale, head.classes_)
    Xt, yt = tensor(X), labels(y)
    gen = torch.Generator().manual_seed(head.seed)
    batches = lambda: ((Xt[i], yt[i]) for i in torch.randperm(len(Xt), generator=gen).split(head.batch_size))
    torch.manual_seed(head.seed)
    module = mlp_module(X.shape[1], hidden, 0.0, len(head.classes_))
    opt = torch.optim.AdamW(module.parameters(), lr=head.lr, weight_decay=head.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=head.epochs * -(-len(X) // head.batch_size))
    ran, best_epoch, best_loss = run_epochs(module, opt, sched, batches, (tensor(Xv), labels(yv)), head.epochs, 3)
    return ran, best_epoch, best_loss


@pytest.mark.parametrize("hidden", [0, 8], ids=["linear", "hidden"])
@pytest.mark.parametrize("position", range(len(SWEEP_SETTINGS)))
def test_a_wide_sweep_trains_each_setting_as_torch_trains_it_alone(hidden, position):
    """The linear sweep's settings trained together (one wide module, AdamW and early stopping per setting) end where
    torch's own optimiser ends each one alone: the same epochs, the same best held-out loss (dropout 0)."""
    X, y = blobs()
    base = LinearHead(hidden=hidden, dropout=0.0, epochs=40, patience=3, device="cpu")
    together = {json.dumps(s, sort_keys=True): h for s, h in base.fit_many(X, y, SWEEP_SETTINGS)}
    wide = together[json.dumps(SWEEP_SETTINGS[position], sort_keys=True)]
    ran, best_epoch, best_loss = torch_reference_fit(X, y, hidden, **SWEEP_SETTINGS[position])
    assert (wide.n_iter_, wide.best_epoch_) == (ran, best_epoch)
    assert wide.best_val_loss_ == pytest.approx(best_loss, rel=1e-4)
