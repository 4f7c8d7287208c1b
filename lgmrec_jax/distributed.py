"""Several processes (hosts) in one run or grid, with ``jax.distributed``.

A single run is one data-parallel program over every process's devices (lgmrec_jax.pmap_engine). Process 0
alone owns the workdir and evaluates; it broadcasts what keeps the other loops in step (the restored
state, each evaluation's metrics), so the others need no shared filesystem, and
:func:`check_same_setup` refuses processes started with another setup. A grid instead gives each
process its own shard of configs (:func:`process_local`). Every wait on the other processes is
guarded (:func:`waiting_for`): a peer that never arrives ends the wait with one line and exit status
4, not a hang. Collectives go through gloo on CPUs and NCCL on GPUs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import threading
from typing import Any

import numpy as np
from absl import flags, logging

DEFAULT_TIMEOUT_S = 300
TIMEOUT_EXIT = 4  # the exit status of a process that gave up waiting for its peers


class DistributedError(ValueError):
    """The process flags do not describe a valid setup; the message is one line."""


def define_flags() -> None:
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for jax.distributed.initialize "
                        "(several hosts; see lgmrec_jax/distributed.py).")
    flags.DEFINE_integer("num_processes", 1, "Number of processes (hosts) taking part.")
    flags.DEFINE_integer("process_id", 0, "This process's index, 0 .. num_processes-1.")
    flags.DEFINE_integer("distributed_timeout", DEFAULT_TIMEOUT_S,
                         "Seconds a process waits for its peers (joining, each broadcast, the first training "
                         f"epoch with its compile) before it exits with status {TIMEOUT_EXIT} and a line naming "
                         "what it waited for.")


_timeout_s = DEFAULT_TIMEOUT_S
_started = False  # jax.distributed.initialize was called: waits on peers are guarded
_process_id = 0


@contextlib.contextmanager
def waiting_for(what: str):
    """Guards a wait on the other processes: if the body has not returned within the timeout, this
    process prints ``error: process P waited T s for WHAT ...`` and exits with TIMEOUT_EXIT. A peer
    that never arrives blocks inside XLA, where no Python exception can reach, so the exit comes
    from a timer thread."""
    if not _started:
        yield
        return

    def give_up():
        sys.stderr.write(f"error: process {_process_id} waited {_timeout_s} s for {what}; a process "
                         f"did not arrive or stopped (--distributed_timeout={_timeout_s})\n")
        sys.stderr.flush()
        os._exit(TIMEOUT_EXIT)

    timer = threading.Timer(_timeout_s, give_up)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def initialize(coordinator_address, num_processes: int, process_id: int,
               timeout_s: int = DEFAULT_TIMEOUT_S) -> tuple[int, int]:
    """Calls jax.distributed.initialize when several processes are asked for; returns (index, count).
    Waits at most ``timeout_s`` for the others (then exits, see :func:`waiting_for`); JAX's own
    deadline, which aborts with a stack trace, is set later than ours."""
    global _timeout_s, _started, _process_id
    if num_processes <= 1 and not coordinator_address:
        return 0, 1
    if not coordinator_address:
        raise DistributedError("--num_processes > 1 needs --coordinator_address=host:port")
    if not 0 <= process_id < num_processes:
        raise DistributedError(f"--process_id is {process_id}, expected 0 .. {num_processes - 1}")
    if timeout_s <= 0:
        raise DistributedError(f"--distributed_timeout is {timeout_s}, expected a number of seconds > 0")
    import jax

    _timeout_s, _started, _process_id = timeout_s, True, process_id
    with waiting_for(f"all {num_processes} processes to join at {coordinator_address}"):
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=timeout_s + 60)
    avoid_cache_hang()
    return jax.process_index(), jax.process_count()


def initialize_from_flags() -> tuple[int, int]:
    f = flags.FLAGS
    return initialize(f.coordinator_address, f.num_processes, f.process_id, f.distributed_timeout)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", text)[:3])


def cache_hangs(version: str, backend: str, process_count: int) -> bool:
    """Whether JAX's persistent compilation cache hangs this setup: from jax 0.12.1 on, a CPU program
    with cross-process collectives (gloo) that is loaded from the cache waits forever at its first
    collective (``python -m experiments.multiprocess_cache_hang`` reproduces it without this project;
    0.12.0 and earlier run it)."""
    return process_count > 1 and backend == "cpu" and _version(version) >= (0, 12, 1)


def avoid_cache_hang() -> None:
    """Turns JAX's persistent compilation cache off where :func:`cache_hangs` (the one workaround:
    compile in every process, as without a cache)."""
    import jax

    if cache_hangs(jax.__version__, jax.default_backend(), jax.process_count()):
        jax.config.update("jax_enable_compilation_cache", False)
        logging.warning("jax %s: a multi-process CPU program loaded from the persistent compilation cache hangs "
                        "at its first collective; compiling without the cache", jax.__version__)


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


def broadcast_tree(tree: Any, what: str = "process 0's arrays") -> Any:
    """Process 0's array tree on every process (the others pass a tree of the same shapes)."""
    if not spans_processes():
        return tree
    from jax.experimental import multihost_utils

    with waiting_for(what):
        return multihost_utils.broadcast_one_to_all(tree)


def _padded_size(n: int) -> int:
    """Power-of-two buffer sizes, so a broadcast compiles once per size class, not once per message."""
    return 1 << max(6, (n - 1).bit_length())


def broadcast_json(value: Any, what: str = "process 0's message") -> Any:
    """Process 0's JSON-able value on every process (what the others pass is ignored). JSON keeps
    floats exact, so every process then takes the same decisions from the same numbers."""
    if not spans_processes():
        return value
    from jax.experimental import multihost_utils

    payload = json.dumps(value).encode() if is_primary() else b""
    with waiting_for(what):
        size = int(multihost_utils.broadcast_one_to_all(np.int32(len(payload))))
        buffer = np.zeros(_padded_size(size), np.uint8)
        buffer[:len(payload)] = np.frombuffer(payload, np.uint8)
        received = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
    return json.loads(bytes(received[:size]).decode())


def all_true(ok: bool, what: str = "every process's answer") -> bool:
    """Whether ``ok`` holds on every process (each passes its own)."""
    if not spans_processes():
        return ok
    from jax.experimental import multihost_utils

    with waiting_for(what):
        return bool(np.all(np.asarray(multihost_utils.process_allgather(np.int32(bool(ok))))))


def check_same_setup(description: Any) -> None:
    """Raises DistributedError on every process unless every process describes its run the same
    way (config, dataset checksums, devices): otherwise their collectives would pair unlike work."""
    if not spans_processes():
        return
    import jax
    from jax.experimental import multihost_utils

    digest = np.frombuffer(hashlib.sha256(json.dumps(description, sort_keys=True).encode()).digest(), np.uint8)
    with waiting_for("every process's setup (the first collective)"):
        everyone = np.asarray(multihost_utils.process_allgather(digest)).reshape(jax.process_count(), -1)
    differing = [p for p in range(len(everyone)) if not np.array_equal(everyone[p], everyone[0])]
    if differing:
        raise DistributedError(f"processes {differing} were started with another setup than process 0 (config, "
                               f"dataset files or device count differ); start every process with the same "
                               f"flags and data")
