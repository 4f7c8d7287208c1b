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
    assert last.startswith("error: matmul_precision 'TF32_TF32_F32_X3' does not run on this backend (cpu): ")


def cli(*args, env=None):
    """The parity command with JAX's backend probe as a user gets it (no JAX_PLATFORMS from conftest)."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"} if env is None else env
    return subprocess.run([sys.executable, "-m", "lgmrec_jax.parity", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=env)


def assert_one_line_error(proc, prefix, *parts):
    assert proc.returncode == 2 and not proc.stdout, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "Unable to initialize backend" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(prefix) and all(p in last for p in parts), last


def broken_golden(tmp_path, breakage: str) -> str:
    path = tmp_path / f"{breakage}.npz"
    if breakage == "not_zip":
        path.write_text("userID\titemID\n0\t1\n")
        return str(path)
    if breakage == "truncated":
        np.savez(path, a=np.arange(1000.0))
        path.write_bytes(path.read_bytes()[:3000])  # a kill during the copy: no zip directory at the end
        return str(path)
    g = parity.load_golden(shared_path("golden", "lgmrec_fixed.npz"))
    if breakage == "missing_key":
        del g["loss/hcl"]
    elif breakage == "param_shape":
        g["param/v_proj"] = g["param/v_proj"][:, :10]
    elif breakage == "output_shape":
        g["train/user_out"] = g["train/user_out"][:10]
    elif breakage == "noise_shape":
        g["train/gumbel/v_item"] = g["train/gumbel/v_item"][:10]
    elif breakage == "id_range":
        g["batch/pos"] = g["batch/pos"] + 1000
    np.savez(path, **g)
    return str(path)


BROKEN = {
    "not_zip": "not a golden file (expected an .npz archive)",
    "truncated": "cannot read golden file (File is not a zip file)",
    "missing_key": "not a complete golden file: missing loss/hcl",
    "param_shape": "param/v_proj has shape (96, 10), expected (96, 64)",
    "output_shape": "train/user_out has shape (10, 64), expected (48, 64)",
    "noise_shape": "train/gumbel/v_item has shape (10, 4), expected (80, 4)",
    "id_range": "batch/pos holds ids outside [0, 80)",
}


@pytest.mark.parametrize("breakage", sorted(BROKEN))
def test_broken_golden_is_one_error_naming_the_file(tmp_path, breakage):
    path = broken_golden(tmp_path, breakage)
    with pytest.raises(parity.GoldenError) as err:
        parity.run(path)
    assert str(err.value).startswith(f"{path}: {BROKEN[breakage]}"), str(err.value)


@pytest.mark.parametrize("breakage", ["truncated", "missing_key", "param_shape"])
def test_cli_broken_golden_exits_2_with_one_line(tmp_path, breakage):
    path = broken_golden(tmp_path, breakage)
    assert_one_line_error(cli(f"--golden={path}"), f"error: {path}: ", BROKEN[breakage])


def test_cli_bad_flag_exits_2_with_one_line():
    assert_one_line_error(cli("--matmul_precision=bogus"), "error: bad flag: ", "--matmul_precision=bogus")
    assert_one_line_error(cli("--golden"), "error: bad flag: ", "--golden")


def test_replay_shape_error_is_reported_as_not_matching_the_model(tmp_path, monkeypatch):
    """Should a golden pass load_golden's checks and still not fit the model, run() names the file."""
    path = broken_golden(tmp_path, "param_shape")
    monkeypatch.setattr(parity, "check_golden", lambda g, path: None)
    with pytest.raises(parity.GoldenError, match=r"param_shape\.npz: does not match the model its config "
                                                 r"describes \(For parameter \"v_proj\""):
        parity.run(path)
