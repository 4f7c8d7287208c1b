"""Faults, each injected for real: kills at chosen points (SIGKILL through LGMREC_FAULT, see
run.py), a full disk at a save, a forced NaN, corrupted and deleted checkpoints, an unwritable
workdir, a locked workdir, and hostile datasets through the CLI.

The CLI runs share a persistent XLA compilation cache (JAX's own environment variables), so only the
first one compiles. experiments/reliability.py repeats the kills at random times.
"""

import concurrent.futures
import fcntl
import glob
import json
import os
import shutil
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO
from lgmrec_jax.records import strip_timing
from lgmrec_jax import checkpoint as ckpt_lib, configs, loop, run as run_lib
from lgmrec_jax import faults, workdir as workdir_lib
from lgmrec_jax.data import load_dataset
from lgmrec_jax.hostile_data import HOSTILE, hostile_copy

# synthetic_tiny with at most 4 epochs and early stopping after 2 evaluations without improvement.
RUN_FLAGS = ("--dataset=synthetic_tiny", "--config.epochs=4", "--config.stopping_step=1")


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
    env = dict(os.environ)
    env.pop(faults.FAULT_ENV, None)
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("xla_cache"))
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    return env


def cli(env, *args, fault=None, check_rc=None):
    env = dict(env)
    if fault:
        env[faults.FAULT_ENV] = fault
    proc = subprocess.run([sys.executable, "-m", "lgmrec_jax.train", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env=env)
    if check_rc is not None:
        assert proc.returncode == check_rc, (fault, proc.returncode, proc.stderr[-3000:])
    return proc


def outputs(workdir):
    """(summary without timings, metrics.jsonl rows without timings)."""
    with open(os.path.join(workdir, "summary.json")) as handle:
        summary = json.load(handle)
    with open(os.path.join(workdir, "metrics.jsonl")) as handle:
        rows = [json.loads(line) for line in handle]
    return strip_timing(summary), strip_timing(rows)


def steps(workdir):
    return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())


def last_line(proc):
    return proc.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def reference(synthetic_dir, cache_env, tmp_path_factory):
    """An uninterrupted CLI run (it also fills the compilation cache); returns its workdir and outputs."""
    workdir = str(tmp_path_factory.mktemp("reference") / "run")
    cli(cache_env, *RUN_FLAGS, f"--data_dir={synthetic_dir}", f"--workdir={workdir}", check_rc=0)
    summary, rows = outputs(workdir)
    assert summary["epochs_run"] >= 3 and len(rows) == summary["epochs_run"]
    return workdir, summary, rows


def kill_chain(env, args, workdir, last):
    """Kills after a save (before its metrics line), mid-epoch, inside a save (files written, rename
    not done) and inside a metrics line; each rerun of the same command resumes."""
    checkpoints = os.path.join(workdir, "checkpoints")
    killed = -signal.SIGKILL
    cli(env, *args, fault="kill:saved:0", check_rc=killed)
    assert steps(workdir) == [1] and os.path.getsize(os.path.join(workdir, "metrics.jsonl")) == 0

    cli(env, *args, fault="kill:train:1", check_rc=killed)
    assert steps(workdir) == [1] and len(open(os.path.join(workdir, "metrics.jsonl")).readlines()) == 1

    cli(env, *args, fault="kill:save:1", check_rc=killed)
    assert steps(workdir) == [1] and glob.glob(os.path.join(checkpoints, "2.orbax-checkpoint-tmp*"))

    cli(env, *args, fault="kill:metrics:1", check_rc=killed)
    assert steps(workdir) == [1, 2] and not glob.glob(os.path.join(checkpoints, "*tmp*"))
    with open(os.path.join(workdir, "metrics.jsonl")) as handle:
        text = handle.read()
    assert not text.endswith("\n") and len(text.splitlines()) == 2  # row 0, then half of row 1


def fault_chain(env, args, workdir, last):
    """A kill mid-evaluation, a full disk at a save, a NaN loss, then a kill before summary.json is
    committed (after a finished run: early stopping must not train on when it resumes)."""
    checkpoints = os.path.join(workdir, "checkpoints")
    cli(env, *args, fault="kill:eval:1", check_rc=-signal.SIGKILL)
    assert steps(workdir) == [1] and len(open(os.path.join(workdir, "metrics.jsonl")).readlines()) == 1

    proc = cli(env, *args, fault="enospc:save:1", check_rc=2)
    assert "Traceback" not in proc.stderr
    line = last_line(proc)
    assert line.startswith(f"error: {checkpoints}: saving checkpoint 2 failed") and \
        "No space left on device" in line and "rerun the same command to resume" in line
    assert steps(workdir) == [1] and not os.path.exists(os.path.join(workdir, "summary.json"))
    assert len(open(os.path.join(workdir, "metrics.jsonl")).readlines()) == 1

    proc = cli(env, *args, fault="nan:loss:1:1", check_rc=3)
    assert last_line(proc) == ("error: non-finite loss or parameters in epoch 1, step 1; the last good "
                               "checkpoint (checkpoints/1, after 1 epochs) is kept")
    summary = json.loads(open(os.path.join(workdir, "summary.json")).read())
    assert summary["status"] == "non_finite" and (summary["epoch"], summary["step"]) == (1, 1)
    assert summary["last_good_checkpoint_epoch"] == 1 and summary["reason"] in last_line(proc)
    assert steps(workdir) == [1] and not glob.glob(os.path.join(checkpoints, "*tmp*"))

    cli(env, *args, fault=f"kill:summary:{last}", check_rc=-signal.SIGKILL)
    assert not os.path.exists(os.path.join(workdir, "summary.json"))  # the stale non-finite one is gone
    assert os.path.exists(os.path.join(workdir, "summary.json.tmp"))


@pytest.mark.slow
def test_kills_full_disk_and_nan_then_resume_equals_uninterrupted(synthetic_dir, cache_env, reference,
                                                                   tmp_path):
    """Two workdirs (in parallel) meet the faults of kill_chain and fault_chain in turn; a final rerun of
    the same command finishes each with the uninterrupted run's summary and metrics.jsonl."""
    _, ref_summary, ref_rows = reference
    last = ref_summary["epochs_run"] - 1  # >= 2

    def chain(steps_fn, name):
        workdir = str(tmp_path / name)
        args = (*RUN_FLAGS, f"--data_dir={synthetic_dir}", f"--workdir={workdir}")
        steps_fn(cache_env, args, workdir, last)
        proc = cli(cache_env, *args, check_rc=0)
        assert "resumed" in proc.stderr and json.loads(proc.stdout)["status"] == ref_summary["status"]
        assert outputs(workdir) == (ref_summary, ref_rows)
        assert not glob.glob(os.path.join(workdir, "*.tmp"))

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        for future in [pool.submit(chain, kill_chain, "kills"), pool.submit(chain, fault_chain, "faults")]:
            future.result()


def truncate(path):
    with open(path, "rb") as handle:
        data = handle.read()
    with open(path, "wb") as handle:
        handle.write(data[:len(data) // 2])


@pytest.mark.slow
def test_truncated_latest_checkpoint_falls_back_and_says_so(synthetic_dir, cache_env, reference, tmp_path):
    ref_dir, ref_summary, ref_rows = reference
    workdir = str(tmp_path / "run")
    shutil.copytree(ref_dir, workdir)
    newest = steps(workdir)[-1]
    older = steps(workdir)[-2]
    for path in glob.glob(os.path.join(workdir, "checkpoints", str(newest), "state", "**", "*"), recursive=True):
        if os.path.isfile(path) and "ocdbt" in path:
            truncate(path)
    os.remove(os.path.join(workdir, "checkpoints", str(newest), "meta", "metadata"))
    proc = cli(cache_env, *RUN_FLAGS, f"--data_dir={synthetic_dir}", f"--workdir={workdir}", check_rc=0)
    assert f"checkpoint {newest} in {workdir}/checkpoints cannot be restored" in proc.stderr
    assert (f"resuming from checkpoint {older} (after epoch {older - 1}): newer checkpoint(s) [{newest}] cannot "
            f"be restored and were moved to {workdir}/checkpoints.unreadable") in proc.stderr
    assert os.listdir(os.path.join(workdir, "checkpoints.unreadable"))[0].startswith(f"{newest}-")
    assert outputs(workdir) == (ref_summary, ref_rows)  # retrained from the older one, same numbers


@pytest.mark.slow
def test_no_restorable_checkpoint_needs_restart(synthetic_dir, cache_env, reference, tmp_path):
    ref_dir, ref_summary, ref_rows = reference
    workdir = str(tmp_path / "run")
    shutil.copytree(ref_dir, workdir)
    for step in steps(workdir):
        shutil.rmtree(os.path.join(workdir, "checkpoints", str(step), "state"))
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    args = (*RUN_FLAGS, f"--data_dir={synthetic_dir}", f"--workdir={workdir}")
    proc = cli(cache_env, *args, check_rc=2)
    assert last_line(proc) == (f"error: {workdir}/checkpoints: no checkpoint can be restored (tried "
                               f"{steps(workdir)[::-1]}, all unreadable or corrupted); use --restart to discard "
                               f"this run and start over")
    assert "Traceback" not in proc.stderr
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before  # nothing moved or deleted
    cli(cache_env, *args, "--restart", check_rc=0)
    assert outputs(workdir) == (ref_summary, ref_rows)


def test_deleted_checkpoints_with_metrics_left_are_refused(reference, tmp_path):
    """metrics.jsonl proves a checkpoint was saved (it is written before the line): all of them gone is
    the 'none is good' case, not a fresh start."""
    ref_dir, _, ref_rows = reference
    workdir = str(tmp_path / "run")
    shutil.copytree(ref_dir, workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints"))
    cfg = configs.for_dataset("synthetic_tiny")
    wd = workdir_lib.Workdir(workdir)
    store = run_lib.RunStore(cfg, wd)
    store.open()
    with pytest.raises(workdir_lib.RunError, match=r"holds no checkpoint, but metrics.jsonl shows one was saved "
                                               rf"after epoch {len(ref_rows) - 1} \(deleted\?\); use --restart"):
        store.restore(None)
    os.remove(wd.file("metrics.jsonl"))
    assert store.restore(None)[0] is None  # a fresh workdir starts from scratch


def test_checksum_catches_a_silently_changed_array_and_resume_falls_back(tmp_path):
    """A flipped bit that the storage format decodes without error still fails the SHA-256 recorded at
    save time; restore_latest then falls back and moves the bad step aside, so it can be saved again."""
    checkpoints = ckpt_lib.Checkpoints(str(tmp_path / "checkpoints"), keep=3)
    states = {step: {"w": np.arange(6, dtype=np.float32) + step} for step in (1, 2)}
    for step, state in states.items():
        checkpoints.save(step, state, {"epoch": step}, None)
    abstract = ckpt_lib.abstract_like(states[1])
    state, meta = checkpoints.restore(2, abstract)
    assert meta == {"epoch": 2} and np.array_equal(state["w"], states[2]["w"])

    original = checkpoints.manager.restore

    def restore_with_flip(step, args=None):  # what a bit flip in step 2's data file decodes to
        restored = dict(original(step, args=args))
        if step == 2:
            w = np.array(restored["state"]["w"])
            w.view(np.uint32)[3] ^= 1 << 7
            restored["state"] = {"w": w}
        return restored

    checkpoints.manager.restore = restore_with_flip
    with pytest.raises(ckpt_lib.CheckpointError, match="do not match the SHA-256 recorded at save time"):
        checkpoints.restore(2, abstract)
    state, meta, skipped = checkpoints.restore_latest(abstract)
    checkpoints.manager.restore = original
    assert skipped == [2] and meta == {"epoch": 1} and np.array_equal(state["w"], states[1]["w"])
    assert checkpoints.steps() == [1] and os.listdir(tmp_path / "checkpoints.unreadable")[0].startswith("2-")
    checkpoints.save(2, states[2], {"epoch": 2}, None)  # the step number is free again
    assert checkpoints.steps() == [1, 2]
    checkpoints.close()


def test_non_finite_parameters_stop_with_reason(synthetic_dir, tmp_path):
    """A config whose parameters are not finite after epoch 4 stops with a reason naming the last good
    checkpoint of its store; a NaN loss before any checkpoint says that none was saved."""
    cfg, ds = configs.for_dataset("synthetic_tiny"), load_dataset(synthetic_dir, "synthetic_tiny")
    store = run_lib.RunStore(cfg, workdir_lib.Workdir(str(tmp_path)))
    store.open()
    for step in (2, 3):
        store.checkpoints.save(step, {"w": np.zeros(2, np.float32)}, {}, None)
    run = loop.ConfigRun(loop.Member("run", cfg, str(tmp_path)), ds, loop.ConfigProgress(), time.time())
    assert run.train_row(4, np.ones((2, 4)), False, 0.1, lambda: store.kept(4)) is None
    assert re.fullmatch(r"non-finite loss or parameters in epoch 4, after its last step \(parameters\); the last "
                        r"good checkpoint \(checkpoints/3, after 3 epochs\) is kept", run.progress.non_finite["reason"])
    run.write_summary()
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["status"] == "non_finite" and written["step"] is None
    assert written["last_good_checkpoint_epoch"] == 3 and not run.active(5)
    store.close()
    fresh = loop.ConfigRun(loop.Member("run", cfg, str(tmp_path)), ds, loop.ConfigProgress(), time.time())
    assert fresh.train_row(0, np.full((2, 4), np.inf), True, 0.1, lambda: run_lib.RunStore(cfg, None).kept(0)) is None
    assert fresh.progress.non_finite["reason"].endswith("step 0; no checkpoint had been saved yet")
    assert fresh.train_row(0, np.ones((2, 4)), True, 0.1, None)["loss"]["total"] == 2.0


def test_unwritable_workdir_is_refused_before_training(synthetic_dir, cache_env, tmp_path):
    """As root, permission bits do not stop writes: the unwritable workdirs are a path below a regular
    file (ENOTDIR) and, where /sys refuses new entries, a path in sysfs."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    proc = cli(cache_env, *RUN_FLAGS, f"--data_dir={synthetic_dir}", f"--workdir={blocker}/run", check_rc=2)
    assert proc.stderr.strip() == (f"error: {blocker}/run: workdir cannot be created (Not a directory); "
                                   f"choose another --workdir")
    assert sorted(os.listdir(tmp_path)) == ["a_file"]
    with pytest.raises(workdir_lib.RunError, match="workdir exists and is not a directory"):
        workdir_lib.Workdir(str(blocker)).prepare({}, restart=False)
    sysfs = "/sys/lgmrec-reliability-test"
    try:
        os.mkdir(sysfs)
        os.rmdir(sysfs)
    except OSError:
        with pytest.raises(workdir_lib.RunError, match=f"{sysfs}: workdir cannot be created"):
            workdir_lib.Workdir(sysfs).prepare({}, restart=False)


def test_full_disk_before_training_is_refused(tmp_path, monkeypatch):
    wd = workdir_lib.Workdir(str(tmp_path))
    state = {"w": np.zeros((1000, 64), np.float32)}
    run_lib.check_free_space(wd, state)
    usage = shutil.disk_usage(str(tmp_path))
    monkeypatch.setattr(run_lib.shutil, "disk_usage", lambda path: usage._replace(free=100_000))
    with pytest.raises(workdir_lib.RunError, match=r"only 0.1 MiB free on its disk, a checkpoint needs about 1.5 MiB"):
        run_lib.check_free_space(wd, state)


@pytest.mark.slow
def test_second_process_on_a_locked_workdir_is_refused_and_changes_nothing(synthetic_dir, cache_env,
                                                                           reference, tmp_path):
    ref_dir, _, _ = reference
    workdir = str(tmp_path / "run")
    shutil.copytree(ref_dir, workdir)
    snapshot = {p: (os.path.getsize(p), os.path.getmtime(p)) for p in glob.glob(f"{workdir}/**", recursive=True)}
    with open(os.path.join(workdir, ".lock"), "a+") as holder:  # this process is the running first run
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc = cli(cache_env, *RUN_FLAGS, f"--data_dir={synthetic_dir}", f"--workdir={workdir}", "--restart",
                   check_rc=2)
    assert proc.stderr.strip() == (f"error: {workdir}: another run is using this workdir (locked); wait for it "
                                   f"or choose another --workdir")
    after = {p: (os.path.getsize(p), os.path.getmtime(p)) for p in glob.glob(f"{workdir}/**", recursive=True)}
    assert after == snapshot


# ---- Hostile datasets through the CLI (the cases are lgmrec_jax/hostile_data.py's HOSTILE) ------------

@pytest.mark.slow
def test_hostile_datasets_exit_2_with_one_line_and_write_nothing(cache_env, tmp_path):
    """Each bad input: exit 2, stderr exactly one line `error: <file>: <problem>`, no traceback, no workdir."""
    def attempt(index):
        case, write, message = HOSTILE[index]
        root = tmp_path / f"case{index}"
        root.mkdir()
        name = write(str(root))
        workdir = root / "workdir"
        proc = cli(cache_env, f"--dataset={name}", f"--data_dir={root}", f"--workdir={workdir}")
        return case, message, proc, workdir.exists(), root

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(attempt, range(len(HOSTILE))))
    failures = []
    for case, message, proc, wrote, root in results:
        lines = proc.stderr.strip().splitlines()
        ok = (proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {root}/")
              and message in lines[0] and not wrote)
        if not ok:
            failures.append(f"{case}: rc={proc.returncode} workdir={wrote} stderr={proc.stderr[-800:]!r}")
    assert not failures, "\n".join(failures)


def test_hostile_but_valid_datasets_load_as_intended(synthetic_dir, tmp_path):
    """A BOM and Windows line endings parse exactly as the clean file; duplicate training rows are kept
    and counted (the reference keeps them: R counts them, the normalised adjacency does not); all-zero
    features are accepted."""
    clean = load_dataset(synthetic_dir, "synthetic_tiny")
    ds = load_dataset(hostile_copy(synthetic_dir, tmp_path, duplicates=5, zero_image=True), "synthetic_tiny")
    assert (ds.n_users, ds.n_items) == (clean.n_users, clean.n_items)
    np.testing.assert_array_equal(ds.train[:len(clean.train)], clean.train)
    np.testing.assert_array_equal(ds.train[len(clean.train):], clean.train[:5])
    assert ds.n_duplicate_train_rows == 5
    np.testing.assert_array_equal(ds.valid, clean.valid)
    np.testing.assert_array_equal(ds.test, clean.test)
    assert not ds.v_feat.any() and ds.v_feat.shape == clean.v_feat.shape
    np.testing.assert_array_equal(ds.t_feat, clean.t_feat)


@pytest.mark.slow
def test_bom_and_windows_line_endings_train_exactly_as_the_clean_file(synthetic_dir, cache_env, reference,
                                                                      tmp_path):
    data_dir = hostile_copy(synthetic_dir, tmp_path / "data")
    workdir = tmp_path / "run"
    cli(cache_env, *RUN_FLAGS, f"--data_dir={data_dir}", f"--workdir={workdir}", check_rc=0)
    assert outputs(workdir) == reference[1:]


@pytest.mark.slow
def test_all_zero_features_train_to_finite_numbers(synthetic_dir, cache_env, reference, tmp_path):
    data_dir = hostile_copy(synthetic_dir, tmp_path / "data", zero_image=True)
    workdir = tmp_path / "run"
    cli(cache_env, *RUN_FLAGS, f"--data_dir={data_dir}", f"--workdir={workdir}", check_rc=0)
    summary, rows = outputs(workdir)
    assert summary["status"] in ("early_stopped", "max_epochs")
    assert all(np.isfinite(r["loss"]["total"]) for r in rows)
    assert all(np.isfinite(v) for v in summary["best_test"].values())
