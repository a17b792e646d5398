"""reference.npz: the k-NN distance to the training rows, its conformal threshold (the false-positive rate the docs
state), and what a damaged or older file does."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from pipeline.errors import UserError
from pipeline.runs import reference


def clusters(rng, n: int, dim: int = 32, classes: int = 3):
    """Rows around `classes` directions (what pooled VGG features look like to a cosine: non-negative, clustered)."""
    centres = np.abs(rng.standard_normal((classes, dim))) * 3
    y = rng.integers(0, classes, n)
    return np.abs(centres[y] + rng.standard_normal((n, dim))).astype(np.float32), y


@pytest.mark.parametrize("n, rank", [(99, 99), (153, 153), (1000, 991)], ids=["99", "153", "1000"])
def test_the_threshold_is_the_conformal_order_statistic(n, rank):
    d = np.random.default_rng(0).permutation(np.arange(1, n + 1) / n)
    assert reference.conformal_threshold(d) == rank / n


def test_below_99_validation_images_nothing_can_be_flagged_at_one_percent(caplog):
    rng = np.random.default_rng(0)
    X, y = clusters(rng, 300)
    caplog.set_level(logging.INFO)
    ref = reference.compute(X[:200], y[:200], X[200:298], np.full(98, 0.9), 3)
    assert np.isinf(ref["threshold"]) and not reference.unusual(ref, np.array([2.0])).any()
    assert "98 validation images are too few to flag unusual images at a 1% false-positive rate (it takes 99)" in caplog.text


def test_images_like_the_validation_ones_are_flagged_about_one_percent_of_the_time():
    """The stated false-positive rate, measured: 20 calibrations on 300 validation rows, each tried on 5,000 new rows
    of the same source. Conformal: at most 1% on average (each calibration's own rate varies around it)."""
    rates = []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        X, y = clusters(rng, 5_800)
        ref = reference.compute(X[:500], y[:500], X[500:800], np.full(300, 0.9), 3)
        rates.append(reference.unusual(ref, reference.distances(ref, X[800:])).mean())
    assert 0.002 < np.mean(rates) <= 0.012 and max(rates) < 0.04, rates


def test_a_plainly_foreign_row_is_unusual_and_at_the_top_percentile():
    rng = np.random.default_rng(0)
    X, y = clusters(rng, 800)
    ref = reference.compute(X[:500], y[:500], X[500:], np.full(300, 0.9), 3)
    foreign = np.zeros((2, 32), np.float32)
    foreign[0, 0], foreign[1] = 1.0, np.linspace(-1, 1, 32)  # one channel alone; a pattern no class has
    d = reference.distances(ref, foreign)
    assert reference.unusual(ref, d).all() and (reference.percentiles(ref, d) == 100).all()
    own = reference.distances(ref, X[500:])
    assert reference.percentiles(ref, np.median(own)[None])[0] == pytest.approx(50, abs=0.5)


def test_the_distance_is_to_the_kth_nearest_training_row():
    train = np.eye(8, dtype=np.float32)[:6] + np.eye(8, dtype=np.float32)[6] * 0.01  # 6 near-orthogonal rows
    ref = reference.compute(train, np.zeros(6, int), train, np.full(6, 0.9), 1)
    row = np.array([[3, 2, 1, 0.5, 0.2, 0.1, 0, 0]], np.float32)
    similarity = np.sort(reference._unit(row) @ reference._unit(train).T)[0]
    assert reference.distances(ref, row)[0] == pytest.approx(1 - similarity[-reference.K], abs=1e-3)  # float16 kept


def test_many_training_rows_are_kept_as_an_even_sample_within_the_byte_budget(monkeypatch):
    monkeypatch.setattr(reference, "REFERENCE_BYTES", 64 * 2 * 100)  # 100 rows of 64
    rng = np.random.default_rng(0)
    X, y = clusters(rng, 1_000, dim=64)
    ref = reference.compute(X, y, X[:120], np.full(120, 0.9), 3)
    assert ref["neighbours"].shape == (100, 64) and ref["neighbours"].dtype == np.float16
    again = reference.compute(X, y, X[:120], np.full(120, 0.9), 3)
    assert np.array_equal(ref["neighbours"], again["neighbours"])  # a fixed seed: the same run, the same file


def test_a_reference_of_an_older_vggcache_is_no_reference_and_says_so(tmp_path, caplog):
    np.savez(tmp_path / reference.REFERENCE_FILE, mean=np.zeros(4), centroids=np.zeros((2, 4)))
    caplog.set_level(logging.WARNING)
    assert reference.load(tmp_path) is None and "retrain the run for the distance_percentile" in caplog.text


@pytest.mark.parametrize("damage, what", [
    (lambda r: r.update(threshold=np.array(np.nan)), "threshold"),
    (lambda r: r.update(val_distances=r["val_distances"][::-1].copy()), "val_distances"),
    (lambda r: r.update(k=np.array(0)), "k"),
    (lambda r: r.update(version=np.array(7)), "version 7 is not 2"),
], ids=["nan-threshold", "unsorted", "k-zero", "version"])
def test_a_damaged_reference_is_one_line(tmp_path, damage, what):
    rng = np.random.default_rng(0)
    X, y = clusters(rng, 400)
    ref = reference.compute(X[:200], y[:200], X[200:], np.full(200, 0.9), 3)
    damage(ref)
    reference.save(tmp_path, ref)
    with pytest.raises(UserError, match=f"reference.npz is damaged \\(.*{what}"):
        reference.load(tmp_path)
