"""experiments/torch_proxy.py: the PyTorch cost proxy computes the reference's model (goldens) and times it."""

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, shared_path
from experiments import torch_proxy
from lgmrec_jax import parity
from lgmrec_jax.data import DatasetError


def test_missing_torch_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    with pytest.raises(DatasetError, match=r"torch is not installed: pip install -e '\.\[proxy\]'"):
        torch_proxy._torch()


@pytest.mark.parametrize("name", ["lgmrec_fixed.npz", "lgmrec_legacy.npz"])
def test_proxy_replays_the_goldens(name):
    pytest.importorskip("torch", reason="torch is an optional extra ([proxy]); the proxy needs it")
    rows = torch_proxy.replay_golden(shared_path("golden", name))
    assert all(r.passed for r in rows), parity.format_rows(rows)
    names = {r.name for r in rows}
    assert {"loss/hcl", "grad/v_hyper", "adam1/item_emb", "metrics_test/top50", "metrics_valid/ndcg@20"} <= names


def test_proxy_replay_can_fail(tmp_path):
    """The fixed golden replayed as the legacy variant must fail: the comparison is not vacuous."""
    pytest.importorskip("torch", reason="torch is an optional extra ([proxy]); the proxy needs it")
    golden = parity.load_golden(shared_path("golden", "lgmrec_fixed.npz"))
    golden["config/legacy_text_user_hyper"] = np.array(1)
    path = tmp_path / "swapped.npz"
    np.savez(path, **golden)
    failed = [r.name for r in torch_proxy.replay_golden(str(path)) if not r.passed]
    assert "train/hyper_v_user" in failed and "loss/hcl" in failed


def test_timing_run_writes_its_report(tmp_path, synthetic_dir):
    pytest.importorskip("torch", reason="torch is an optional extra ([proxy]); the proxy needs it")
    proc = subprocess.run([sys.executable, "-m", "experiments.torch_proxy", "--datasets=synthetic_tiny",
                           f"--data_dir={synthetic_dir}", "--epochs_to_time=1", "--eval_repeats=1",
                           f"--out={tmp_path}", "--tag=t"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "torch_proxy_t.json").read_text())
    (result,) = report["results"]
    assert result["dataset"] == "synthetic_tiny" and len(result["epoch_times_s"]) == 2
    assert len(result["eval_times_s"]) == 2 and result["eval_s"] == result["eval_times_s"][1]
    assert all(np.isfinite(result["epoch_losses"]))
    assert set(result["last_metrics"]) == {"valid", "test"}
    assert 0.0 <= result["last_metrics"]["valid"]["recall@20"] <= 1.0
    assert "| synthetic_tiny |" in (tmp_path / "torch_proxy_t.md").read_text()


def test_unknown_dataset_is_one_line(tmp_path):
    pytest.importorskip("torch", reason="torch is an optional extra ([proxy]); the proxy needs it")
    proc = subprocess.run([sys.executable, "-m", "experiments.torch_proxy", "--datasets=nonexistent",
                           f"--data_dir={tmp_path}", f"--out={tmp_path}"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("torch_proxy_*"))


@pytest.mark.parametrize("args,message", [
    (["--epochs_to_time=0"], "error: --epochs_to_time and --eval_repeats must be at least 1 (the medians of the timed calls)"),
    (["--eval_repeats=0"], "error: --epochs_to_time and --eval_repeats must be at least 1 (the medians of the timed calls)"),
    (["--out=FILE"], "error: --out=FILE: FILE is a file, expected a directory (or a path to create)"),
    (["extra"], "error: unexpected arguments ['extra']; every input is a --flag"),
    (["--bogus"], "error: bad flag: Unknown command line flag 'bogus'"),
])
def test_bad_flags_are_one_line_before_any_timing(tmp_path, args, message):
    (tmp_path / "FILE").write_text("x")
    args = [a.replace("FILE", str(tmp_path / "FILE")) for a in args]
    proc = subprocess.run([sys.executable, "-m", "experiments.torch_proxy", "--datasets=synthetic_tiny",
                           f"--data_dir={tmp_path / 'data'}", f"--out={tmp_path / 'out'}", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == message.replace("FILE", str(tmp_path / "FILE"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FILE"]
