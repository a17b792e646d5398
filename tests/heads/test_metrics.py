"""The metrics are scikit-learn's, computed without it: every number equal to sklearn.metrics' on random cases
(classes missing from the truth or from the predictions, ties, many classes)."""

import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from pipeline.heads.metrics import classification_metrics


@pytest.mark.parametrize("seed", range(40))
def test_every_number_is_scikit_learns(seed):
    rng = np.random.default_rng(seed)
    k, n = int(rng.integers(2, 9)), int(rng.integers(1, 60))
    y = rng.integers(0, k, n)
    proba = rng.dirichlet(np.ones(k) * rng.uniform(0.1, 3), n)
    if seed % 4 == 0:  # ties
        proba = np.round(proba, 1) + 1e-3
        proba /= proba.sum(1, keepdims=True)
    m = classification_metrics(y, proba, [f"c{i}" for i in range(k)])
    labels, predicted = np.arange(k), proba.argmax(1)
    precision, recall, f1, support = skm.precision_recall_fscore_support(y, predicted, labels=labels, zero_division=0)
    with warnings.catch_warnings():  # sklearn warns of classes predicted but absent from the truth
        warnings.simplefilter("ignore")
        expected = {"accuracy": skm.accuracy_score(y, predicted),
                    "balanced_accuracy": skm.balanced_accuracy_score(y, predicted),
                    "macro_f1": skm.f1_score(y, predicted, labels=labels, average="macro", zero_division=0),
                    "log_loss": skm.log_loss(y, np.clip(proba, 1e-15, 1), labels=labels)}
    assert {key: m[key] for key in expected} == expected
    assert m["confusion_matrix"] == skm.confusion_matrix(y, predicted, labels=labels).tolist()
    assert [tuple(c.values()) for c in m["per_class"].values()] == list(zip(precision, recall, f1, support))
    if k > 5:
        assert m["top5_accuracy"] == skm.top_k_accuracy_score(y, proba, k=5, labels=labels)
