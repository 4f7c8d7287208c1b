"""Several processes (hosts) in one run or grid, with ``jax.distributed``.

    python -m lgmrec_jax.train ... --coordinator_address=host0:1234 --num_processes=2 --process_id=0  # host 0
    python -m lgmrec_jax.train ... --coordinator_address=host0:1234 --num_processes=2 --process_id=1  # host 1

A single run (lgmrec_jax.run) is then one data-parallel program over every process's devices: each
process feeds its own devices' rows of the batch, the graph and the features (lgmrec_jax.sharded),
and the gradients are summed across all of them. Process 0 alone owns the workdir (lock, checkpoints,
metrics, summary) and evaluates; it shares with the others what keeps every process's loop in step
(:func:`broadcast_json`, :func:`broadcast_tree`: the restored state, each evaluation's metrics), so
the other processes need no shared filesystem. Every process must be started with the same config and
data: :func:`check_same_setup` compares them first and refuses a mismatch on every process. A grid
(experiments/grid.py) instead gives each process its own shard of configs, each trained by that
process alone (:func:`process_local`). On CPU the collectives go through gloo (tests/test_distributed.py
runs two local processes); on GPUs through NCCL.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from typing import Any

import numpy as np
from absl import flags


class DistributedError(ValueError):
    """The process flags do not describe a valid setup; the message is one line."""


def define_flags() -> None:
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for jax.distributed.initialize "
                        "(several hosts; see lgmrec_jax/distributed.py).")
    flags.DEFINE_integer("num_processes", 1, "Number of processes (hosts) taking part.")
    flags.DEFINE_integer("process_id", 0, "This process's index, 0 .. num_processes-1.")


def initialize(coordinator_address, num_processes: int, process_id: int) -> tuple[int, int]:
    """Calls jax.distributed.initialize when several processes are asked for; returns (index, count)."""
    if num_processes <= 1 and not coordinator_address:
        return 0, 1
    if not coordinator_address:
        raise DistributedError("--num_processes > 1 needs --coordinator_address=host:port")
    if not 0 <= process_id < num_processes:
        raise DistributedError(f"--process_id is {process_id}, expected 0 .. {num_processes - 1}")
    import jax

    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    return jax.process_index(), jax.process_count()


def initialize_from_flags() -> tuple[int, int]:
    f = flags.FLAGS
    return initialize(f.coordinator_address, f.num_processes, f.process_id)


_local_scopes = 0  # > 0 inside process_local()


@contextlib.contextmanager
def process_local():
    """Runs started inside are this process's alone even under jax.distributed: its own devices,
    its own workdir, no collectives (a grid's ``--mode=sequential``, where each process trains its
    own shard of configs)."""
    global _local_scopes
    _local_scopes += 1
    try:
        yield
    finally:
        _local_scopes -= 1


def spans_processes() -> bool:
    """True when a run is one program over several processes (jax.distributed, outside process_local)."""
    import jax

    return _local_scopes == 0 and jax.process_count() > 1


def is_primary() -> bool:
    """The process that owns a run's workdir: process 0, or this one when the run is not shared."""
    import jax

    return not spans_processes() or jax.process_index() == 0


def broadcast_tree(tree: Any) -> Any:
    """Process 0's array tree on every process (the others pass a tree of the same shapes)."""
    if not spans_processes():
        return tree
    from jax.experimental import multihost_utils

    return multihost_utils.broadcast_one_to_all(tree)


def _padded_size(n: int) -> int:
    """Power-of-two buffer sizes, so a broadcast compiles once per size class, not once per message."""
    return 1 << max(6, (n - 1).bit_length())


def broadcast_json(value: Any) -> Any:
    """Process 0's JSON-able value on every process (what the others pass is ignored). JSON keeps
    floats exact, so every process then takes the same decisions from the same numbers."""
    if not spans_processes():
        return value
    from jax.experimental import multihost_utils

    payload = json.dumps(value).encode() if is_primary() else b""
    size = int(multihost_utils.broadcast_one_to_all(np.int32(len(payload))))
    buffer = np.zeros(_padded_size(size), np.uint8)
    buffer[:len(payload)] = np.frombuffer(payload, np.uint8)
    received = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
    return json.loads(bytes(received[:size]).decode())


def all_true(ok: bool) -> bool:
    """Whether ``ok`` holds on every process (each passes its own)."""
    if not spans_processes():
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(np.asarray(multihost_utils.process_allgather(np.int32(bool(ok))))))


def check_same_setup(description: Any) -> None:
    """Raises DistributedError on every process unless every process describes its run the same
    way (config, dataset checksums, devices): otherwise their collectives would pair unlike work."""
    if not spans_processes():
        return
    import jax
    from jax.experimental import multihost_utils

    digest = np.frombuffer(hashlib.sha256(json.dumps(description, sort_keys=True).encode()).digest(), np.uint8)
    everyone = np.asarray(multihost_utils.process_allgather(digest)).reshape(jax.process_count(), -1)
    differing = [p for p in range(len(everyone)) if not np.array_equal(everyone[p], everyone[0])]
    if differing:
        raise DistributedError(f"processes {differing} were started with another setup than process 0 (config, "
                               f"dataset files or device count differ); start every process with the same "
                               f"flags and data")
