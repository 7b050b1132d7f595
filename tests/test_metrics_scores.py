"""Inception Score, KID and improved precision/recall against textbook and brute-force references."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch

from vfmbench.errors import UserError
from vfmbench.metrics import precision_recall as pr
from vfmbench.metrics.inception_score import inception_score
from vfmbench.metrics.kid import kernel_inception_distance

# -- Inception Score --------------------------------------------------------------------------------


def _textbook_is(logits, splits, seed=2020):
    """exp(E_x KL(p(y|x) || p(y))) per split, with scipy's softmax and KL (scipy.stats.entropy)."""
    x = logits[np.random.RandomState(seed).permutation(len(logits))]
    n = len(x)
    scores = []
    for i in range(splits):
        p = scipy.special.softmax(x[i * n // splits : (i + 1) * n // splits], axis=1)
        q = p.mean(axis=0)
        scores.append(np.exp(np.mean([scipy.stats.entropy(row, q) for row in p])))
    return np.mean(scores), np.std(scores)


def test_is_equals_textbook_formula_and_torch_fidelity():
    logits = np.random.default_rng(0).normal(size=(103, 20)) * 3
    mean, std = inception_score(logits, splits=4)
    ref_mean, ref_std = _textbook_is(logits, 4)
    assert mean == pytest.approx(ref_mean, rel=1e-10) and std == pytest.approx(ref_std, rel=1e-8)
    from torch_fidelity.metric_isc import isc_features_to_metric

    tf = isc_features_to_metric(torch.from_numpy(logits).float(), splits=4, shuffle=True, rng_seed=2020)
    assert mean == pytest.approx(tf["inception_score_mean"], rel=1e-5)
    assert std == pytest.approx(tf["inception_score_std"], rel=1e-3, abs=1e-6)


def test_is_known_values():
    c, per = 8, 5
    onehot = np.tile(np.eye(c), (per, 1))  # every split holds each class equally often
    mean, std = inception_score(onehot, splits=per, probs=True, shuffle=False)
    assert mean == pytest.approx(c, rel=1e-12) and std == pytest.approx(0.0, abs=1e-12)
    mean, _ = inception_score(np.zeros((40, 10)), splits=4)  # uniform p(y|x): no information
    assert mean == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError):
        inception_score(np.full((10, 3), 0.5), splits=2, probs=True)
    with pytest.raises(ValueError):
        inception_score(np.zeros((3, 5)), splits=4)


# -- KID --------------------------------------------------------------------------------------------


def _naive_kid(f1, f2, subsets, size, seed):
    rng = np.random.RandomState(seed)
    d = f1.shape[1]

    def k(x, y):
        return (float(np.dot(x, y)) / d + 1.0) ** 3

    out = []
    for _ in range(subsets):
        a = f1[rng.choice(len(f1), size, replace=False)]
        b = f2[rng.choice(len(f2), size, replace=False)]
        xx = sum(k(a[i], a[j]) for i in range(size) for j in range(size) if i != j)
        yy = sum(k(b[i], b[j]) for i in range(size) for j in range(size) if i != j)
        xy = sum(k(a[i], b[j]) for i in range(size) for j in range(size))
        out.append(xx / (size * (size - 1)) + yy / (size * (size - 1)) - 2 * xy / size**2)
    return np.mean(out), np.std(out)


def test_kid_equals_naive_loops_and_torch_fidelity():
    rng = np.random.default_rng(1)
    f1, f2 = rng.normal(size=(30, 5)), rng.normal(size=(25, 5)) + 0.5
    mean, std = kernel_inception_distance(f1, f2, subsets=6, subset_size=12, seed=7)
    ref_mean, ref_std = _naive_kid(f1, f2, 6, 12, 7)
    assert mean == pytest.approx(ref_mean, rel=1e-10) and std == pytest.approx(ref_std, rel=1e-8)
    from torch_fidelity.metric_kid import kid_features_to_metric

    tf = kid_features_to_metric(torch.from_numpy(f1), torch.from_numpy(f2), kid_subsets=6, kid_subset_size=12,
                                rng_seed=7, verbose=False)
    assert mean == pytest.approx(tf["kernel_inception_distance_mean"], rel=1e-10)


def test_kid_separates_distributions():
    rng = np.random.default_rng(2)
    a, b, c = rng.normal(size=(200, 8)), rng.normal(size=(200, 8)), rng.normal(size=(200, 8)) + 1.0
    same, _ = kernel_inception_distance(a, b, subsets=20, subset_size=100)
    diff, _ = kernel_inception_distance(a, c, subsets=20, subset_size=100)
    assert abs(same) < 0.05 and diff > 0.5
    with pytest.raises(UserError):
        kernel_inception_distance(a[:10], b, subsets=2, subset_size=20)


# -- improved precision / recall -------------------------------------------------------------------


def _cluster(rng, n, centre, d=4, scale=0.1):
    return centre + scale * rng.normal(size=(n, d))


def test_pr_identical_and_disjoint():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(60, 4))
    assert pr.precision_recall(x, x.copy()) == (1.0, 1.0)
    far = _cluster(rng, 40, 100.0)
    assert pr.precision_recall(_cluster(rng, 40, 0.0), far) == (0.0, 0.0)


def test_pr_known_overlap():
    rng = np.random.default_rng(4)
    a = _cluster(rng, 10, 0.0)
    b = _cluster(rng, 10, 50.0)
    c = _cluster(rng, 5, -50.0)
    reference = np.concatenate([a, b])
    samples = np.concatenate([a, c])
    # samples: the 10 copies of A lie on reference balls, the 5 of C far from all -> 10/15;
    # reference: A is covered by the samples' A balls, B (half the reference) is not -> 1/2
    precision, recall = pr.precision_recall(reference, samples)
    assert precision == pytest.approx(10 / 15, abs=1e-12) and recall == pytest.approx(0.5, abs=1e-12)


def _naive_radii(x, k):
    return np.array([np.sort([np.linalg.norm(x[i] - x[j]) for j in range(len(x))])[k] for i in range(len(x))])


def _naive_coverage(q, x, radii):
    return np.mean([any(np.linalg.norm(qi - x[j]) <= radii[j] for j in range(len(x))) for qi in q])


def test_pr_blocks_match_brute_force(monkeypatch):
    rng = np.random.default_rng(5)
    ref, smp = rng.normal(size=(37, 3)), rng.normal(size=(29, 3)) * 1.3 + 0.2
    r_ref, r_smp = _naive_radii(ref, 3), _naive_radii(smp, 3)
    expected = (_naive_coverage(smp, ref, r_ref), _naive_coverage(ref, smp, r_smp))
    assert 0.0 < expected[0] < 1.0 and 0.0 < expected[1] < 1.0  # a case that can fail
    full = pr.precision_recall(ref, smp)
    monkeypatch.setattr(pr, "ROW_BLOCK", 5)
    monkeypatch.setattr(pr, "COL_BLOCK", 7)
    np.testing.assert_allclose(pr.manifold_radii(ref, 3), r_ref, rtol=1e-10)
    blocked = pr.precision_recall(ref, smp)
    assert full == blocked == pytest.approx(expected, abs=1e-12)
