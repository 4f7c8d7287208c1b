"""The negative sampler: never a training positive, uniform over allowed items, partial batch kept."""

import numpy as np
import pytest

from lgmrec_jax import data
from lgmrec_jax.sampler import NegativeSampler


def make_train(seed=0, n_users=50, n_items=30, n_rows=700):
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(0, n_users, n_rows), rng.integers(0, n_items - 3, n_rows)], axis=1)


def test_negatives_are_never_training_positives():
    train = make_train()
    s = NegativeSampler(train, 30, 64, seed=1)
    positives = set(map(tuple, train.tolist()))
    for epoch in range(3):
        b = s.epoch(epoch)
        real = b.mask.astype(bool)
        assert not any((u, n) in positives for u, n in zip(b.users[real], b.neg[real]))
        assert set(b.neg[real]) <= set(train[:, 1])  # only items present in the training split


def test_every_row_once_per_epoch_and_partial_batch():
    train = make_train()
    s = NegativeSampler(train, 30, 64, seed=1)
    b = s.epoch(0)
    assert b.users.shape == (11, 64) and s.n_batches == 11  # ceil(700 / 64)
    assert b.mask[-1].sum() == 700 - 10 * 64 and b.mask[:-1].all()
    real = b.mask.astype(bool)
    got = sorted(zip(b.users[real].tolist(), b.pos[real].tolist()))
    assert got == sorted(map(tuple, train.tolist()))


def test_reproducible_per_epoch_and_reshuffled():
    train = make_train()
    a, b = NegativeSampler(train, 30, 64, 7), NegativeSampler(train, 30, 64, 7)
    np.testing.assert_array_equal(a.epoch(3).neg, b.epoch(3).neg)
    assert not np.array_equal(a.epoch(0).users, a.epoch(1).users)


def test_uniform_over_allowed_items():
    # One user whose positives are items 0-2; candidates are items 0-9; negatives uniform over 3-9.
    train = np.array([[0, i] for i in range(3)] + [[1, 9], [1, 5]] +
                     [[2, i] for i in range(3, 9)])
    rows = np.repeat(train[:1], 7000, axis=0)
    s = NegativeSampler(train, 10, 128, seed=0)
    neg = s.negatives(np.random.default_rng(0), rows[:, 0])
    counts = np.bincount(neg, minlength=10)
    assert counts[:3].sum() == 0
    expected = len(rows) / 7
    chi2 = ((counts[3:] - expected) ** 2 / expected).sum()
    assert chi2 < 22.46  # chi-square, 6 degrees of freedom, p = 0.001


def test_user_with_every_item_is_an_error():
    train = np.array([[0, 0], [0, 1], [1, 0]])
    with pytest.raises(data.DatasetError, match="user 0 has every training item"):
        NegativeSampler(train, 2, 4, 0)


def test_prefetched_epochs_equal_direct_ones():
    from lgmrec_jax.sampler import Prefetcher

    train = make_train()
    direct = {"a": NegativeSampler(train, 30, 64, seed=5), "b": NegativeSampler(train, 30, 32, seed=6)}
    prefetch = Prefetcher({"a": NegativeSampler(train, 30, 64, seed=5), "b": NegativeSampler(train, 30, 32, seed=6)})
    # In order, then a jump (as after a resume), then fewer configs (some finished), then more again.
    for epoch, cids in ((0, "ab"), (1, "ab"), (2, "ab"), (5, "ab"), (6, "b"), (7, "b"), (8, "ab")):
        got = prefetch.epoch(epoch, list(cids))
        assert sorted(got) == sorted(cids)
        for cid in cids:
            for x, y in zip(got[cid], direct[cid].epoch(epoch)):
                np.testing.assert_array_equal(x, y)
    prefetch.close()
