"""Where a compiled program's device time goes, from a JAX profiler trace.

    python -m experiments.trace_summary /tmp/trace_dir            # the newest perfetto_trace.json.gz under it
    python -m experiments.bench --presets=clothing --trace ...    # the same summary inside a benchmark result

Sums the executed XLA operations of a ``perfetto_trace.json.gz`` (the device's kernels on a GPU, the
thunks on a CPU) by operation family (the HLO name without its numeric suffix) and by kind (matmul,
scatter, gather, reduce, sort, copy, other fusion), and compares the device's busy time with the traced
window: a busy share far below 1 means the device waited. Output: JSON and a Markdown table.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import sys
from typing import Iterable, Optional

# Coarse kinds, tried in order on the lower-cased family name; the first match wins. A fusion's name
# lists the operations fused into it ("loop_multiply_reduce_fusion"), so a kind is matched on those
# words; bitcasts and slices inside a fusion move no data and name no kind.
KINDS = (
    ("matmul", ("gemm", "cublas", "cutlass", "dot", "matmul", "xmma", "ynn")),
    ("collective", ("all-reduce", "all_reduce", "all-gather", "all_gather", "reduce-scatter", "all-to-all",
                    "collective-permute", "nccl")),
    ("other fusion / elementwise", ("reduce-precision", "reduce_precision")),
    ("scatter", ("scatter",)),
    ("gather", ("gather", "dynamic-slice", "dynamic_slice")),
    ("sort/top-k", ("sort", "topk", "top_k", "top-k")),
    ("reduce", ("reduce", "reduction")),
    ("copy/transfer", ("copy", "memcpy", "memset", "transpose", "concatenate")),
)
SUFFIX = re.compile(r"([._-]\d+)+$")
# Operations that only hold others (a CPU trace nests the body's thunks inside them).
CONTAINERS = ("while", "conditional", "call")


def family(op: str) -> str:
    """``loop_add_fusion.12`` -> ``loop_add_fusion``; ``custom-call.3`` -> ``custom-call``."""
    return SUFFIX.sub("", op) or op


def kind(name: str) -> str:
    low = name.lower()
    for label, needles in KINDS:
        if any(n in low for n in needles):
            return label
    return "other fusion / elementwise"


def op_kind(event: dict, op_names: Optional[dict] = None) -> str:
    """The kind of one executed operation: by its family's name, except that a library call
    (``custom-call``: cuBLAS on a GPU) whose op_name is a ``dot_general`` counts as a matmul."""
    name = family(event["args"]["hlo_op"])
    if name == "custom-call" and op_names:
        op_name = op_names.get(event["args"]["hlo_op"], "")
        if op_name.rsplit("/", 1)[-1].startswith("dot_general"):
            return "matmul"
    return kind(name)


def newest_trace(path: str) -> str:
    """``path`` itself if it is a trace file, else the newest perfetto_trace.json.gz below it."""
    if os.path.isfile(path):
        return path
    found = glob.glob(os.path.join(path, "**", "perfetto_trace.json.gz"), recursive=True)
    if not found:
        raise FileNotFoundError(f"{path}: no perfetto_trace.json.gz below it (was the trace made with "
                                f"create_perfetto_trace=True?)")
    return max(found, key=os.path.getmtime)


def load_events(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as handle:
        data = json.load(handle)
    return data["traceEvents"] if isinstance(data, dict) else data


def _names(events: list[dict], kind: str, key) -> dict:
    return {key(e): e.get("args", {}).get("name", "") for e in events if e.get("ph") == "M" and e.get("name") == kind}


def device_op_events(events: Iterable[dict]) -> list[dict]:
    """The executed XLA operations: complete events naming an HLO op, on the device processes where
    the trace has any (GPU/TPU), else wherever they are (CPU). Where a device process has both its
    streams' kernels and derived lines (such as "XLA Ops", one event per operation again), only the
    stream lines count, so nothing is counted twice."""
    events = list(events)
    processes = _names(events, "process_name", lambda e: e["pid"])
    threads = _names(events, "thread_name", lambda e: (e["pid"], e["tid"]))
    ops = [e for e in events if e.get("ph") == "X" and "hlo_op" in e.get("args", {})]
    on_device = [e for e in ops if processes.get(e["pid"], "").startswith("/device:")]
    streams = [e for e in on_device if "stream" in threads.get((e["pid"], e["tid"]), "").lower()]
    return leaves(streams or on_device or ops)


def lines_of(events: Iterable[dict], ops: list[dict]) -> list[str]:
    """The process / thread names the counted operations came from (to check what was summed)."""
    events = list(events)
    processes = _names(events, "process_name", lambda e: e["pid"])
    threads = _names(events, "thread_name", lambda e: (e["pid"], e["tid"]))
    return sorted({f"{processes.get(e['pid'], e['pid'])} / {threads.get((e['pid'], e['tid']), e['tid'])}"
                   for e in ops})


NESTING_SLACK_US = 0.01  # timestamps are rounded: an end this close to the holder's still counts as inside


def leaves(ops: list[dict]) -> list[dict]:
    """The operations that hold no other operation of the same thread (on a CPU a while loop's event
    spans its body's; counting both would count the body twice). An event holds another only if the
    other starts and ends inside it and lasts a while: back-to-back events whose rounded times touch
    or overlap slightly, and zero-length marks, hold nothing."""
    holders = set()
    by_thread = collections.defaultdict(list)
    for i, e in enumerate(ops):
        by_thread[(e["pid"], e["tid"])].append(i)
    start = lambda i: float(ops[i]["ts"])
    end = lambda i: start(i) + float(ops[i].get("dur", 0.0))
    for indices in by_thread.values():
        indices.sort(key=lambda i: (start(i), -end(i)))
        open_ = []  # the events that may still enclose the next ones, outermost first
        for i in indices:
            while open_ and end(open_[-1]) <= start(i) + NESTING_SLACK_US:
                open_.pop()
            if open_ and float(ops[i].get("dur", 0.0)) > 0 and end(i) <= end(open_[-1]) + NESTING_SLACK_US:
                holders.add(open_[-1])
            open_.append(i)
    return [e for i, e in enumerate(ops) if i not in holders and family(e["args"]["hlo_op"]) not in CONTAINERS]


# The named scopes of the model, losses and train step (jax.named_scope), innermost wins: where a step's
# device time goes by part of the model, forward and backward apart.
SCOPES = ("cge", "features", "mge", "hypergraph", "losses", "infonce", "noise", "adam")
MODULE_KEY = "<module>"
OP_NAME = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{[^}]*?op_name="([^"]*)"')


def hlo_op_names(hlo_text: str) -> dict:
    """Instruction name -> its ``op_name`` metadata (the JAX name stack), from a compiled program's
    HLO text (``compiled.as_text()``); fusions carry the op_name of their root. The module's name is
    under the key ``MODULE_KEY``: only the trace's operations of that module are looked up."""
    out = {}
    module = re.match(r"\s*HloModule\s+([^\s,]+)", hlo_text)
    if module:
        out[MODULE_KEY] = module.group(1)
    for line in hlo_text.splitlines():
        match = OP_NAME.match(line)
        if match:
            out[match.group(1)] = match.group(2)
    return out


def scope_of(op_name: str) -> str:
    """``jit(run_epoch)/while/body/transpose(jvp(LGMRec))/cge/...`` -> ``cge backward``: the
    innermost known scope, and backward where the op comes from a transpose (autodiff's VJP)."""
    parts = [p.rstrip(")").split("(")[-1] for p in op_name.split("/")]
    known = [p for p in parts if p in SCOPES]
    where = known[-1] if known else "other"
    return f"{where} {'backward' if 'transpose(' in op_name else 'forward'}"


def by_scope(ops: list[dict], op_names: dict, per: Optional[int] = None) -> dict:
    """Device ms by model scope and direction (per ``per`` units), and the share of device time whose
    operation was found in ``op_names`` (an operation of another program, or a renamed one, is not)."""
    total = collections.defaultdict(float)
    found = 0.0
    module = op_names.get(MODULE_KEY)
    for e in ops:
        op = e["args"]["hlo_op"]
        same = module is None or e["args"].get("hlo_module", module) == module
        name = (op_names.get(op) if same else None) or e["args"].get("tf_op")
        dur = float(e.get("dur", 0.0))
        if name:
            found += dur
        total[scope_of(name) if name else "unmatched"] += dur
    busy = sum(total.values())
    div = 1e3 * (per or 1)
    return {"matched_share": round(found / busy, 3) if busy else None,
            "ms": {k: round(v / div, 4) for k, v in sorted(total.items(), key=lambda kv: -kv[1])}}


def timeline(ops: list[dict], origin: float) -> list[dict]:
    """The traced window as runs of consecutive operations of one program (``hlo_module``), in order:
    each run's start and end (ms from ``origin``), its busy ms and operation count, and the idle ms
    before it. Where a window's idle time lies: inside a program, or between programs (host work)."""
    runs = []
    for e in sorted(ops, key=lambda e: float(e["ts"])):
        module = e["args"].get("hlo_module", "?")
        begin, dur = float(e["ts"]), float(e.get("dur", 0.0))
        if not runs or runs[-1]["module"] != module:
            gap = begin - (runs[-1]["_end"] if runs else origin)
            runs.append({"module": module, "_start": begin, "_end": begin, "busy": 0.0, "ops": 0, "gap": gap})
        run = runs[-1]
        run["_end"], run["busy"], run["ops"] = max(run["_end"], begin + dur), run["busy"] + dur, run["ops"] + 1
    return [{"module": r["module"], "start_ms": round((r["_start"] - origin) / 1e3, 3),
             "end_ms": round((r["_end"] - origin) / 1e3, 3), "busy_ms": round(r["busy"] / 1e3, 3),
             "ops": r["ops"], "idle_before_ms": round(max(r["gap"], 0.0) / 1e3, 3)} for r in runs]


def summarize(events: Iterable[dict], top: int = 25, per: Optional[int] = None,
              op_names: Optional[dict] = None) -> dict:
    """Device time by operation family and kind (milliseconds); ``per``: also divide by this count
    (e.g. the steps traced) for per-step figures; ``op_names`` (:func:`hlo_op_names` of the traced
    program): also by model scope, and the top single operations with their op_name."""
    events = list(events)
    ops = device_op_events(events)
    if not ops:
        return {"ops": 0}
    by_family = collections.defaultdict(lambda: [0.0, 0])
    for e in ops:
        entry = by_family[family(e["args"]["hlo_op"])]
        entry[0] += float(e.get("dur", 0.0))
        entry[1] += 1
    busy_us = sum(t for t, _ in by_family.values())
    start = min(float(e["ts"]) for e in ops)
    end = max(float(e["ts"]) + float(e.get("dur", 0.0)) for e in ops)
    kinds = collections.defaultdict(float)
    for e in ops:
        kinds[op_kind(e, op_names)] += float(e.get("dur", 0.0))
    ranked = sorted(by_family.items(), key=lambda item: (-item[1][0], item[0]))
    out = {
        "ops": len(ops),
        "modules": sorted({e["args"].get("hlo_module", "") for e in ops} - {""}),
        "lines": lines_of(events, ops)[:8],
        "window_ms": round((end - start) / 1e3, 3),
        "busy_ms": round(busy_us / 1e3, 3),
        "busy_share": round(busy_us / (end - start), 3) if end > start else None,
        "kinds_ms": {k: round(v / 1e3, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "top": [{"family": name, "kind": kind(name), "ms": round(t / 1e3, 3), "count": n,
                 "share": round(t / busy_us, 4) if busy_us else None} for name, (t, n) in ranked[:top]],
    }
    out["timeline"] = timeline(ops, start)
    if op_names is not None:
        out["scopes"] = by_scope(ops, op_names, per)
        single = collections.defaultdict(float)
        for e in ops:
            single[e["args"]["hlo_op"]] += float(e.get("dur", 0.0))
        out["top_ops"] = [{"op": op, "ms": round(t / 1e3 / (per or 1), 4), "op_name": op_names.get(op, "")[-160:]}
                          for op, t in sorted(single.items(), key=lambda kv: -kv[1])[:top]]
    if per:
        out["per"] = per
        out["busy_ms_per"] = round(busy_us / 1e3 / per, 4)
        out["ops_per"] = round(len(ops) / per, 1)
    return out


def markdown(summary: dict, title: str = "Device time by operation") -> str:
    if not summary.get("ops"):
        return f"### {title}\n\nNo device operations in the trace.\n"
    lines = [f"### {title}", "",
             f"{summary['ops']} operations in {', '.join(summary['modules']) or '?'}; busy "
             f"{summary['busy_ms']} ms of a {summary['window_ms']} ms window (busy share {summary['busy_share']})"
             + (f"; per unit ({summary['per']}): {summary['busy_ms_per']} ms busy, {summary['ops_per']} operations"
                if summary.get("per") else "") + ".", "",
             "Counted: " + "; ".join(summary.get("lines", [])) + ".", "",
             "| kind | ms | share |", "|---|---|---|"]
    for name, ms in summary["kinds_ms"].items():
        lines.append(f"| {name} | {ms} | {ms / summary['busy_ms']:.1%} |")
    lines += ["", "| operation family | kind | ms | count | share |", "|---|---|---|---|---|"]
    for row in summary["top"]:
        lines.append(f"| `{row['family']}` | {row['kind']} | {row['ms']} | {row['count']} | {row['share']:.1%} |")
    buffered = sum(r["ms"] for r in summary["top"] if r["family"].startswith("command_buffer"))
    if buffered > 0.5 * summary["busy_ms"]:
        lines += ["", f"{buffered / summary['busy_ms']:.0%} of the device time is in XLA command buffers (CUDA "
                  "graphs), each one event in the trace: run with `XLA_FLAGS=--xla_gpu_enable_command_buffer=` "
                  "to see their kernels."]
    runs = summary.get("timeline") or []
    if 1 < len(runs) <= 40:  # an evaluation's programs; an epoch is one program
        lines += ["", "Programs in the order they ran (ms from the first operation):", "",
                  "| program | start | end | busy | operations | idle before |", "|---|---|---|---|---|---|"]
        lines += [f"| `{r['module']}` | {r['start_ms']} | {r['end_ms']} | {r['busy_ms']} | {r['ops']} | "
                  f"{r['idle_before_ms']} |" for r in runs]
    if summary.get("scopes"):
        unit = "ms per unit" if summary.get("per") else "ms"
        lines += ["", f"By model scope (named scopes; {summary['scopes']['matched_share']:.0%} of the device time "
                  f"matched to the compiled program's op names):", "", f"| scope | {unit} |", "|---|---|"]
        lines += [f"| {name} | {ms} |" for name, ms in summary["scopes"]["ms"].items()]
        lines += ["", f"| operation | {unit} | op_name |", "|---|---|---|"]
        lines += [f"| `{r['op']}` | {r['ms']} | `{r['op_name']}` |" for r in summary["top_ops"][:12]]
    return "\n".join(lines) + "\n"


USAGE = "usage: python -m experiments.trace_summary TRACE_DIR_OR_FILE"


def main(argv: list[str]) -> int:
    """0 with the table on stdout; 2 with one line on stderr for a bad argument or an unreadable trace."""
    if len(argv) == 2 and argv[1] in ("-h", "--help"):
        print(__doc__ + "\n" + USAGE)
        return 0
    if len(argv) != 2:
        print(f"error: expected one TRACE_DIR_OR_FILE argument, got {len(argv) - 1}; {USAGE}", file=sys.stderr)
        return 2
    try:
        path = newest_trace(argv[1])
        events = load_events(path)
        if not isinstance(events, list):
            raise ValueError("no list of trace events")
        summary = summarize(events)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError) as err:  # gzip, JSON, shape
        print(f"error: {path}: not a readable Chrome/perfetto trace ({type(err).__name__}: {err})", file=sys.stderr)
        return 2
    print(markdown(summary, title=path))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
