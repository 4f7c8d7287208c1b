"""Engines: how the train states of a loop's K >= 1 config slots live on the devices.

The loop (lgmrec_jax.loop) sees only this interface:
    init(seeds) -> states                         states in the engine's device layout
    run_epoch(states, cfgs, batches, epoch, active, on_chunk) -> (states, parts (K, n_batches, 4), finite (K,))
    evaluate(states, cfgs, epoch, active) -> per slot {split: metrics} (None for an inactive slot)
    host_copy(states) / put(host states)          for checkpoints and restores
:class:`SingleEngine` is one config on one device (``jit``); lgmrec_jax.pmap_engine one config
data-parallel over devices and processes; lgmrec_jax.group_engine K configs of one program in lockstep.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lgmrec_jax import checkpoint as ckpt_lib
from lgmrec_jax import distributed, evaluation, faults, losses, sampler as sampler_lib, step as step_lib
from lgmrec_jax.configs import ConfigError
from lgmrec_jax.data import Dataset
from lgmrec_jax.graph import build_graph


class ProgramInputs:
    """What every engine builds once for a (config, dataset): the model, the optimiser, the graph and
    the features on the device, and the evaluation plans with their device arrays."""

    def __init__(self, cfg, ds: Dataset):
        self.cfg, self.ds = cfg, ds
        self.model = step_lib.make_model(cfg, ds)
        self.optimizer = step_lib.make_optimizer(cfg.learning_rate)
        self.graph = build_graph(ds.train, ds.n_users, ds.n_items, cfg.kernel)
        self.feats = step_lib.device_features(ds, cfg.feature_dtype)
        pairs = {"valid": ds.valid, "test": ds.test}
        self.plans = {name: evaluation.plan_split(ds.train, pairs[name], ds.n_users, ds.n_items, cfg.eval_batch_size)
                      for name in evaluation.evaluated_splits(pairs)}
        self.eval_arrays = {name: p.device_arrays() for name, p in self.plans.items()}


def replicate(tree, devices: list, axis: str):
    """One copy of every leaf per device, laid out as pmap's mapped axis (a leading device axis)."""
    sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices), (axis,)),
                                          jax.sharding.PartitionSpec(axis))
    stack = lambda x: np.broadcast_to(np.asarray(x), (len(devices),) + np.shape(x))
    return jax.device_put(jax.tree_util.tree_map(stack, tree), sharding)


class SingleEngine(ProgramInputs):
    """One config on one device: the whole epoch one jitted :func:`step.epoch_scan` with the state
    donated, and the evaluation of one config's parameters (the pmap engine's too)."""

    n_slots = 1
    can_repack = False

    def __init__(self, cfg, ds: Dataset):
        super().__init__(cfg, ds)
        self.evaluate_split = jax.jit(evaluation.make_split_evaluator(
            self.model, cfg.eval_noise, cfg.eval_topk, evaluation.resolve_score_chunk(cfg.eval_score_chunk)))
        self.noise_free = jax.jit(evaluation.make_noise_free(self.model))
        # On CPUs the splits are evaluated from threads of their own (evaluation.map_splits): the same
        # programs and numbers, with their top-ks on several cores at once.
        self.concurrent_splits = jax.default_backend() == "cpu"
        self._epoch = self.compile_epoch()

    def compile_epoch(self):
        step = step_lib.make_train_step(self.model, self.optimizer, step_lib.config_objective(self.cfg))

        def run_epoch(state, graph, feats, batches, epoch_key, first_step):
            return step_lib.epoch_scan(lambda s, batch, i: step(s, graph, feats, batch, jax.random.fold_in(epoch_key, i)),
                                       state, batches, first_step)

        return jax.jit(run_epoch, donate_argnums=(0,))

    # -- layout ---------------------------------------------------------------------------------
    def init_state(self):
        """The config's initial state on the host layout (a TrainState)."""
        return step_lib.init_state(self.model, self.optimizer, self.graph, self.feats, self.cfg.seed)

    def init(self, seeds):
        return self.put(self.init_state())

    def put(self, state):
        return state

    def get(self, state):
        """One copy of the state (a replicated engine's first replica), still on a device."""
        return state

    def host_copy(self, states):
        return ckpt_lib.host_copy(self.get(states))

    # -- training -------------------------------------------------------------------------------
    def run_chunk(self, state, batch: losses.Batch, epoch_key, first_step):
        return self._epoch(state, self.graph, self.feats, batch, epoch_key, first_step)

    def run_epoch(self, states, cfgs, batches, epoch: int, active=None, on_chunk=None):
        """One epoch of the slot's config from its ``batches`` (a one-element list of EpochBatches);
        ``on_chunk(done, total)`` is called after each twentieth of it (a progress bar, a fault)."""
        epoch_batches = batches[0]
        key = step_lib.stream_key(self.cfg.seed, step_lib.TRAIN_STREAM, epoch)
        n = epoch_batches.users.shape[0]
        chunk = n if on_chunk is None else max(1, -(-n // 20))
        parts = []
        for start in range(0, n, chunk):
            piece = step_lib.to_batch(tuple(a[start:start + chunk] for a in epoch_batches))
            states, chunk_parts = self.run_chunk(states, piece, key, start)
            parts.append(np.stack([np.asarray(x) for x in chunk_parts], axis=1))
            if on_chunk is not None:
                on_chunk(min(start + chunk, n), n)
        finite = step_lib.finite_state(self.get(states))
        return states, np.concatenate(parts)[None], np.array([finite])

    @functools.cached_property
    def sampler(self) -> sampler_lib.NegativeSampler:
        return sampler_lib.for_config(self.cfg, self.ds)

    @functools.cached_property
    def _prefetcher(self) -> sampler_lib.Prefetcher:
        return sampler_lib.Prefetcher({0: self.sampler})

    def train_epoch(self, state, epoch: int):
        """Epoch ``epoch`` from the config's own batches, the next epoch's sampled meanwhile, as in the
        loop (benchmarks and tests): (state, (n_batches, 4) loss parts)."""
        batches = self._prefetcher.epoch(epoch, [0])[0]
        state, parts, _ = self.run_epoch(state, [self.cfg], [batches], epoch)
        return state, parts[0]

    # -- evaluation -----------------------------------------------------------------------------
    def evaluate_params(self, params, epoch: int) -> dict:
        """{split: metrics} of one config's parameters, with the evaluation keys of epoch ``epoch``."""
        key = step_lib.stream_key(self.cfg.seed, step_lib.EVAL_STREAM, epoch)
        base = self.noise_free(params, self.graph, self.feats)  # shared by the splits
        names = list(self.plans)

        def split_hits(i: int):  # dispatched; map_splits decides where it is waited for
            return self.evaluate_split(params, self.graph, self.feats, *self.eval_arrays[names[i]],
                                       jax.random.fold_in(key, i), base=base).hits

        results = {}
        for name, hits in zip(names, evaluation.map_splits(split_hits, len(names), self.concurrent_splits)):
            results[name] = evaluation.metrics_from_hits(self.plans[name], hits)
            faults.kill_at("eval", epoch)  # fault injection (no-op unless LGMREC_FAULT asks)
        return results

    def evaluate(self, states, cfgs, epoch: int, active=None) -> list:
        return [self.evaluate_params(self.get(states).params, epoch)]


def resolve_num_devices(requested: int) -> int:
    """Devices of this process for the step (0: all of them); under jax.distributed every process
    uses as many and the step spans them all."""
    available = jax.local_device_count()
    if requested < 0 or requested > available:
        raise ConfigError(f"num_devices is {requested}, expected 0 (all) to {available} local devices")
    return requested or available


def check_kernel_fits_devices(cfg) -> None:
    """The "ell" kernel runs on one device: the row-sharded step (lgmrec_jax.pmap_engine) splits BCOO
    matrices. Raises ConfigError (one line) before anything is written."""
    n = resolve_num_devices(cfg.num_devices)
    if cfg.kernel == "ell" and (n > 1 or distributed.spans_processes()):
        raise ConfigError(f"kernel 'ell' runs on one device, and this run would use {n} device(s)"
                          f"{' in several processes' if distributed.spans_processes() else ''}: set "
                          f"num_devices=1, or kernel=segment_sum for the multi-device step")


def check_matmul_precision(precision: str) -> None:
    """Some dot algorithms exist on some backends only (TF32_TF32_F32_X3: GPUs). Compiles one small
    product at ``precision`` and raises ConfigError (one line) if this backend cannot. Not memoised:
    JAX's own cache makes a repeated check cost microseconds, and it follows what changes the lowering
    (experiments/precision_emulation.py)."""
    probe = jax.ShapeDtypeStruct((8, 8), jnp.float32)
    try:
        with jax.default_matmul_precision(precision):
            jax.jit(jnp.matmul).lower(probe, probe).compile()
    except Exception as err:  # JAX refuses on CPU with a ValueError; XLA's errors vary by backend
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"matmul_precision {precision!r} does not run on this backend "
                          f"({jax.default_backend()}): {reason}") from None


def check_backend(cfg) -> None:
    """What the config asks of the devices, checked before anything is written."""
    check_kernel_fits_devices(cfg)
    check_matmul_precision(cfg.matmul_precision)

