"""Top-k metrics exactly as MMRec computes them (SPEC §5), on the host in float64.

For each evaluated user with n_u split items and a top-K list, ``rel[j]`` marks hits. Then, per k:
  Recall@k    = hits@k / n_u
  Precision@k = hits@k / k
  NDCG@k      = sum_{j<=k} rel_j / log2(j+1)  /  sum_{j<=min(n_u,k)} 1 / log2(j+1)
  MAP@k       = sum_{j<=k} Precision@j * rel_j / min(n_u, k)
averaged over evaluated users and rounded to 4 decimals.
"""

from __future__ import annotations

import numpy as np

TOPK = (5, 10, 20, 50)
METRICS = ("recall", "ndcg", "precision", "map")


def relevance(users: np.ndarray, top_items: np.ndarray, split_pairs: np.ndarray, n_items: int) -> np.ndarray:
    """rel[r, j] = top_items[r, j] is one of users[r]'s items in the split (vectorised lookup)."""
    split_keys = np.unique(split_pairs[:, 0].astype(np.int64) * n_items + split_pairs[:, 1])
    query = users.astype(np.int64)[:, None] * n_items + top_items.astype(np.int64)
    pos = np.minimum(np.searchsorted(split_keys, query), len(split_keys) - 1)
    return (split_keys[pos] == query) & (top_items >= 0)  # -1 pads lists of small catalogues


def per_user_counts(users: np.ndarray, split_pairs: np.ndarray, n_users: int) -> np.ndarray:
    """n_u: rows of each user in the split (duplicates count, as in the reference)."""
    return np.bincount(split_pairs[:, 0], minlength=n_users)[users]


def metrics_from_relevance(rel: np.ndarray, n_pos: np.ndarray, topk=TOPK) -> dict:
    rel, n_users = np.asarray(rel), len(rel)
    # A user without a hit in its list scores 0 on every metric: only the others are computed, and
    # the sums are divided by all users (most users have no hit, so this is most of the work saved).
    with_hit = np.flatnonzero(rel.any(axis=1))
    rel, n_pos = rel[with_hit].astype(np.float64), np.asarray(n_pos)[with_hit]
    depth = rel.shape[1]
    ranks = np.arange(1, depth + 1, dtype=np.float64)
    hits = np.cumsum(rel, axis=1)
    discount = 1.0 / np.log2(ranks + 1.0)
    dcg = np.cumsum(rel * discount, axis=1)
    ideal_cum = np.cumsum(discount)
    capped = np.minimum(n_pos, depth)
    sum_prec = np.cumsum(hits / ranks * rel, axis=1)
    out = {}
    for k in topk:
        denom_k = np.minimum(capped, k).astype(np.float64)
        idcg = ideal_cum[denom_k.astype(np.int64) - 1]
        values = {
            "recall": hits[:, k - 1] / n_pos,
            "ndcg": dcg[:, k - 1] / idcg,
            "precision": hits[:, k - 1] / k,
            "map": sum_prec[:, k - 1] / denom_k,
        }
        for name in METRICS:
            out[f"{name}@{k}"] = round(float(values[name].sum()) / n_users, 4) if n_users else float("nan")
    return out


def evaluation_users(split_pairs: np.ndarray) -> np.ndarray:
    """Unique users of a split in order of first appearance (the reference's evaluation order)."""
    _, first = np.unique(split_pairs[:, 0], return_index=True)
    return split_pairs[np.sort(first), 0]


def topk_metrics(users, top_items, split_pairs, n_users, n_items, topk=TOPK) -> dict:
    rel = relevance(np.asarray(users), np.asarray(top_items), split_pairs, n_items)
    return metrics_from_relevance(rel, per_user_counts(np.asarray(users), split_pairs, n_users), topk)
