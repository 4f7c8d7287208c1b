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


def test_cli_refuses_a_precision_the_backend_cannot_run(tmp_path):
    """Refused before the golden is read (so any path will do), in one line after the project's prefix."""
    proc = subprocess.run([sys.executable, "-m", "lgmrec_jax.parity", f"--golden={tmp_path / 'any.npz'}",
                           "--matmul_precision=TF32_TF32_F32_X3"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 2 and not proc.stdout and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("parity: matmul_precision 'TF32_TF32_F32_X3' does not run on this backend (cpu): ")
