"""LGMRec's training objective (SPEC §4): BPR + cl_weight * hypergraph InfoNCE + reg_weight * reg.

A batch has a fixed row count so that the last partial batch of an epoch shares the compiled step;
``batch.mask`` marks the real rows. Padded rows contribute nothing, and every divisor is the real
row count, so a padded partial batch gives exactly the reference's loss and gradient. The per-row
terms are written for one row and vectorised with ``jax.vmap``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lgmrec_jax.model import TAU, Outputs, l2_normalize


class Batch(NamedTuple):
    users: jax.Array  # (B,) int32
    pos: jax.Array  # (B,) int32
    neg: jax.Array  # (B,) int32
    mask: jax.Array  # (B,) float32, 1 for real rows


class LossParts(NamedTuple):
    total: jax.Array
    bpr: jax.Array
    hcl: jax.Array
    reg: jax.Array


def bpr_row(user, pos, neg):
    """-log sigmoid(<u, p> - <u, n>) for one row, via the stable log-sigmoid."""
    return -jax.nn.log_sigmoid(jnp.dot(user, pos) - jnp.dot(user, neg))


def infonce_row(anchor, positive, candidates_normed, tau=TAU):
    """-log(exp(<a,p>/tau) / sum_k exp(<a,z_k>/tau)) for one row; the sum includes the positive."""
    a, p = l2_normalize(anchor), l2_normalize(positive)
    return jax.nn.logsumexp(candidates_normed @ a / tau) - jnp.dot(a, p) / tau


def infonce(anchors, positives, candidates, mask):
    """Summed (not averaged) InfoNCE over the real rows of a batch."""
    per_row = jax.vmap(infonce_row, in_axes=(0, 0, None))(anchors, positives, l2_normalize(candidates))
    return jnp.sum(per_row * mask)


class LossSums(NamedTuple):
    """Sums over a batch's real rows; the loss parts are functions of these, so a batch split
    across devices needs only their psum (lgmrec_jax.sharded)."""

    bpr: jax.Array  # sum of -log sigmoid(diff)
    hcl: jax.Array  # sum of the two InfoNCE terms
    sq_user: jax.Array  # squared Frobenius norms of the three embedding blocks
    sq_pos: jax.Array
    sq_neg: jax.Array
    rows: jax.Array  # number of real rows


def masked_sq(x, mask):
    return jnp.sum(jnp.square(x) * mask[:, None])


def loss_sums(out: Outputs, batch: Batch) -> LossSums:
    e_u, e_p, e_n = out.user[batch.users], out.item[batch.pos], out.item[batch.neg]
    bpr = jnp.sum(jax.vmap(bpr_row)(e_u, e_p, e_n) * batch.mask)
    if "t_user" in out.hyper and "v_user" in out.hyper:
        h = out.hyper
        hcl = (infonce(h["v_user"][batch.users], h["t_user"][batch.users], h["t_user"], batch.mask)
               + infonce(h["v_item"][batch.pos], h["t_item"][batch.pos], h["t_item"], batch.mask))
    else:  # the contrastive loss needs two modalities
        hcl = jnp.zeros((), jnp.float32)
    return LossSums(bpr, hcl, masked_sq(e_u, batch.mask), masked_sq(e_p, batch.mask),
                    masked_sq(e_n, batch.mask), jnp.sum(batch.mask))


def combine(sums: LossSums, cl_weight: float, reg_weight: float) -> LossParts:
    """The reference's parts: mean BPR, summed InfoNCE, (sum of Frobenius norms) / B."""
    bpr = sums.bpr / sums.rows
    reg = (jnp.sqrt(sums.sq_user) + jnp.sqrt(sums.sq_pos) + jnp.sqrt(sums.sq_neg)) / sums.rows
    return LossParts(bpr + cl_weight * sums.hcl + reg_weight * reg, bpr, sums.hcl, reg)


def loss_parts(out: Outputs, batch: Batch, cl_weight: float, reg_weight: float) -> LossParts:
    return combine(loss_sums(out, batch), cl_weight, reg_weight)
