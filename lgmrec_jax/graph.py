"""Graph matrices of LGMRec and the one propagation function (SPEC §3.3).

Both matrices are built once on the host from the training pairs, in float64 where the reference
computes in float64, and held as row-sorted ``jax.experimental.sparse.BCOO``:

  R      (U x I)  1.0 per training row; duplicate pairs stay separate entries, so they sum.
  A_hat  (N x N)  D^-1/2 A D^-1/2 of the symmetric bipartite adjacency of distinct pairs,
                  D = diag(deg + 1e-7); isolated nodes keep all-zero rows and columns.

``propagate(matrix, x, kernel)`` multiplies a BCOO by a dense block with either kernel:
``"bcoo"`` (BCOO matmul, gather + scatter-add) or ``"segment_sum"`` (gather, then a sorted
``segment_sum`` over the row indices, as in jraph's message passing). Both give the same values
and gradients; the default is chosen by measurement (experiments/bench.py).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse

from lgmrec_jax.configs import KERNELS

DEGREE_EPS = 1e-7


class Graph(NamedTuple):
    """Device-side graph constants; a pytree, passed to jitted functions as an argument."""

    norm_adj: sparse.BCOO  # (N, N)
    interactions: sparse.BCOO  # R, (U, I)
    user_inv_deg: jax.Array  # (U, 1) float32: 1 / (deg_u + 1e-7)


class HostGraph(NamedTuple):
    """Row-sorted COO triplets on the host (int32 indices, float32 values)."""

    adj_rows: np.ndarray
    adj_cols: np.ndarray
    adj_vals: np.ndarray
    r_rows: np.ndarray
    r_cols: np.ndarray
    user_inv_deg: np.ndarray
    n_users: int
    n_items: int


def build_host_graph(train: np.ndarray, n_users: int, n_items: int) -> HostGraph:
    """COO of R (with multiplicity) and of the normalised symmetric adjacency."""
    users = np.asarray(train[:, 0], dtype=np.int64)
    items = np.asarray(train[:, 1], dtype=np.int64)
    order = np.lexsort((items, users))
    r_rows, r_cols = users[order], items[order]

    keys = np.unique(users * n_items + items)  # distinct pairs, sorted by (user, item)
    du, di = keys // n_items, keys % n_items
    deg = np.zeros(n_users + n_items, dtype=np.float64)
    np.add.at(deg, du, 1.0)
    np.add.at(deg, n_users + di, 1.0)
    scale = (deg + DEGREE_EPS) ** -0.5
    rows = np.concatenate([du, n_users + di])
    cols = np.concatenate([n_users + di, du])
    vals = scale[rows] * scale[cols]
    order = np.lexsort((cols, rows))
    inv_deg = (1.0 / (deg[:n_users] + DEGREE_EPS)).astype(np.float32)[:, None]
    return HostGraph(rows[order].astype(np.int32), cols[order].astype(np.int32),
                     vals[order].astype(np.float32), r_rows.astype(np.int32), r_cols.astype(np.int32),
                     inv_deg, n_users, n_items)


def to_bcoo(rows, cols, vals, shape) -> sparse.BCOO:
    indices = jnp.stack([jnp.asarray(rows), jnp.asarray(cols)], axis=1)
    return sparse.BCOO((jnp.asarray(vals), indices), shape=shape, indices_sorted=True)


def device_graph(host: HostGraph) -> Graph:
    n = host.n_users + host.n_items
    return Graph(
        norm_adj=to_bcoo(host.adj_rows, host.adj_cols, host.adj_vals, (n, n)),
        interactions=to_bcoo(host.r_rows, host.r_cols, np.ones(len(host.r_rows), np.float32),
                             (host.n_users, host.n_items)),
        user_inv_deg=jnp.asarray(host.user_inv_deg))


def build_graph(train: np.ndarray, n_users: int, n_items: int) -> Graph:
    return device_graph(build_host_graph(train, n_users, n_items))


def propagate(matrix: sparse.BCOO, x: jax.Array, kernel: str = "segment_sum") -> jax.Array:
    """matrix @ x for a row-sorted BCOO matrix and a dense (cols, d) block."""
    if kernel == "bcoo":
        return matrix @ x
    if kernel == "segment_sum":
        rows, cols = matrix.indices[:, 0], matrix.indices[:, 1]
        messages = matrix.data[:, None] * x[cols]
        return jax.ops.segment_sum(messages, rows, num_segments=matrix.shape[0], indices_are_sorted=True)
    raise ValueError(f"unknown propagation kernel {kernel!r}; expected one of {KERNELS}")
