"""Where XLA's compile time goes, from its own timers in a log.

    TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE=gpu_compiler=1,nvptx_compiler=1,... \
        python -m experiments.bench --presets=clothing --compile_only --out=/tmp/phases --append 2> compile.log
    python -m experiments.compile_phases compile.log --program=jit_run_epoch

XLA's compilers log scoped timers (``Running HLO passes on [jit_run_epoch] for GPU time: 3.21 s``) at
verbosity 1 of their source files; this sums them by phase and prints a Markdown table, longest first.
Phases nest, so the rows do not add up to the compile time. ``--program`` keeps one program's phases.
"""

from __future__ import annotations

import collections
import re
import sys
from typing import Iterable, Optional

from absl import app, flags

# "<source>.cc:<line>] <label> time: <human> (<n> us)"
TIMER = re.compile(r"\s(?P<source>[\w.]+\.cc):\d+\] (?P<label>.+?) time: [^(]*\((?P<us>\d+) us\)")
PROGRAM = re.compile(r"\[(jit_[^\]]*)\]")

FLAGS = flags.FLAGS


def phases(lines: Iterable[str], program: Optional[str] = None) -> list[dict]:
    """[{"phase", "source", "seconds", "count"}] from a log's timer lines, longest first; with
    ``program``, only the lines that name it (``[jit_...]``) or name no program."""
    total = collections.defaultdict(lambda: [0.0, 0])
    for line in lines:
        match = TIMER.search(line)
        if not match:
            continue
        label = match.group("label")
        named = PROGRAM.findall(label)
        if program is not None and named and program not in named:
            continue
        key = (PROGRAM.sub("[...]", label).strip(), match.group("source"))
        total[key][0] += int(match.group("us")) / 1e6
        total[key][1] += 1
    rows = [{"phase": phase, "source": source, "seconds": round(seconds, 3), "count": count}
            for (phase, source), (seconds, count) in total.items()]
    return sorted(rows, key=lambda r: (-r["seconds"], r["phase"]))


def markdown(rows: list[dict], top: int = 30) -> str:
    if not rows:
        return ("No XLA timer lines found (is TF_CPP_MIN_LOG_LEVEL=0 set, and TF_CPP_VMODULE naming the "
                "compiler's source files at level 1?)\n")
    lines = ["| phase | source | seconds | times |", "|---|---|---|---|"]
    lines += [f"| {r['phase']} | {r['source']} | {r['seconds']} | {r['count']} |" for r in rows[:top]]
    return "\n".join(lines) + "\n"


def define_flags() -> None:
    flags.DEFINE_string("program", None, "Keep this program's phases (e.g. jit_run_epoch) and unnamed ones.")
    flags.DEFINE_integer("top", 30, "Rows to print.")


def main(argv) -> int:
    if len(argv) != 2:
        raise app.UsageError("usage: python -m experiments.compile_phases LOG [--program=jit_run_epoch]")
    try:
        with open(argv[1], errors="replace") as handle:
            rows = phases(handle, FLAGS.program)
    except OSError as error:
        print(f"error: cannot read {argv[1]}: {error.strerror}", file=sys.stderr)
        return 2
    sys.stdout.write(markdown(rows, FLAGS.top))
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(main)
