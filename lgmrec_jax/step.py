"""The training step and the epoch scan shared by every engine, and how a model and its state are made.

An epoch is one compiled program: :func:`epoch_scan` of :func:`make_train_step`'s step over the
epoch's device-resident batches, with the parameters and optimiser state donated. Every random draw of
step s of epoch e comes from ``fold_in(fold_in(key(seed), TRAIN_STREAM), e)`` folded with s, so a
run is a pure function of its seed and a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lgmrec_jax import losses
from lgmrec_jax.data import Dataset
from lgmrec_jax.graph import Graph
from lgmrec_jax.model import LGMRec, pad_rows, sample_noise

TRAIN_STREAM, EVAL_STREAM, INIT_STREAM = 0, 1, 2


class TrainState(NamedTuple):
    params: Any
    opt_state: Any


def stream_key(seed: int, stream: int, epoch: int = 0) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), stream), epoch)


def make_model(cfg, ds: Dataset) -> LGMRec:
    if cfg.feat_embed_dim != cfg.embedding_size:
        raise ValueError(f"feat_embed_dim ({cfg.feat_embed_dim}) must equal embedding_size "
                         f"({cfg.embedding_size}): MGE and CGE outputs are added")
    feat_dims = tuple((m, f.shape[1]) for m, f in (("v", ds.v_feat), ("t", ds.t_feat)) if f is not None)
    return LGMRec(n_users=ds.n_users, n_items=ds.n_items, feat_dims=feat_dims,
                  embedding_size=cfg.embedding_size, hyper_num=cfg.hyper_num, n_ui_layers=cfg.n_ui_layers,
                  n_mm_layers=cfg.n_mm_layers, n_hyper_layer=cfg.n_hyper_layer, keep_rate=cfg.keep_rate,
                  alpha=cfg.alpha, tau=cfg.tau, cf_model=cfg.cf_model, legacy_text_user_hyper=cfg.legacy_text_user_hyper,
                  kernel=cfg.kernel, use_cge=cfg.use_cge, use_mge=cfg.use_mge, use_ghe=cfg.use_ghe)


def device_features(ds: Dataset, dtype: str = "float32") -> dict:
    """The feature matrices on the device, stored as ``dtype`` (config feature_dtype), with zero rows
    up to a multiple of GEMM_ROW_MULTIPLE items (the weight gradient contracts over the items; see
    lgmrec_jax.model.GEMM_ROW_MULTIPLE). The model's products keep the first n_items rows."""
    return {m: pad_rows(jnp.asarray(f, dtype)) for m, f in (("v", ds.v_feat), ("t", ds.t_feat)) if f is not None}


def make_optimizer(learning_rate) -> optax.GradientTransformation:
    """PyTorch's Adam: (0.9, 0.999, 1e-8), eps after the sqrt; the rate may be a traced value (grids)."""
    return optax.adam(learning_rate)


def init_state(model: LGMRec, optimizer, graph: Graph, feats: dict, seed: int) -> TrainState:
    noise = sample_noise(jax.random.PRNGKey(0), model.noise_shapes(), train=False, keep_rate=model.keep_rate)
    params = jax.jit(model.init)(stream_key(seed, INIT_STREAM), graph, feats, noise)
    return TrainState(params, optimizer.init(params))


def single_device_objective(cl_weight, reg_weight, tau):
    """The loss of one device holding the whole batch: fn(outputs, batch) -> (total, LossParts)."""
    def objective(out, batch):
        parts = losses.loss_parts(out, batch, cl_weight, reg_weight, tau)
        return parts.total, parts
    return objective


def config_objective(cfg):
    """:func:`single_device_objective` with a config's loss weights."""
    return single_device_objective(cfg.cl_weight, cfg.reg_weight, cfg.tau)


def make_train_step(model: LGMRec, optimizer, objective, grad_reduce=None):
    """fn(state, graph, feats, batch, key) -> (state, LossParts): the one training step of every engine.

    ``objective(outputs, batch) -> (value to differentiate, LossParts)`` (:func:`single_device_objective`,
    or a device's share of it under pmap, lgmrec_jax.pmap_engine); ``grad_reduce`` sums the devices'
    gradients. The loss weights and the rate may be traced values (a group's configs)."""
    shapes = model.noise_shapes()

    def loss(params, graph, feats, batch, key):
        with jax.named_scope("noise"):
            noise = sample_noise(key, shapes, train=True, keep_rate=model.keep_rate)
        return objective(model.apply(params, graph, feats, noise), batch)

    def train_step(state: TrainState, graph, feats, batch: losses.Batch, key):
        grads, parts = jax.grad(loss, has_aux=True)(state.params, graph, feats, batch, key)
        if grad_reduce is not None:
            grads = grad_reduce(grads)
        with jax.named_scope("adam"):
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            return TrainState(optax.apply_updates(state.params, updates), opt_state), parts

    return train_step


def epoch_scan(step, state, batches, first_step):
    """The compiled epoch of every engine: ``lax.scan`` of ``step(state, batch, step_index)`` over the
    leading (step) axis of ``batches``; returns (state, stacked per-step outputs)."""
    steps = first_step + jnp.arange(jax.tree_util.tree_leaves(batches)[0].shape[0])
    return jax.lax.scan(lambda carry, xs: step(carry, *xs), state, (batches, steps))


def to_batch(epoch_batches) -> losses.Batch:
    return losses.Batch(*(jnp.asarray(a) for a in epoch_batches))


def finite_state(state: TrainState) -> bool:
    leaves = jax.tree_util.tree_leaves(state.params)
    return bool(all(np.isfinite(np.asarray(x)).all() for x in leaves))
