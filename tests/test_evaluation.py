"""Evaluation kernels: the top-k methods and the noise-free/noisy split of the evaluation forward."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lgmrec_jax import configs, engine as engine_lib, evaluation, metrics
from lgmrec_jax.data import from_arrays, load_dataset
from lgmrec_jax.model import sample_noise


def exact(scores, k):
    return np.asarray(jax.lax.top_k(jnp.asarray(scores), k)[1])


def test_grouped_top_k_by_hand():
    # 9 items, k = 2: g = round(sqrt(9 / 2)) = 2, groups {0,1} {2,3} {4,5} {6,7} {8,pad}.
    # Group maxima 5, 9, 1, 9, 0: the best two groups are {2,3} and {6,7}, whose items score 1, 9, 9, 8.
    # Items 3 and 6 tie at 9 and keep index order, as top_k orders ties.
    row = np.array([5, 0, 1, 9, 1, 0, 9, 8, 0], np.float32)
    got = np.asarray(evaluation.grouped_top_k(jnp.asarray(row[None]), 2))
    np.testing.assert_array_equal(got, [[3, 6]])
    # Groups {4,5} (max 9) and {0,1} (max 5) win; items 0 and 5 tie at 5. top_k takes the lower index,
    # so the candidates must be read in item order, not in the groups' rank order (that gives [4, 5]).
    row = np.array([5, 0, 0, 0, 9, 5, 0, 0, 0], np.float32)
    np.testing.assert_array_equal(np.asarray(evaluation.grouped_top_k(jnp.asarray(row[None]), 2)), [[4, 0]])
    np.testing.assert_array_equal(exact(row[None], 2), [[4, 0]])


@pytest.mark.parametrize("prune", [True, False])
@pytest.mark.parametrize("n_items", [60, 101, 997, 7050])
@pytest.mark.parametrize("values", ["normal", "ties", "masked"])
def test_grouped_top_k_equals_top_k(n_items, values, prune):
    rng = np.random.default_rng(n_items)
    if values == "normal":
        scores = rng.normal(size=(64, n_items)).astype(np.float32)
    elif values == "ties":  # few distinct values: the tie order decides most of the list
        scores = rng.integers(0, 5, size=(64, n_items)).astype(np.float32)
    else:  # most items masked to -1e10 as training items: fewer than k real candidates in some rows
        scores = rng.normal(size=(64, n_items)).astype(np.float32)
        scores[rng.random(scores.shape) < 0.98] = evaluation.MASK_VALUE
    k = min(50, n_items)
    np.testing.assert_array_equal(
        np.asarray(jax.jit(evaluation.grouped_top_k, static_argnums=(1, 2))(scores, k, prune)), exact(scores, k))


def test_kth_lower_bound_by_hand():
    # Row 1..100, k = 10: ten slices of ten, maxima 10, 20, ..., 100, so the start is 10; then
    # bisections towards 100: 55 (46 reach it: kept), 77.5 (23: kept), 88.75 (12: kept), 94.375 (6: too
    # high), 91.5625 (9: too high), 90.15625 (10: kept), 90.859375 (10: kept), 91.2109375 (9: too high).
    row = jnp.arange(1, 101, dtype=jnp.float32)[None]
    assert float(evaluation.kth_lower_bound(row, 10, steps=0)[0, 0]) == 10.0
    assert float(evaluation.kth_lower_bound(row, 10, steps=8)[0, 0]) == 90.859375


@pytest.mark.parametrize("values", ["normal", "ties", "masked", "huge"])
def test_kth_lower_bound_leaves_k_values(values):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(200, 300)).astype(np.float32)
    if values == "ties":
        x = rng.integers(1, 4, size=x.shape).astype(np.float32)
    elif values == "masked":
        x[rng.random(x.shape) < 0.9] = evaluation.MASK_VALUE
    elif values == "huge":  # the midpoint's arithmetic overflows to inf
        x = np.where(rng.random(x.shape) < 0.5, 3e38, -3e38).astype(np.float32)
    t = np.asarray(evaluation.kth_lower_bound(jnp.asarray(x), 50))
    assert ((x >= t).sum(axis=1) >= 50).all()
    assert (t[:, 0] <= np.sort(x, axis=1)[:, -50]).all()


@pytest.mark.parametrize("n_items", [997, 7050])
@pytest.mark.parametrize("values", ["normal", "ties", "masked", "bfloat16"])
def test_pruned_selection_equals_top_k(n_items, values):
    """The pruned path itself (grouped_top_k on CPUs when every group maximum is finite and non-zero),
    with a short last group (997 = 249 * 4 + 1; 7050 = 587 * 12 + 6) and rows where the ties at the
    k-th value decide the list."""
    rng = np.random.default_rng(n_items)
    scores = rng.normal(size=(64, n_items)).astype(np.float32)
    if values == "ties":
        scores = rng.integers(1, 6, size=scores.shape).astype(np.float32)
    elif values == "masked":
        scores[rng.random(scores.shape) < 0.98] = evaluation.MASK_VALUE
    x = jnp.asarray(scores, jnp.bfloat16 if values == "bfloat16" else jnp.float32)
    g = evaluation.group_size(n_items, 50)
    maxima = evaluation.group_maxima(x, g)
    assert maxima.shape == (64, -(-n_items // g)) and bool(jnp.isfinite(maxima).all() & (maxima != 0).all())
    got = jax.jit(evaluation.pruned_selection, static_argnums=(2, 3))(x, maxima, 50, g)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jax.lax.top_k(x, 50)[1]))


def test_approx_top_k_recalls_the_exact_list():
    scores = np.random.default_rng(0).normal(size=(256, 3000)).astype(np.float32)
    got = np.asarray(evaluation.top_k_indices(jnp.asarray(scores), 50, "approx"))
    want = exact(scores, 50)
    recall = np.mean([len(set(g) & set(w)) / 50 for g, w in zip(got, want)])
    assert recall >= evaluation.APPROX_RECALL_TARGET
    # Ranked by score, whatever the backend: the values fall along each list.
    assert (np.diff(np.take_along_axis(scores, got, axis=1), axis=1) <= 0).all()


def test_unknown_top_k_method_is_refused():
    cfg = configs.for_dataset("synthetic_tiny")
    cfg.eval_topk = "fast"
    with pytest.raises(configs.ConfigError, match="eval_topk is 'fast', expected one of"):
        configs.validate(cfg)
    with pytest.raises(ValueError, match="eval_topk is 'fast'"):
        evaluation.top_k_indices(jnp.zeros((1, 60)), 50, "fast")


def tiny(**overrides):
    cfg = configs.for_dataset("synthetic_tiny")
    cfg.update(overrides)
    return cfg


def catalogue_dataset(n_users=120, n_items=700, seed=0):
    """Random pairs over a 700-item catalogue: big enough that "grouped" groups (g = 4, 175 groups)."""
    rng = np.random.default_rng(seed)
    pairs = np.unique(np.stack([rng.integers(0, n_users, 3000), rng.integers(0, n_items, 3000)], 1), axis=0)
    pairs = pairs[rng.permutation(len(pairs))]
    n = len(pairs)
    return from_arrays(pairs[: n * 8 // 10], pairs[n * 8 // 10: n * 9 // 10], pairs[n * 9 // 10:], n_users, n_items,
                       v_feat=rng.normal(size=(n_items, 24)), t_feat=rng.normal(size=(n_items, 16)))


@pytest.mark.parametrize("method", ["grouped", "approx"])
def test_top_k_methods_give_the_direct_metrics(method):
    """Exact on CPU for both (approx_max_k is exact off TPUs); per-block noise keys are unchanged."""
    ds = catalogue_dataset()
    direct = engine_lib.SingleEngine(tiny(eval_batch_size=32, eval_topk="direct"), ds)
    params = direct.init_state().params
    other = engine_lib.SingleEngine(tiny(eval_batch_size=32, eval_topk=method), ds)
    key = jax.random.PRNGKey(5)
    tops = [e.evaluate_split(params, e.graph, e.feats, *direct.eval_arrays["test"], key) for e in (direct, other)]
    np.testing.assert_array_equal(np.asarray(tops[1].items), np.asarray(tops[0].items))
    np.testing.assert_array_equal(np.asarray(tops[1].hits), np.asarray(tops[0].hits))
    assert other.evaluate_params(params, epoch=3) == direct.evaluate_params(params, epoch=3)


def test_per_block_evaluation_equals_a_full_forward_per_block(synthetic_dir):
    """The evaluator shares the noise-free part of the forward across blocks; each block must still
    see what a whole forward with that block's own Gumbel draw gives (SPEC §3.6). The evaluator runs
    the default top-k ("grouped"); the expected lists come from lax.top_k."""
    ds = load_dataset(synthetic_dir, "synthetic_tiny")
    exp = engine_lib.SingleEngine(tiny(eval_batch_size=7), ds)
    params = exp.init_state().params
    key = jax.random.PRNGKey(11)
    block_users, rows, cols, _ = exp.eval_arrays["valid"]
    tops = np.asarray(exp.evaluate_split(params, exp.graph, exp.feats, *exp.eval_arrays["valid"], key).items)
    assert block_users.shape[0] > 1
    different = 0
    for b, block_key in enumerate(jax.random.split(key, block_users.shape[0])):
        noise = sample_noise(block_key, exp.model.noise_shapes(), train=False, keep_rate=exp.model.keep_rate)
        out = exp.model.apply(params, exp.graph, exp.feats, noise)
        want = np.asarray(evaluation.masked_top_k(out.user[block_users[b]] @ out.item.T, rows[b], cols[b]))
        np.testing.assert_array_equal(tops[b], want)
        other = exp.model.apply(params, exp.graph, exp.feats,
                                sample_noise(jax.random.PRNGKey(99), exp.model.noise_shapes(), False, 0.5))
        different += not np.array_equal(
            want, np.asarray(evaluation.masked_top_k(other.user[block_users[b]] @ other.item.T, rows[b], cols[b])))
    assert different > 0  # the noise changes the lists, so the equality above is not vacuous


def test_device_hits_equal_the_host_relevance_and_give_its_metrics(synthetic_dir):
    """The evaluator marks hits on the device; they must be metrics.relevance of its lists, and the
    metrics from them those of the host path (split_metrics), including -1 pads (synthetic_tiny has
    45 items) and a duplicated split row (counted twice in n_u, as in the reference)."""
    big = catalogue_dataset()
    big = dataclasses.replace(big, valid=np.concatenate([big.valid, big.valid[:1]]))
    for ds in (load_dataset(synthetic_dir, "synthetic_tiny"), big):
        exp = engine_lib.SingleEngine(tiny(eval_batch_size=16), ds)
        params = exp.init_state().params
        for i, (name, plan) in enumerate(exp.plans.items()):
            out = exp.evaluate_split(params, exp.graph, exp.feats, *exp.eval_arrays[name], jax.random.PRNGKey(i))
            items = np.asarray(out.items).reshape(-1, 50)[: len(plan.users)]
            hits = np.asarray(out.hits).reshape(-1, 50)[: len(plan.users)]
            want = metrics.relevance(plan.users, items, plan.pairs, ds.n_items)
            assert want.any()
            np.testing.assert_array_equal(hits, want)
            assert evaluation.metrics_from_hits(plan, out.hits) == evaluation.split_metrics(
                plan.users, items, plan.pairs, ds.n_users, ds.n_items)
    assert plan.n_pos.max() >= 1 and exp.plans["valid"].n_pos.sum() == len(big.valid)


@pytest.mark.parametrize("prune", [True, False])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("values", ["nan", "negative_nan", "signed_zeros"])
def test_grouped_top_k_ranks_nans_and_signed_zeros_as_top_k(values, dtype, prune):
    """lax.top_k ranks by IEEE total order (-NaN < -inf < ... < -0 < +0 < ... < +NaN); a plain max
    over each group does not, which once made grouped_top_k differ (and return padding indices)."""
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(8, 1001)).astype(np.float32)
    if values == "nan":
        scores[rng.random(scores.shape) < 0.3] = np.nan
    elif values == "negative_nan":  # inf - inf on CPU: the sign bit is set
        scores[rng.random(scores.shape) < 0.9] = -np.abs(np.float32(np.nan))
    else:
        scores = np.where(rng.random(scores.shape) < 0.5, 0.0, -0.0).astype(np.float32)
    x = jnp.asarray(scores, dtype)
    got = np.asarray(jax.jit(evaluation.grouped_top_k, static_argnums=(1, 2))(x, 50, prune))
    np.testing.assert_array_equal(got, np.asarray(jax.lax.top_k(x, 50)[1]))
    assert got.max() < 1001


@pytest.mark.parametrize("chunk", [1, 7, 16, 40, 64])
@pytest.mark.parametrize("method", ["direct", "grouped"])
def test_chunked_block_top_k_gives_the_block_lists(chunk, method):
    """Scoring a block a few users at a time (eval_score_chunk) must give each row the list of the
    whole block's masked top-k: chunks that do not divide the block (padded), training items of rows
    in every chunk (the block's mask shifted per chunk), and rows whose items are mostly masked."""
    rng = np.random.default_rng(chunk)
    n_rows, n_items = 40, 700
    users, items = rng.normal(size=(n_rows, 8)), rng.normal(size=(n_items, 8))
    rows = np.concatenate([np.repeat(np.arange(n_rows), 12), np.full(600, 3)])
    cols = np.concatenate([rng.integers(0, n_items, n_rows * 12), np.arange(600)])  # row 3: 600 of 700 masked
    pad = 50  # mask padding as plan_split writes it: row 0, item n_items (dropped)
    rows, cols = np.concatenate([rows, np.zeros(pad, int)]), np.concatenate([cols, np.full(pad, n_items)])
    args = tuple(jnp.asarray(a, jnp.float32) for a in (users, items)) + tuple(
        jnp.asarray(a, jnp.int32) for a in (rows, cols))
    whole = evaluation.masked_top_k(args[0] @ args[1].T, args[2], args[3], method=method)
    got = jax.jit(lambda *a: evaluation.block_top_k(*a, method=method, chunk=chunk))(*args)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(whole))
    assert not np.isin(np.arange(600), np.asarray(got)[3]).any()  # row 3's mask applied in its chunk


def test_score_chunk_config():
    cfg = tiny(eval_score_chunk=-2)
    with pytest.raises(configs.ConfigError, match="eval_score_chunk is -2"):
        configs.validate(cfg)
    assert evaluation.resolve_score_chunk(0) == 0 and evaluation.resolve_score_chunk(96) == 96
    assert evaluation.resolve_score_chunk(-1) == (evaluation.CPU_SCORE_CHUNK if jax.default_backend() == "cpu" else 0)


def test_evaluation_shares_the_noise_free_part_across_splits():
    """SingleEngine.evaluate_params computes the noise-free forward once and passes it to both splits; the
    lists must be those of a split that computes it itself, at any score chunk."""
    ds = catalogue_dataset()
    exp = engine_lib.SingleEngine(tiny(eval_batch_size=32, eval_score_chunk=0), ds)
    params = exp.init_state().params
    base = exp.noise_free(params, exp.graph, exp.feats)
    chunked = engine_lib.SingleEngine(tiny(eval_batch_size=32, eval_score_chunk=5), ds)
    for i, name in enumerate(exp.plans):
        key = jax.random.PRNGKey(i)
        n_users = len(exp.plans[name].users)
        alone = exp.evaluate_split(params, exp.graph, exp.feats, *exp.eval_arrays[name], key)
        alone = np.asarray(alone.items).reshape(-1, 50)
        for e in (exp, chunked):
            shared = e.evaluate_split(params, e.graph, e.feats, *e.eval_arrays[name], key, base=base)
            shared = np.asarray(shared.items).reshape(-1, 50)
            np.testing.assert_array_equal(shared[:n_users], alone[:n_users])
        # The last block's chunks of 5 wholly past the split's users (its padding) are not scored.
        last_block = n_users // 32 * 32
        first_skipped = last_block + -(-(n_users - last_block) // 5) * 5
        assert first_skipped < len(shared) and (shared[first_skipped:] == -1).all()
        assert (shared[:first_skipped] >= 0).all()
    assert chunked.evaluate_params(params, epoch=2) == exp.evaluate_params(params, epoch=2)


def test_concurrent_splits_give_the_sequential_metrics():
    """On CPUs the splits are evaluated from threads of their own (engine.SingleEngine.concurrent_splits):
    the same programs on the same inputs, so the same metrics as one after another."""
    ds = catalogue_dataset()
    exp = engine_lib.SingleEngine(tiny(eval_batch_size=32), ds)
    assert exp.concurrent_splits == (jax.default_backend() == "cpu")
    params = exp.init_state().params
    results = {}
    for concurrent in (True, False):
        exp.concurrent_splits = concurrent
        results[concurrent] = [exp.evaluate_params(params, epoch=e) for e in (0, 1)]
    assert results[True] == results[False]
    assert results[True][0] != results[True][1]  # epochs draw different noise: the comparison can fail


@pytest.mark.parametrize("concurrent", [True, False])
def test_map_splits_keeps_order_and_the_callers_matmul_precision(concurrent):
    """The split threads must compute at the caller's precision: jax.default_matmul_precision is
    thread-local, and a thread that lost it would trace the evaluation at TF32/bf16 on accelerators."""
    seen = lambda i: (i, jax.config.jax_default_matmul_precision)
    with jax.default_matmul_precision("highest"):
        assert list(evaluation.map_splits(seen, 3, concurrent)) == [(0, "highest"), (1, "highest"), (2, "highest")]
    with jax.default_matmul_precision("bfloat16"):
        assert list(evaluation.map_splits(seen, 2, concurrent)) == [(0, "bfloat16"), (1, "bfloat16")]


def test_grouped_top_k_edge_uses():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 997)).astype(np.float32))
    assert evaluation.grouped_top_k(x, 0, prune=True).shape == (4, 0)
    # Differentiating around the selection: the indices carry no gradient, and the pruned path's
    # batching rule must not stop reverse mode.
    loss = lambda x: jnp.take_along_axis(x, evaluation.grouped_top_k(x, 50, prune=True), axis=1).sum()
    grad = np.asarray(jax.grad(loss)(x))
    assert grad.sum() == 4 * 50 and set(np.unique(grad)) == {0.0, 1.0}


def test_map_splits_dispatches_every_split_before_the_first_result():
    """Sequential splits (accelerators) are all dispatched first, so that the device runs them back to
    back while the host computes the first split's metrics."""
    calls = []
    splits = evaluation.map_splits(lambda i: calls.append(i) or jnp.full(3, i), 3, concurrent=False)
    assert np.asarray(next(splits)).tolist() == [0, 0, 0] and calls == [0, 1, 2]
    assert [np.asarray(x).tolist() for x in splits] == [[1, 1, 1], [2, 2, 2]]


def test_vmapped_pruned_top_k_takes_one_branch_for_the_whole_batch():
    """Configs evaluated at once (the grid's vmap): one cond over all of them, not a select that runs
    the pruned and the full selection for every config, and still each config's exact list, also when
    one config's scores (here with NaNs) need the full selection."""
    rng = np.random.default_rng(11)
    scores = rng.normal(size=(3, 16, 997)).astype(np.float32)
    select = jax.vmap(lambda s: evaluation.grouped_top_k(s, 50, prune=True))
    assert "cond[" in str(jax.make_jaxpr(select)(scores))
    for batch in (scores, np.where(np.arange(3)[:, None, None] == 1, np.float32(np.nan), scores)):
        np.testing.assert_array_equal(np.asarray(jax.jit(select)(batch)), np.asarray(jax.lax.top_k(batch, 50)[1]))
    nested = jax.vmap(jax.vmap(lambda s: evaluation.grouped_top_k(s, 50, prune=True)))(scores.reshape(3, 4, 4, 997))
    np.testing.assert_array_equal(np.asarray(nested).reshape(3, 16, 50), np.asarray(jax.lax.top_k(scores, 50)[1]))
