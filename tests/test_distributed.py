"""Multi-host data-parallel training (lgmrec_jax/distributed.py) with two local CPU processes of two
devices each, talking through jax.distributed and gloo: one run over both, resumed across layouts,
and a failure on process 0 reaching process 1."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, free_port, read_jsonl
from lgmrec_jax.records import strip_timing
from lgmrec_jax import distributed, faults

RUN = ("--dataset=synthetic_tiny", "--config.epochs=3", "--config.stopping_step=100", "--config.num_devices=0")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != faults.FAULT_ENV}
    env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("xla_cache")),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return env


def train(env, devices: int, *args, fault=None):
    env = {**env, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    if fault:
        env[faults.FAULT_ENV] = fault
    return subprocess.Popen([sys.executable, "-m", "lgmrec_jax.train", *RUN, *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def two_processes(env, data_dir, workdirs, *args):
    """Runs the same run as processes 0 and 1 (two devices each); returns [(returncode, stdout, stderr)]."""
    port = free_port()
    procs = [train(env, 2, f"--data_dir={data_dir}", f"--workdir={workdir}", f"--coordinator_address=localhost:{port}",
                   "--num_processes=2", f"--process_id={i}", *args) for i, workdir in enumerate(workdirs)]
    outs = [p.communicate(timeout=300) for p in procs]
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]


def rows(workdir):
    return strip_timing(read_jsonl(os.path.join(workdir, "metrics.jsonl")))


def assert_same_run(a, b):
    """Equal metrics; losses equal to float32 reassociation (gloo's all-reduce vs one process's)."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        loss_x, loss_y = x.pop("loss"), y.pop("loss")
        assert x == y
        np.testing.assert_allclose([loss_x[k] for k in sorted(loss_x)], [loss_y[k] for k in sorted(loss_y)],
                                   rtol=1e-5)


@pytest.mark.slow
def test_two_processes_train_one_run_resumable_from_one_process(synthetic_dir, env, tmp_path):
    # One process with four devices, killed after epoch 0's checkpoint ...
    single = tmp_path / "single"
    proc = train(env, 4, f"--data_dir={synthetic_dir}", f"--workdir={single}", fault="kill:saved:0")
    proc.communicate(timeout=300)
    assert proc.returncode == -9
    # ... resumed by two processes of two devices (the same four-way split of every step).
    results = two_processes(env, synthetic_dir, [single, tmp_path / "unused_1"])
    for rc, _, err in results:
        assert rc == 0, err[-3000:]
    # The same run, two processes from the start; process 1 is told another workdir and must not touch it.
    fresh = tmp_path / "fresh"
    results = two_processes(env, synthetic_dir, [fresh, tmp_path / "fresh_1"])
    for rc, _, err in results:
        assert rc == 0, err[-3000:]
    (_, out0, _), (_, out1, _) = results
    assert json.loads(out0[out0.index("{\n"):])["epochs_run"] == 3
    assert "{" not in out1  # the summary is process 0's to print
    assert not (tmp_path / "fresh_1").exists() and not (tmp_path / "unused_1").exists()
    assert_same_run(rows(fresh), rows(single))
    # The whole run in one process equals both.
    whole = tmp_path / "whole"
    proc = train(env, 4, f"--data_dir={synthetic_dir}", f"--workdir={whole}")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert_same_run(rows(whole), rows(fresh))


@pytest.mark.slow
def test_processes_started_with_different_setups_are_refused(synthetic_dir, env, tmp_path):
    port = free_port()
    procs = [train(env, 2, f"--data_dir={synthetic_dir}", f"--workdir={tmp_path / str(i)}", f"--config.alpha={alpha}",
                   f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}")
             for i, alpha in enumerate((0.3, 0.5))]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 2, err[-2000:]
        assert err.strip().splitlines()[-1] == (
            "error: processes [1] were started with another setup than process 0 (config, dataset files or device "
            "count differ); start every process with the same flags and data")
    assert not (tmp_path / "0").exists()  # refused before process 0 touched its workdir


@pytest.mark.slow
def test_a_refusal_on_process_0_stops_process_1(synthetic_dir, env, tmp_path):
    workdir = tmp_path / "taken"
    workdir.write_text("a file where the workdir should be")
    results = two_processes(env, synthetic_dir, [workdir, tmp_path / "other"])
    (rc0, _, err0), (rc1, _, err1) = results
    assert rc0 == 2 and rc1 == 2, (err0[-2000:], err1[-2000:])
    assert err0.strip().splitlines()[-1] == f"error: {workdir}: workdir exists and is not a directory; choose another --workdir"
    assert err1.strip().splitlines()[-1].startswith(f"error: process 0: {workdir}: workdir exists")


def test_process_flags_are_checked_before_jax_distributed_starts():
    assert distributed.initialize(None, 1, 0) == (0, 1)  # one process: nothing to initialise
    with pytest.raises(distributed.DistributedError, match="needs --coordinator_address=host:port"):
        distributed.initialize(None, 2, 0)
    with pytest.raises(distributed.DistributedError, match=r"--process_id is 2, expected 0 \.\. 1"):
        distributed.initialize("localhost:1", 2, 2)
    with pytest.raises(distributed.DistributedError, match=r"--distributed_timeout is 0, expected"):
        distributed.initialize("localhost:1", 2, 1, timeout_s=0)


@pytest.mark.slow
def test_a_peer_that_never_arrives_is_a_clear_exit_not_a_hang(synthetic_dir, env, tmp_path):
    # Process 1 of 2 is never started: process 0 gives up after --distributed_timeout.
    port = free_port()
    proc = train(env, 2, f"--data_dir={synthetic_dir}", f"--workdir={tmp_path / 'w'}",
                 f"--coordinator_address=localhost:{port}", "--num_processes=2", "--process_id=0",
                 "--distributed_timeout=5")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == distributed.TIMEOUT_EXIT, err[-2000:]
    assert err.strip().splitlines()[-1] == (
        f"error: process 0 waited 5 s for all 2 processes to join at localhost:{port}; "
        "a process did not arrive or stopped (--distributed_timeout=5)")
    assert not (tmp_path / "w").exists()


def test_a_wait_past_the_timeout_exits_with_the_line_naming_it(tmp_path):
    # waiting_for around a wait that never ends (as a broadcast whose sender is gone): the timer exits.
    code = ("from lgmrec_jax import distributed as d; import time\n"
            "d._started, d._timeout_s, d._process_id = True, 1, 1\n"
            "with d.waiting_for(\"process 0's metrics of epoch 3\"):\n    time.sleep(60)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=50)
    assert proc.returncode == distributed.TIMEOUT_EXIT
    assert proc.stderr.strip() == ("error: process 1 waited 1 s for process 0's metrics of epoch 3; a process did "
                                   "not arrive or stopped (--distributed_timeout=1)")
    # A wait that ends in time leaves the process alone.
    code = code.replace("time.sleep(60)", "time.sleep(0.1)") + "time.sleep(2); print('went on')\n"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=50)
    assert proc.returncode == 0 and proc.stdout.strip() == "went on"


def test_the_persistent_cache_is_off_where_it_hangs():
    # jax 0.12.1's CPU programs with cross-process collectives hang when loaded from the cache.
    assert distributed.cache_hangs("0.12.1", "cpu", 2)
    assert distributed.cache_hangs("0.13.0.dev20270101", "cpu", 2)
    assert not distributed.cache_hangs("0.12.0", "cpu", 2)
    assert not distributed.cache_hangs("0.12.0.1", "cpu", 2)
    assert not distributed.cache_hangs("0.10.2", "cpu", 4)
    assert not distributed.cache_hangs("0.12.1", "cpu", 1)
    assert not distributed.cache_hangs("0.12.1", "gpu", 2)
