"""A reproducer, without this project, of the hang that ``lgmrec_jax.distributed.cache_hangs`` avoids.

    python -m experiments.multiprocess_cache_hang [--devices_per_process=2] [--timeout=30]

Runs the same two-process ``pmap`` (a ``psum`` and an ``all_gather`` inside a ``lax.scan``, gloo
collectives on CPU) twice with one fresh persistent compilation cache: the first run compiles and
fills it, the second loads its program from it. Prints one line per run, finished or killed after
``--timeout`` seconds; exit 1 if a run hung. Which jax versions hang is written in
lgmrec_jax/distributed.py.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time

from absl import app, flags

FLAGS = flags.FLAGS


def worker(process_id: int, port: int) -> None:
    import jax
    import numpy as np

    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id)

    def body(carry, _):
        total = jax.lax.psum(carry, "d")
        gathered = jax.lax.all_gather(carry, "d", tiled=True)[: carry.shape[0]]
        return carry + 0.0 * total + 0.0 * gathered, None

    program = jax.pmap(lambda x: jax.lax.scan(body, x, None, length=3)[0], axis_name="d", devices=jax.devices())
    out = program(np.ones((jax.local_device_count(), 4), np.float32))
    print(f"process {process_id}: {np.asarray(out.addressable_data(0)).tolist()}", flush=True)


def run_pair(cache: str, devices: int, timeout: float) -> tuple[bool, float]:
    """Both processes of one run; (finished, seconds)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": cache,
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    tick = time.time()
    procs = [subprocess.Popen([sys.executable, "-m", "experiments.multiprocess_cache_hang", f"--worker={i}",
                               f"--port={port}"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for i in range(2)]
    finished = True
    for proc in procs:
        try:
            proc.wait(timeout=max(1.0, timeout - (time.time() - tick)))
        except subprocess.TimeoutExpired:
            finished = False
    for proc in procs:  # SIGKILL: jax.distributed's preemption notifier catches SIGTERM
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return finished and all(p.returncode == 0 for p in procs), time.time() - tick


def main(argv):
    del argv
    if FLAGS.worker is not None:
        worker(FLAGS.worker, FLAGS.port)
        return
    import jax

    print(f"jax {jax.__version__}, two processes of {FLAGS.devices_per_process} CPU devices each")
    hung = False
    with tempfile.TemporaryDirectory() as cache:
        for name in ("cold cache (compiles, writes it)", "warm cache (loads from it)"):
            ok, seconds = run_pair(cache, FLAGS.devices_per_process, FLAGS.timeout)
            print(f"{name}: {'finished' if ok else 'did not finish, killed'} after {seconds:.1f} s")
            hung |= not ok
    sys.exit(1 if hung else 0)


if __name__ == "__main__":
    flags.DEFINE_integer("devices_per_process", 2, "CPU devices of each process.")
    flags.DEFINE_float("timeout", 30.0, "Seconds a run may take before it counts as hung.")
    flags.DEFINE_integer("worker", None, "Internal: the process index of a worker.")
    flags.DEFINE_integer("port", 0, "Internal: the coordinator's port.")
    app.run(main)
