"""The benchmark harness (experiments/bench.py): a smoke run on synthetic_tiny and its report files.

No timing thresholds: only that the documented fields exist and hold positive numbers.
"""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from experiments import bench


def positive(x):
    return isinstance(x, (int, float)) and x > 0


def test_smoke_run_writes_json_and_markdown(synthetic_dir, tmp_path):
    settings = bench.Settings(presets=("tiny",), epochs_to_time=1, eval_repeats=1, isolate=False,
                              out=str(tmp_path), tag="smoke", data_dir=synthetic_dir)
    bench.run_benchmark(settings, argv=["python -m experiments.bench", "--presets=tiny"])

    report = json.loads((tmp_path / "bench_smoke.json").read_text())
    machine = report["machine"]
    assert machine["backend"] and machine["versions"]["jax"] and positive(machine["cpu_count"])
    (run,) = report["runs"]
    assert run["command"].startswith("python -m experiments.bench") and run["finished"]
    (result,) = report["results"]
    assert "error" not in result
    for field in bench.RESULT_FIELDS:
        assert field in result, field
    assert result["dataset"] == "synthetic_tiny" and result["kernel"] == "segment_sum"
    for field in ("n_users", "n_items", "n_train", "n_batches", "setup_s", "first_epoch_s", "epoch_s",
                  "steps_per_s", "eval_s", "eval_first_s"):
        assert positive(result[field]), (field, result[field])
    assert positive(result["compile"]["compile_s"]) and positive(result["compile"]["trace_lower_s"])
    assert len(result["epoch_times_s"]) == 1 and all(map(positive, result["epoch_times_s"]))
    assert len(result["eval_times_s"]) == 1 and all(map(positive, result["eval_times_s"]))
    assert result["sampler_s"] >= 0 and result["eval_compile_s"] >= 0
    assert positive(result["memory"]["peak_rss_mb"])

    table = (tmp_path / "bench_smoke.md").read_text()
    assert "| dataset | users | items |" in table
    assert "| synthetic_tiny | 60 | 45 |" in table
    assert machine["cpu"] in table and f"jax {machine['versions']['jax']}" in table


def test_scaled_preset_names_and_sizes():
    settings = bench.Settings(presets=("baby",), scales=(0.5, 2.0), scaled=((0.2, 0.8),), feature_dims=(64, 32))
    assert bench.dataset_names(settings) == ["synthetic_baby", "synthetic_clothing_x0.5_f64-32",
                                             "synthetic_clothing_x2_f64-32", "synthetic_clothing_c0.2_e0.8_f64-32"]
    assert bench.parse_scaled("synthetic_clothing_x0.25") == (0.25, 0.25, None)
    assert bench.parse_scaled("synthetic_clothing_x2_f64-32") == (2.0, 2.0, (64, 32))
    assert bench.parse_scaled("synthetic_clothing_c0.2_e0.8") == (0.2, 0.8, None)
    assert bench.parse_scaled("synthetic_baby") is None and bench.parse_scaled("synthetic_clothing_x") is None
    preset = bench.scaled_preset(bench.Scaled(0.5, 0.5, (64, 32)))
    assert (preset.n_users, preset.n_items, preset.n_interactions) == (19694, 11516, 139338)
    assert (preset.image_dim, preset.text_dim) == (64, 32)
    preset = bench.scaled_preset(bench.parse_scaled("synthetic_clothing_c0.5_e0.25"))
    assert (preset.n_users, preset.n_items, preset.n_interactions) == (19694, 11516, 69669)
    with pytest.raises(ValueError):
        bench.dataset_names(bench.Settings(presets=("nope",)))


def test_eval_topk_is_an_axis_of_the_comparison():
    settings = bench.Settings(presets=("tiny",), kernels=("segment_sum", "bcoo"), eval_topks=("direct", "grouped"))
    got = [(s["kernel"], s["eval_topk"]) for s in bench.specs(settings)]
    assert got == [("segment_sum", "direct"), ("segment_sum", "grouped"), ("bcoo", "direct"), ("bcoo", "grouped")]
    assert bench.kernels({"kernel": "bcoo", "eval_topk": "grouped"}) == "bcoo, grouped top-k"
    assert bench.kernels({"kernel": "bcoo"}) == "bcoo"  # results recorded before the option existed


def test_isolated_workers_keep_the_callers_gpu_preallocation(monkeypatch):
    """The coordinating process allocates on demand; its workers see the caller's setting (unset here,
    i.e. JAX's preallocation), so the worker's device memory is a user's run's."""
    monkeypatch.setenv(bench.PREALLOCATE, "recorded")  # so that teardown restores the real value
    monkeypatch.delenv(bench.PREALLOCATE)
    monkeypatch.setattr(bench, "WORKER_ENV", {})
    bench.keep_coordinator_off_the_pool()
    assert bench.os.environ[bench.PREALLOCATE] == "false"
    assert bench.PREALLOCATE not in bench.WORKER_ENV
    assert bench.WORKER_ENV["PATH"] == bench.os.environ["PATH"]

    monkeypatch.setenv(bench.PREALLOCATE, "true")
    monkeypatch.setattr(bench, "WORKER_ENV", {})
    bench.keep_coordinator_off_the_pool()
    assert (bench.os.environ[bench.PREALLOCATE], bench.WORKER_ENV[bench.PREALLOCATE]) == ("false", "true")


def test_run_timeline_from_metrics_rows():
    rows = [{"time_s": 30.0, "train_s": 20.0, "eval_s": 1.0},  # 9 s before epoch 0; its train has the compile
            {"time_s": 32.5, "train_s": 2.0, "eval_s": 0.4},  # 0.1 s between epochs
            {"time_s": 35.0, "train_s": 2.0, "eval_s": 0.2},  # 0.3 s
            {"time_s": 37.2, "train_s": 2.0}]  # no evaluation this epoch: 0.2 s
    assert bench.run_timeline(rows) == {"before_first_epoch_s": 9.0, "first_epoch_train_s": 20.0,
                                        "host_between_epochs_s": 0.2}
    assert bench.run_timeline([{"train_s": 1.0, "eval_s": 0.1}]) == {}  # rows from before time_s


def test_kernel_column_names_xla_flags_but_not_the_fake_device_count():
    row = {"kernel": "ell", "eval_topk": "grouped",
           "xla_flags": "--xla_force_host_platform_device_count=4 --xla_gpu_autotune_level=0"}
    assert bench.kernels(row) == "ell, grouped top-k, XLA_FLAGS=--xla_gpu_autotune_level=0"
    assert bench.kernels(dict(row, xla_flags="--xla_force_host_platform_device_count=4")) == "ell, grouped top-k"
    assert bench.kernels({"kernel": "bcoo"}) == "bcoo"  # results recorded before either field existed


def test_run_isolated_starts_workers_with_the_callers_environment(monkeypatch):
    seen = {}

    def fake_run(cmd, cwd, env):
        seen["env"] = env
        return bench.subprocess.CompletedProcess(cmd, 1)

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    monkeypatch.setattr(bench, "WORKER_ENV", {"XLA_PYTHON_CLIENT_PREALLOCATE": "true", "PATH": "/bin"})
    result = bench.run_isolated({"dataset": "d", "kernel": "segment_sum", "precision": "highest",
                                 "eval_topk": "grouped"})
    assert result["error"] == "worker exited with 1"
    assert seen["env"] == {"XLA_PYTHON_CLIENT_PREALLOCATE": "true", "PATH": "/bin"}


def test_appended_runs_name_a_different_machine():
    header = {"device_kind": "NVIDIA H100 80GB HBM3", "versions": {"jax": "0.11.2", "flax": "0.12.10"}}
    same = {"device": "NVIDIA H100 80GB HBM3", "versions": {"jax": "0.11.2", "flax": "0.12.10"}}
    other = {"device": "NVIDIA H200", "versions": {"jax": "0.11.3", "flax": "0.12.10"}}
    assert bench.run_machine_note(same, header) == ""
    assert bench.run_machine_note(other, header) == " [on NVIDIA H200; jax 0.11.3]"
    assert bench.run_machine_note({}, header) == ""  # runs recorded before runs named their machine


def test_proxy_comparison_uses_the_latest_default_row():
    row = lambda run, epoch, eval_s, **kw: {"run": run, "dataset": "synthetic_baby", "kernel": "segment_sum",
                                            "matmul_precision": "highest", "eval_topk": "grouped", "patches": [],
                                            "epoch_s": epoch, "eval_s": eval_s, **kw}
    report = {"results": [row(0, 12.0, 1.2), row(1, 8.0, 0.5, kernel="ell"), row(2, 10.0, 1.0),
                          row(3, 5.0, 0.4, patches=["infonce_vmap"]), row(4, 9.0, 0.9, matmul_precision="default")]}
    proxy = {"command": "python -m experiments.torch_proxy", "started": "t", "machine": {"cpu": "AMD EPYC"},
             "results": [{"dataset": "synthetic_baby", "epoch_s": 45.0, "eval_s": 2.8},
                         {"dataset": "synthetic_clothing", "epoch_s": 200.0, "eval_s": 9.0}]}
    lines = bench.proxy_markdown(report, proxy)
    assert lines[-1] == "| synthetic_baby | 45 | 10 | 4.5x | 2.8 | 1 | 2.8x | 2 |"
    assert not any("synthetic_clothing" in line for line in lines)  # no row of ours to compare with
    assert bench.proxy_markdown({"results": []}, proxy) == []


def test_topk_bench_checks_every_method_against_direct():
    from experiments import topk_bench

    rows = topk_bench.measure(n_items=700, rows=60, chunk=32, methods=topk_bench.METHODS, repeats=1)
    assert [r["method"] for r in rows] == list(topk_bench.METHODS)
    assert rows[0]["rows"] == 64  # rounded up to whole chunks
    assert [r["same_as_direct"] for r in rows] == [None, True, True, True]
    report = {"command": "python -m experiments.topk_bench", "started": "now", "results": rows,
              "machine": {"backend": "cpu", "cpu": "test", "cpu_count": 2, "versions": {"jax": "x"},
                          "git": {"commit": "0" * 40}}}
    table = topk_bench.markdown(report)
    assert "| 700 | 64 | 32 | grouped_pruned |" in table and "**no**" not in table


def test_evaluation_patches_restore_the_previous_behaviour_and_undo():
    import jax
    import numpy as np

    from lgmrec_jax import evaluation

    x = np.random.default_rng(0).normal(size=(8, 997)).astype(np.float32)
    assert "cond[" in str(jax.make_jaxpr(lambda s: evaluation.grouped_top_k(s, 50))(x))  # CPU: pruned
    calls = []
    record = lambda i: calls.append(i) or i
    try:
        bench.PATCHES["unpruned_top_k"]()
        bench.PATCHES["wait_each_split"]()
        assert "cond[" not in str(jax.make_jaxpr(lambda s: evaluation.grouped_top_k(s, 50))(x))
        np.testing.assert_array_equal(np.asarray(evaluation.grouped_top_k(x, 50)), np.asarray(jax.lax.top_k(x, 50)[1]))
        splits = evaluation.map_splits(record, 3, concurrent=False)
        assert next(splits) == 0 and calls == [0]  # waited for before the next is dispatched
    finally:
        bench.undo_patches()
    assert "cond[" in str(jax.make_jaxpr(lambda s: evaluation.grouped_top_k(s, 50))(x))
    calls.clear()
    assert next(evaluation.map_splits(record, 3, concurrent=False)) == 0 and calls == [0, 1, 2]


def bench_cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "experiments.bench", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("args,message", [
    (["--presets=nope"], "--presets=nope: unknown; expected one of ['tiny', 'default', 'baby', 'sports', 'clothing']"),
    (["--scales=abc"], "--scales=abc: expected float values"),
    (["--scales=0"], "--scales=0: expected positive values"),
    (["--feature_dims=a,b", "--scales=1"], "--feature_dims=a,b: expected IMAGE,TEXT positive widths"),
    (["--kernel=foo"], "--kernel=foo: unknown; expected one of ['segment_sum', 'bcoo', 'ell']"),
    (["--epochs_to_time=abc"], "bad flag: flag --epochs_to_time=abc: invalid literal for int()"),
    (["--eval_repeats=-1"], "--eval_repeats must be >= 0 (0 skips evaluation)"),
    (["--out=OUT/afile"], "--out=OUT/afile: OUT/afile is a file, expected a directory (or a path to create)"),
    (["--out=OUT", "--append"], "OUT/bench_cpu.json: not valid JSON (Expecting value: line 2 column 1 (char 11)); "
                                "--append adds to it: repair or move it"),
    (["--matmul_precision=TF32_TF32_F32_X3"], "matmul_precision 'TF32_TF32_F32_X3' does not run on this backend (cpu)"),
])
def test_cli_refuses_what_it_cannot_measure_before_measuring(tmp_path, args, message):
    """One line, exit 2, before the first configuration: nothing generated, nothing written."""
    (tmp_path / "afile").write_text("x")
    (tmp_path / "bench_cpu.json").write_text('{"runs": [\n')
    args = [a.replace("OUT", str(tmp_path)) for a in args]
    proc = bench_cli("--presets=tiny", f"--data_dir={tmp_path / 'data'}", f"--out={tmp_path / 'out'}", *args)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert last.startswith("error: " + message.replace("OUT", str(tmp_path))), last
    assert sorted(os.listdir(tmp_path)) == ["afile", "bench_cpu.json"]
    assert (tmp_path / "bench_cpu.json").read_text() == '{"runs": [\n'


def test_a_run_whose_every_configuration_failed_says_why_and_exits_1(tmp_path):
    (tmp_path / "data" / "synthetic_tiny").mkdir(parents=True)
    (tmp_path / "data" / "synthetic_tiny" / "synthetic_tiny.inter").write_text("userID\titemID\tx_label\n0\tx\t0\n")
    proc = bench_cli("--presets=tiny", f"--data_dir={tmp_path / 'data'}", f"--out={tmp_path / 'out'}")
    assert proc.returncode == 1
    cause = (f"DatasetError: {tmp_path}/data/synthetic_tiny/synthetic_tiny.inter:2: itemID is 'x', expected a "
             f"non-negative integer")
    assert proc.stderr.strip().splitlines()[-1] == f"error: synthetic_tiny (segment_sum, highest): worker exited with 1: {cause}"
    (result,) = json.loads((tmp_path / "out" / "bench_cpu.json").read_text())["results"]
    assert result["error"] == f"worker exited with 1: {cause}"


@pytest.mark.parametrize("args,message", [
    (["--items=abc"], "error: --items=abc: expected integer catalogue widths"),
    (["--items=20"], "error: --items must be at least k=50 wide, --rows, --chunk and --repeats at least 1"),
    (["--rows=0"], "error: --items must be at least k=50 wide, --rows, --chunk and --repeats at least 1"),
    (["--methods=foo"], "error: --methods: 'foo' is not one of ['scores', 'direct', 'grouped', 'grouped_pruned']"),
    (["--out=FILE"], "error: --out=FILE: FILE is a file, expected a directory (or a path to create)"),
])
def test_topk_bench_refuses_bad_flags_in_one_line(tmp_path, args, message):
    (tmp_path / "FILE").write_text("x")
    args = [a.replace("FILE", str(tmp_path / "FILE")) for a in args]
    proc = subprocess.run([sys.executable, "-m", "experiments.topk_bench", f"--out={tmp_path / 'out'}", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == message.replace("FILE", str(tmp_path / "FILE"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FILE"]


def test_an_existing_report_is_refused_without_append(tmp_path):
    (tmp_path / "bench_cpu.json").write_text('{"runs": [], "results": []}\n')
    proc = bench_cli("--presets=tiny", f"--data_dir={tmp_path / 'data'}", f"--out={tmp_path}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'bench_cpu.json'} exists: --append adds this command's results to it; for a new "
        f"report pass another --tag or --out, or move it away")
    assert (tmp_path / "bench_cpu.json").read_text() == '{"runs": [], "results": []}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench_cpu.json"]
