"""Many same-shape configs trained together as one compiled program (the grid's group engine).

Configs that differ only in :data:`TRACED_KEYS` (per-config arrays in the program) and
:data:`HOST_KEYS` share every shape, so K of them are stacked and trained in lockstep, each from its
own seed exactly as its single run (parameters, batches, step and evaluation keys). ``batching``:
"map" (one config after another inside the program: bitwise its single run), "vmap" (batched: equal
to float32 reassociation per step) or "vmap_columns" (vmap with each propagation over all configs'
columns). Finished configs are masked, and a group half empty is repacked into a smaller program.
Each config keeps its own early stopping and a single run's files in its own workdir; the group's
stacked state is checkpointed in the group's directory, so a killed group resumes.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import logging
import os
import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lgmrec_jax import checkpoint as ckpt_lib
from lgmrec_jax import evaluation, losses, run as run_lib, sampler as sampler_lib, trainer
from lgmrec_jax import workdir as workdir_lib
from lgmrec_jax.data import Dataset
from lgmrec_jax.early_stopping import EarlyStopping
from lgmrec_jax.model import LocalOps, sample_noise

TRACED_KEYS = ("alpha", "keep_rate", "cl_weight", "reg_weight", "learning_rate", "tau")
HOST_KEYS = ("seed", "epochs", "stopping_step")
PER_CONFIG_KEYS = TRACED_KEYS + HOST_KEYS
FINAL_STATUSES = ("early_stopped", "max_epochs", "non_finite")


class GroupError(RuntimeError):
    """A group cannot be formed or continued; the message is one line."""


class Hyper(NamedTuple):
    """Per-config traced values, each (K,) float32."""

    alpha: Any
    keep_rate: Any
    cl_weight: Any
    reg_weight: Any
    learning_rate: Any
    tau: Any


class _LossWeights(NamedTuple):  # what make_train_step reads from a config
    cl_weight: Any
    reg_weight: Any
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


def hyper_of(cfgs) -> Hyper:
    return Hyper(*(np.asarray([float(c[k]) for c in cfgs], np.float32) for k in TRACED_KEYS))


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


class MultiProgram:
    """Compiled functions for K configs of one program key on ``n_devices`` local devices.

    Host layout of a stacked tree: leading axis K. Device layout: the same for one device, and
    (n_devices, K / n_devices, ...) under pmap. :meth:`put` and :meth:`get` convert.
    """

    def __init__(self, cfg, ds: Dataset, n_devices: int = 1, eval_chunk: Optional[int] = None,
                 experiment: Optional[run_lib.Experiment] = None, batching: str = "map",
                 uniform: Optional[dict] = None):
        self.cfg = cfg
        if cfg.num_devices != 1:
            raise GroupError(f"num_devices is {cfg.num_devices}: a group spreads whole configs over devices "
                             f"(the grid's --devices); for data-parallel single configs use --mode=sequential")
        exp = experiment or run_lib.Experiment(cfg, ds)
        self.ds = ds
        self.model, self.graph, self.feats = exp.model, exp.graph, exp.feats
        if batching not in BATCHINGS:
            raise GroupError(f"batching is {batching!r}, expected one of {BATCHINGS}")
        self.batching = batching
        self.uniform = dict(uniform or {})  # traced keys compiled in as constants (uniform_values)
        if batching == "vmap_columns":
            if cfg.kernel != "segment_sum":
                raise GroupError("batching 'vmap_columns' computes with the segment_sum kernel; set kernel=segment_sum")
            self.model = self.model.clone(ops=ColumnOps())
        self.plans, self.eval_arrays = exp.plans, exp.eval_arrays
        self.n_devices = n_devices
        self.eval_chunk = eval_chunk or auto_eval_chunk(cfg, ds)  # vmap: configs evaluated at once
        self.devices = jax.local_devices()[:n_devices]
        if len(self.devices) < n_devices:
            raise GroupError(f"{n_devices} devices requested, {len(self.devices)} local devices available")
        self.optimizer_template = trainer.make_optimizer(cfg.learning_rate)
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
            self._graph, self._feats = self._replicate(self.graph), self._replicate(self.feats)
        self._stream_keys = jax.jit(jax.vmap(trainer.stream_key, in_axes=(0, None, None)), static_argnums=(1,))

    def _replicate(self, tree):
        """One copy per device, laid out as pmap's mapped axis."""
        sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(self.devices), ("d",)),
                                              jax.sharding.PartitionSpec("d"))
        d = self.n_devices
        return jax.tree_util.tree_map(
            lambda a: jax.device_put(jnp.broadcast_to(a, (d,) + a.shape), sharding), tree)

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

    # -- per-config pieces (traced inside vmap) ---------------------------------------------------
    def _value(self, hyper: Hyper, key: str):
        return self.uniform[key] if key in self.uniform else getattr(hyper, key)

    def _config_model(self, hyper: Hyper):
        return self.model.clone(**{k: self._value(hyper, k) for k in ("alpha", "keep_rate", "tau")})

    def _init_one(self, seed):
        key = trainer.stream_key(seed, trainer.INIT_STREAM)
        noise = sample_noise(jax.random.PRNGKey(0), self.model.noise_shapes(), train=False,
                             keep_rate=self.model.keep_rate)
        params = self.model.init(key, self.graph, self.feats, noise)
        return trainer.TrainState(params, self.optimizer_template.init(params))

    def _config_step(self, state, hyper: Hyper, graph, feats, batch, key):
        model = self._config_model(hyper)
        optimizer = trainer.make_optimizer(self._value(hyper, "learning_rate"))  # the rate maybe traced
        weights = _LossWeights(*(self._value(hyper, k) for k in _LossWeights._fields))
        step = trainer.make_train_step(model, optimizer, weights)
        return step(state, graph, feats, batch, key)

    def _device_epoch(self, states, hyper, graph, feats, batches, keys, active):
        """states (k,...), batches (k, n_batches, B), keys (k, 2) -> states, parts (k, n_b, 4), finite (k,)."""
        n_batches = batches.users.shape[1]
        per_step = jax.tree_util.tree_map(lambda a: jnp.swapaxes(a, 0, 1), batches)
        skipped = losses.LossParts(*(jnp.zeros((), jnp.float32) for _ in losses.LossParts._fields))

        def one_config(args):  # "map": the single run's step, or nothing for a finished config
            state, h, batch, key, act = args
            return jax.lax.cond(act, lambda: self._config_step(state, h, graph, feats, batch, key),
                                lambda: (state, skipped))

        vstep = jax.vmap(self._config_step, in_axes=(0, 0, None, None, 0, 0))

        def body(carry, xs):
            batch, step = xs
            step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)
            if self.batching == "map":
                new, parts = jax.lax.map(one_config, (carry, hyper, batch, step_keys, active))
            else:
                new, parts = vstep(carry, hyper, graph, feats, batch, step_keys)
                new = _keep_active(active, new, carry)
            return new, jnp.stack(parts, axis=-1)

        states, parts = jax.lax.scan(body, states, (per_step, jnp.arange(n_batches)))
        return states, jnp.swapaxes(parts, 0, 1), _finite_per_config(states.params)

    def _device_eval(self, params, hyper, graph, feats, block_users, mask_rows, mask_cols, split_items, keys,
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

        xs = (params, hyper, keys, active)
        if self.batching == "map":
            return jax.lax.map(one, xs)
        if self.eval_chunk < active.shape[0]:
            return jax.lax.map(one, xs, batch_size=self.eval_chunk)
        return jax.vmap(lambda *a: one(a))(*xs)

    # -- host API (device layout in and out) ------------------------------------------------------
    def init_states(self, seeds):
        return self._init(self.put(np.asarray(seeds, np.int32)))

    def epoch_keys(self, seeds, stream: int, epoch: int):
        return self._stream_keys(jnp.asarray(np.asarray(seeds, np.int32)), stream, epoch)

    def run_epoch(self, states, hyper: Hyper, batches: sampler_lib.EpochBatches, keys, active):
        """One lockstep epoch; returns (states, host parts (K, n_batches, 4), host finite (K,))."""
        batch = losses.Batch(batches.users, batches.pos, batches.neg, batches.mask)
        states, parts, finite = self._epoch(states, self.put(hyper), self._graph, self._feats, self.put(batch),
                                            self.put(np.asarray(keys)), self.put(np.asarray(active)))
        return states, self.get(parts), self.get(finite)

    def evaluate(self, states, hyper: Hyper, seeds, epoch: int, active=None) -> list[dict]:
        """Valid/test metric dicts per config (None for inactive ones), with the single run's keys."""
        keys = np.asarray(self.epoch_keys(seeds, trainer.EVAL_STREAM, epoch))
        active = np.ones(len(seeds), bool) if active is None else np.asarray(active)
        results = [dict() if act else None for act in active]
        names = list(self.plans)

        def split_hits(i: int):
            split_keys = np.asarray(jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, i))
            return self.get(self._eval(states.params, self.put(hyper), self._graph, self._feats,
                                       *self.eval_arrays[names[i]], self.put(split_keys), self.put(active)))

        # As run.Experiment.evaluate: on one CPU device the splits run from threads of their own.
        concurrent = jax.default_backend() == "cpu" and self.n_devices == 1
        for name, hits in zip(names, evaluation.map_splits(split_hits, len(names), concurrent)):
            for k in np.flatnonzero(active):
                results[k][name] = evaluation.metrics_from_hits(self.plans[name], hits[k])
        return results


# ---------------------------------------------------------------------------------------------
# A group: K configs of one program, trained to completion with per-config outputs and resume.
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Member:
    """One config of a group: its id, resolved config and workdir; ``extra`` goes to config.json."""

    cid: str
    cfg: Any
    workdir: str
    extra: dict = dataclasses.field(default_factory=dict)


def read_summary(workdir: str) -> Optional[dict]:
    path = os.path.join(workdir, "summary.json")
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        summary = json.load(handle)
    return summary if summary.get("status") in FINAL_STATUSES else None


def identity_of(cfg, ds: Dataset, checksums: dict) -> dict:
    """run.run_identity with the dataset checksums computed once per group."""
    return {"dataset": ds.name, "config": cfg.to_dict(), "dataset_files": checksums}


def _padded(items: list, multiple: int) -> list:
    return items + [None] * (-len(items) % multiple)


def train_group(members: list[Member], ds: Dataset, group_dir: str, n_devices: int = 1, repack: bool = True,
                eval_chunk: Optional[int] = None, stop_after_epochs: Optional[int] = None,
                checksums: Optional[dict] = None, on_epoch: Optional[Callable[[dict], None]] = None,
                batching: str = "map") -> dict:
    """Trains (or resumes) every unfinished member; returns {cid: summary} ({"status": "interrupted"}
    for members left unfinished by ``stop_after_epochs``)."""
    if not members:
        return {}
    keys = {program_key(m.cfg) for m in members}
    if len(keys) != 1:
        raise GroupError("members of a group must differ only in " + ", ".join(PER_CONFIG_KEYS))
    checksums = ds.checksums() if checksums is None else checksums
    workdirs = {m.cid: workdir_lib.Workdir(m.workdir) for m in members}
    locked = []
    try:
        for m in members:
            workdirs[m.cid].prepare(identity_of(m.cfg, ds, checksums), restart=False)
            locked.append(workdirs[m.cid])
        with jax.default_matmul_precision(members[0].cfg.matmul_precision):
            return _train_group(members, ds, group_dir, workdirs, n_devices, repack, eval_chunk,
                                stop_after_epochs, checksums, on_epoch, batching)
    finally:
        for wd in locked:
            wd.unlock()


@dataclasses.dataclass
class _ConfigProgress:
    status: Optional[str] = None  # None while training; a FINAL_STATUSES value once done
    stopper: Optional[dict] = None
    history: list = dataclasses.field(default_factory=list)
    wall_s: float = 0.0
    non_finite: Optional[dict] = None  # the non_finite summary, when that is the status


def _summary(cfg, ds: Dataset, stopper: EarlyStopping, progress: _ConfigProgress) -> dict:
    if progress.status == "non_finite":
        return dict(progress.non_finite)
    return {"status": progress.status, "dataset": ds.name, "best_epoch": stopper.best_epoch,
            "best_valid": stopper.best_valid, "best_test": stopper.best_test,
            "epochs_run": len(progress.history), "valid_metric": cfg.valid_metric,
            "total_wall_s": round(progress.wall_s, 3)}


def _refuse_other_length(member: Member, summary: Optional[dict]) -> None:
    """A finished config whose run length disagrees with its config's epochs is refused (GroupError),
    since its files would then describe another run than its config.json says: one that reached
    max_epochs below ``epochs`` (a group is not extended once every member has finished; a single run
    is), or one longer than ``epochs`` (a run is not shortened)."""
    if not summary:
        return
    ran, epochs = summary.get("epochs_run", 0), member.cfg.epochs
    if ran > epochs or summary.get("status") == "max_epochs" and ran < epochs:
        raise GroupError(f"config {member.cid} finished after {ran} epochs ({summary.get('status')}), and asks "
                         f"for epochs={epochs}: a finished group is neither extended nor shortened; rerun with "
                         f"epochs={ran}, or use --restart (or another --workdir) to train it again")


def _train_group(members, ds, group_dir, workdirs, n_devices, repack, eval_chunk, stop_after_epochs,
                 checksums, on_epoch, batching) -> dict:
    by_id = {m.cid: m for m in members}
    summaries = {m.cid: read_summary(m.workdir) for m in members}
    for m in members:
        _refuse_other_length(m, summaries[m.cid])
    if all(summaries.values()):
        return summaries  # every member finished in an earlier call
    cfg0 = members[0].cfg
    prog = MultiProgram(cfg0, ds, n_devices, eval_chunk, batching=batching,
                        uniform=uniform_values([m.cfg for m in members]))
    repack = repack and batching != "map"  # under map a finished config costs nothing already
    checkpoints = ckpt_lib.Checkpoints(os.path.join(group_dir, "checkpoints"), cfg0.keep_checkpoints,
                                       keep_best=False)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="group-sampler")
    saves = ckpt_lib.BackgroundSaver()  # epoch e's checkpoint is written while epoch e + 1 trains
    try:
        restored = _restore(prog, checkpoints, members)
        if restored is None:
            todo = [m.cid for m in members if summaries[m.cid] is None]
            if not todo:
                return summaries
            slots = _padded(todo, n_devices)
            progress = {cid: _ConfigProgress() for cid in todo}
            epoch = 0
            states = prog.init_states([by_id[c].cfg.seed if c else by_id[todo[0]].cfg.seed for c in slots])
        else:
            states, slots, progress, epoch = restored
        stoppers = {cid: (EarlyStopping.from_state_dict(p.stopper) if p.stopper
                          else EarlyStopping(by_id[cid].cfg.stopping_step)) for cid, p in progress.items()}
        versions = workdir_lib.versions()
        for cid, p in progress.items():
            m = by_id[cid]
            if summaries[cid] is not None:
                continue  # finished before: its files are final
            workdir_lib.write_json_atomic(workdirs[cid].file("config.json"), {
                "identity": identity_of(m.cfg, ds, checksums), "versions": versions,
                "n_users": ds.n_users, "n_items": ds.n_items, **m.extra})
            workdirs[cid].rewrite_metrics(p.history)
            if p.status in FINAL_STATUSES and summaries[cid] is None:  # killed after its last checkpoint
                summaries[cid] = _summary(m.cfg, ds, stoppers[cid], p)
                workdir_lib.write_json_atomic(workdirs[cid].file("summary.json"), summaries[cid])
        samplers = {cid: sampler_lib.NegativeSampler(ds.train, ds.n_items, by_id[cid].cfg.train_batch_size,
                                                     by_id[cid].cfg.seed) for cid in progress}
        epochs_this_call = 0
        pending = None  # (epoch, configs, future): the next epoch's batches, sampled while the device trains

        def sample(e, cids):
            return {c: samplers[c].epoch(e) for c in cids}

        def is_active(cid):
            return cid is not None and progress[cid].status is None and epoch < by_id[cid].cfg.epochs

        while any(is_active(c) for c in slots):
            tick = time.time()
            active = np.array([is_active(c) for c in slots])
            live = [c for c in slots if is_active(c)]
            slot_cfgs = [by_id[c if is_active(c) else live[0]].cfg for c in slots]
            seeds = [c.seed for c in slot_cfgs]
            hyper = hyper_of(slot_cfgs)
            if pending is not None and pending[0] == epoch and set(live) <= pending[1]:
                per_config = pending[2].result()
            else:
                per_config = sample(epoch, live)
            pending = (epoch + 1, frozenset(live), pool.submit(sample, epoch + 1, live))
            batches = sampler_lib.EpochBatches(*(np.stack([getattr(per_config[c if is_active(c) else live[0]], f)
                                                           for c in slots]) for f in sampler_lib.EpochBatches._fields))
            train_keys = prog.epoch_keys(seeds, trainer.TRAIN_STREAM, epoch)
            states, parts, finite = prog.run_epoch(states, hyper, batches, train_keys, active)
            saves.finish()  # the previous epoch's checkpoint, then its metrics lines and summaries
            train_s = time.time() - tick
            rows, finished = {}, []
            for k, cid in enumerate(slots):
                if not active[k]:
                    continue
                p = progress[cid]
                bad = np.flatnonzero(~np.isfinite(parts[k]).all(axis=1))
                if bad.size or not finite[k]:
                    where = f"step {int(bad[0])}" if bad.size else "after its last step (parameters)"
                    p.status = "non_finite"
                    p.non_finite = {"status": "non_finite", "epoch": epoch,
                                    "step": int(bad[0]) if bad.size else None,
                                    "reason": f"non-finite loss or parameters in epoch {epoch}, {where}",
                                    "last_good_checkpoint_epoch": None}
                    finished.append(cid)
                    continue
                loss = dict(zip(("total", "bpr", "hcl", "reg"), map(float, parts[k].sum(axis=0))))
                rows[cid] = {"epoch": epoch, "loss": loss, "train_s": round(train_s, 4)}
            evaluated = (epoch + 1) % cfg0.eval_step == 0 and prog.plans and rows
            eval_s = 0.0
            if evaluated:
                tick_eval = time.time()
                results = prog.evaluate(states, hyper, seeds, epoch, np.array([c in rows for c in slots]))
                eval_s = time.time() - tick_eval
            for k, cid in enumerate(slots):
                if cid not in rows:
                    continue
                row, p, stopper, cfg = rows[cid], progress[cid], stoppers[cid], by_id[cid].cfg
                stop = False
                if evaluated:
                    row["eval_s"] = round(eval_s, 4)
                    row.update(results[k])
                    stop = stopper.update(epoch, results[k]["valid"][cfg.valid_metric], results[k]["valid"],
                                          results[k].get("test", {}))
                    row.update(best_epoch=stopper.best_epoch, patience_left=stopper.patience_left)
                p.history.append(row)
                if stop:
                    p.status = "early_stopped"
                elif epoch + 1 >= cfg.epochs:
                    p.status = "max_epochs"
                if p.status:
                    finished.append(cid)
            epoch += 1
            epochs_this_call += 1
            wall = time.time() - tick
            for k, cid in enumerate(slots):
                if active[k]:
                    progress[cid].wall_s += wall
                    progress[cid].stopper = stoppers[cid].state_dict()
                    if cid in rows:  # a config that went non-finite this epoch has no row
                        rows[cid]["time_s"] = round(progress[cid].wall_s, 3)  # the config's clock, as a run's
            n_live = sum(is_active(c) for c in slots)
            if repack and n_live and len(slots) > n_devices and n_live <= len(slots) // 2:
                keep = [k for k, c in enumerate(slots) if is_active(c)]
                keep = keep + [keep[0]] * (-len(keep) % n_devices)
                host = prog.get(states)
                states = prog.put(jax.tree_util.tree_map(lambda x: x[np.asarray(keep)], host))
                slots = _padded([slots[k] for k in keep[:n_live]], n_devices)
                logging.info("group %s: repacked to %d slots (%d active)", os.path.basename(group_dir),
                             len(slots), n_live)
            for cid in finished:
                summaries[cid] = _summary(by_id[cid].cfg, ds, stoppers[cid], progress[cid])
            files = functools.partial(_write_epoch_files, workdirs, rows, {c: summaries[c] for c in finished})
            if finished or epoch % cfg0.checkpoint_every == 0 or not n_live:
                meta = {"epoch": epoch, "slots": slots,
                        "configs": {cid: dataclasses.asdict(p) for cid, p in progress.items()}}
                saves.submit(functools.partial(checkpoints.save, epoch, prog.get(ckpt_lib.host_copy(states)), meta,
                                               None), files)
            else:
                saves.after_saves(files)
            if on_epoch is not None:
                on_epoch({"epoch": epoch - 1, "slots": len(slots), "active": int(active.sum()),
                          "train_s": train_s, "eval_s": eval_s, "wall_s": wall})
            bests = sorted(stoppers[c].best for c in slots if c in rows)
            logging.info("group %s epoch %4d  %d/%d configs active  train %.2fs  eval %.2fs  best valid %s "
                         "min/median/max %s  %d finished", os.path.basename(group_dir), epoch - 1,
                         int(active.sum()), len(slots), train_s, eval_s, cfg0.valid_metric,
                         "/".join(f"{x:.4f}" for x in (bests[0], bests[len(bests) // 2], bests[-1])) if bests else "-",
                         len(finished))
            if stop_after_epochs is not None and epochs_this_call >= stop_after_epochs:
                break
        saves.finish()
        for cid in progress:
            if summaries.get(cid) is None:
                if progress[cid].status is None and epoch >= by_id[cid].cfg.epochs:
                    progress[cid].status = "max_epochs"  # epochs reached before this call
                    summaries[cid] = _summary(by_id[cid].cfg, ds, stoppers[cid], progress[cid])
                    workdir_lib.write_json_atomic(workdirs[cid].file("summary.json"), summaries[cid])
                else:
                    summaries[cid] = {"status": "interrupted", "epoch": epoch}
        return summaries
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        saves.close()
        checkpoints.close()


def _write_epoch_files(workdirs: dict, rows: dict, summaries: dict) -> None:
    """An epoch's metrics lines and its finished configs' summaries (after its checkpoint)."""
    for cid, row in rows.items():
        workdirs[cid].append_metrics(row)
    for cid, summary in summaries.items():
        workdir_lib.write_json_atomic(workdirs[cid].file("summary.json"), summary)


def _restore(prog: MultiProgram, checkpoints: ckpt_lib.Checkpoints, members):
    """(states, slots, progress, epoch) from the newest readable group checkpoint, or None."""
    import orbax.checkpoint as ocp

    known = {m.cid for m in members}
    skipped = []
    for step in reversed(checkpoints.steps()):
        try:
            meta = checkpoints.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            slots = meta["slots"]
            if not set(c for c in slots if c) <= known or not set(meta["configs"]) <= known:
                raise GroupError("the checkpoint holds configs that are not members of this group")
            if len(slots) % prog.n_devices:
                raise GroupError(f"the checkpoint has {len(slots)} slots, not a multiple of {prog.n_devices} "
                                 f"devices; rerun with the device count it was made with")
            template = jax.eval_shape(prog._vinit, jax.ShapeDtypeStruct((len(slots),), jnp.int32))
            state, _ = checkpoints.restore(step, template)
        except Exception as err:  # an unreadable or foreign checkpoint: try an older one
            logging.warning("group checkpoint %d in %s cannot be restored: %s", step, checkpoints.directory,
                            str(err).splitlines()[0] if str(err) else type(err).__name__)
            skipped.append(step)
            continue
        progress = {cid: _ConfigProgress(**p) for cid, p in meta["configs"].items()}
        logging.info("resumed group %s at epoch %d", checkpoints.directory, meta["epoch"])
        return prog.put(state), slots, progress, int(meta["epoch"])
    if skipped:
        raise GroupError(f"{checkpoints.directory}: no group checkpoint can be restored (tried {skipped}); "
                         f"rerun with --restart")
    return None
