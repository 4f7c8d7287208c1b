"""Several processes (hosts) in one run or grid, with ``jax.distributed``.

    python -m lgmrec_jax.train ... --coordinator_address=host0:1234 --num_processes=2 --process_id=0  # host 0
    python -m lgmrec_jax.train ... --coordinator_address=host0:1234 --num_processes=2 --process_id=1  # host 1

A single run (lgmrec_jax.run) is then one data-parallel program over every process's devices: each
process feeds its own devices' rows of the batch, the graph and the features (lgmrec_jax.sharded),
and the gradients are summed across all of them. Process 0 alone owns the workdir (lock, checkpoints,
metrics, summary) and evaluates; it shares with the others what keeps every process's loop in step
(:func:`broadcast_json`, :func:`broadcast_tree`: the restored state, each evaluation's metrics), so
the other processes need no shared filesystem. A grid (experiments/grid.py) instead gives each process
its own shard of configs. On CPU the collectives go through gloo (tests/test_distributed.py runs two
local processes); on GPUs through NCCL.
"""

from __future__ import annotations

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


def is_primary() -> bool:
    import jax

    return jax.process_index() == 0


def broadcast_tree(tree: Any) -> Any:
    """Process 0's array tree on every process (the others pass a tree of the same shapes)."""
    import jax

    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    return multihost_utils.broadcast_one_to_all(tree)


def broadcast_json(value: Any) -> Any:
    """Process 0's JSON-able value on every process (what the others pass is ignored). JSON keeps
    floats exact, so every process then takes the same decisions from the same numbers."""
    import jax

    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    payload = np.frombuffer(json.dumps(value).encode(), np.uint8) if is_primary() else np.zeros(0, np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.int32(payload.size)))
    buffer = payload if is_primary() else np.zeros(size, np.uint8)
    return json.loads(bytes(np.asarray(multihost_utils.broadcast_one_to_all(buffer))).decode())
