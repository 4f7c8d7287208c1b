"""experiments/compile_phases.py: XLA's timer lines summed by phase."""

from experiments import compile_phases

LOG = """\
I1127 14:57:49.274744   10387 cpu_compiler.cc:1269] Running HLO passes on [jit_run_epoch] for CPU time: 908 us (908 us) (cumulative: 908 us, max: 908 us, #called: 1)
I1127 14:57:49.274801   10387 cpu_compiler.cc:2091] Compiling: jit_run_epoch
I1127 14:57:49.278467   10387 cpu_compiler.cc:1215] CpuCompiler - Running LLVM verifier time: 17 us (17 us) (cumulative: 17 us, max: 17 us, #called: 1)
I1127 14:57:49.278467   10387 cpu_compiler.cc:1215] CpuCompiler - Running LLVM verifier time: 3 us (3 us) (cumulative: 20 us, max: 17 us, #called: 2)
I1127 14:57:49.279452   10387 cpu_compiler.cc:2094] Compiling [jit_run_epoch] for CPU using JIT time: 2.5 s (2500000 us) (cumulative: 2.5 s, max: 2.5 s, #called: 1)
I1127 14:57:49.289076   10387 cpu_compiler.cc:1269] Running HLO passes on [jit_evaluate_split] for CPU time: 1.2 s (1200000 us) (cumulative: 1.2 s, max: 1.2 s, #called: 2)
W1127 unrelated warning time: nothing
"""


def test_phases_sum_timer_lines_by_label():
    rows = compile_phases.phases(LOG.splitlines())
    assert rows == [
        {"phase": "Compiling [...] for CPU using JIT", "source": "cpu_compiler.cc", "seconds": 2.5, "count": 1},
        {"phase": "Running HLO passes on [...] for CPU", "source": "cpu_compiler.cc", "seconds": 1.201, "count": 2},
        {"phase": "CpuCompiler - Running LLVM verifier", "source": "cpu_compiler.cc", "seconds": 0.0, "count": 2},
    ]


def test_program_filter_keeps_its_phases_and_unnamed_ones():
    rows = compile_phases.phases(LOG.splitlines(), program="jit_run_epoch")
    assert {r["phase"]: r["seconds"] for r in rows} == {
        "Compiling [...] for CPU using JIT": 2.5, "Running HLO passes on [...] for CPU": 0.001,
        "CpuCompiler - Running LLVM verifier": 0.0}
    assert "| Compiling [...] for CPU using JIT | cpu_compiler.cc | 2.5 | 1 |" in compile_phases.markdown(rows)


def test_no_timer_lines_says_how_to_get_them():
    assert "TF_CPP_VMODULE" in compile_phases.markdown(compile_phases.phases(["nothing here"]))
