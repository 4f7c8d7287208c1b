"""The golden vectors of the authors' PyTorch code replay within tolerance, and the checker can fail."""

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, shared_path
from lgmrec_jax import parity


@pytest.mark.parametrize("name", ["lgmrec_fixed.npz", "lgmrec_legacy.npz"])
@pytest.mark.parametrize("kernel", ["segment_sum", "bcoo", "ell"])
def test_golden_replays(name, kernel):
    ok, table = parity.run(shared_path("golden", name), kernel)
    assert ok, table
    assert "0 failed" in table


def test_cli_exits_zero_on_golden():
    golden = shared_path("golden", "lgmrec_fixed.npz")
    proc = subprocess.run([sys.executable, "-m", "lgmrec_jax.parity", f"--golden={golden}"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "loss/hcl" in proc.stdout and "PASS" in proc.stdout
    assert proc.stdout.startswith(f"# {golden}: kernel segment_sum, matmul precision highest\n")


def test_cli_refuses_a_precision_the_backend_cannot_run():
    golden = shared_path("golden", "lgmrec_fixed.npz")
    proc = subprocess.run([sys.executable, "-m", "lgmrec_jax.parity", f"--golden={golden}",
                           "--matmul_precision=TF32_TF32_F32_X3"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 2 and not proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == (
        "parity: matmul_precision 'TF32_TF32_F32_X3' does not run on this backend (cpu): The precision "
        "'TF32_TF32_F32_X3' is not supported by dot_general on CPU")


def test_variant_mismatch_fails(tmp_path):
    """Replaying the fixed golden as if it were legacy must fail: the checker is not vacuous."""
    golden = parity.load_golden(shared_path("golden", "lgmrec_fixed.npz"))
    golden["config/legacy_text_user_hyper"] = np.array(1)
    path = tmp_path / "swapped.npz"
    np.savez(path, **golden)
    ok, table = parity.run(str(path))
    assert not ok
    failed = [line.split()[0] for line in table.splitlines() if "FAIL" in line]
    assert "train/hyper_v_user" in failed and "loss/hcl" in failed


def test_cli_reports_missing_golden(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lgmrec_jax.parity", f"--golden={tmp_path / 'nope.npz'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "nope.npz" in proc.stderr and "Traceback" not in proc.stderr
