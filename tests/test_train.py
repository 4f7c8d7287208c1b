"""The training entry point: outputs, resume equality, config handling, refusals and evaluation."""

import json
import os
import signal
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, read_jsonl
from lgmrec_jax.records import strip_timing
from lgmrec_jax import configs, engine as engine_lib, evaluation, loop, run as run_lib
from lgmrec_jax import workdir as workdir_lib
from lgmrec_jax.data import load_dataset



def cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "lgmrec_jax.train", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def test_cli_run_leaves_all_outputs(synthetic_dir, tmp_path):
    workdir = tmp_path / "run"
    proc = cli("--dataset=synthetic_tiny", f"--data_dir={synthetic_dir}", f"--workdir={workdir}",
               "--config.alpha=0.7", "--num_devices=2")  # conftest's 4 fake devices: the pmap path
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    config = json.loads((workdir / "config.json").read_text())
    rows = read_jsonl(workdir / "metrics.jsonl")
    assert config["identity"]["config"]["alpha"] == 0.7  # the override is recorded
    assert config["identity"]["config"]["num_devices"] == 2
    assert config["identity"]["config"]["epochs"] == 6  # synthetic_tiny picks configs/tiny.py
    assert set(config["identity"]["dataset_files"]) == {"synthetic_tiny.inter", "image_feat.npy", "text_feat.npy"}
    assert "jax" in config["versions"]
    assert [r["epoch"] for r in rows] == list(range(summary["epochs_run"]))
    best = rows[summary["best_epoch"]]
    assert summary["best_test"] == best["test"] and summary["best_valid"] == best["valid"]
    assert max(r["valid"]["recall@20"] for r in rows) == summary["best_valid"]["recall@20"]
    assert {"total", "bpr", "hcl", "reg"} == set(rows[0]["loss"]) and rows[0]["loss"]["hcl"] > 0
    assert os.listdir(workdir / "checkpoints")
    assert "epoch    0" in proc.stderr  # one log line per epoch
    assert "training synthetic_tiny (" in proc.stderr and "first epoch includes compiling" in proc.stderr


def test_cli_rejects_bad_input_with_one_line(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "broken.inter").write_text("userID\titemID\tx_label\n0\tx\t0\n")
    workdir = tmp_path / "wd"
    proc = cli("--dataset=broken", f"--data_dir={tmp_path}", f"--workdir={workdir}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path}/broken/broken.inter:2: itemID is 'x', expected a non-negative integer")
    assert "Traceback" not in proc.stderr and not workdir.exists()


@pytest.mark.parametrize("arg,message", [
    ("--config.bogus=1", "unknown config key 'bogus'"),
    ("--config.eval_noise=sometimes", "eval_noise is 'sometimes'"),
    ("--config.alpha=abc", "could not convert string to float"),
    ("--config.seed=-1", "error: config: seed is -1, expected 0 <= seed < 2**32"),
    ("--config.learning_rate=-1", "error: config: learning_rate is -1.0, expected > 0"),
    ("--config.n_ui_layers=100000", "must be 0 to 64 (each layer is unrolled into the compiled step)"),
    ("--config.tau=inf", "error: config: tau is inf, expected a finite number"),
    ("--config.learning_rate=nan", "error: config: learning_rate is nan, expected a finite number"),
])
def test_cli_rejects_bad_config(tmp_path, arg, message):
    proc = cli("--dataset=synthetic_tiny", f"--data_dir={tmp_path}", f"--workdir={tmp_path / 'wd'}", arg)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("args,message", [
    (("--config.kernel=ell", "--num_devices=2"),
     "error: kernel 'ell' runs on one device, and this run would use 2 device(s): set num_devices=1, or "
     "kernel=segment_sum for the multi-device step"),
    (("--num_devices=9",), "error: num_devices is 9, expected 0 (all) to 4 local devices"),
    (("--config.matmul_precision=TF32_TF32_F32_X3",),  # then JAX's reason, in its own words
     "error: matmul_precision 'TF32_TF32_F32_X3' does not run on this backend (cpu): "),
])
def test_cli_refuses_what_the_devices_cannot_run(synthetic_dir, tmp_path, args, message):
    proc = cli("--dataset=synthetic_tiny", f"--data_dir={synthetic_dir}", f"--workdir={tmp_path / 'wd'}", *args)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and (last == message or message.endswith(": ") and last.startswith(message)), \
        proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "wd").exists()


def tiny_config(**overrides):
    cfg = configs.for_dataset("synthetic_tiny")
    cfg.epochs, cfg.stopping_step = 5, 100
    cfg.update(overrides)
    return cfg


def test_resume_equals_uninterrupted_run(synthetic_dir, tmp_path):
    ds = load_dataset(synthetic_dir, "synthetic_tiny")
    straight = run_lib.train_and_evaluate(tiny_config(), ds, str(tmp_path / "a"))
    partial = run_lib.train_and_evaluate(tiny_config(), ds, str(tmp_path / "b"), stop_after_epochs=2)
    assert partial == {"status": "interrupted", "epoch": 2}
    resumed = run_lib.train_and_evaluate(tiny_config(), ds, str(tmp_path / "b"))
    assert strip_timing(resumed) == strip_timing(straight)
    assert strip_timing(read_jsonl(tmp_path / "a" / "metrics.jsonl")) == strip_timing(
        read_jsonl(tmp_path / "b" / "metrics.jsonl"))
    # Each row's time_s is the run's clock over both sessions: it covers the epoch's own train and
    # eval time, and the second session continues the first's clock.
    rows = read_jsonl(tmp_path / "b" / "metrics.jsonl")
    assert rows[0]["time_s"] >= rows[0]["train_s"] + rows[0]["eval_s"] - 1e-3  # time_s is rounded to 1 ms
    for before, after in zip(rows, rows[1:]):
        assert after["time_s"] - before["time_s"] >= after["train_s"] + after["eval_s"] - 2e-3, (before, after)


def test_workdir_with_other_setup_is_refused(synthetic_dir, tmp_path):
    ds = load_dataset(synthetic_dir, "synthetic_tiny")
    run_lib.train_and_evaluate(tiny_config(epochs=1), ds, str(tmp_path))
    with pytest.raises(workdir_lib.RunError, match=r"config.alpha: 0.3 -> 0.9; config.seed: 999 -> 1"):
        run_lib.train_and_evaluate(tiny_config(epochs=1, alpha=0.9, seed=1), ds, str(tmp_path))
    summary = run_lib.train_and_evaluate(tiny_config(epochs=1, alpha=0.9), ds, str(tmp_path), restart=True)
    assert summary["epochs_run"] == 1


def test_second_run_on_locked_workdir_is_refused(tmp_path):
    first = workdir_lib.Workdir(str(tmp_path))
    first.lock()
    try:
        with pytest.raises(workdir_lib.RunError, match="another run is using this workdir"):
            workdir_lib.Workdir(str(tmp_path)).lock()
    finally:
        first.unlock()
    workdir_lib.Workdir(str(tmp_path)).lock()  # free again once released


@pytest.mark.parametrize("eval_noise", ["off", "per_eval"])
def test_evaluation_is_invariant_to_block_size(synthetic_dir, eval_noise):
    ds = load_dataset(synthetic_dir, "synthetic_tiny")
    results = []
    for block in (7, 1000):
        exp = engine_lib.SingleEngine(tiny_config(eval_batch_size=block, eval_noise=eval_noise), ds)
        results.append(exp.evaluate_params(exp.init_state().params, epoch=0))
    assert results[0] == results[1]


def test_blocked_top_k_masks_training_items(synthetic_dir):
    ds = load_dataset(synthetic_dir, "synthetic_tiny")
    plan = evaluation.plan_split(ds.train, ds.valid, ds.n_users, ds.n_items, block_size=8)
    scores = np.tile(np.arange(ds.n_items, dtype=np.float32)[::-1], (8, 1))  # item 0 scores highest
    tops = np.asarray(evaluation.masked_top_k(jnp.asarray(scores), plan.mask_rows[0], plan.mask_cols[0]))
    train = set(map(tuple, ds.train.tolist()))
    for row, user in enumerate(plan.block_users[0]):
        ranked = [int(i) for i in tops[row] if i >= 0]
        assert sorted(ranked) == list(range(ds.n_items))  # a 45-item catalogue: every item, then -1 pads
        is_train = [(int(user), i) in train for i in ranked]
        assert is_train == sorted(is_train)  # training items rank after every other item
        assert sum(is_train) == len({i for u, i in train if u == user})


def test_tensorboard_events_follow_the_history(synthetic_dir, tmp_path):
    pytest.importorskip("tensorboardX", reason="the [tensorboard] extra is not installed")
    ds = load_dataset(synthetic_dir, "synthetic_tiny")
    run_lib.train_and_evaluate(tiny_config(epochs=2, tensorboard=True), ds, str(tmp_path))
    events = [f for f in os.listdir(tmp_path / "tensorboard") if f.startswith("events.out.tfevents")]
    assert len(events) == 1 and os.path.getsize(tmp_path / "tensorboard" / events[0]) > 0


def test_keys_added_since_a_run_started_do_not_block_its_resume(synthetic_dir, tmp_path):
    """A workdir written before a config key existed resumes when the key holds a value that does
    what the run did before (workdir.BEHAVIOUR_BEFORE_KEY), and is refused under any other value."""
    ds = load_dataset(synthetic_dir, "synthetic_tiny")

    def run_from_before_the_key(workdir):
        run_lib.train_and_evaluate(tiny_config(epochs=1), ds, str(workdir))
        path = workdir / "config.json"
        stored = json.loads(path.read_text())
        del stored["identity"]["config"]["eval_topk"]  # as written before config eval_topk existed
        path.write_text(json.dumps(stored))

    run_from_before_the_key(tmp_path / "a")
    with pytest.raises(workdir_lib.RunError, match=r"config.eval_topk: None -> 'approx'"):
        run_lib.train_and_evaluate(tiny_config(epochs=2, eval_topk="approx"), ds, str(tmp_path / "a"))
    summary = run_lib.train_and_evaluate(tiny_config(epochs=2, eval_topk="direct"), ds, str(tmp_path / "a"))
    assert summary["epochs_run"] == 2  # "direct": what the run did before the key existed
    run_from_before_the_key(tmp_path / "b")
    summary = run_lib.train_and_evaluate(tiny_config(epochs=2), ds, str(tmp_path / "b"))
    assert summary["epochs_run"] == 2  # the default "grouped" gives the same lists


def test_a_checkpoint_is_written_while_the_next_epoch_trains(synthetic_dir, tmp_path, monkeypatch):
    """Epoch e's save is still running when epoch e + 1's training starts (it waits for that), and
    epoch e's metrics line is written only once its checkpoint is committed."""
    import collections
    import threading

    ds = load_dataset(synthetic_dir, "synthetic_tiny")
    training = collections.defaultdict(threading.Event)
    overlapped, recorded = [], []
    real_run, real_save, real_record = engine_lib.SingleEngine.run_epoch, run_lib.RunStore.save, loop.ConfigRun.record

    def run_epoch(self, states, cfgs, batches, epoch, *args):
        training[epoch].set()
        return real_run(self, states, cfgs, batches, epoch, *args)

    def save(self, epochs_done, state, *args):
        if epochs_done <= 2:  # a synchronous save would wait here in vain: the next epoch starts after it
            overlapped.append(training[epochs_done].wait(timeout=30))
        real_save(self, epochs_done, state, *args)

    def record(self, row):
        recorded.append((row["epoch"], sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())))
        real_record(self, row)

    monkeypatch.setattr(engine_lib.SingleEngine, "run_epoch", run_epoch)
    monkeypatch.setattr(run_lib.RunStore, "save", save)
    monkeypatch.setattr(loop.ConfigRun, "record", record)
    summary = run_lib.train_and_evaluate(tiny_config(epochs=3), ds, str(tmp_path))
    assert overlapped == [True, True]
    assert [(epoch, epoch + 1 in steps) for epoch, steps in recorded] == [(0, True), (1, True), (2, True)]
    assert summary["epochs_run"] == 3 and len(read_jsonl(tmp_path / "metrics.jsonl")) == 3


def test_a_start_that_fails_on_its_data_leaves_no_workdir(tmp_path):
    """The sampler refuses data where a user has no negative item: the message names the dataset, and
    the workdir the run had just created is gone again."""
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "one.inter").write_text("userID\titemID\tx_label\n0\t0\t0\n1\t0\t0\n0\t0\t1\n1\t0\t2\n")
    workdir = tmp_path / "wd"
    proc = cli("--dataset=one", f"--data_dir={tmp_path}", f"--workdir={workdir}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'one'}: user 0 has every training item")
    assert not workdir.exists()


@pytest.mark.parametrize("content,message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "not a JSON object"),
])
def test_a_corrupt_config_json_is_reported_in_one_line(synthetic_dir, tmp_path, content, message):
    workdir = tmp_path / "wd"
    workdir.mkdir()
    (workdir / "config.json").write_text(content)
    proc = cli("--dataset=synthetic_tiny", f"--data_dir={synthetic_dir}", f"--workdir={workdir}")
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert last.startswith(f"error: {workdir / 'config.json'}: {message}") and "--restart" in last
    assert (workdir / "config.json").read_text() == content  # refused, not overwritten


def test_an_empty_workdir_flag_is_refused(tmp_path):
    proc = cli("--dataset=synthetic_tiny", f"--data_dir={tmp_path}", "--workdir=", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        "error: --workdir is empty; give a directory, or leave the flag out for runs/<dataset>")
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_ctrl_c_ends_a_run_in_one_line(synthetic_dir, tmp_path):
    # A background job's children inherit an ignored SIGINT, and Python then raises no KeyboardInterrupt:
    # the launcher restores Python's handler, as a terminal's foreground process has it.
    launcher = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                "sys.argv = ['lgmrec_jax.train'] + sys.argv[1:]; runpy.run_module('lgmrec_jax.train', "
                "run_name='__main__')")
    proc = subprocess.Popen([sys.executable, "-c", launcher, "--dataset=synthetic_tiny",
                             f"--data_dir={synthetic_dir}", f"--workdir={tmp_path / 'wd'}", "--config.epochs=3000",
                             "--config.stopping_step=3000"], cwd=REPO, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:  # interrupt once the run is training
        seen.append(line)
        if "epoch    2" in line:
            proc.send_signal(signal.SIGINT)
            break
    try:
        _, rest = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 130, "".join(seen) + rest
    assert "Traceback" not in rest and rest.strip().splitlines()[-1] == (
        "error: interrupted; the newest checkpoint is intact: rerun the same command to resume")


def test_an_unusable_compilation_cache_is_reported_and_skipped(tmp_path, monkeypatch):
    from absl import logging as absl_logging

    from lgmrec_jax import compile_cache

    warnings = []
    monkeypatch.setattr(absl_logging, "warning", lambda fmt, *args: warnings.append(fmt % args))
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert compile_cache.enable(str(blocker / "xla")) is None
    assert warnings == [f"{blocker / 'xla'}: cannot hold JAX's compilation cache (Not a directory); "
                        "compiling without it"]


def test_restart_refuses_a_workdir_holding_files_no_run_wrote(synthetic_dir, tmp_path):
    """--restart deletes a run's own files (temporary ones included) and nothing else: a --workdir
    pointed at a directory with other files in it is refused before anything is deleted."""
    workdir = tmp_path / "project"
    (workdir / "src").mkdir(parents=True)
    (workdir / "src" / "model.py").write_text("code\n")
    (workdir / "notes.txt").write_text("mine\n")
    args = ("--dataset=synthetic_tiny", f"--data_dir={synthetic_dir}", f"--workdir={workdir}", "--restart",
            "--config.epochs=1")
    proc = cli(*args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {workdir}: --restart deletes only what a run wrote there, and it also holds notes.txt, src; "
        f"move those away or choose another --workdir")
    assert sorted(os.listdir(workdir)) == ["notes.txt", "src"]  # nothing deleted, nothing written
    assert (workdir / "src" / "model.py").read_text() == "code\n"

    (workdir / "notes.txt").unlink()
    (workdir / "src" / "model.py").unlink()
    (workdir / "src").rmdir()
    assert cli(*args).returncode == 0
    (workdir / "tensorboard").mkdir()
    for leftover in ("curves.png", "curves.png.tmp.png", "metrics.jsonl.tmp", ".write-probe-12"):
        (workdir / leftover).write_text("x")
    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(os.listdir(workdir)) == [".lock", "checkpoints", "config.json", "metrics.jsonl", "summary.json"]
    assert len(read_jsonl(workdir / "metrics.jsonl")) == 1


def test_a_run_is_not_shortened_by_a_smaller_epochs(synthetic_dir, tmp_path):
    ds = load_dataset(synthetic_dir, "synthetic_tiny")
    run_lib.train_and_evaluate(tiny_config(epochs=3, stopping_step=100), ds, str(tmp_path))
    config_before = (tmp_path / "config.json").read_text()
    with pytest.raises(workdir_lib.RunError, match=r"holds a run of 3 epochs, more than epochs=2: a run is not "
                                               r"shortened; ask for 3 or more, or use --restart"):
        run_lib.train_and_evaluate(tiny_config(epochs=2, stopping_step=100), ds, str(tmp_path))
    assert (tmp_path / "config.json").read_text() == config_before
    assert run_lib.train_and_evaluate(tiny_config(epochs=3, stopping_step=100), ds, str(tmp_path))["epochs_run"] == 3


def test_identity_differences_say_how_a_dataset_file_changed():
    old = {"dataset": "d", "config": {}, "dataset_files": {"a.inter": "1", "image_feat.npy": "2", "t.npy": "3"}}
    new = {"dataset": "d", "config": {}, "dataset_files": {"a.inter": "1", "t.npy": "4", "text_feat.npy": "5"}}
    assert workdir_lib.identity_differences(old, new) == [
        "dataset file image_feat.npy is gone", "dataset file t.npy changed (sha256)",
        "dataset file text_feat.npy is new"]
