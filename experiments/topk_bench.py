"""The evaluation's top-50 selection alone, method against method, at a catalogue's width.

    python -m experiments.topk_bench --items=7050,23033 --rows=19200

Scores random 64-d users against random items a chunk of users at a time (as
evaluation.block_top_k does on CPUs) and times each selection over all rows: ``scores`` (the matmul
and a row maximum only: the floor), ``direct`` (lax.top_k), ``grouped`` (grouped_top_k as on
accelerators) and ``grouped_pruned`` (grouped_top_k as on CPUs). Every method's indices are checked
against ``direct``'s. Results go to ``<out>/topk_<tag>.json`` and ``.md`` (tag: the backend).
The whole evaluation is measured by experiments.bench (``--eval_topk``); this isolates the selection.
"""

from __future__ import annotations

import datetime
import os
import sys

import numpy as np
from absl import app, flags

from experiments import benchmarking
from lgmrec_jax import cli

METHODS = ("scores", "direct", "grouped", "grouped_pruned")
FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_list("items", ["7050", "23033"], "Catalogue widths (Baby 7,050, Clothing 23,033).")
    flags.DEFINE_integer("rows", 19200, "Users scored (rounded up to whole chunks).")
    flags.DEFINE_integer("chunk", 256, "Users scored at a time (evaluation.CPU_SCORE_CHUNK on CPUs).")
    flags.DEFINE_integer("repeats", 5, "Timed calls per method after one warm-up (median reported).")
    flags.DEFINE_list("methods", list(METHODS), f"Methods among {METHODS}.")
    flags.DEFINE_string("out", os.path.join(benchmarking.REPO, "experiments", "results"), "Results directory.")
    flags.DEFINE_string("tag", "", "Result file suffix: topk_<tag>.json/md (default: the backend).")


K = 50  # the evaluation's top-k (evaluation.TOP_K)


def selection(method: str, k: int = K):
    """fn(chunk scores) -> what the method keeps of them."""
    import jax

    from lgmrec_jax import evaluation

    if method == "scores":
        return lambda s: s.max(axis=1)
    if method == "direct":
        return lambda s: jax.lax.top_k(s, k)[1]
    if method in ("grouped", "grouped_pruned"):
        return lambda s: evaluation.grouped_top_k(s, k, prune=method == "grouped_pruned")
    cli.fail(f"--methods: {method!r} is not one of {list(METHODS)}")


def chunked(fn, chunk: int):
    import jax

    def run(users, items):
        return jax.lax.map(lambda c: fn(c @ items.T), users.reshape(-1, chunk, users.shape[1]))

    return jax.jit(run)


def time_calls(fn, repeats: int) -> list[float]:
    """Seconds of ``repeats`` calls after one warm-up call."""
    benchmarking.timed(fn)
    return [benchmarking.timed(fn)[1] for _ in range(repeats)]


def measure(n_items: int, rows: int, chunk: int, methods, repeats: int) -> list[dict]:
    import jax

    rows = -(-rows // chunk) * chunk
    users = jax.random.normal(jax.random.PRNGKey(0), (rows, 64))
    items = jax.random.normal(jax.random.PRNGKey(1), (n_items, 64))
    reference = np.asarray(chunked(selection("direct"), chunk)(users, items))
    out = []
    for method in methods:
        fn = chunked(selection(method), chunk)
        times = time_calls(lambda: fn(users, items), repeats)
        same = None if method == "scores" else bool((np.asarray(fn(users, items)) == reference).all())
        out.append({"items": n_items, "rows": rows, "chunk": chunk, "method": method,
                    "median_s": round(float(np.median(times)), 4), "min_s": round(min(times), 4),
                    "us_per_row": round(float(np.median(times)) / rows * 1e6, 2), "same_as_direct": same})
        print(f"{n_items} items, {method}: {out[-1]['median_s']} s ({out[-1]['us_per_row']} us per row)"
              f"{'' if same is not False else '  DIFFERENT LISTS'}", flush=True)
    return out


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# Top-50 selection ({m['backend']}: {m['cpu']}, {m['cpu_count']} cores; jax {m['versions'].get('jax')})",
             "", f"`{report['command']}` ({report['started']}, commit {m['git']['commit'][:10]}). "
             "Median wall seconds over all rows, the chunk's scores included; *scores*: matmul and a "
             "row maximum only. *same*: the same indices as `direct` for every row.", "",
             "| items | rows | chunk | method | median s | min s | us per row | same |", "|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        same = "-" if r["same_as_direct"] is None else ("yes" if r["same_as_direct"] else "**no**")
        lines.append(f"| {r['items']} | {r['rows']} | {r['chunk']} | {r['method']} | {r['median_s']} | "
                     f"{r['min_s']} | {r['us_per_row']} | {same} |")
    return "\n".join(lines) + "\n"


def main(argv) -> int:
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}; every input is a --flag")
    for method in FLAGS.methods:
        selection(method)  # an unknown method stops here, before any timing
    try:
        widths = [int(n) for n in FLAGS.items]
    except ValueError:
        cli.fail(f"--items={','.join(FLAGS.items)}: expected integer catalogue widths")
    if min(widths, default=0) < K or FLAGS.rows < 1 or FLAGS.chunk < 1 or FLAGS.repeats < 1:
        cli.fail(f"--items must be at least k={K} wide, --rows, --chunk and --repeats at least 1")
    cli.require_out_dir(FLAGS.out)
    import jax

    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    results = []
    for n in widths:
        results += measure(n, FLAGS.rows, FLAGS.chunk, FLAGS.methods, FLAGS.repeats)
    report = {"command": "python -m experiments.topk_bench " + " ".join(sys.argv[1:]), "started": started,
              "machine": benchmarking.machine(), "results": results}
    stem = os.path.join(FLAGS.out, f"topk_{FLAGS.tag or jax.default_backend()}")
    benchmarking.write_texts({stem + ".json": benchmarking.json_text(report), stem + ".md": markdown(report)})
    print(f"wrote {stem}.json and {stem}.md")
    return 0 if all(r["same_as_direct"] is not False for r in results) else 1


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
