"""Matmul precisions: the dot algorithms reach every product of the step, backends refuse what they
cannot run, and the CPU emulation of the accelerators' algorithms (experiments/precision_emulation.py)
computes what those algorithms compute."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, shared_path
from experiments import precision_emulation as emulation
from lgmrec_jax import configs, graph as graph_lib, engine as engine_lib, losses, parity, step as step_lib
from test_model import small_config, toy_dataset


def tf32_reference(x: np.ndarray) -> np.ndarray:
    """Round to 11 significant bits, ties away from zero, in float64 (independent of the bit trick)."""
    mantissa, exponent = np.frexp(x.astype(np.float64))  # |mantissa| in [0.5, 1)
    rounded = np.sign(mantissa) * np.floor(np.abs(mantissa) * 2.0**11 + 0.5) / 2.0**11
    return np.ldexp(rounded, exponent).astype(np.float32)


def test_tf32_rounding_by_hand_and_against_float64():
    ulp = np.float32(2.0**-10)  # TF32's spacing at 1
    x = np.array([1.0, 1 + ulp / 2, -(1 + ulp / 2), 1 + ulp / 2 - 2**-23, 1 + 3 * ulp / 4, 0.0], np.float32)
    want = np.array([1.0, 1 + ulp, -(1 + ulp), 1.0, 1 + ulp, 0.0], np.float32)  # ties away from zero
    np.testing.assert_array_equal(np.asarray(emulation.round_tf32(jnp.asarray(x))), want)
    rng = np.random.default_rng(0)
    values = (rng.standard_normal(100_000) * 10.0 ** rng.integers(-20, 20, 100_000)).astype(np.float32)
    got = np.asarray(emulation.round_tf32(jnp.asarray(values)))
    np.testing.assert_array_equal(got, tf32_reference(values))


@pytest.fixture(scope="module")
def operands():
    rng = np.random.default_rng(1)
    return rng.standard_normal((64, 4096)).astype(np.float32), rng.standard_normal((4096, 32)).astype(np.float32)


def emulated_product(precision, a, b, as_backend=None):
    with emulation.emulating_dot_algorithms(as_backend), jax.default_matmul_precision(precision):
        return np.asarray(jax.jit(jnp.matmul)(a, b)).astype(np.float64)


def bf16_reference(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, jnp.bfloat16).astype(np.float32)  # numpy's (ml_dtypes') rounding, not XLA's


@pytest.mark.parametrize("precision,rounded", [("TF32_TF32_F32", tf32_reference), ("BF16_BF16_F32", bf16_reference)])
def test_one_pass_multiplies_the_rounded_operands(operands, precision, rounded):
    a, b = operands
    want = rounded(a).astype(np.float64) @ rounded(b).astype(np.float64)
    got = emulated_product(precision, a, b)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() / scale < 2e-6  # only float32 accumulation apart
    exact = a.astype(np.float64) @ b.astype(np.float64)
    assert np.abs(got - exact).max() / scale > 1e-4  # and far from the float32 product


def test_an_infinite_operand_gives_what_its_largest_parts_give():
    """The smaller partial products of inf are NaN; as in XLA's multi-pass rewrites they are dropped,
    so the result is inf * x, not NaN."""
    a = np.array([[np.inf, 1.0]], np.float32)
    b = np.array([[2.0], [3.0]], np.float32)
    for precision in ("TF32_TF32_F32_X3", "BF16_BF16_F32_X6"):
        assert emulated_product(precision, a, b)[0, 0] == np.inf


def test_integer_products_are_not_emulated():
    a = np.full((2, 3), 1001, np.int32)
    got = emulated_product("default", a, np.ones((3, 1), np.int32), as_backend="tpu")
    np.testing.assert_array_equal(got, [[3003], [3003]])


def test_multi_pass_algorithms_reach_float32_accuracy(operands):
    a, b = operands
    exact = a.astype(np.float64) @ b.astype(np.float64)
    scale = np.abs(exact).max()
    error = {p: np.abs(emulated_product(p, a, b) - exact).max() / scale
             for p in ("highest", "TF32_TF32_F32_X3", "BF16_BF16_F32", "BF16_BF16_F32_X3", "BF16_BF16_F32_X6")}
    assert error["BF16_BF16_F32"] > 1e-3  # 8 significant bits
    assert 1e-6 < error["BF16_BF16_F32_X3"] < 1e-4  # 16 bits from two parts
    for p in ("TF32_TF32_F32_X3", "BF16_BF16_F32_X6"):  # float32's own error, within a small factor
        assert error[p] < 3 * error["highest"] + 1e-7, error


@pytest.mark.parametrize("as_backend,level,algorithm", [
    ("tpu", "default", "BF16_BF16_F32"), ("tpu", "high", "BF16_BF16_F32_X3"), ("tpu", "highest", "BF16_BF16_F32_X6"),
    ("gpu", "default", "TF32_TF32_F32"), ("gpu", "high", "F32_F32_F32"), ("gpu", "highest", "F32_F32_F32"),
])
def test_precision_levels_as_each_accelerator_computes_them(operands, as_backend, level, algorithm):
    a, b = operands[0][:, :512], operands[1][:512]
    np.testing.assert_array_equal(emulated_product(level, a, b, as_backend), emulated_product(algorithm, a, b))


def test_emulation_is_undone_on_exit(operands):
    a, b = operands
    with pytest.raises(ValueError, match="TF32_TF32_F32_X3"):
        with jax.default_matmul_precision("TF32_TF32_F32_X3"):
            jax.jit(jnp.matmul)(a, b)
    emulated_product("TF32_TF32_F32_X3", a, b)
    with pytest.raises(ValueError, match="TF32_TF32_F32_X3"):
        with jax.default_matmul_precision("TF32_TF32_F32_X3"):
            jax.jit(jnp.matmul)(a, b)


@pytest.mark.slow
def test_goldens_under_emulated_algorithms():
    """One TF32 pass lands far outside the goldens' float32 tolerances; three passes stay inside them
    (the estimate that makes TF32_TF32_F32_X3 a candidate for a faithful GPU default)."""
    g = parity.load_golden(shared_path("golden", "lgmrec_fixed.npz"))
    rows = {}
    with emulation.emulating_dot_algorithms():
        for precision in ("TF32_TF32_F32", "TF32_TF32_F32_X3"):
            with jax.default_matmul_precision(precision):
                rows[precision] = {r.name: r for r in parity.replay(g, "segment_sum")}
    one_pass = rows["TF32_TF32_F32"]["train/user_out"]
    assert one_pass.error > 50 * one_pass.tolerance
    assert all(r.passed for r in rows["TF32_TF32_F32_X3"].values()), \
        [r for r in rows["TF32_TF32_F32_X3"].values() if not r.passed]


def test_backend_check_names_the_precision_and_the_backend():
    engine_lib.check_matmul_precision("BF16_BF16_F32_X6")  # XLA:CPU runs it (as float32)
    refused = r"matmul_precision 'TF32_TF32_F32_X3' does not run on this backend \(cpu\): "
    with pytest.raises(configs.ConfigError, match=refused):
        engine_lib.check_matmul_precision("TF32_TF32_F32_X3")
    with emulation.emulating_dot_algorithms():  # the check follows the lowering, both ways
        engine_lib.check_matmul_precision("TF32_TF32_F32_X3")
        with emulation.emulating_dot_algorithms("tpu"):  # a TPU has no TF32
            with pytest.raises(configs.ConfigError, match=refused + ".*does not exist on a TPU"):
                engine_lib.check_matmul_precision("TF32_TF32_F32_X3")
    with pytest.raises(configs.ConfigError, match=refused):
        engine_lib.check_matmul_precision("TF32_TF32_F32_X3")
    cfg = small_config()
    cfg.matmul_precision = "TF32_TF32_F32_X4"
    with pytest.raises(configs.ConfigError, match="matmul_precision is 'TF32_TF32_F32_X4', expected one of"):
        configs.validate(cfg)


@pytest.mark.parametrize("precision,algorithm", [
    ("TF32_TF32_F32_X3", "lhs_precision_type = tf32, rhs_precision_type = tf32, accumulation_type = f32, "
                         "lhs_component_count = 1, rhs_component_count = 1, num_primitive_operations = 3"),
    ("BF16_BF16_F32_X6", "lhs_precision_type = bf16, rhs_precision_type = bf16, accumulation_type = f32, "
                         "lhs_component_count = 1, rhs_component_count = 1, num_primitive_operations = 6"),
])
def test_every_product_of_the_gpu_step_carries_the_algorithm(precision, algorithm):
    """The training step lowered for a GPU (no GPU needed): every dot_general of the forward pass,
    both losses and the gradient is computed with the configured algorithm."""
    ds, cfg = toy_dataset(), small_config()
    model, optimizer = step_lib.make_model(cfg, ds), step_lib.make_optimizer(cfg.learning_rate)
    g = graph_lib.build_graph(ds.train, ds.n_users, ds.n_items)
    feats = step_lib.device_features(ds)
    state = step_lib.init_state(model, optimizer, g, feats, seed=1)
    batch = losses.Batch(jnp.arange(6), jnp.arange(6) % ds.n_items, jnp.full(6, 2), jnp.ones(6))
    step = jax.jit(step_lib.make_train_step(model, optimizer, step_lib.config_objective(cfg)))
    with jax.default_matmul_precision(precision):
        lowered = step.trace(state, g, feats, batch, jax.random.PRNGKey(5)).lower(lowering_platforms=("cuda",))
    dots = re.findall(r"stablehlo\.dot_general .*", lowered.as_text())
    assert len(dots) >= 20  # forward and backward products of both modalities, both losses
    assert all(algorithm in d for d in dots), [d for d in dots if algorithm not in d][:2]


def emulation_cli(*args):
    """The tool as a user runs it: no JAX_PLATFORMS from conftest (JAX probes the other backends, and
    logs that it found no TPU), no GPU."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    return subprocess.run([sys.executable, "-m", "experiments.precision_emulation", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=env)


def test_cli_logs_one_line_per_replay(tmp_path):
    golden_dir = os.path.dirname(shared_path("golden", "lgmrec_fixed.npz"))
    shared_path("golden", "lgmrec_legacy.npz")
    proc = emulation_cli("--precisions=highest", f"--golden_dir={golden_dir}", f"--out={tmp_path / 'out'}",
                         "--tag=t")
    assert proc.returncode == 0, proc.stderr
    assert "Unable to initialize backend" not in proc.stderr, proc.stderr
    progress = [line for line in proc.stderr.splitlines() if "] replayed " in line]
    assert [line.split("] ")[1].split(",")[0] for line in progress] == [
        "replayed 1/2: lgmrec_fixed under highest", "replayed 2/2: lgmrec_legacy under highest"]
    assert all(", 0 of " in line and " rows failed (" in line for line in progress), progress
    assert sorted(os.listdir(tmp_path / "out")) == ["precision_emulation_t.json", "precision_emulation_t.md"]
    assert proc.stdout.startswith("# Matmul precisions against the goldens, emulated on a CPU")


@pytest.mark.parametrize("case", ["out_is_a_file", "out_under_a_file", "bad_flag", "truncated_golden",
                                  "no_precisions"])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, case):
    (tmp_path / "file").write_text("")
    golden_dir, out = tmp_path / "golden", tmp_path / "out"
    golden_dir.mkdir()
    for name in emulation.GOLDENS:  # never read in the cases refused before the replay
        (golden_dir / f"{name}.npz").write_bytes(b"PK\x03\x04" + b"\0" * 60)  # a zip cut after its first header
    args = [f"--golden_dir={golden_dir}", f"--out={out}"]
    if case == "out_is_a_file":
        args[1] = f"--out={tmp_path / 'file'}"
        expected = f"error: {args[1]}: {tmp_path / 'file'} is a file, expected a directory"
    elif case == "out_under_a_file":
        args[1] = f"--out={tmp_path / 'file' / 'results'}"
        expected = f"error: {args[1]}: {tmp_path / 'file'} is a file, expected a directory"
    elif case == "bad_flag":
        args.append("--no_such_flag")
        expected = "error: bad flag: Unknown command line flag 'no_such_flag'"
    elif case == "no_precisions":
        args.append("--precisions=")
        expected = "error: --precisions is empty; name some of ['highest', "
    else:
        expected = f"error: {golden_dir / 'lgmrec_fixed.npz'}: cannot read golden file ("
    proc = emulation_cli(*args)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "Unable to initialize backend" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(expected), last
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["file", "golden"]
