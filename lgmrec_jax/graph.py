"""Graph matrices of LGMRec and the one propagation function (SPEC §3.3).

Built once on the host from the training pairs (float64 where the reference computes in float64) and
held as row-sorted BCOO: ``R`` (U x I, 1.0 per training row, duplicates summing) and ``A_hat``
(D^-1/2 A D^-1/2 of the bipartite adjacency of distinct pairs, D = diag(deg + 1e-7)).

``propagate(matrix, x, kernel)``: "segment_sum" (gather, then a sorted segment sum: the default),
"bcoo" (BCOO matmul) or "ell" (rows blocked by degree into ELLPACK blocks: gathers and dense row
sums, no scatter-add; needs ``build_graph(..., kernel="ell")``). All three agree up to float32
summation order.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse

from lgmrec_jax.configs import KERNELS

DEGREE_EPS = 1e-7


class Graph(NamedTuple):
    """Device-side graph constants; a pytree, passed to jitted functions as an argument. The matrices
    are BCOO, or EllMatrix for the "ell" kernel (see :class:`EllMatrix`, defined below)."""

    norm_adj: Any  # (N, N): sparse.BCOO | EllMatrix
    interactions: Any  # R, (U, I): sparse.BCOO | EllMatrix
    user_inv_deg: jax.Array  # (U, 1) float32: 1 / (deg_u + 1e-7)


class EllLayout(NamedTuple):
    """A sparse matrix as ELLPACK blocks: block b holds ``cols[b]``/``vals[b]`` of shape (rows_b, width_b),
    one row per matrix row of that block (entries in the row's order, padded with value 0 on the row's
    first column); ``slot[r]`` is row r's position in the blocks' concatenated outputs, or the position
    of one appended zero row for rows without entries."""

    cols: tuple
    vals: tuple
    slot: jax.Array  # (n_rows,) int32


class EllMatrix(NamedTuple):
    """A graph matrix for the "ell" kernel: its blocks and its transpose's (for the gradient)."""

    fwd: EllLayout
    bwd: EllLayout

    @property
    def shape(self) -> tuple:
        return (self.fwd.slot.shape[0], self.bwd.slot.shape[0])


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


# ELL blocks: each row is padded to the next power of two of its entry count, then the cheapest merges of
# a block into the next wider one are made while the padding they add stays within this share of the
# entries (fewer blocks are fewer kernels per product).
ELL_MERGE_BUDGET = 0.05


def ell_widths(counts: np.ndarray, budget: float = ELL_MERGE_BUDGET) -> np.ndarray:
    """Each row's padded width (0 for rows without entries): powers of two, then merged blocks."""
    width = np.zeros(len(counts), np.int64)
    nonzero = counts > 0
    width[nonzero] = 1 << np.ceil(np.log2(counts[nonzero])).astype(np.int64)
    allowance = budget * counts.sum()
    while True:
        blocks = np.unique(width[nonzero])
        if len(blocks) < 2:
            return width
        costs = [(int(np.sum(width == w)) * int(wider - w), w, wider) for w, wider in zip(blocks, blocks[1:])]
        cost, w, wider = min(costs)
        if cost > allowance:
            return width
        allowance -= cost
        width[width == w] = wider


def ell_layout(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, n_rows: int) -> EllLayout:
    """The ELL blocks of a row-sorted COO matrix (host arrays in, device arrays out)."""
    counts = np.bincount(rows, minlength=n_rows)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    width = ell_widths(counts)
    slot = np.zeros(n_rows, np.int64)
    block_cols, block_vals, offset = [], [], 0
    for w in np.unique(width[width > 0]):
        members = np.flatnonzero(width == w)
        k = np.arange(w)
        entry = starts[members, None] + k
        real = k < counts[members, None]
        entry = np.where(real, entry, starts[members, None])  # pads read the row's first entry, times 0
        block_cols.append(jnp.asarray(cols[entry].astype(np.int32)))
        block_vals.append(jnp.asarray(np.where(real, vals[entry], 0.0).astype(np.float32)))
        slot[members] = offset + np.arange(len(members))
        offset += len(members)
    slot[width == 0] = offset  # the appended zero row
    return EllLayout(tuple(block_cols), tuple(block_vals), jnp.asarray(slot.astype(np.int32)))


def to_ell(rows, cols, vals, shape, symmetric: bool = False) -> EllMatrix:
    """The ELL form of a row-sorted COO matrix and of its transpose (the same blocks, held once, when
    the caller knows the matrix is symmetric)."""
    fwd = ell_layout(rows, cols, vals, shape[0])
    if symmetric:
        return EllMatrix(fwd, fwd)
    order = np.lexsort((rows, cols))
    return EllMatrix(fwd, ell_layout(cols[order], rows[order], vals[order], shape[1]))


def device_graph(host: HostGraph, kernel: str = "segment_sum") -> Graph:
    n = host.n_users + host.n_items
    r_vals = np.ones(len(host.r_rows), np.float32)
    if kernel == "ell":  # A_hat is symmetric: its transpose's blocks are its own
        norm_adj = to_ell(host.adj_rows, host.adj_cols, host.adj_vals, (n, n), symmetric=True)
        interactions = to_ell(host.r_rows, host.r_cols, r_vals, (host.n_users, host.n_items))
    else:
        norm_adj = to_bcoo(host.adj_rows, host.adj_cols, host.adj_vals, (n, n))
        interactions = to_bcoo(host.r_rows, host.r_cols, r_vals, (host.n_users, host.n_items))
    return Graph(norm_adj=norm_adj, interactions=interactions, user_inv_deg=jnp.asarray(host.user_inv_deg))


def build_graph(train: np.ndarray, n_users: int, n_items: int, kernel: str = "segment_sum") -> Graph:
    return device_graph(build_host_graph(train, n_users, n_items), kernel)


def _ell_apply(layout: EllLayout, x: jax.Array) -> jax.Array:
    # Written as multiply + sum so that each block can be one gather-multiply-reduce fusion on a GPU.
    # (An einsum "rw,rwd->rd" ran 1.6x faster on this project's CPU for two propagations and their
    # gradient at Baby's size, but it is a batch of tiny matrix products, which GPUs run poorly;
    # segment_sum was faster than both there: 0.035 s vs 0.046 s einsum vs 0.074 s this form.)
    parts = [jnp.sum(v[:, :, None] * x[c], axis=1) for c, v in zip(layout.cols, layout.vals)]
    parts.append(jnp.zeros((1, x.shape[1]), jnp.promote_types(jnp.float32, x.dtype)))  # rows without entries
    return jnp.concatenate(parts, axis=0)[layout.slot]


@jax.custom_vjp
def ell_matmul(matrix: EllMatrix, x: jax.Array) -> jax.Array:
    """matrix @ x from ELL blocks; the gradient with respect to x is matrix.T @ g from the transpose's
    blocks (no scatter either way); the matrix is a constant."""
    return _ell_apply(matrix.fwd, x)


def _ell_fwd(matrix, x):
    # The empty array carries x's dtype to the backward pass: the cotangent must have it (a bf16 x gets
    # a bf16 gradient, as from the other kernels), though the product is computed in float32.
    return _ell_apply(matrix.fwd, x), (matrix, jnp.zeros((0,), x.dtype))


def _ell_bwd(residual, g):
    matrix, like = residual
    return None, _ell_apply(matrix.bwd, g).astype(like.dtype)


ell_matmul.defvjp(_ell_fwd, _ell_bwd)


def propagate(matrix, x: jax.Array, kernel: str = "segment_sum") -> jax.Array:
    """matrix @ x for a row-sorted BCOO matrix (or an EllMatrix, kernel "ell") and a dense (cols, d) block."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown propagation kernel {kernel!r}; expected one of {KERNELS}")
    if (kernel == "ell") != isinstance(matrix, EllMatrix):
        raise TypeError(f"kernel {kernel!r} got a {type(matrix).__name__}: build the graph with "
                        f"build_graph(..., kernel={kernel!r})")
    if kernel == "ell":
        return ell_matmul(matrix, x)
    if kernel == "bcoo":
        return matrix @ x
    rows, cols = matrix.indices[:, 0], matrix.indices[:, 1]
    messages = matrix.data[:, None] * x[cols]
    return jax.ops.segment_sum(messages, rows, num_segments=matrix.shape[0], indices_are_sorted=True)
