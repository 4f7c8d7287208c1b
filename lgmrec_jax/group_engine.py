"""The group engine: many same-shape configs trained together as one compiled program (a grid's group).

Configs that differ only in :data:`TRACED_KEYS` (per-config arrays in the program) and
:data:`HOST_KEYS` share every shape, so K of them are stacked and trained in lockstep, each from its
own seed exactly as its single run (parameters, batches, step and evaluation keys). ``batching``:
"map" (one config after another inside the program: bitwise its single run), "vmap" (batched: equal
to float32 reassociation per step) or "vmap_columns" (vmap with each propagation over all configs'
columns). Finished configs are masked, and a group half empty is repacked into a smaller program.
The loop (lgmrec_jax.loop) keeps each config's early stopping and a single run's files in its own
workdir; lgmrec_jax.group checkpoints the stacked state in the group's directory.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lgmrec_jax import checkpoint as ckpt_lib
from lgmrec_jax import engine as engine_lib, evaluation, losses, sampler as sampler_lib, step as step_lib
from lgmrec_jax.data import Dataset
from lgmrec_jax.model import LocalOps

TRACED_KEYS = ("alpha", "keep_rate", "cl_weight", "reg_weight", "learning_rate", "tau")
HOST_KEYS = ("seed", "epochs", "stopping_step")
PER_CONFIG_KEYS = TRACED_KEYS + HOST_KEYS


class GroupError(RuntimeError):
    """A group cannot be formed or continued; the message is one line."""


class TracedValues(NamedTuple):
    """Per-config traced values, each (K,) float32."""

    alpha: Any
    keep_rate: Any
    cl_weight: Any
    reg_weight: Any
    learning_rate: Any
    tau: Any


# ---------------------------------------------------------------------------------------------
# Propagation with the configs' columns side by side
# ---------------------------------------------------------------------------------------------

def _fold(x):
    """(K, n, *rest) -> (n, K * prod(rest)): the configs' columns side by side."""
    return jnp.moveaxis(x, 0, 1).reshape(x.shape[1], -1)


def _unfold(y, k: int, rest: tuple):
    return jnp.moveaxis(y.reshape((y.shape[0], k) + rest), 1, 0)


def _scatter_gather(vals, gather_idx, scatter_idx, x, n_out: int, sorted_scatter: bool):
    messages = vals.reshape((-1,) + (1,) * (x.ndim - 1)) * x[gather_idx]
    return jax.ops.segment_sum(messages, scatter_idx, num_segments=n_out, indices_are_sorted=sorted_scatter)


def _column_batched(transpose: bool):
    """matrix @ x (or matrix.T @ x) whose vmap over x multiplies once, with K configs' columns side by side."""
    @jax.custom_batching.custom_vmap
    def apply(vals, rows, cols, x, n_out):
        src, dst = (rows, cols) if transpose else (cols, rows)
        return _scatter_gather(vals, src, dst, x, n_out.shape[0], not transpose)

    @apply.def_vmap
    def rule(axis_size, in_batched, vals, rows, cols, x, n_out):
        if any(in_batched[:3]) or in_batched[4]:  # a batched matrix: no sharing, plain vmap
            def one(v, r, c, xx):
                src, dst = (r, c) if transpose else (c, r)
                return _scatter_gather(v, src, dst, xx, n_out.shape[-1], not transpose)
            axes = tuple(0 if b else None for b in in_batched[:4])
            return jax.vmap(one, in_axes=axes, axis_size=axis_size)(vals, rows, cols, x), True
        if not in_batched[3]:
            return apply(vals, rows, cols, x, n_out), False
        src, dst = (rows, cols) if transpose else (cols, rows)
        out = _scatter_gather(vals, src, dst, _fold(x), n_out.shape[0], not transpose)
        return _unfold(out, axis_size, x.shape[2:]), True

    return apply


_PROP, _PROP_T = _column_batched(False), _column_batched(True)


@jax.custom_vjp
def _propagate_columns(vals, rows, cols, x, n_out):
    return _PROP(vals, rows, cols, x, n_out)


def _propagate_columns_fwd(vals, rows, cols, x, n_out):
    return _PROP(vals, rows, cols, x, n_out), (vals, rows, cols, x.shape[0], n_out.shape)


def _propagate_columns_bwd(res, g):
    vals, rows, cols, n_in, n_out_shape = res
    gx = _PROP_T(vals, rows, cols, g, jnp.zeros((n_in,), jnp.int8))
    float0 = jax.dtypes.float0
    # No gradient for the graph values (constants of the run).
    return (jnp.zeros_like(vals), np.zeros(rows.shape, float0), np.zeros(cols.shape, float0), gx,
            np.zeros(n_out_shape, float0))


_propagate_columns.defvjp(_propagate_columns_fwd, _propagate_columns_bwd)


@dataclasses.dataclass(frozen=True)
class ColumnOps(LocalOps):
    """The model's big products (``LGMRec.ops``) for a vmapped group: under ``vmap`` over configs a
    sparse propagation runs once over all configs' columns (an (n, K*d) block: one gather, one
    sorted segment_sum), instead of a gather/scatter with a config axis in its windows. Values are
    those of the segment_sum kernel. The dense products are LocalOps' (XLA already multiplies a
    shared feature matrix by all configs' weights in one matmul)."""

    def propagate(self, matrix, x, n_rows: int):
        rows, cols = matrix.indices[:, 0], matrix.indices[:, 1]
        return _propagate_columns(matrix.data, rows, cols, x, jnp.zeros((n_rows,), jnp.int8))


# How a group's configs share a program (see the module docstring):
#   map           one after another inside the program (lax.map over the configs of each step):
#                 bitwise the single run's numbers where the group's values are uniform (compiled in
#                 as constants); a finished config is skipped (lax.cond)
#   vmap          batched (vmap over configs): the feature matmuls are shared (one matmul over all
#                 configs' columns); numbers equal the single run's up to float32 reassociation
#   vmap_columns  vmap with ColumnOps: each sparse propagation also once over all configs' columns
BATCHINGS = ("map", "vmap", "vmap_columns")


def program_key(cfg) -> str:
    """Configs with equal keys share one compiled program (every array shape and static choice)."""
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    return json.dumps({k: v for k, v in d.items() if k not in PER_CONFIG_KEYS}, sort_keys=True)


def uniform_values(cfgs) -> dict:
    """The traced keys on which all ``cfgs`` agree: compiled in as constants, exactly as a single run
    compiles them (XLA folds constants, e.g. cl_weight into the InfoNCE gradient's 1/tau, so a traced
    copy of the same value can round differently); only the values that vary are traced."""
    return {k: cfgs[0][k] for k in TRACED_KEYS if all(c[k] == cfgs[0][k] for c in cfgs)}


def traced_values(cfgs) -> TracedValues:
    """The slots' values of TRACED_KEYS, each (K,) float32."""
    return TracedValues(*(np.asarray([float(c[k]) for c in cfgs], np.float32) for k in TRACED_KEYS))


def _keep_active(active, new, old):
    def pick(n, o):
        return jnp.where(active.reshape((-1,) + (1,) * (n.ndim - 1)), n, o)
    return jax.tree_util.tree_map(pick, new, old)


def _finite_per_config(tree):
    leaves = jax.tree_util.tree_leaves(tree)
    per_leaf = [jnp.all(jnp.isfinite(x).reshape(x.shape[0], -1), axis=1) for x in leaves
                if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack(per_leaf), axis=0)


EVAL_SCORE_BYTES = 2 ** 31  # default bound on the score blocks of configs evaluated at once


def auto_eval_chunk(cfg, ds: Dataset) -> int:
    """Configs evaluated at once so that their (eval_batch_size x n_items) float32 score blocks stay
    under EVAL_SCORE_BYTES; more configs are evaluated in sequential chunks (lax.map)."""
    per_config = 4 * min(cfg.eval_batch_size, ds.n_users) * ds.n_items
    return max(1, EVAL_SCORE_BYTES // max(per_config, 1))


class GroupEngine:
    """K configs of one program key on ``n_devices`` local devices, trained in lockstep (module docstring).

    Host layout of a stacked tree: leading axis K (the slots). Device layout: the same for one
    device, and (n_devices, K / n_devices, ...) under pmap. :meth:`put` and :meth:`get` convert.
    """

    can_repack = True

    def __init__(self, cfg, ds: Dataset, n_devices: int = 1, eval_chunk: Optional[int] = None,
                 batching: str = "map", uniform: Optional[dict] = None):
        self.cfg = cfg
        if cfg.num_devices != 1:
            raise GroupError(f"num_devices is {cfg.num_devices}: a group spreads whole configs over devices "
                             f"(the grid's --devices); for data-parallel single configs use --mode=sequential")
        if batching not in BATCHINGS:
            raise GroupError(f"batching is {batching!r}, expected one of {BATCHINGS}")
        if batching == "vmap_columns" and cfg.kernel != "segment_sum":
            raise GroupError("batching 'vmap_columns' computes with the segment_sum kernel; set kernel=segment_sum")
        self.devices = jax.local_devices()[:n_devices]
        if len(self.devices) < n_devices:
            raise GroupError(f"{n_devices} devices requested, {len(self.devices)} local devices available")
        self.ds = ds
        inputs = engine_lib.ProgramInputs(cfg, ds)
        self.model, self.graph, self.feats = inputs.model, inputs.graph, inputs.feats
        self.batching = batching
        self.uniform = dict(uniform or {})  # traced keys compiled in as constants (uniform_values)
        if batching == "vmap_columns":
            self.model = self.model.clone(ops=ColumnOps())
        self.plans, self.eval_arrays = inputs.plans, inputs.eval_arrays
        self.n_devices = self.n_slots = n_devices  # slots: a multiple of the devices
        self.eval_chunk = eval_chunk or auto_eval_chunk(cfg, ds)  # vmap: configs evaluated at once
        self.optimizer_template = inputs.optimizer  # its state's structure; the rate is traced per config
        init = self._vinit = jax.vmap(self._init_one)
        epoch, evaluate = self._device_epoch, self._device_eval
        if n_devices == 1:
            self._init = jax.jit(init)
            self._epoch = jax.jit(epoch, donate_argnums=(0,))
            self._eval = jax.jit(evaluate)
            self._graph, self._feats = self.graph, self.feats
        else:  # graph and features copied to every device once, not broadcast on every call
            self._init = jax.pmap(init, devices=self.devices)
            self._epoch = jax.pmap(epoch, donate_argnums=(0,), devices=self.devices)
            self._eval = jax.pmap(evaluate, in_axes=(0, 0, 0, 0, None, None, None, None, 0, 0), devices=self.devices)
            self._graph, self._feats = (engine_lib.replicate(self.graph, self.devices, "d"),
                                        engine_lib.replicate(self.feats, self.devices, "d"))
        self._stream_keys = jax.jit(jax.vmap(step_lib.stream_key, in_axes=(0, None, None)), static_argnums=(1,))

    # -- layout -------------------------------------------------------------------------------
    def put(self, tree):
        """Host (K, ...) -> device layout."""
        if self.n_devices == 1:
            return jax.tree_util.tree_map(jnp.asarray, tree)
        d = self.n_devices
        return jax.tree_util.tree_map(lambda x: np.asarray(x).reshape((d, -1) + np.shape(x)[1:]), tree)

    def get(self, tree):
        """Device layout -> host numpy (K, ...)."""
        if self.n_devices == 1:
            return jax.tree_util.tree_map(np.asarray, tree)
        return jax.tree_util.tree_map(lambda x: np.asarray(x).reshape((-1,) + np.shape(x)[2:]), tree)

    def host_copy(self, states):
        return self.get(ckpt_lib.host_copy(states))

    def abstract_states(self, n_slots: int):
        """Shapes and dtypes of ``n_slots`` stacked states on the host layout (for restores)."""
        return jax.eval_shape(self._vinit, jax.ShapeDtypeStruct((n_slots,), jnp.int32))

    def repack(self, states, keep: list):
        """The states of slots ``keep`` alone (a smaller program once many configs have finished)."""
        return self.put(jax.tree_util.tree_map(lambda x: x[np.asarray(keep)], self.get(states)))

    # -- per-config pieces (traced inside vmap) ---------------------------------------------------
    def _value(self, values: TracedValues, key: str):
        return self.uniform[key] if key in self.uniform else getattr(values, key)

    def _config_model(self, values: TracedValues):
        return self.model.clone(**{k: self._value(values, k) for k in ("alpha", "keep_rate", "tau")})

    def _init_one(self, seed):
        return step_lib.init_state(self.model, self.optimizer_template, self.graph, self.feats, seed)

    def _config_step(self, state, values: TracedValues, graph, feats, batch, key):
        objective = step_lib.single_device_objective(*(self._value(values, k) for k in ("cl_weight", "reg_weight", "tau")))
        optimizer = step_lib.make_optimizer(self._value(values, "learning_rate"))  # the rate maybe traced
        return step_lib.make_train_step(self._config_model(values), optimizer, objective)(state, graph, feats, batch, key)

    def _device_epoch(self, states, values, graph, feats, batches, keys, active):
        """states (k,...), batches (k, n_batches, B), keys (k, 2) -> states, parts (k, n_b, 4), finite (k,)."""
        per_step = jax.tree_util.tree_map(lambda a: jnp.swapaxes(a, 0, 1), batches)
        skipped = losses.LossParts(*(jnp.zeros((), jnp.float32) for _ in losses.LossParts._fields))

        def one_config(args):  # "map": the single run's step, or nothing for a finished config
            state, h, batch, key, act = args
            return jax.lax.cond(act, lambda: self._config_step(state, h, graph, feats, batch, key),
                                lambda: (state, skipped))

        vstep = jax.vmap(self._config_step, in_axes=(0, 0, None, None, 0, 0))

        def step(carry, batch, i):
            step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, i)
            if self.batching == "map":
                new, parts = jax.lax.map(one_config, (carry, values, batch, step_keys, active))
            else:
                new, parts = vstep(carry, values, graph, feats, batch, step_keys)
                new = _keep_active(active, new, carry)
            return new, jnp.stack(parts, axis=-1)

        states, parts = step_lib.epoch_scan(step, states, per_step, 0)
        return states, jnp.swapaxes(parts, 0, 1), _finite_per_config(states.params)

    def _device_eval(self, params, values, graph, feats, block_users, mask_rows, mask_cols, split_items, keys,
                     active):
        """Per config: the split's SplitTops.hits (the top-50 lists themselves stay on the device)."""
        def evaluate(p, h, key):
            split = evaluation.make_split_evaluator(self._config_model(h), self.cfg.eval_noise, self.cfg.eval_topk,
                                                    evaluation.resolve_score_chunk(self.cfg.eval_score_chunk))
            return split(p, graph, feats, block_users, mask_rows, mask_cols, split_items, key).hits

        def one(args):
            p, h, key, act = args
            if self.batching != "map":
                return evaluate(p, h, key)
            out = jax.eval_shape(evaluate, p, h, key)
            return jax.lax.cond(act, lambda: evaluate(p, h, key), lambda: jnp.zeros(out.shape, out.dtype))

        xs = (params, values, keys, active)
        if self.batching == "map":
            return jax.lax.map(one, xs)
        if self.eval_chunk < active.shape[0]:
            return jax.lax.map(one, xs, batch_size=self.eval_chunk)
        return jax.vmap(lambda *a: one(a))(*xs)

    # -- the engine interface (device layout in and out) -----------------------------------------
    def init(self, seeds):
        return self._init(self.put(np.asarray(seeds, np.int32)))

    def epoch_keys(self, seeds, stream: int, epoch: int):
        return self._stream_keys(jnp.asarray(np.asarray(seeds, np.int32)), stream, epoch)

    def run_epoch(self, states, cfgs, batches, epoch: int, active, on_chunk=None):
        """One lockstep epoch of the slots' configs ``cfgs`` from their ``batches`` (EpochBatches per
        slot); returns (states, host parts (K, n_batches, 4), host finite (K,))."""
        stacked = sampler_lib.EpochBatches(*(np.stack([getattr(b, f) for b in batches])
                                             for f in sampler_lib.EpochBatches._fields))
        batch = losses.Batch(stacked.users, stacked.pos, stacked.neg, stacked.mask)
        keys = self.epoch_keys([c.seed for c in cfgs], step_lib.TRAIN_STREAM, epoch)
        states, parts, finite = self._epoch(states, self.put(traced_values(cfgs)), self._graph, self._feats,
                                            self.put(batch), self.put(np.asarray(keys)), self.put(np.asarray(active)))
        return states, self.get(parts), self.get(finite)

    def evaluate(self, states, cfgs, epoch: int, active=None) -> list:
        """Valid/test metric dicts per slot (None for inactive ones), with the single run's keys."""
        keys = np.asarray(self.epoch_keys([c.seed for c in cfgs], step_lib.EVAL_STREAM, epoch))
        active = np.ones(len(cfgs), bool) if active is None else np.asarray(active)
        values = self.put(traced_values(cfgs))
        results = [dict() if act else None for act in active]
        names = list(self.plans)

        def split_hits(i: int):
            split_keys = np.asarray(jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, i))
            return self.get(self._eval(states.params, values, self._graph, self._feats,
                                       *self.eval_arrays[names[i]], self.put(split_keys), self.put(active)))

        # As engine.SingleEngine: on one CPU device the splits run from threads of their own.
        concurrent = jax.default_backend() == "cpu" and self.n_devices == 1
        for name, hits in zip(names, evaluation.map_splits(split_hits, len(names), concurrent)):
            for k in np.flatnonzero(active):
                results[k][name] = evaluation.metrics_from_hits(self.plans[name], hits[k])
        return results
