"""How far each accelerator matmul precision lands from the reference, estimated on a CPU.

    python -m experiments.precision_emulation            # both goldens, every emulated algorithm

A CPU computes every float32 product in float32 whatever precision is asked, so this replaces its
lowering of ``dot_general`` by an emulation of the accelerators' algorithms (TF32_TF32_F32 and its X3
form, BF16_BF16_F32 and its X3 and X6 forms: operands split into TF32 or bf16 parts, each product of
parts exact in float32, float32 accumulation, smallest products first) and replays the goldens under
each. Assumed, not known to match a device: the rounding of the parts and the order of the sums.
``python -m lgmrec_jax.parity --matmul_precision=...`` on the device measures the real thing.
Writes ``<out>/precision_emulation_<tag>.{json,md}``.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
from absl import app, flags, logging
from jax import lax
from jax._src.interpreters import mlir
from jax._src.lax import lax as lax_internal

from experiments import benchmarking
from lgmrec_jax import parity
from lgmrec_jax import cli
from lgmrec_jax.cli import parse_flags, setup_logging

Preset = lax.DotAlgorithmPreset
# algorithm -> (rounding of one part, number of parts, the (i, j) part products in summation order)
EMULATED = {
    Preset.TF32_TF32_F32: ("tf32", 1, ((0, 0),)),
    Preset.TF32_TF32_F32_X3: ("tf32", 2, ((0, 1), (1, 0), (0, 0))),
    Preset.BF16_BF16_F32: ("bf16", 1, ((0, 0),)),
    Preset.BF16_BF16_F32_X3: ("bf16", 2, ((0, 1), (1, 0), (0, 0))),
    Preset.BF16_BF16_F32_X6: ("bf16", 3, ((2, 0), (1, 1), (0, 2), (0, 1), (1, 0), (0, 0))),
}
# What JAX's precision levels mean on each accelerator (jax.lax.Precision): on TPUs "default", "high"
# and "highest" are one, three and six bfloat16 passes; on NVIDIA GPUs "default" is one TF32 pass and
# "highest" float32. A GPU's "high" is not emulated (computed in float32): it is TF32 in cuBLAS products
# but float32 in the products XLA emits with Triton, and which a product gets depends on XLA's choice.
# ``emulating_dot_algorithms(as_backend=...)`` computes the levels that way on the CPU.
LEVELS = {
    "gpu": {lax.Precision.DEFAULT: Preset.TF32_TF32_F32},
    "tpu": {lax.Precision.DEFAULT: Preset.BF16_BF16_F32, lax.Precision.HIGH: Preset.BF16_BF16_F32_X3,
            lax.Precision.HIGHEST: Preset.BF16_BF16_F32_X6},
}
REPLAYED = ("highest",) + tuple(p.name for p in EMULATED)
GOLDENS = ("lgmrec_fixed", "lgmrec_legacy")


def round_tf32(x: jax.Array) -> jax.Array:
    """float32 -> the nearest TF32 value (10 stored significand bits), ties away from zero. Finite
    values below float32's largest TF32-rounded magnitude only (the products here are far from it)."""
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    return lax.bitcast_convert_type((bits + jnp.uint32(0x1000)) & jnp.uint32(0xFFFFE000), jnp.float32)


def round_bf16(x: jax.Array) -> jax.Array:
    return x.astype(jnp.bfloat16).astype(jnp.float32)


def split(x: jax.Array, rounding: str, n_parts: int) -> list[jax.Array]:
    """x as n_parts values of the rounding's format whose sum approximates x (hi first)."""
    to_part = round_tf32 if rounding == "tf32" else round_bf16
    parts, rest = [], x.astype(jnp.float32)
    for _ in range(n_parts):
        parts.append(to_part(rest))
        rest = rest - parts[-1]
    return parts


def emulated_dot(lhs, rhs, *, algorithm: Preset, dimension_numbers, out_dtype):
    rounding, n_parts, products = EMULATED[algorithm]
    lhs_parts, rhs_parts = split(lhs, rounding, n_parts), split(rhs, rounding, n_parts)
    def product(i, j):  # exact in float32, accumulated in float32
        # F32_F32_F32, not HIGHEST: as_backend="tpu" emulates HIGHEST, and this must lower as XLA:CPU's.
        return lax.dot_general(lhs_parts[i], rhs_parts[j], dimension_numbers,
                               precision=Preset.F32_F32_F32, preferred_element_type=jnp.float32)

    *small, largest = products
    if not small:
        return product(*largest).astype(out_dtype)
    total = product(*small[0])
    for i, j in small[1:]:
        total = total + product(i, j)
    total = jnp.where(jnp.isfinite(total), total, 0.0)  # an inf operand's hi*hi alone decides
    return (total + product(*largest)).astype(out_dtype)


def emulated_algorithm(precision, as_backend: Optional[str]) -> Optional[Preset]:
    """The algorithm to emulate for a dot_general's ``precision`` parameter (a preset, a pair of
    levels, or None for the default level), or None to lower it as XLA:CPU does."""
    if isinstance(precision, Preset):
        return precision if precision in EMULATED else None
    levels = LEVELS.get(as_backend, {})
    pair = precision if precision is not None else (lax.Precision.DEFAULT, lax.Precision.DEFAULT)
    return levels.get(max(pair, key=lambda level: level.value))


@contextlib.contextmanager
def emulating_dot_algorithms(as_backend: Optional[str] = None):
    """Within the block, CPU programs compute the EMULATED algorithms exactly as accelerators do, and
    with ``as_backend`` ("gpu" or "tpu") JAX's precision levels as that backend does (LEVELS). JAX's
    caches are cleared on entry and exit, so no program compiled outside the block is reused in it or
    the other way round. Everything else lowers as before."""
    if as_backend is not None and as_backend not in LEVELS:
        raise ValueError(f"as_backend is {as_backend!r}, expected one of {sorted(LEVELS)}")
    table = mlir._platform_specific_lowerings["cpu"]
    original = table[lax_internal.dot_general_p]

    def lowering(ctx, lhs, rhs, *, dimension_numbers, precision, preferred_element_type, **params):
        algorithm = emulated_algorithm(precision, as_backend)
        if algorithm is not None and as_backend == "tpu" and algorithm.name.startswith("TF32"):
            raise ValueError(f"The precision '{algorithm.name}' does not exist on a TPU (emulated)")
        floating = all(jnp.issubdtype(aval.dtype, jnp.floating) for aval in ctx.avals_in)
        if algorithm is not None and floating:
            fn = functools.partial(emulated_dot, algorithm=algorithm, dimension_numbers=dimension_numbers,
                                   out_dtype=ctx.avals_out[0].dtype)
            return mlir.lower_fun(fn, multiple_results=False)(ctx, lhs, rhs)
        return original.rule(ctx, lhs, rhs, dimension_numbers=dimension_numbers, precision=precision,
                             preferred_element_type=preferred_element_type, **params)

    jax.clear_caches()
    mlir.register_lowering(lax_internal.dot_general_p, lowering, platform="cpu")
    try:
        yield
    finally:
        table[lax_internal.dot_general_p] = original
        jax.clear_caches()


def replay_all(golden_dir: str, goldens=GOLDENS, precisions=REPLAYED, kernel: str = "segment_sum") -> dict:
    """{golden: {precision: [parity.Row, ...]}} with the algorithms emulated; logs one INFO line per
    (golden, precision) replayed (each takes seconds: the whole default set, minutes)."""
    out = {}
    total, done = len(goldens) * len(precisions), 0
    with emulating_dot_algorithms():
        for name in goldens:
            g = parity.load_golden(os.path.join(golden_dir, f"{name}.npz"))
            out[name] = {}
            for precision in precisions:
                start = time.perf_counter()
                with jax.default_matmul_precision(precision):
                    out[name][precision] = parity.replay(g, kernel)
                done += 1
                n_failed = sum(not r.passed for r in out[name][precision])
                logging.info("replayed %d/%d: %s under %s, %d of %d rows failed (%.1f s)", done, total, name,
                             precision, n_failed, len(out[name][precision]), time.perf_counter() - start)
    return out


def group(row_name: str) -> str:
    return row_name.split("/")[0].replace("metrics_", "")


def summary(rows: list) -> dict:
    """Per quantity group (train, loss, grad, adam1, eval, valid, test): the largest error as a multiple
    of its tolerance (None for groups compared exactly: top-50 lists and metrics), and the failing rows."""
    out = {}
    for r in rows:
        g = out.setdefault(group(r.name), {"worst": None, "worst_row": None, "failed": []})
        if r.tolerance and (g["worst"] is None or r.error / r.tolerance > g["worst"]):
            g["worst"], g["worst_row"] = r.error / r.tolerance, r.name
        if not r.passed:
            g["failed"].append(r.name)
    return out


def cell(group_summary: dict) -> str:
    worst, failed = group_summary["worst"], group_summary["failed"]
    text = "exact" if worst is None and not failed else ("" if worst is None else f"{worst:.3g}")
    return (text + f" ✗{len(failed)}").strip() if failed else text


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# Matmul precisions against the goldens, emulated on a CPU",
        "",
        f"`{report['command']}` ({report['started']}; {m['cpu']}, {m['cpu_count']} cores; jax "
        f"{m['versions'].get('jax')}; commit {m['git']['commit'][:10]}). Every accelerator algorithm is "
        "emulated on the CPU (`experiments/precision_emulation.py`: parts rounded to nearest TF32 or "
        "bfloat16, products exact, float32 accumulation, smallest first), then the goldens are replayed "
        "(`lgmrec_jax.parity.replay`). Each cell: the largest error of that group of quantities as a "
        "multiple of its tolerance (the goldens' float32 tolerances: values 2e-6 relative, gradients "
        "2e-5 relative, one Adam step 5e-5 absolute), *exact* where the top-50 lists and metrics are the "
        "recorded ones, and ✗ with the number of failing rows where any fail. An estimate: a real "
        "device may sum in another order and round the parts another way.",
        "",
    ]
    for name, by_precision in report["goldens"].items():
        groups = list(next(iter(by_precision.values())).keys())
        lines += [f"## {name}", "", "| precision | " + " | ".join(groups) + " | rows failed |",
                  "|---|" + "---|" * (len(groups) + 1)]
        for precision, per_group in by_precision.items():
            n_failed = sum(len(s["failed"]) for s in per_group.values())
            lines.append(f"| {precision} | " + " | ".join(cell(per_group[g]) for g in groups) + f" | {n_failed} |")
        lines.append("")
    return "\n".join(lines)


FLAGS = flags.FLAGS
flags.DEFINE_string("golden_dir", os.path.join("..", "shared", "golden"), "Folder of the golden .npz files.")
flags.DEFINE_list("precisions", list(REPLAYED), "Precisions to replay: highest and the emulated algorithms.")
flags.DEFINE_string("out", os.path.join("experiments", "results"), "Folder of the written results.")
flags.DEFINE_string("tag", "cpu", "File tag: precision_emulation_<tag>.{json,md}.")


def write_results(out: str, tag: str, report: dict) -> str:
    """Writes ``<out>/precision_emulation_<tag>.{json,md}``: both temporary files first, then both
    renamed, so a failed write (a full disk) leaves the previous pair and no temporary file; returns
    the stem."""
    stem = os.path.join(out, f"precision_emulation_{tag}")
    benchmarking.write_texts({stem + ".json": benchmarking.json_text(report), stem + ".md": markdown(report)})
    return stem


def main(argv):
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]!r}; every input is a --flag", file=sys.stderr)
        return 2
    setup_logging()  # progress lines at INFO, without JAX's "Unable to initialize backend 'tpu'" line
    unknown = [p for p in FLAGS.precisions if p not in REPLAYED]
    if not FLAGS.precisions:
        print(f"error: --precisions is empty; name some of {list(REPLAYED)}", file=sys.stderr)
        return 2
    if unknown:
        print(f"error: --precisions: {unknown} not among {list(REPLAYED)}", file=sys.stderr)
        return 2
    missing = [g for g in GOLDENS if not os.path.exists(os.path.join(FLAGS.golden_dir, f"{g}.npz"))]
    if missing:
        print(f"error: {FLAGS.golden_dir}: no {', '.join(missing)}.npz (the goldens live in ../shared/golden)",
              file=sys.stderr)
        return 2
    problem = cli.out_dir_problem(FLAGS.out)
    if problem:
        print(f"error: --out={FLAGS.out}: {problem}", file=sys.stderr)
        return 2
    if jax.default_backend() != "cpu":
        print("error: the emulation replaces the CPU's lowering: run it with JAX_PLATFORMS=cpu", file=sys.stderr)
        return 2
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    try:
        rows = replay_all(FLAGS.golden_dir, precisions=tuple(FLAGS.precisions))
    except parity.GoldenError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report = {
        "command": " ".join(["python -m experiments.precision_emulation", *sys.argv[1:]]),
        "started": started, "machine": benchmarking.machine(),
        "goldens": {name: {p: summary(r) for p, r in by.items()} for name, by in rows.items()},
        "errors": {name: {p: {r.name: r.error for r in rs} for p, rs in by.items()} for name, by in rows.items()},
    }
    try:
        write_results(FLAGS.out, FLAGS.tag, report)
    except OSError as err:
        print(f"error: --out={FLAGS.out}: cannot write the results to {err.filename or FLAGS.out} "
              f"({err.strerror or err})", file=sys.stderr)
        return 2
    print(markdown(report))
    return 0


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
