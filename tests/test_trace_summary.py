"""experiments/trace_summary.py: device time by operation from a profiler trace (hand-made traces with
known totals, and a real CPU trace of a program whose operation counts are known)."""

import jax
import jax.numpy as jnp
import pytest

from experiments import trace_summary as ts


def op(pid, tid, ts_us, dur_us, hlo_op, module="jit_step"):
    return {"ph": "X", "pid": pid, "tid": tid, "ts": ts_us, "dur": dur_us, "name": hlo_op,
            "args": {"hlo_op": hlo_op, "hlo_module": module}}


def process(pid, name):
    return {"ph": "M", "pid": pid, "name": "process_name", "args": {"name": name}}


def test_gpu_like_trace_counts_device_kernels_only():
    events = [process(1, "/host:CPU"), process(2, "/device:GPU:0"),
              op(1, 7, 0, 50, "loop_add_fusion.3"),  # the host's launch record: left out
              op(2, 9, 100, 30, "loop_add_fusion.3"), op(2, 9, 140, 10, "loop_add_fusion.17"),
              op(2, 9, 150, 40, "cublas-gemm.2"), op(2, 9, 200, 20, "input_scatter_fusion"),
              op(2, 9, 290, 10, "copy.5"),
              {"ph": "X", "pid": 2, "tid": 9, "ts": 0, "dur": 999, "name": "MemcpyH2D", "args": {}}]
    s = ts.summarize(events, per=2)
    assert s["ops"] == 5 and s["modules"] == ["jit_step"]
    assert s["window_ms"] == 0.2 and s["busy_ms"] == 0.11 and s["busy_share"] == 0.55
    assert s["kinds_ms"] == {"matmul": 0.04, "other fusion / elementwise": 0.04, "scatter": 0.02,
                             "copy/transfer": 0.01}
    assert s["top"][0] == {"family": "cublas-gemm", "kind": "matmul", "ms": 0.04, "count": 1, "share": 0.3636}
    assert s["top"][1]["family"] == "loop_add_fusion" and s["top"][1]["count"] == 2
    assert s["busy_ms_per"] == 0.055 and s["ops_per"] == 2.5
    assert "| `cublas-gemm` | matmul | 0.04 | 1 | 36.4% |" in ts.markdown(s)


def test_nested_cpu_events_are_counted_once():
    # A CPU trace nests a while loop's body inside the while's own event.
    events = [process(1, "/host:CPU"), op(1, 3, 0, 100, "while.4"), op(1, 3, 10, 30, "fusion.1"),
              op(1, 3, 50, 30, "fusion.2"), op(1, 3, 120, 5, "copy.9")]
    s = ts.summarize(events)
    assert s["ops"] == 3 and s["busy_ms"] == 0.065
    assert {r["family"] for r in s["top"]} == {"fusion", "copy"}


@pytest.mark.parametrize("name,kind", [("loop_multiply_reduce_fusion", "reduce"), ("wrapped_scatter", "scatter"),
                                       ("multiply_bitcast_fusion", "other fusion / elementwise"),
                                       ("gemm_fusion_dot", "matmul"), ("bitcast_gather_fusion", "gather"),
                                       ("copy", "copy/transfer"), ("sort", "sort/top-k")])
def test_kinds(name, kind):
    assert ts.kind(name) == kind


def test_real_cpu_trace_of_a_scan(tmp_path):
    @jax.jit
    def f(x, w):
        return jax.lax.scan(lambda c, _: (jnp.tanh(c @ w) + c, None), x, None, length=7)[0]

    x, w = jnp.ones((64, 64)), jnp.full((64, 64), 0.01)
    f(x, w).block_until_ready()
    with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
        f(x, w).block_until_ready()
    s = ts.summarize(ts.load_events(ts.newest_trace(str(tmp_path))))
    assert s["ops"] >= 7 and 0 < s["busy_ms"] <= s["window_ms"] + 1e-3
    matmuls = [r for r in s["top"] if r["kind"] == "matmul"]
    assert matmuls and sum(r["count"] for r in matmuls) == 7  # one product per iteration


def test_missing_trace_is_a_clear_error(tmp_path, capsys):
    assert ts.main(["trace_summary", str(tmp_path)]) == 2
    assert "no perfetto_trace.json.gz" in capsys.readouterr().err


@pytest.mark.parametrize("name,content,reason", [
    ("perfetto_trace.json.gz", b"\x1f\x8b\x08\x00cut", "EOFError"),
    ("perfetto_trace.json.gz", b"not gzip at all", "BadGzipFile"),
    ("trace.json", b'{"traceEvents": [', "JSONDecodeError"),
    ("trace.json", b'{"traceEvents": 5}', "ValueError: no list of trace events"),
])
def test_an_unreadable_trace_is_one_line_exit_2(tmp_path, capsys, name, content, reason):
    (tmp_path / name).write_bytes(content)
    assert ts.main(["trace_summary", str(tmp_path / name)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path / name}: not a readable Chrome/perfetto trace "
                                               f"({reason}"), err


def test_help_and_argument_count(capsys):
    assert ts.main(["trace_summary", "--help"]) == 0 and "usage:" in capsys.readouterr().out
    assert ts.main(["trace_summary"]) == 2
    assert capsys.readouterr().err.startswith("error: expected one TRACE_DIR_OR_FILE argument, got 0")


def test_touching_and_zero_length_events_hold_nothing():
    events = [process(1, "/host:CPU"),
              op(1, 3, 0, 10, "fusion.1"), op(1, 3, 9.9, 5, "fusion.2"),  # rounded times overlap a little
              op(1, 3, 20, 8, "copy.3"), op(1, 3, 20, 0, "copy.4"),  # a zero-length mark at the same time
              op(1, 3, 30, 10, "while.1"), op(1, 3, 31, 2, "fusion.5")]  # real nesting
    s = ts.summarize(events)
    assert s["ops"] == 5 and s["busy_ms"] == 0.025
    assert {r["family"]: r["count"] for r in s["top"]} == {"fusion": 3, "copy": 2}


def test_collectives_and_reduce_precision_are_not_reductions():
    assert ts.kind("all-reduce") == "collective" and ts.kind("all-gather-start") == "collective"
    assert ts.kind("reduce-precision") == "other fusion / elementwise"


def test_stream_kernels_count_once_beside_derived_op_lines():
    thread = lambda pid, tid, name: {"ph": "M", "pid": pid, "tid": tid, "name": "thread_name", "args": {"name": name}}
    events = [process(2, "/device:GPU:0"), thread(2, 1, "Stream #14(Compute)"), thread(2, 2, "XLA Ops"),
              op(2, 1, 0, 10, "fusion.1"), op(2, 1, 12, 6, "cublas-gemm.3"),
              op(2, 2, 0, 11, "fusion.1"), op(2, 2, 12, 7, "cublas-gemm.3")]  # the same two, derived
    s = ts.summarize(events)
    assert s["ops"] == 2 and s["busy_ms"] == 0.016
    assert s["lines"] == ["/device:GPU:0 / Stream #14(Compute)"]


HLO = """HloModule jit_step, entry_computation_layout={(f32[4]{0})->f32[4]{0}}

%fused_computation.1 (param_0: f32[4]) -> f32[4] {
  ROOT %exp.1 = f32[4]{0} exponential(%param_0), metadata={op_name="jit(step)/while/body/jvp(losses)/infonce/exp"}
}

ENTRY %main (p: f32[4]) -> f32[4] {
  %custom-call.4 = f32[4]{0} custom-call(%p), custom_call_target="__cublas$gemm", metadata={op_name="jit(step)/while/body/transpose(jvp(LGMRec))/LGMRec.feature_products/features/dot_general" stack_frame_id=3}
  %loop_exp_fusion.2 = f32[4]{0} fusion(%custom-call.4), kind=kLoop, calls=%fused_computation.1, metadata={op_name="jit(step)/while/body/jvp(losses)/infonce/exp"}
  ROOT %loop_pad_fusion.9 = f32[4]{0} fusion(%loop_exp_fusion.2), kind=kLoop, calls=%fused_computation.1
}
"""


def test_op_names_from_hlo_text_and_scopes_forward_and_backward():
    names = ts.hlo_op_names(HLO)
    assert names[ts.MODULE_KEY] == "jit_step"
    assert names["custom-call.4"].endswith("features/dot_general")
    assert names["loop_exp_fusion.2"].endswith("infonce/exp") and "loop_pad_fusion.9" not in names
    assert ts.scope_of(names["custom-call.4"]) == "features backward"
    assert ts.scope_of("jit(step)/while/body/jvp(losses)/infonce/exp") == "infonce forward"  # innermost wins
    assert ts.scope_of("jit(step)/while/body/add") == "other forward"


def test_device_time_by_scope_with_unmatched_ops_and_library_matmuls():
    events = [process(2, "/device:GPU:0"), op(2, 9, 0, 40, "custom-call.4"), op(2, 9, 40, 20, "loop_exp_fusion.2"),
              op(2, 9, 60, 30, "loop_pad_fusion.9"), op(2, 9, 90, 10, "fusion.3", module="jit_other")]
    s = ts.summarize(events, per=2, op_names=ts.hlo_op_names(HLO))
    # loop_pad_fusion.9 has no op_name; fusion.3 belongs to another program: neither is matched.
    assert s["scopes"]["ms"] == {"features backward": 0.02, "unmatched": 0.02, "infonce forward": 0.01}
    assert s["scopes"]["matched_share"] == 0.6
    assert s["kinds_ms"]["matmul"] == 0.04  # the cuBLAS call named dot_general
    assert s["top_ops"][0] == {"op": "custom-call.4", "ms": 0.02, "op_name": ts.hlo_op_names(HLO)["custom-call.4"]}
    assert "| features backward | 0.02 |" in ts.markdown(s)


def test_real_cpu_trace_by_named_scope(tmp_path):
    def f(x, w):
        with jax.named_scope("cge"):
            y = jnp.tanh(x @ w)
        with jax.named_scope("infonce"):
            return jnp.sum(jnp.exp(y @ y.T))

    step = jax.jit(jax.grad(f, argnums=1))
    x, w = jnp.ones((256, 64)), jnp.full((64, 64), 0.01)
    names = ts.hlo_op_names(step.lower(x, w).compile().as_text())
    step(x, w).block_until_ready()
    with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
        step(x, w).block_until_ready()
    s = ts.summarize(ts.load_events(ts.newest_trace(str(tmp_path))), op_names=names)
    scopes = set(s["scopes"]["ms"])
    assert {"cge forward", "infonce forward", "infonce backward", "cge backward"} <= scopes
    assert s["scopes"]["matched_share"] > 0.5


def test_a_trace_of_command_buffers_says_how_to_see_their_kernels():
    events = [process(2, "/device:GPU:0"), op(2, 9, 0, 90, "command_buffer_6"), op(2, 9, 90, 10, "copy.1")]
    s = ts.summarize(events)
    assert "90% of the device time is in XLA command buffers" in ts.markdown(s)
    assert "command buffers" not in ts.markdown(ts.summarize([process(2, "/device:GPU:0"), op(2, 9, 0, 9, "copy.1")]))


def test_timeline_shows_where_the_idle_time_lies_between_programs():
    events = [process(2, "/device:GPU:0"), op(2, 9, 100, 10, "fusion.1", module="jit_noise_free"),
              op(2, 9, 110, 20, "fusion.2", module="jit_noise_free"),
              op(2, 9, 180, 30, "fusion.1", module="jit_evaluate_split"),  # 50 us of host time before it
              op(2, 9, 215, 5, "copy.1", module="jit_evaluate_split"),  # 5 us idle inside the program
              op(2, 9, 300, 10, "fusion.1", module="jit_noise_free")]
    s = ts.summarize(events)
    assert s["timeline"] == [
        {"module": "jit_noise_free", "start_ms": 0.0, "end_ms": 0.03, "busy_ms": 0.03, "ops": 2, "idle_before_ms": 0.0},
        {"module": "jit_evaluate_split", "start_ms": 0.08, "end_ms": 0.12, "busy_ms": 0.035, "ops": 2,
         "idle_before_ms": 0.05},
        {"module": "jit_noise_free", "start_ms": 0.2, "end_ms": 0.21, "busy_ms": 0.01, "ops": 1, "idle_before_ms": 0.08}]
    assert "| `jit_evaluate_split` | 0.08 | 0.12 | 0.035 | 2 | 0.05 |" in ts.markdown(s)
