"""MMRec metrics against hand-worked examples."""

import math

import numpy as np

from lgmrec_jax import metrics


def test_single_user_by_hand():
    # One user with 3 split items (7, 8, 9); its top list hits at ranks 1 and 3.
    top = np.array([[7, 1, 8] + list(range(20, 67))])
    out = metrics.topk_metrics(np.array([0]), top, np.array([[0, 7], [0, 8], [0, 9]]), n_users=1, n_items=100)
    d = [1 / math.log2(r + 1) for r in range(1, 6)]
    assert out["recall@5"] == round(2 / 3, 4)
    assert out["precision@5"] == round(2 / 5, 4)
    assert out["ndcg@5"] == round((d[0] + d[2]) / (d[0] + d[1] + d[2]), 4)
    assert out["map@5"] == round((1 / 1 + 2 / 3) / 3, 4)
    assert out["recall@50"] == round(2 / 3, 4)


def test_denominators_use_min_of_n_and_k():
    # A user with 7 split items, 5 hits in the top 5: precision 1, recall 5/7, NDCG and MAP 1 at k=5.
    items = np.arange(7)
    top = np.array([list(range(5)) + list(range(10, 55))])
    pairs = np.stack([np.zeros(7, int), items], axis=1)
    out = metrics.topk_metrics(np.array([0]), top, pairs, n_users=1, n_items=60)
    assert out["precision@5"] == 1.0 and out["ndcg@5"] == 1.0 and out["map@5"] == 1.0
    assert out["recall@5"] == round(5 / 7, 4)
    assert out["map@10"] == round(5 / 7, 4)  # sum of precisions 5, divided by min(7, 10)


def test_average_over_users_then_round():
    top = np.array([[1] + list(range(10, 59)), [2] + list(range(10, 59))])
    pairs = np.array([[0, 1], [1, 3], [1, 4]])
    out = metrics.topk_metrics(np.array([0, 1]), top, pairs, n_users=2, n_items=60)
    assert out["recall@5"] == 0.5 and out["precision@5"] == 0.1


def test_padded_lists_never_hit():
    # A 3-item catalogue gives lists padded with -1; -1 must not match user u-1's last item.
    top = np.array([[0, 1, 2] + [-1] * 47, [0, 1, 2] + [-1] * 47])
    pairs = np.array([[0, 2], [1, 0]])
    rel = metrics.relevance(np.array([0, 1]), top, pairs, 3)
    assert rel.sum() == 2


def test_evaluation_users_in_first_appearance_order():
    np.testing.assert_array_equal(metrics.evaluation_users(np.array([[5, 0], [2, 1], [5, 3], [9, 0]])), [5, 2, 9])
