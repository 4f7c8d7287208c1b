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
    """Prepares epoch e + 1's batches of the configs that trained epoch e on a host thread while the
    device trains epoch e.

    The batches are a pure function of (seed, epoch), so prefetching changes no number.
    """

    def __init__(self, samplers: dict):
        self.samplers = samplers  # {config id: NegativeSampler}
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sampler")
        self._pending = None  # (epoch, config ids, future)

    def _sample(self, epoch: int, cids) -> dict:
        return {c: self.samplers[c].epoch(epoch) for c in cids}

    def epoch(self, epoch: int, cids) -> dict:
        """{config id: EpochBatches} of epoch ``epoch`` for ``cids``."""
        if self._pending is not None and self._pending[0] == epoch and set(cids) <= self._pending[1]:
            ready = self._pending[2].result()
            batches = {c: ready[c] for c in cids}
        else:
            batches = self._sample(epoch, cids)
        self._pending = (epoch + 1, frozenset(cids), self._pool.submit(self._sample, epoch + 1, list(cids)))
        return batches

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def for_config(cfg, ds) -> NegativeSampler:
    """The sampler of a config's training batches (its seed and batch size); a DatasetError names the data."""
    try:
        return NegativeSampler(ds.train, ds.n_items, cfg.train_batch_size, cfg.seed)
    except DatasetError as err:  # the data cannot be trained on: say which data
        raise DatasetError(f"{ds.path or ds.name}: {err}") from None
