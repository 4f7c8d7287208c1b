"""Full-ranking evaluation (SPEC §5) as one compiled, blocked top-k per split.

Users of a split are taken in order of first appearance and cut into blocks of
``eval_batch_size``. For every block the device scores the block's users against all items, sets the
users' training items to -1e10 and keeps the top 50 indices; metrics are then computed on the host
from those lists. Memory is bounded by one (block x items) score matrix.

Noise modes (``eval_noise``):
  "per_block"  faithful: a fresh forward with fresh Gumbel noise for every block, as the reference
               recomputes ``forward()`` for every 4,096-user batch (SPEC §3.6, §9.2). Default.
  "per_eval"   one noisy forward per split evaluation, shared by its blocks (a deviation).
  "off"        one forward without Gumbel noise: deterministic evaluation (a deviation).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lgmrec_jax import metrics as metrics_lib
from lgmrec_jax.configs import EVAL_NOISE_MODES
from lgmrec_jax.model import sample_noise

MASK_VALUE = -1e10  # the reference masks with -1e10, not -inf
TOP_K = max(metrics_lib.TOPK)


class SplitPlan(NamedTuple):
    """Host arrays describing one split's blocked evaluation."""

    users: np.ndarray  # (n,) evaluated users in order
    block_users: np.ndarray  # (n_blocks, B) int32, padded with user 0
    mask_rows: np.ndarray  # (n_blocks, P) int32: row in block of a training pair
    mask_cols: np.ndarray  # (n_blocks, P) int32: its item; padding uses n_items (dropped)
    pairs: np.ndarray  # the split's (user, item) rows


def training_items_csr(train: np.ndarray, n_users: int):
    order = np.argsort(train[:, 0], kind="stable")
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(train[:, 0], minlength=n_users), out=indptr[1:])
    return indptr, train[order, 1]


def block_mask(users: np.ndarray, indptr: np.ndarray, items: np.ndarray):
    """(row, item) of every training pair of ``users`` (row = position in ``users``)."""
    counts = indptr[users + 1] - indptr[users]
    rows = np.repeat(np.arange(len(users)), counts)
    starts = np.repeat(indptr[users] - np.cumsum(counts) + counts, counts)
    return rows, items[starts + np.arange(counts.sum())]


def plan_split(train: np.ndarray, split_pairs: np.ndarray, n_users: int, n_items: int,
               block_size: int) -> SplitPlan:
    users = metrics_lib.evaluation_users(split_pairs)
    n_blocks = max(1, -(-len(users) // block_size))
    block_size = min(block_size, max(len(users), 1))
    padded = np.zeros(n_blocks * block_size, dtype=np.int32)
    padded[: len(users)] = users
    block_users = padded.reshape(n_blocks, block_size)
    indptr, items = training_items_csr(train, n_users)
    masks = [block_mask(users[b * block_size:(b + 1) * block_size], indptr, items) for b in range(n_blocks)]
    width = max(1, max(len(r) for r, _ in masks))
    mask_rows = np.zeros((n_blocks, width), dtype=np.int32)
    mask_cols = np.full((n_blocks, width), n_items, dtype=np.int32)
    for b, (r, c) in enumerate(masks):
        mask_rows[b, : len(r)], mask_cols[b, : len(c)] = r, c
    return SplitPlan(users, block_users, mask_rows, mask_cols, split_pairs)


def masked_top_k(scores: jax.Array, mask_rows: jax.Array, mask_cols: jax.Array, k: int = TOP_K) -> jax.Array:
    """Indices of the k best items per row after setting training pairs to -1e10.

    A catalogue smaller than k is padded with -1 (never relevant).
    """
    scores = scores.at[mask_rows, mask_cols].set(MASK_VALUE, mode="drop")
    top = jax.lax.top_k(scores, min(k, scores.shape[1]))[1]
    return jnp.pad(top, ((0, 0), (0, k - top.shape[1])), constant_values=-1)


def train_mask(ds, users: np.ndarray):
    """Mask arrays for scoring ``users`` (all in one block), for small replays such as parity."""
    indptr, items = training_items_csr(ds.train, ds.n_users)
    rows, cols = block_mask(np.asarray(users), indptr, items)
    return jnp.asarray(rows, jnp.int32), jnp.asarray(cols, jnp.int32)


def split_metrics(users, top_items, split_pairs, n_users, n_items) -> dict:
    return metrics_lib.topk_metrics(users, top_items, split_pairs, n_users, n_items)


def make_split_evaluator(model, eval_noise: str = "per_block"):
    """A jittable fn(params, graph, feats, block_users, mask_rows, mask_cols, key) -> (n_blocks, B, 50)."""
    if eval_noise not in EVAL_NOISE_MODES:
        raise ValueError(f"eval_noise is {eval_noise!r}, expected one of {EVAL_NOISE_MODES}")
    shapes = model.noise_shapes()

    def forward(params, graph, feats, key):
        noise = sample_noise(key, shapes, train=False, keep_rate=model.keep_rate, gumbel=eval_noise != "off")
        return model.apply(params, graph, feats, noise)

    def evaluate_split(params, graph, feats, block_users, mask_rows, mask_cols, key):
        keys = jax.random.split(key, block_users.shape[0])
        shared = None if eval_noise == "per_block" else forward(params, graph, feats, key)

        def one_block(_, xs):
            users, rows, cols, block_key = xs
            out = forward(params, graph, feats, block_key) if shared is None else shared
            scores = out.user[users] @ out.item.T
            return None, masked_top_k(scores, rows, cols)

        _, tops = jax.lax.scan(one_block, None, (block_users, mask_rows, mask_cols, keys))
        return tops

    return evaluate_split


def metrics_from_tops(plan: SplitPlan, tops, n_users: int, n_items: int) -> dict:
    flat = np.asarray(tops).reshape(-1, np.asarray(tops).shape[-1])[: len(plan.users)]
    return split_metrics(plan.users, flat, plan.pairs, n_users, n_items)
