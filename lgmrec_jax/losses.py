"""LGMRec's training objective (SPEC §4): BPR + cl_weight * hypergraph InfoNCE + reg_weight * reg.

A batch has a fixed row count so that the last partial batch of an epoch shares the compiled step;
``batch.mask`` marks the real rows. Padded rows contribute nothing, and every divisor is the real
row count, so a padded partial batch gives exactly the reference's loss and gradient. The per-row
terms are written for one row and vectorised with ``jax.vmap``, except the InfoNCE denominators,
which are one matmul (see log_sum_exp_scores for why).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lgmrec_jax.model import TAU, Outputs, l2_normalize, pad_rows


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def log_sum_exp_scores(anchors, candidates, n_valid: int):
    """log sum_k exp(<a_b, z_k>) per row of unit-norm ``anchors`` (already divided by tau), over the
    first ``n_valid`` rows of ``candidates`` (the rest are zero padding: GEMM_ROW_MULTIPLE).

    All rows are unit vectors, so every logit lies in [-1/tau, 1/tau] = [-5, 5] and the reference's
    plain log(sum(exp)) cannot overflow. Written as one (B x K) matmul with a hand-written VJP: the
    vmapped per-row form compiled to batched mat-vecs and measured ~4x slower per epoch on CPU
    (experiments/results/bench_cpu_patches.md, patch "infonce_matmul").
    """
    return jnp.log(jnp.sum(_valid_exp(anchors @ candidates.T, n_valid), axis=1))


def _valid_exp(scores, n_valid: int):
    """exp of the scores, 0 in the padding columns (an exact zero: they add nothing anywhere)."""
    if n_valid == scores.shape[1]:
        return jnp.exp(scores)
    return jnp.where(jnp.arange(scores.shape[1]) < n_valid, jnp.exp(scores), 0.0)


def _lse_fwd(anchors, candidates, n_valid):
    e = _valid_exp(anchors @ candidates.T, n_valid)
    total = jnp.sum(e, axis=1)
    return jnp.log(total), (anchors, candidates, e, total)


def _lse_bwd(n_valid, res, g):
    anchors, candidates, e, total = res
    scale = (g / total)[:, None]
    # Scale the (B x d) operands, not the (B x K) matrix; computing (d x B)(B x K) and transposing the
    # small result avoids a transpose of e (the barrier keeps XLA from folding it back).
    return (e @ candidates) * scale, jax.lax.optimization_barrier((anchors * scale).T @ e).T


log_sum_exp_scores.defvjp(_lse_fwd, _lse_bwd)


def alignment_row(anchor, positive, tau=TAU):
    """<a, p> / tau for one row of unit vectors: the numerator's log."""
    return jnp.dot(anchor, positive) / tau


@jax.named_scope("infonce")
def infonce(anchors, positives, candidates, mask, tau=TAU):
    """Summed (not averaged) InfoNCE over the real rows of a batch:
    -log(exp(<a,p>/tau) / sum_k exp(<a,z_k>/tau)), the sum running over all candidates including
    the positive; anchor, positive and candidates are L2-normalised first."""
    a, p, z = l2_normalize(anchors), l2_normalize(positives), l2_normalize(candidates)
    per_row = (log_sum_exp_scores(a / tau, pad_rows(z), z.shape[0])
               - jax.vmap(alignment_row, in_axes=(0, 0, None))(a, p, tau))
    return jnp.sum(per_row * mask)


class LossSums(NamedTuple):
    """Sums over a batch's real rows; the loss parts are functions of these, so a batch split
    across devices needs only their psum (lgmrec_jax.pmap_engine)."""

    bpr: jax.Array  # sum of -log sigmoid(diff)
    hcl: jax.Array  # sum of the two InfoNCE terms
    sq_user: jax.Array  # squared Frobenius norms of the three embedding blocks
    sq_pos: jax.Array
    sq_neg: jax.Array
    rows: jax.Array  # number of real rows


def masked_sq(x, mask):
    return jnp.sum(jnp.square(x) * mask[:, None])


@jax.named_scope("losses")
def loss_sums(out: Outputs, batch: Batch, tau: float = TAU) -> LossSums:
    e_u, e_p, e_n = out.user[batch.users], out.item[batch.pos], out.item[batch.neg]
    bpr = jnp.sum(jax.vmap(bpr_row)(e_u, e_p, e_n) * batch.mask)
    if "t_user" in out.hyper and "v_user" in out.hyper:
        h = out.hyper
        hcl = (infonce(h["v_user"][batch.users], h["t_user"][batch.users], h["t_user"], batch.mask, tau)
               + infonce(h["v_item"][batch.pos], h["t_item"][batch.pos], h["t_item"], batch.mask, tau))
    else:  # the contrastive loss needs two modalities
        hcl = jnp.zeros((), jnp.float32)
    return LossSums(bpr, hcl, masked_sq(e_u, batch.mask), masked_sq(e_p, batch.mask),
                    masked_sq(e_n, batch.mask), jnp.sum(batch.mask))


def combine(sums: LossSums, cl_weight: float, reg_weight: float) -> LossParts:
    """The reference's parts: mean BPR, summed InfoNCE, (sum of Frobenius norms) / B."""
    bpr = sums.bpr / sums.rows
    reg = (jnp.sqrt(sums.sq_user) + jnp.sqrt(sums.sq_pos) + jnp.sqrt(sums.sq_neg)) / sums.rows
    return LossParts(bpr + cl_weight * sums.hcl + reg_weight * reg, bpr, sums.hcl, reg)


def loss_parts(out: Outputs, batch: Batch, cl_weight: float, reg_weight: float, tau: float = TAU) -> LossParts:
    return combine(loss_sums(out, batch, tau), cl_weight, reg_weight)
