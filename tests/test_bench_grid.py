"""experiments/bench_grid.py: what it refuses before measuring, and how it records several invocations."""

import subprocess
import sys

import pytest

from conftest import REPO
from experiments import bench_grid


def cli(*args):
    return subprocess.run([sys.executable, "-m", "experiments.bench_grid", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("args,message", [
    (["--sizes=abc"], "--sizes=abc and --device_counts=1,2,4: expected integers"),
    (["--epochs=0"], "--sizes, --device_counts, --epochs, --seed_check_epochs, --device_configs and "
                     "--nominal_epochs must be >= 1"),
    (["--batchings=map,foo"], "--batchings=foo: unknown; expected one of ['map', 'vmap', 'vmap_columns']"),
    (["--dataset=nope"], "TMP/data/nope: dataset directory not found"),
    (["--out=TMP/afile"], "--out=TMP/afile: TMP/afile is a file, expected a directory (or a path to create)"),
    (["--out=TMP"], "TMP/bench_grid_cpu.json: not valid JSON (Expecting value: line 2 column 1 (char 6)); this "
                    "command adds to it: repair or move it"),
])
def test_cli_refuses_before_measuring(tmp_path, args, message):
    (tmp_path / "data").mkdir()
    (tmp_path / "afile").write_text("x")
    (tmp_path / "bench_grid_cpu.json").write_text('{"a":\n')
    args = [a.replace("TMP", str(tmp_path)) for a in args]
    proc = cli("--dataset=synthetic_tiny", f"--data_dir={tmp_path / 'data'}", f"--out={tmp_path / 'out'}", *args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: " + message.replace("TMP", str(tmp_path)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "bench_grid_cpu.json", "data"]
    assert (tmp_path / "bench_grid_cpu.json").read_text() == '{"a":\n'
    assert not any((tmp_path / "data").iterdir())  # nothing generated either


def test_a_section_from_another_invocation_names_its_own_machine():
    def machine(git):
        return {"backend": "cpu", "cpu": "c", "affinity": 2, "cpu_count": 2, "device_kind": "cpu",
                "devices": ["d"], "jax": "j", "flax": "f", "optax": "o", "git": git}

    check = {"batching": "map", "dataset": "d", "epochs": 1, "command": "c", "load": {"loadavg_at_start": [0, 0, 0]},
             "groups": 1, "grid_wall_s": 1, "singles_wall_s": 2, "all_summaries_equal": True,
             "max_loss_rel_diff": 0.0, "max_metric_abs_diff": 0.0, "per_seed": [], "machine": machine("older")}
    md = bench_grid.markdown({"machine": machine("newer"), "seed_check_map": check})
    assert md.count("commit newer") == 1 and md.count("commit older") == 1
    assert md.index("commit older") > md.index("## Seed check")


def test_importing_bench_grid_defines_no_global_flags():
    from absl import flags

    assert "sizes" not in flags.FLAGS and "seed_check" not in flags.FLAGS
