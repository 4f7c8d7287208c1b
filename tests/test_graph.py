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


def random_graph(seed=0, n_users=30, n_items=20, n_rows=150):
    rng = np.random.default_rng(seed)
    train = np.stack([rng.integers(0, n_users, n_rows), rng.integers(0, n_items - 2, n_rows)], axis=1)
    return graph_lib.build_graph(train, n_users, n_items)


@pytest.mark.parametrize("which", ["norm_adj", "interactions"])
def test_kernels_equal_in_value_and_gradient(which):
    g = random_graph()
    matrix = getattr(g, which)
    x = jax.random.normal(jax.random.PRNGKey(1), (matrix.shape[1], 8))
    weights = jax.random.normal(jax.random.PRNGKey(2), (matrix.shape[0], 8))
    outputs = {k: graph_lib.propagate(matrix, x, k) for k in graph_lib.KERNELS}
    np.testing.assert_allclose(outputs["bcoo"], outputs["segment_sum"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(outputs["bcoo"], dense(matrix) @ np.asarray(x), rtol=1e-5, atol=1e-6)
    grads = {k: jax.grad(lambda v, k=k: jnp.sum(weights * graph_lib.propagate(matrix, v, k)))(x)
             for k in graph_lib.KERNELS}
    np.testing.assert_allclose(grads["bcoo"], grads["segment_sum"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(grads["bcoo"], dense(matrix).T @ np.asarray(weights), rtol=1e-5, atol=1e-6)


def test_kernels_agree_under_jit():
    g = random_graph(3)
    x = jnp.ones((g.norm_adj.shape[1], 4))
    f = jax.jit(graph_lib.propagate, static_argnums=2)
    np.testing.assert_allclose(f(g.norm_adj, x, "bcoo"), f(g.norm_adj, x, "segment_sum"), rtol=1e-6)


def test_unknown_kernel_is_an_error():
    g = random_graph()
    with pytest.raises(ValueError, match="unknown propagation kernel 'cusparse'"):
        graph_lib.propagate(g.norm_adj, jnp.ones((50, 2)), "cusparse")
