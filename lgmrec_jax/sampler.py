"""Training batches of one epoch (SPEC §2), vectorised on the host and reproducible from the seed.

Every epoch (including the first) the training rows are reshuffled, cut into consecutive batches
of ``batch_size`` with the last partial batch kept, and each row gets one negative drawn uniformly
from the items present in the training split, redrawn while it is a training positive of that
user. The reference composes each epoch's shuffle with the previous one; a fresh uniform
permutation has the same distribution and makes the sampler's state just ``(seed, epoch)``, so a
resumed run draws exactly what an uninterrupted one draws.

The epoch is returned padded to a whole number of batches, with a row mask, so one compiled step
serves every batch (see losses.Batch).
"""

from __future__ import annotations

import concurrent.futures
from typing import NamedTuple

import numpy as np

from lgmrec_jax.data import DatasetError


class EpochBatches(NamedTuple):
    users: np.ndarray  # (n_batches, B) int32
    pos: np.ndarray
    neg: np.ndarray
    mask: np.ndarray  # (n_batches, B) float32

    @property
    def n_rows(self) -> int:
        return int(self.mask.sum())


class NegativeSampler:
    """Per-epoch batches with rejection-sampled negatives for a fixed training split."""

    def __init__(self, train: np.ndarray, n_items: int, batch_size: int, seed: int):
        self.train = np.asarray(train, dtype=np.int64)
        self.n_items = n_items
        self.batch_size = batch_size
        self.seed = seed
        self.candidates = np.unique(self.train[:, 1])  # negatives come only from training items
        self.positive_keys = np.unique(self.train[:, 0] * n_items + self.train[:, 1])
        per_user = np.bincount(self.positive_keys // n_items)
        if (per_user == len(self.candidates)).any():
            user = int(np.flatnonzero(per_user == len(self.candidates))[0])
            raise DatasetError(f"user {user} has every training item as a training positive, so no negative "
                               f"can be drawn for it (expected at least one training item it has not seen)")

    @property
    def n_batches(self) -> int:
        return -(-len(self.train) // self.batch_size)

    def is_positive(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        keys = users * self.n_items + items
        pos = np.minimum(np.searchsorted(self.positive_keys, keys), len(self.positive_keys) - 1)
        return self.positive_keys[pos] == keys

    def negatives(self, rng: np.random.Generator, users: np.ndarray) -> np.ndarray:
        neg = self.candidates[rng.integers(0, len(self.candidates), len(users))]
        todo = np.flatnonzero(self.is_positive(users, neg))
        while todo.size:  # redraw only the rejected rows, as the reference does row by row
            neg[todo] = self.candidates[rng.integers(0, len(self.candidates), todo.size)]
            todo = todo[self.is_positive(users[todo], neg[todo])]
        return neg

    def epoch(self, epoch: int) -> EpochBatches:
        rng = np.random.default_rng([self.seed, epoch])
        rows = self.train[rng.permutation(len(self.train))]
        neg = self.negatives(rng, rows[:, 0])
        padded = self.n_batches * self.batch_size
        shape = (self.n_batches, self.batch_size)

        def pad(values, dtype):
            out = np.zeros(padded, dtype=dtype)
            out[: len(values)] = values
            return out.reshape(shape)

        return EpochBatches(pad(rows[:, 0], np.int32), pad(rows[:, 1], np.int32), pad(neg, np.int32),
                            pad(np.ones(len(rows)), np.float32))


class Prefetcher:
    """Prepares epoch e + 1's batches on a host thread while the device trains epoch e.

    The batches are a pure function of (seed, epoch), so prefetching changes no number.
    """

    def __init__(self, sampler: NegativeSampler):
        self.sampler = sampler
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sampler")
        self._pending: tuple[int, concurrent.futures.Future] | None = None

    def epoch(self, epoch: int) -> EpochBatches:
        if self._pending is not None and self._pending[0] == epoch:
            batches = self._pending[1].result()
        else:
            batches = self.sampler.epoch(epoch)
        self._pending = (epoch + 1, self._pool.submit(self.sampler.epoch, epoch + 1))
        return batches

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
