"""Epoch runners: one device (jit) or data-parallel over devices (pmap; several processes too).

A runner owns how the train state lives on the devices. The run loop only calls
``put`` (host/restored state -> runner layout), ``run_epoch`` and ``get`` (runner layout -> one copy,
for evaluation and checkpoints), so the single- and multi-device paths share the whole loop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lgmrec_jax import distributed, trainer


class SingleDeviceRunner:
    """The whole epoch as one jitted ``lax.scan`` with the state donated."""

    n_devices = 1

    def __init__(self, model, optimizer, cfg):
        step = trainer.make_train_step(model, optimizer, cfg)
        self._run = jax.jit(trainer.make_epoch_fn(step), donate_argnums=(0,))

    def put(self, state):
        return state

    def get(self, state):
        return state

    def run_epoch(self, state, graph, feats, batches, epoch_key, first_step):
        return self._run(state, graph, feats, batches, epoch_key, first_step)


def resolve_num_devices(requested: int) -> int:
    """Devices of this process for the step (0: all of them); under jax.distributed every process
    uses as many and the step spans them all."""
    from lgmrec_jax.configs import ConfigError  # a ValueError: one line from the CLI

    available = jax.local_device_count()
    if requested < 0 or requested > available:
        raise ConfigError(f"num_devices is {requested}, expected 0 (all) to {available} local devices")
    return requested or available


def check_kernel_fits_devices(cfg) -> None:
    """The "ell" kernel runs on one device: the row-sharded step (lgmrec_jax.sharded) splits BCOO
    matrices. Raises ConfigError (one line) before anything is written."""
    from lgmrec_jax.configs import ConfigError

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
    from lgmrec_jax.configs import ConfigError

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


def make_runner(model, optimizer, cfg):
    check_backend(cfg)
    n = resolve_num_devices(cfg.num_devices)
    if n == 1 and not distributed.spans_processes():
        return SingleDeviceRunner(model, optimizer, cfg)
    from lgmrec_jax import sharded  # the row-sharded multi-device step

    return sharded.PmapRunner(model, optimizer, cfg, n)
