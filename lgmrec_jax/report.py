"""Reads a run's workdir and prints its result as a table; plots its training curves.

    python -m lgmrec_jax.report runs/baby            # table on stdout, runs/baby/curves.png
    python -m lgmrec_jax.report runs/baby --noplot   # table only

The table: status, best epoch, epochs run, wall time, and the valid and test metrics at the best epoch.
A finished run is read from summary.json, one in progress from metrics.jsonl (the best epoch so far,
as its early stopping recorded it). With matplotlib (the ``[plot]`` extra) it writes ``curves.png``.
A malformed workdir is one ``error: ...`` line, exit 2, with or without matplotlib.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Optional

from absl import app, flags, logging

from lgmrec_jax import records
from lgmrec_jax.cli import fail, parse_flags

METRICS = ("recall", "ndcg", "precision", "map")
CUTOFFS = (5, 10, 20, 50)
CURVE_METRICS = ("recall@20", "ndcg@20")
PLOT_NAME = "curves.png"


class ReportError(RuntimeError):
    """The workdir cannot be reported; the message is one line for the user."""


@dataclasses.dataclass
class RunRecord:
    """What a workdir holds: the epoch rows, and summary.json / config.json where present."""

    path: str
    rows: list
    summary: Optional[dict]
    config: Optional[dict]


@dataclasses.dataclass
class Result:
    """The numbers the table shows, whether the run finished or not."""

    status: str
    dataset: Optional[str]
    valid_metric: str
    best_epoch: Optional[int]
    epochs_run: int
    wall_s: Optional[float]
    wall_is_estimate: bool  # summed from metrics.jsonl (no summary.json): excludes start-up time
    best_valid: Optional[dict]
    best_test: Optional[dict]
    reason: Optional[str] = None


# ---------------------------------------------------------------------------------------------------------
# Reading a workdir


def read_json(path: str) -> Optional[dict]:
    """A JSON file's object, or None when the file is absent."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as handle:
            payload = json.load(handle)
    except json.JSONDecodeError as err:
        raise ReportError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    except OSError as err:
        raise ReportError(f"{path}: cannot read ({err.strerror})") from None
    if not isinstance(payload, dict):
        raise ReportError(f"{path}: expected a JSON object, found {type(payload).__name__}")
    return payload


def read_metrics(path: str) -> list[dict]:
    """The epoch rows of metrics.jsonl; a corrupt line is an error naming its line number.

    The one exception: a last line without its newline that is not valid JSON is what a kill during
    the run's append leaves (the run skips it too, and rewrites the file on resume). It is skipped
    with a warning on stderr; a corrupt line anywhere else, or a complete last one, stays an error.
    """
    if not os.path.exists(path):
        raise ReportError(f"{path}: no metrics.jsonl (has the run finished an epoch in this workdir?)")
    rows = []
    try:
        with open(path) as handle:
            lines = handle.readlines()
    except OSError as err:
        raise ReportError(f"{path}: cannot read ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise ReportError(f"{path}: not valid JSON lines (not UTF-8 text: {err.reason})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines) and not line.endswith("\n"):
                print(f"warning: {path} line {number}: skipped a truncated last line (not valid JSON, no "
                      f"newline: the run was stopped while appending it)", file=sys.stderr)
                continue
            raise ReportError(f"{path} line {number}: not valid JSON ({err.msg})") from None
        problem = records.row_problem(row)  # checked on reading: a plot or none, the same refusal
        if problem:
            raise ReportError(f"{path} line {number}: {problem}; was it written by lgmrec_jax?")
        rows.append(row)
    return rows


def load_run(workdir: str) -> RunRecord:
    if not os.path.isdir(workdir):
        raise ReportError(f"{workdir}: no such workdir")
    path = os.path.abspath(workdir)
    rows = read_metrics(os.path.join(path, "metrics.jsonl"))
    summary = read_json(os.path.join(path, "summary.json"))
    config = read_json(os.path.join(path, "config.json"))
    return RunRecord(path=path, rows=rows, summary=summary, config=config)


# ---------------------------------------------------------------------------------------------------------
# The result to show


def identity_config(run: RunRecord) -> dict:
    return ((run.config or {}).get("identity") or {}).get("config") or {}


def best_so_far(rows: list[dict]) -> tuple[Optional[int], Optional[dict], Optional[dict]]:
    """The best epoch as the run's early stopping recorded it in the latest evaluated row.

    Taking the run's own ``best_epoch`` (rather than re-ranking the rows here) keeps its rules: the
    valid metric rounded to 4 decimals, strict improvement only, ties keep the earlier epoch.
    """
    evaluated = [row for row in rows if "best_epoch" in row]
    if not evaluated or evaluated[-1]["best_epoch"] < 0:
        return None, None, None
    best_epoch = evaluated[-1]["best_epoch"]
    best_row = next((row for row in rows if row["epoch"] == best_epoch), {})
    return best_epoch, best_row.get("valid"), best_row.get("test")


def summary_is_current(summary: Optional[dict], rows: list[dict]) -> bool:
    """A summary written before the run was resumed with more epochs describes fewer epochs than
    metrics.jsonl holds; it is then stale and the run is reported as in progress."""
    if summary is None or summary.get("status") == "non_finite":
        return False
    return summary.get("epochs_run", 0) >= len(rows)


def summed_epoch_seconds(rows: list[dict]) -> float:
    return sum(row.get("train_s", 0.0) + row.get("eval_s", 0.0) for row in rows)


def result_of(run: RunRecord) -> Result:
    cfg = identity_config(run)
    dataset = (run.summary or {}).get("dataset") or ((run.config or {}).get("identity") or {}).get("dataset")
    valid_metric = (run.summary or {}).get("valid_metric") or cfg.get("valid_metric", "recall@20")
    if summary_is_current(run.summary, run.rows):
        s = run.summary
        best_epoch = s.get("best_epoch")
        return Result(status=s.get("status", "?"), dataset=dataset, valid_metric=valid_metric,
                      best_epoch=None if best_epoch is None or best_epoch < 0 else best_epoch,
                      epochs_run=s.get("epochs_run", len(run.rows)), wall_s=s.get("total_wall_s"),
                      wall_is_estimate=False, best_valid=s.get("best_valid"), best_test=s.get("best_test"))
    best_epoch, best_valid, best_test = best_so_far(run.rows)
    stopped = run.summary if (run.summary or {}).get("status") == "non_finite" else None
    status = "non_finite" if stopped else "in progress"
    if run.summary is not None and not stopped:
        status = "in progress (summary.json is from an earlier, shorter invocation)"
    return Result(status=status, dataset=dataset, valid_metric=valid_metric,
                  best_epoch=best_epoch, epochs_run=len(run.rows), wall_s=summed_epoch_seconds(run.rows),
                  wall_is_estimate=True, best_valid=best_valid, best_test=best_test,
                  reason=stopped.get("reason") if stopped else None)


# ---------------------------------------------------------------------------------------------------------
# The table


def fmt_metric(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def fmt_seconds(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{seconds:.1f} s ({hours}:{minutes:02d}:{secs:02d})"


def metrics_table(best_valid: Optional[dict], best_test: Optional[dict]) -> list[str]:
    """One line per (split, metric), one column per cutoff."""
    label_width = len("precision") + 7
    lines = [" " * label_width + "".join(f"{'@' + str(k):>9}" for k in CUTOFFS)]
    for split, values in (("valid", best_valid), ("test", best_test)):
        for metric in METRICS:
            cells = "".join(f"{fmt_metric((values or {}).get(f'{metric}@{k}')):>9}" for k in CUTOFFS)
            lines.append(f"{split + ' ' + metric:<{label_width}}{cells}")
    return lines


def format_report(run: RunRecord, result: Result) -> str:
    best = "-" if result.best_epoch is None else f"{result.best_epoch} (by valid {result.valid_metric})"
    wall = fmt_seconds(result.wall_s)
    if result.wall_is_estimate:
        wall += ", summed over the epochs so far (without start-up time)"
    header = [("workdir", run.path), ("dataset", result.dataset or "-"), ("status", result.status)]
    if result.reason:
        header.append(("reason", result.reason))
    header += [("best epoch", best), ("epochs run", str(result.epochs_run)), ("wall time", wall)]
    width = max(len(key) for key, _ in header)
    lines = [f"{key:<{width}}  {value}" for key, value in header]
    if result.best_epoch is None:
        lines.append("")
        lines.append("no evaluated epoch yet: no metrics to show")
        return "\n".join(lines)
    lines.append("")
    lines.append(f"metrics at the best epoch ({result.best_epoch}):")
    lines.extend(metrics_table(result.best_valid, result.best_test))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# The curves


def curve(rows: list[dict], split: str, metric: str) -> tuple[list[int], list[float]]:
    points = [(row["epoch"], row[split][metric]) for row in rows if metric in row.get(split, {})]
    return [epoch for epoch, _ in points], [value for _, value in points]


def plot_curves(rows: list[dict], best_epoch: Optional[int], path: str) -> bool:
    """Writes the loss and metric curves to ``path``; False when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")  # files only: no display is needed or wanted
    import matplotlib.pyplot as plt

    figure, (loss_axes, metric_axes) = plt.subplots(1, 2, figsize=(11, 4))
    epochs = [row["epoch"] for row in rows]
    loss_axes.plot(epochs, [row["loss"]["total"] for row in rows], marker=".", label="total (sum over batches)")
    loss_axes.set(xlabel="epoch", ylabel="training loss", title="Loss")
    loss_axes.legend()
    for split, style in (("valid", "-"), ("test", "--")):  # one colour per metric, one line style per split
        for colour, metric in zip(("C0", "C1"), CURVE_METRICS):
            xs, ys = curve(rows, split, metric)
            if xs:
                metric_axes.plot(xs, ys, style, color=colour, marker=".", label=f"{split} {metric}")
    if best_epoch is not None:
        metric_axes.axvline(best_epoch, color="grey", linewidth=0.8, linestyle=":", label=f"best epoch {best_epoch}")
    metric_axes.set(xlabel="epoch", ylabel="metric", title="Recall@20 and NDCG@20")
    metric_axes.legend(fontsize="small")
    figure.tight_layout()
    tmp = f"{path}.tmp.png"  # written whole, then renamed: a reader never sees half a PNG
    try:
        figure.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    except OSError as err:
        raise ReportError(f"{path}: cannot write the plot ({err.strerror})") from None
    finally:
        plt.close(figure)
    return True


def plot_message(run: RunRecord, result: Result, plot: bool) -> str:
    if not plot:
        return "plot: not written (--noplot)"
    if not run.rows:
        return "plot: not written (no epoch recorded yet)"
    path = os.path.join(run.path, PLOT_NAME)
    if plot_curves(run.rows, result.best_epoch, path):
        return f"plot: {path}"
    return "plot: matplotlib is not installed, no plot written (pip install 'lgmrec-jax[plot]')"


def report(workdir: str, plot: bool = True) -> str:
    """The full text the command prints; writes curves.png as a side effect when ``plot``."""
    run = load_run(workdir)
    try:
        result = result_of(run)
        return f"{format_report(run, result)}\n\n{plot_message(run, result, plot)}"
    except (KeyError, TypeError, AttributeError, ValueError) as err:  # valid JSON, not the fields a run writes
        raise ReportError(f"{run.path}: metrics.jsonl, summary.json or config.json lacks a field a run writes, or "
                          f"has one of another type ({type(err).__name__}: {err}); was it written by "
                          f"lgmrec_jax?") from None


# ---------------------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        fail(f"expected one WORKDIR argument, got {len(argv) - 1}; usage: python -m lgmrec_jax.report WORKDIR")
    logging.set_verbosity(logging.WARNING)  # app.run sets INFO; matplotlib's font-cache note is noise here
    try:
        print(report(argv[1], plot=flags.FLAGS.plot))
    except ReportError as err:
        fail(str(err))


def define_flags() -> None:
    """Defined only when run as a program, so importing this module adds no global flags that could
    clash with another entry point's (lgmrec_jax.train defines --dataset, --workdir, ...)."""
    flags.DEFINE_bool("plot", True, f"Write WORKDIR/{PLOT_NAME} (needs matplotlib).")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
