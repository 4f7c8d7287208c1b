"""Graph matrices against hand-worked values; the two propagation kernels agree in value and gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lgmrec_jax import graph as graph_lib


def dense(matrix):
    return np.asarray(matrix.todense())


def test_normalised_adjacency_by_hand():
    # 2 users, 3 items; user 0 -> items 0, 1 (item 1 twice); user 1 -> item 1; item 2 isolated.
    train = np.array([[0, 0], [0, 1], [0, 1], [1, 1]])
    g = graph_lib.build_graph(train, 2, 3)
    adj = dense(g.norm_adj)
    eps = 1e-7
    deg_u0, deg_u1, deg_i0, deg_i1 = 2, 1, 1, 2  # distinct neighbours: duplicates collapse in A
    expected = np.zeros((5, 5))
    for u, i, du, di in [(0, 0, deg_u0, deg_i0), (0, 1, deg_u0, deg_i1), (1, 1, deg_u1, deg_i1)]:
        expected[u, 2 + i] = expected[2 + i, u] = 1 / np.sqrt((du + eps) * (di + eps))
    np.testing.assert_allclose(adj, expected, rtol=1e-6)
    assert not adj[4].any() and not adj[:, 4].any()  # isolated item: exact zero row and column
    # R keeps the duplicate as a second entry, so the sparse product sums it (SPEC §3.3).
    np.testing.assert_array_equal(dense(g.interactions), [[1, 2, 0], [0, 1, 0]])
    np.testing.assert_allclose(np.asarray(g.user_inv_deg)[:, 0], [1 / (2 + eps), 1 / (1 + eps)], rtol=1e-6)


def random_train(seed=0, n_users=30, n_items=20, n_rows=150):
    rng = np.random.default_rng(seed)
    # Heavy-tailed users (a few with many rows) give the ELL kernel several blocks; the last two items
    # never occur (rows without entries).
    users = np.minimum(rng.geometric(0.08, n_rows) - 1, n_users - 1)
    return np.stack([users, rng.integers(0, n_items - 2, n_rows)], axis=1)


def random_graph(seed=0, n_users=30, n_items=20, n_rows=150, kernel="segment_sum"):
    return graph_lib.build_graph(random_train(seed, n_users, n_items, n_rows), n_users, n_items, kernel)


@pytest.mark.parametrize("which", ["norm_adj", "interactions"])
def test_kernels_equal_in_value_and_gradient(which):
    graphs = {k: random_graph(kernel=k) for k in graph_lib.KERNELS}
    matrix = getattr(graphs["bcoo"], which)
    assert len(getattr(graphs["ell"], which).fwd.cols) >= 3  # several ELL blocks are exercised
    x = jax.random.normal(jax.random.PRNGKey(1), (matrix.shape[1], 8))
    weights = jax.random.normal(jax.random.PRNGKey(2), (matrix.shape[0], 8))
    outputs = {k: graph_lib.propagate(getattr(graphs[k], which), x, k) for k in graph_lib.KERNELS}
    grads = {k: jax.grad(lambda v, k=k: jnp.sum(weights * graph_lib.propagate(getattr(graphs[k], which), v, k)))(x)
             for k in graph_lib.KERNELS}
    for k in ("bcoo", "ell"):
        np.testing.assert_allclose(outputs[k], outputs["segment_sum"], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(grads[k], grads["segment_sum"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(outputs["bcoo"], dense(matrix) @ np.asarray(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads["bcoo"], dense(matrix).T @ np.asarray(weights), rtol=1e-5, atol=1e-6)


def test_ell_blocks_by_hand():
    # Rows 0..4 with 3, 1, 0, 5 and 2 entries (row-sorted COO), 6 columns.
    rows = np.array([0, 0, 0, 1, 3, 3, 3, 3, 3, 4, 4])
    cols = np.array([1, 4, 5, 2, 0, 1, 2, 3, 5, 0, 4])
    vals = np.arange(1.0, 12.0, dtype=np.float32)
    np.testing.assert_array_equal(graph_lib.ell_widths(np.bincount(rows, minlength=5), budget=0.0), [4, 1, 0, 8, 2])
    # A budget of 1 padded entry per 11 merges the cheapest pair: the width-1 block (1 row) into width 2.
    np.testing.assert_array_equal(graph_lib.ell_widths(np.bincount(rows, minlength=5), budget=1 / 11), [4, 2, 0, 8, 2])
    layout = graph_lib.ell_layout(rows, cols, vals, 5)  # the default budget (5%, 0.55 entries) merges nothing
    assert [c.shape for c in layout.cols] == [(1, 1), (1, 2), (1, 4), (1, 8)]
    np.testing.assert_array_equal(layout.slot, [2, 0, 4, 3, 1])  # row 2 reads the appended zero row
    np.testing.assert_array_equal(layout.cols[2], [[1, 4, 5, 1]])  # the pad repeats the row's first column...
    np.testing.assert_array_equal(layout.vals[2], [[1, 2, 3, 0]])  # ...with value 0
    np.testing.assert_array_equal(layout.cols[3], [[0, 1, 2, 3, 5, 0, 0, 0]])
    x = jnp.arange(12.0).reshape(6, 2)
    want = np.zeros((5, 2))
    np.add.at(want, rows, vals[:, None] * np.asarray(x)[cols])
    matrix = graph_lib.to_ell(rows, cols, vals, (5, 6))
    np.testing.assert_allclose(graph_lib.propagate(matrix, x, "ell"), want, rtol=1e-6)
    assert matrix.shape == (5, 6)
    g = jax.grad(lambda v: jnp.sum(jnp.arange(10.0).reshape(5, 2) * graph_lib.propagate(matrix, v, "ell")))(x)
    dense_matrix = np.zeros((5, 6))
    np.add.at(dense_matrix, (rows, cols), vals)
    np.testing.assert_allclose(g, dense_matrix.T @ np.arange(10.0).reshape(5, 2), rtol=1e-6)


def test_kernel_and_matrix_form_must_match():
    with pytest.raises(TypeError, match=r"build_graph\(\.\.\., kernel='ell'\)"):
        graph_lib.propagate(random_graph().norm_adj, jnp.ones((50, 2)), "ell")
    with pytest.raises(TypeError, match="kernel 'segment_sum' got a EllMatrix"):
        graph_lib.propagate(random_graph(kernel="ell").norm_adj, jnp.ones((50, 2)), "segment_sum")


def test_kernels_agree_under_jit():
    g = random_graph(3)
    x = jnp.ones((g.norm_adj.shape[1], 4))
    f = jax.jit(graph_lib.propagate, static_argnums=2)
    np.testing.assert_allclose(f(g.norm_adj, x, "bcoo"), f(g.norm_adj, x, "segment_sum"), rtol=1e-6)


def test_unknown_kernel_is_an_error():
    g = random_graph()
    with pytest.raises(ValueError, match="unknown propagation kernel 'cusparse'"):
        graph_lib.propagate(g.norm_adj, jnp.ones((50, 2)), "cusparse")


def test_ell_gradient_keeps_the_input_dtype():
    """A bf16 block gets a bf16 gradient from every kernel (the products themselves are float32)."""
    x = jax.random.normal(jax.random.PRNGKey(0), (50, 4)).astype(jnp.bfloat16)
    grads = {}
    for kernel in ("segment_sum", "ell"):
        matrix = random_graph(kernel=kernel).norm_adj
        assert graph_lib.propagate(matrix, x, kernel).dtype == jnp.float32
        grads[kernel] = jax.grad(lambda v: jnp.sum(graph_lib.propagate(matrix, v, kernel)))(x)
    assert grads["ell"].dtype == grads["segment_sum"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(grads["ell"], np.float32), np.asarray(grads["segment_sum"], np.float32),
                               rtol=1e-2)


def test_symmetric_matrix_holds_its_blocks_once():
    g = random_graph(kernel="ell")
    assert g.norm_adj.bwd is g.norm_adj.fwd  # A_hat is its own transpose
    assert g.interactions.bwd.slot.shape == (20,)  # R's transpose has a row per item
