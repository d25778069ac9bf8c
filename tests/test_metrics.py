"""datainf.metrics against sklearn / scipy and brute-force definitions, on random data with ties."""

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from sklearn.metrics import roc_auc_score

from datainf.errors import DataInfError
from datainf.metrics import average_ranks, pearson, precision_at_k, recall_at_k, roc_auc, spearman

# small integer values make ties frequent
tied_values = st.lists(st.integers(min_value=-3, max_value=3), min_size=3, max_size=40)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_roc_auc_matches_sklearn_with_ties(data):
    scores = data.draw(tied_values)
    labels = data.draw(st.lists(st.booleans(), min_size=len(scores), max_size=len(scores)))
    if all(labels) or not any(labels):
        labels[0] = not labels[0]
        if all(labels) or not any(labels):
            labels[1] = not labels[1]
    expected = roc_auc_score(np.array(labels, dtype=int), np.array(scores, dtype=float))
    assert roc_auc(scores, labels) == pytest.approx(expected, abs=1e-12)


def test_roc_auc_pairwise_definition_and_input_types():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=60).astype(float)
    labels = rng.random(60) < 0.3
    pos, neg = scores[labels], scores[~labels]
    pairwise = np.mean([(p > q) + 0.5 * (p == q) for p in pos for q in neg])
    assert roc_auc(scores, labels) == pytest.approx(pairwise)
    assert roc_auc(torch.tensor(scores), torch.tensor(labels)) == pytest.approx(pairwise)
    assert roc_auc(list(scores), labels.astype(int)) == pytest.approx(pairwise)


@settings(max_examples=150, deadline=None)
@given(a=tied_values, seed=st.integers(0, 10_000))
def test_pearson_and_spearman_match_scipy(a, seed):
    rng = np.random.default_rng(seed)
    x = np.array(a, dtype=float)
    y = x * rng.normal() + rng.integers(-2, 3, size=len(x))
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        with pytest.raises(DataInfError):
            pearson(x, y)
        return
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-9)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-9)


def test_average_ranks_match_scipy():
    x = np.array([3.0, 1.0, 3.0, 2.0, 3.0, 1.0, -5.0])
    np.testing.assert_allclose(average_ranks(x), stats.rankdata(x, method="average"))


def _brute_force_top_k(scores, labels, k):
    """Mean number of positives among the top k over every order of the tied scores."""
    n = len(scores)
    counts = []
    for perm in itertools.permutations(range(n)):
        # sort by score descending, ties ordered by this permutation
        order = sorted(range(n), key=lambda i: (-scores[i], perm.index(i)))
        counts.append(sum(labels[i] for i in order[:k]))
    return np.mean(counts)


@pytest.mark.parametrize("seed", range(6))
def test_precision_and_recall_at_k_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = 6
    scores = rng.integers(0, 3, size=n).tolist()
    labels = (rng.random(n) < 0.5).tolist()
    labels[seed % n] = True
    for k in range(1, n + 1):
        expected = _brute_force_top_k(scores, labels, k)
        assert precision_at_k(scores, labels, k) == pytest.approx(expected / k)
        assert recall_at_k(scores, labels, k) == pytest.approx(expected / sum(labels))


def test_recall_at_k_without_ties():
    scores = np.array([0.9, 0.1, 0.8, 0.3, 0.7, 0.2])
    labels = np.array([True, False, False, True, True, False])
    # descending order: 0 (pos), 2 (neg), 4 (pos), 3 (pos), 5, 1
    assert recall_at_k(scores, labels, 1) == pytest.approx(1 / 3)
    assert recall_at_k(scores, labels, 3) == pytest.approx(2 / 3)
    assert recall_at_k(scores, labels, 4) == pytest.approx(1.0)
    assert precision_at_k(scores, labels, 2) == pytest.approx(0.5)


def test_errors():
    with pytest.raises(DataInfError, match="length"):
        roc_auc([1.0, 2.0, 3.0], [True, False])
    with pytest.raises(DataInfError, match="no True"):
        roc_auc([1.0, 2.0], [False, False])
    with pytest.raises(DataInfError, match="negative"):
        roc_auc([1.0, 2.0], [True, True])
    with pytest.raises(DataInfError, match="no True"):
        recall_at_k([1.0, 2.0], [False, False], 1)
    with pytest.raises(DataInfError, match="k must be"):
        precision_at_k([1.0, 2.0], [True, False], 3)
    with pytest.raises(DataInfError, match="differ in length"):
        pearson([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(DataInfError, match="differ in length"):
        spearman([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(DataInfError, match="NaN"):
        roc_auc([1.0, float("nan")], [True, False])
