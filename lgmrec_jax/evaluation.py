"""Full-ranking evaluation (SPEC §5) as one compiled, blocked top-k per split.

A split's users, in order of first appearance, are cut into blocks of ``eval_batch_size``; per block
the device scores all items, sets training items to -1e10, keeps the top 50 and marks the hits, so
only (users x 50) booleans reach the host, which computes the metrics in float64. Memory is bounded
by one (block x items) score matrix; inside a block ``eval_score_chunk`` users are scored at a time
(256 on CPUs, where their scores stay in cache; the same lists).

``eval_noise``: "per_block" (the reference: fresh Gumbel noise per block; only the hypergraph branch
is recomputed), "per_eval" (one draw per split) or "off". ``eval_topk``: "grouped" (exact, two smaller
selections, pruned on CPUs; the same lists as "direct"), "direct" (``lax.top_k``) or "approx"
(``lax.approx_max_k``, approximate on TPUs). Measurements: experiments/results/README.md.
"""

from __future__ import annotations

import concurrent.futures as concurrent_futures
import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lgmrec_jax import metrics as metrics_lib
from lgmrec_jax.configs import EVAL_NOISE_MODES, EVAL_TOPK_METHODS
from lgmrec_jax.model import sample_noise

MASK_VALUE = -1e10  # the reference masks with -1e10, not -inf
TOP_K = max(metrics_lib.TOPK)
APPROX_RECALL_TARGET = 0.95  # eval_topk="approx": jax.lax.approx_max_k's default
CPU_SCORE_CHUNK = 256  # users scored at a time on CPUs (config eval_score_chunk=-1); see block_top_k
PRUNE_STEPS = 8  # bisections of kth_lower_bound (4 to 16 measured alike at Baby and Clothing widths)


class SplitPlan(NamedTuple):
    """Host arrays describing one split's blocked evaluation."""

    users: np.ndarray  # (n,) evaluated users in order
    block_users: np.ndarray  # (n_blocks, B) int32, padded with user 0
    mask_rows: np.ndarray  # (n_blocks, P) int32: row in block of a training pair
    mask_cols: np.ndarray  # (n_blocks, P) int32: its item; padding uses n_items (dropped)
    split_items: np.ndarray  # (n_blocks, B, M) int32: each row's items in the split, padded with SPLIT_PAD
    n_pos: np.ndarray  # (n,) rows of each evaluated user in the split (duplicates count)
    pairs: np.ndarray  # the split's (user, item) rows

    def device_arrays(self) -> tuple:
        """What the split evaluator takes after (params, graph, feats), before the key."""
        return tuple(jnp.asarray(a) for a in (self.block_users, self.mask_rows, self.mask_cols, self.split_items))


class SplitTops(NamedTuple):
    """One split's evaluation on the device, per block: (n_blocks, B, 50) each."""

    items: jax.Array  # top-50 item indices (-1 pads a catalogue under 50 items)
    hits: jax.Array  # bool: the item is one of the row's split items (metrics.relevance)
    scores: Optional[jax.Array] = None  # with_scores: the masked scores of those items (-inf on -1 pads)


EVAL_SPLITS = ("valid", "test")  # evaluated in this order; see evaluated_splits
SPLIT_PAD = -2  # never an item index, nor top-k's -1 padding


def items_csr(pairs: np.ndarray, n_users: int):
    """(indptr, items): the items of user u's pairs are items[indptr[u]:indptr[u + 1]], in row order."""
    order = np.argsort(pairs[:, 0], kind="stable")
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(pairs[:, 0], minlength=n_users), out=indptr[1:])
    return indptr, pairs[order, 1]


def block_mask(users: np.ndarray, indptr: np.ndarray, items: np.ndarray):
    """(row, item) of every pair of ``users`` in a CSR (row = position in ``users``)."""
    counts = indptr[users + 1] - indptr[users]
    rows = np.repeat(np.arange(len(users)), counts)
    starts = np.repeat(indptr[users] - np.cumsum(counts) + counts, counts)
    return rows, items[starts + np.arange(counts.sum())]


def evaluated_splits(pairs: dict) -> list[str]:
    """The splits an evaluation covers (those with rows), in order: split i's noise key is the epoch's
    evaluation key folded with i."""
    return [name for name in EVAL_SPLITS if len(pairs[name])]


def plan_split(train: np.ndarray, split_pairs: np.ndarray, n_users: int, n_items: int,
               block_size: int) -> SplitPlan:
    users = metrics_lib.evaluation_users(split_pairs)
    n_blocks = max(1, -(-len(users) // block_size))
    block_size = min(block_size, max(len(users), 1))
    padded = np.zeros(n_blocks * block_size, dtype=np.int32)
    padded[: len(users)] = users
    block_users = padded.reshape(n_blocks, block_size)
    indptr, items = items_csr(train, n_users)
    masks = [block_mask(users[b * block_size:(b + 1) * block_size], indptr, items) for b in range(n_blocks)]
    width = max(1, max(len(r) for r, _ in masks))
    mask_rows = np.zeros((n_blocks, width), dtype=np.int32)
    mask_cols = np.full((n_blocks, width), n_items, dtype=np.int32)
    for b, (r, c) in enumerate(masks):
        mask_rows[b, : len(r)], mask_cols[b, : len(c)] = r, c
    split_items, n_pos = split_item_table(users, split_pairs, n_users, n_blocks * block_size)
    return SplitPlan(users, block_users, mask_rows, mask_cols, split_items.reshape(n_blocks, block_size, -1),
                     n_pos, split_pairs)


def plan_all_users(train: np.ndarray, n_users: int, n_items: int, block_size: int) -> SplitPlan:
    """A plan of every user 0..n_users-1 in blocks, as plan_split would cut a split holding them all: for
    top-k lists of users outside the valid/test splits (lgmrec_jax.export). Each user gets the one split
    item ``n_items``, which no list holds (so every row counts as real and no hit is marked)."""
    users = np.arange(n_users, dtype=np.int64)
    return plan_split(train, np.stack([users, np.full_like(users, n_items)], axis=1), n_users, n_items, block_size)


def split_item_table(users: np.ndarray, split_pairs: np.ndarray, n_users: int, n_rows: int):
    """(n_rows, M) table of each user's split items (rows past len(users) and short lists padded with
    SPLIT_PAD; M = the most items any user has in the split), and n_pos per user."""
    indptr, items = items_csr(split_pairs, n_users)
    counts = indptr[users + 1] - indptr[users]
    table = np.full((n_rows, max(1, int(counts.max(initial=0)))), SPLIT_PAD, np.int32)
    rows, cols = block_mask(users, indptr, items)
    table[rows, np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)] = cols
    return table, counts


def _int_like(dtype):
    return {2: jnp.int16, 4: jnp.int32}[jnp.dtype(dtype).itemsize]


def _flip_negatives(bits: jax.Array) -> jax.Array:
    """Reverses the order of the negative integers' magnitudes; its own inverse."""
    return jnp.where(bits < 0, bits ^ jnp.array(jnp.iinfo(bits.dtype).max, bits.dtype), bits)


def total_order_key(x: jax.Array) -> jax.Array:
    """Integers that order as ``lax.top_k`` orders the floats ``x`` (IEEE total order: -NaN < -inf <
    ... < -0 < +0 < ... < +inf < +NaN), equal exactly where the bits are equal."""
    return _flip_negatives(jax.lax.bitcast_convert_type(x, _int_like(x.dtype)))


def from_total_order_key(key: jax.Array, dtype) -> jax.Array:
    return jax.lax.bitcast_convert_type(_flip_negatives(key), dtype)


def grouped_top_k(scores: jax.Array, k: int, prune: bool | None = None) -> jax.Array:
    """The same indices as ``lax.top_k(scores, k)[1]``, in two smaller selections.

    Items are cut into groups of g consecutive indices (g ~ sqrt(n / k)). Every one of the k best
    items lies in one of the k groups with the largest maxima (at most k groups can hold a value
    >= the k-th best), so the top k of those groups' k * g items is the top k overall. The chosen
    groups are put back in index order, so candidates keep the items' order and ties are broken
    as top_k breaks them (lower index first). Sorting-based top-k backends do k * g + n / g work
    per row instead of n.

    ``prune`` (default: on CPUs) takes :func:`pruned_grouped_top_k`'s path, which also cuts the
    selections' own work; without it the group maxima are taken in top_k's own order
    (total_order_key), so NaNs and signed zeros rank as top_k ranks them, and both selections stay
    float top_k (an integer top_k measured 4.5x slower on XLA:CPU).
    """
    n_rows, n = scores.shape
    if k < 1:
        return jax.lax.top_k(scores, k)[1]
    g = group_size(n, k)
    n_groups = -(-n // g)
    if n_groups <= k:
        return jax.lax.top_k(scores, k)[1]
    if jax.default_backend() == "cpu" if prune is None else prune:
        # Indices carry no gradient; stopping it here lets callers differentiate around the selection
        # (the batching rule of the pruned path has no reverse-mode rule).
        return pruned_grouped_top_k(jax.lax.stop_gradient(scores), k, g)
    int_type = _int_like(scores.dtype)
    lowest = jnp.iinfo(int_type).min  # the key of the lowest value in total order: pads rank last
    keys = jnp.pad(total_order_key(scores), ((0, 0), (0, n_groups * g - n)), constant_values=lowest)
    group_max = from_total_order_key(keys.reshape(n_rows, n_groups, g).max(axis=2), scores.dtype)
    groups = jnp.sort(jax.lax.top_k(group_max, k)[1], axis=1)
    candidates = (groups[:, :, None] * g + jnp.arange(g)).reshape(n_rows, k * g)
    padded = jnp.pad(scores, ((0, 0), (0, n_groups * g - n)),
                     constant_values=from_total_order_key(jnp.array(lowest, int_type), scores.dtype))
    best = jax.lax.top_k(jnp.take_along_axis(padded, candidates, axis=1), k)[1]
    return jnp.take_along_axis(candidates, best, axis=1)


def group_size(n: int, k: int) -> int:
    """grouped_top_k's g: about sqrt(n / k), which balances the two selections' widths."""
    return max(1, round(math.sqrt(n / k)))


def group_maxima(scores: jax.Array, g: int) -> jax.Array:
    """(rows, ceil(n / g)) float maxima of consecutive groups of g items; the last may be shorter.

    One strided window reduction: slicing off the whole groups first copied the score matrix (a
    tenth of a split's selection time on the 2-core CPU)."""
    n = scores.shape[1]
    short = -(-n // g) * g - n
    return jax.lax.reduce_window(scores, jnp.array(-jnp.inf, scores.dtype), jax.lax.max, (1, g), (1, g),
                                 ((0, 0), (0, short)))


def kth_lower_bound(values: jax.Array, k: int, steps: int = PRUNE_STEPS) -> jax.Array:
    """(rows, 1) thresholds t with at least k of each row's ``values`` >= t, close to the k-th largest.

    Start: the smallest of the maxima of k disjoint slices of the row (k distinct values reach it).
    Then ``steps`` bisections between t and the row's maximum, each keeping the midpoint only where
    k values reach it, so the guarantee holds whatever the arithmetic does (an overflowing or NaN
    midpoint is never kept).
    """
    n_rows, n = values.shape
    width = n // k
    low = values[:, : k * width].reshape(n_rows, k, width).max(axis=2).min(axis=1, keepdims=True)
    high = values.max(axis=1, keepdims=True)

    def bisect(_, bounds):
        low, high = bounds
        mid = low + (high - low) * 0.5
        enough = (values >= mid).sum(axis=1, keepdims=True) >= k
        return jnp.where(enough, mid, low), jnp.where(enough, high, mid)

    return jax.lax.fori_loop(0, steps, bisect, (low, high), unroll=True)[0]


def _drop_below(x: jax.Array, threshold: jax.Array) -> jax.Array:
    return jnp.where(x < threshold, -jnp.inf, x)


def pruned_grouped_top_k(scores: jax.Array, k: int, g: int) -> jax.Array:
    """grouped_top_k's selections with everything that cannot win set to -inf first (exact).

    XLA:CPU's top-k keeps a heap of k and pays most (~50 ns) for each value that enters it; on
    random rows about k (1 + ln(n / k)) values do, and a value below the heap's worst costs little
    (a run of equal -inf values, least of all). So each selection first drops what cannot be in its
    top k: group maxima below :func:`kth_lower_bound` (at least k maxima reach it), then candidates
    below the k-th chosen maximum (k candidates reach that). Values at least k others beat never enter
    a top k, and the rest keep their order, so the indices are lax.top_k's. On this project's 2-core
    CPU, 19,200 users' selections, scores included, took 0.255 s instead of 0.455 s at Baby's 7,050
    items and 0.451 s instead of 0.794 s at Clothing's 23,033 (experiments/results/topk_cpu.md).

    The maxima are plain float maxima, cheaper than total_order_key's; they rank groups as top_k
    would only when every maximum is finite and non-zero (NaNs and signed zeros order differently),
    so other score matrices take lax.top_k itself (so do those with a subnormal maximum: XLA:CPU
    compares subnormals as zero). A NaN reaches its group's maximum because XLA's max propagates
    NaNs (XLA:CPU's --xla_cpu_enable_fast_min_max, off by default, would break that).
    """
    return _pruned_top_k(k, g)(scores)


@functools.lru_cache(maxsize=None)
def _pruned_top_k(k: int, g: int):
    """pruned_grouped_top_k for one (k, g): the pruned selection where every group maximum is finite
    and non-zero, lax.top_k elsewhere, chosen by one lax.cond per score matrix.

    Under vmap (the grid's configs evaluated at once) a cond whose predicate is batched becomes a
    select that runs both branches. Rows are independent, so the batching rule instead stacks the
    batch's matrices into one taller matrix: one cond for all of them."""

    @jax.custom_batching.custom_vmap
    def select(scores):
        maxima = group_maxima(scores, g)
        safe = jnp.isfinite(maxima).all() & (maxima != 0).all()
        pruned = functools.partial(pruned_selection, k=k, g=g)
        return jax.lax.cond(safe, pruned, lambda scores, _: jax.lax.top_k(scores, k)[1], scores, maxima)

    @select.def_vmap
    def select_batched(axis_size, in_batched, scores):
        del axis_size
        if not in_batched[0]:
            return select(scores), False
        rows = select(scores.reshape(-1, scores.shape[-1]))
        return rows.reshape(scores.shape[:-1] + (k,)), True

    return select


def pruned_selection(scores: jax.Array, maxima: jax.Array, k: int, g: int) -> jax.Array:
    """pruned_grouped_top_k for score rows whose group ``maxima`` are all finite and non-zero."""
    best_maxima, groups = jax.lax.top_k(_drop_below(maxima, kth_lower_bound(maxima, k)), k)
    groups = jnp.sort(groups, axis=1)
    candidates = (groups[:, :, None] * g + jnp.arange(g)).reshape(scores.shape[0], k * g)
    # The last group may be short: its missing items read -inf (never chosen: k finite maxima).
    values = jnp.take_along_axis(scores, candidates, axis=1, mode="fill", fill_value=-jnp.inf)
    best = jax.lax.top_k(_drop_below(values, best_maxima.min(axis=1, keepdims=True)), k)[1]
    return jnp.take_along_axis(candidates, best, axis=1)


def top_k_indices(scores: jax.Array, k: int, method: str = "direct") -> jax.Array:
    """Indices of the k largest scores per row by ``method`` (config eval_topk)."""
    if method == "direct":
        return jax.lax.top_k(scores, k)[1]
    if method == "grouped":
        return grouped_top_k(scores, k)
    if method == "approx":
        return jax.lax.approx_max_k(scores, k, recall_target=APPROX_RECALL_TARGET)[1]
    raise ValueError(f"eval_topk is {method!r}, expected one of {EVAL_TOPK_METHODS}")


def masked_top_k(scores: jax.Array, mask_rows: jax.Array, mask_cols: jax.Array, k: int = TOP_K,
                 method: str = "direct", with_scores: bool = False):
    """Indices of the k best items per row after setting training pairs to -1e10.

    A catalogue smaller than k is padded with -1 (never relevant). ``with_scores``: (indices, their
    masked scores), the pads scoring -inf.
    """
    scores = scores.at[mask_rows, mask_cols].set(MASK_VALUE, mode="drop")
    top = top_k_indices(scores, min(k, scores.shape[1]), method)
    pad = ((0, 0), (0, k - top.shape[1]))
    indices = jnp.pad(top, pad, constant_values=-1)
    if not with_scores:
        return indices
    return indices, jnp.pad(jnp.take_along_axis(scores, top, axis=1), pad, constant_values=-jnp.inf)


def block_top_k(user_emb: jax.Array, item_emb: jax.Array, mask_rows: jax.Array, mask_cols: jax.Array,
                k: int = TOP_K, method: str = "direct", chunk: int = 0, rows_used=None, with_scores: bool = False):
    """masked_top_k of the block's scores ``user_emb @ item_emb.T``, ``chunk`` users at a time (0: all).

    Exact: each row's list is the same whatever the chunk. Chunks keep each score matrix small enough
    to stay in the CPU's cache through the masking and the selections, instead of streaming a
    (4,096 x items) matrix through memory several times (see :data:`CPU_SCORE_CHUNK`). With
    ``rows_used`` (a traced count: the block's real rows come first), chunks past them are not scored
    and their rows read -1 (score -inf): the last block of a split is mostly padding. ``with_scores``:
    (indices, scores) as masked_top_k gives them.
    """
    n_rows = user_emb.shape[0]
    if chunk <= 0 or chunk >= n_rows:
        return masked_top_k(user_emb @ item_emb.T, mask_rows, mask_cols, k, method, with_scores)
    n_chunks = -(-n_rows // chunk)
    users = jnp.pad(user_emb, ((0, n_chunks * chunk - n_rows), (0, 0))).reshape(n_chunks, chunk, -1)

    def scored(index, chunk_users):
        local = mask_rows - index * chunk  # the block's mask, shifted; other chunks' rows are dropped
        rows = jnp.where((local >= 0) & (local < chunk), local, chunk)
        return masked_top_k(chunk_users @ item_emb.T, rows, mask_cols, k, method, with_scores)

    def unscored(*_):
        indices = jnp.full((chunk, k), -1, jnp.int32)
        return (indices, jnp.full((chunk, k), -jnp.inf, item_emb.dtype)) if with_scores else indices

    def one_chunk(args):
        if rows_used is None:
            return scored(*args)
        index, _ = args
        return jax.lax.cond(index * chunk < rows_used, scored, unscored, *args)

    tops = jax.lax.map(one_chunk, (jnp.arange(n_chunks), users))
    return jax.tree_util.tree_map(lambda x: x.reshape(n_chunks * chunk, -1)[:n_rows], tops)


def resolve_score_chunk(value: int) -> int:
    """Config eval_score_chunk: -1 picks CPU_SCORE_CHUNK on CPUs and whole blocks on accelerators."""
    if value >= 0:
        return value
    return CPU_SCORE_CHUNK if jax.default_backend() == "cpu" else 0


def train_mask(ds, users: np.ndarray):
    """Mask arrays for scoring ``users`` (all in one block), for small replays such as parity."""
    indptr, items = items_csr(ds.train, ds.n_users)
    rows, cols = block_mask(np.asarray(users), indptr, items)
    return jnp.asarray(rows, jnp.int32), jnp.asarray(cols, jnp.int32)


def split_metrics(users, top_items, split_pairs, n_users, n_items) -> dict:
    return metrics_lib.topk_metrics(users, top_items, split_pairs, n_users, n_items)


def map_splits(fn, n_splits: int, concurrent: bool):
    """Yields fn(0), ..., fn(n_splits - 1) in order, where fn dispatches a split's evaluation.

    Without ``concurrent``, every split is dispatched before the first result is yielded: with JAX's
    asynchronous dispatch the device then runs the splits back to back while the caller turns the
    first split's hits into metrics, instead of idling through that host work and the round trip.
    With ``concurrent``, each split is computed, and waited for, on a thread of its own (XLA:CPU runs
    a top-k on one core and a program on the thread that calls it, so the splits' selections then
    share the cores). The caller's matmul precision, a thread-local JAX setting, is carried into the
    threads: without it they would trace the splits at the default precision."""
    if not concurrent:
        yield from [fn(i) for i in range(n_splits)]
        return
    precision = jax.config.jax_default_matmul_precision

    def call(i: int):
        with jax.default_matmul_precision(precision):
            return jax.block_until_ready(fn(i))

    with concurrent_futures.ThreadPoolExecutor(n_splits) as pool:
        for future in [pool.submit(call, i) for i in range(n_splits)]:
            yield future.result()


def make_noise_free(model):
    """fn(params, graph, feats) -> the forward's noise-free part (LGMRec.noise_free), jittable."""
    return lambda params, graph, feats: model.apply(params, graph, feats, method=type(model).noise_free)


def evaluation_noise(model, eval_noise: str, key: jax.Array):
    """The noise of one evaluation-mode forward under mode ``eval_noise`` (config key): Gumbel draws
    from ``key``, or zeros for "off"; no dropout masks."""
    return sample_noise(key, model.noise_shapes(), train=False, keep_rate=model.keep_rate,
                        gumbel=eval_noise != "off")


def make_split_evaluator(model, eval_noise: str = "per_block", eval_topk: str = "grouped", score_chunk: int = 0,
                         k: int = TOP_K, with_scores: bool = False):
    """A jittable fn(params, graph, feats, *plan.device_arrays(), key, base=None) -> SplitTops.

    The hits are marked on the device, so the host only turns a boolean (users x 50) matrix into
    metrics (metrics.metrics_from_relevance). ``base`` is the model's noise-free part for these
    params (:func:`make_noise_free`); given, the splits of one evaluation share it, and without it
    the split computes it itself (the same values). ``k`` items per list; ``with_scores`` also returns
    their scores (SplitTops.scores), for exporting the lists."""
    if eval_noise not in EVAL_NOISE_MODES:
        raise ValueError(f"eval_noise is {eval_noise!r}, expected one of {EVAL_NOISE_MODES}")
    if eval_topk not in EVAL_TOPK_METHODS:
        raise ValueError(f"eval_topk is {eval_topk!r}, expected one of {EVAL_TOPK_METHODS}")

    def with_fresh_noise(params, base, key):
        noise = evaluation_noise(model, eval_noise, key)
        return model.apply(params, base, noise, method=type(model).with_noise)

    def evaluate_split(params, graph, feats, block_users, mask_rows, mask_cols, split_items, key, base=None):
        keys = jax.random.split(key, block_users.shape[0])
        # Only the hypergraph branch sees the noise, so the rest of the forward (CGE, MGE, hyperedge
        # logits: nearly all of its work) is computed once and shared by the blocks.
        if base is None:
            base = make_noise_free(model)(params, graph, feats)
        shared = None if eval_noise == "per_block" else with_fresh_noise(params, base, key)

        def one_block(_, xs):
            users, rows, cols, wanted, block_key = xs
            out = with_fresh_noise(params, base, block_key) if shared is None else shared
            # Real rows come first; padding rows have no split items (plan_split).
            rows_used = jnp.sum(wanted[:, 0] != SPLIT_PAD)
            top = block_top_k(out.user[users], out.item, rows, cols, k=k, method=eval_topk, chunk=score_chunk,
                              rows_used=rows_used, with_scores=with_scores)
            top, scores = top if with_scores else (top, None)
            return None, SplitTops(top, (top[:, :, None] == wanted[:, None, :]).any(axis=2), scores)

        _, tops = jax.lax.scan(one_block, None, (block_users, mask_rows, mask_cols, split_items, keys))
        return tops

    return evaluate_split


def metrics_from_hits(plan: SplitPlan, hits) -> dict:
    """The split's metrics from SplitTops.hits (only these booleans leave the device)."""
    hits = np.asarray(hits)
    return metrics_lib.metrics_from_relevance(hits.reshape(-1, hits.shape[-1])[: len(plan.users)], plan.n_pos)
