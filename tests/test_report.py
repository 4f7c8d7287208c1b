"""python -m lgmrec_jax.report: the table of a real tiny run, curves.png, runs in progress, errors."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO
from lgmrec_jax import report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def finished_run(synthetic_dir, tmp_path_factory):
    """A real synthetic_tiny run, trained to its end in this process (cheaper than a subprocess)."""
    from lgmrec_jax import configs, run
    from lgmrec_jax.data import load_dataset

    cfg = configs.for_dataset("synthetic_tiny")
    cfg.epochs = 4
    workdir = str(tmp_path_factory.mktemp("run"))
    run.train_and_evaluate(cfg, load_dataset(synthetic_dir, "synthetic_tiny"), workdir)
    return workdir


def copy_run(src, dst):
    """A copy of a workdir's files (not its checkpoints), for variants of it."""
    os.makedirs(dst)
    for name in ("config.json", "metrics.jsonl", "summary.json"):
        shutil.copy(os.path.join(src, name), dst)
    return str(dst)


def read_json(path):
    with open(path) as handle:
        return json.load(handle)


def read_rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def table_values(text):
    """{(split, metric, k): value} parsed back from the printed table."""
    values = {}
    for line in text.splitlines():
        match = re.match(r"^(valid|test) (recall|ndcg|precision|map)\s+(.*)$", line)
        if match:
            cells = match.group(3).split()
            for k, cell in zip(report.CUTOFFS, cells):
                values[(match.group(1), match.group(2), k)] = None if cell == "-" else float(cell)
    return values


def header_value(text, key):
    match = re.search(rf"^{key}\s+(.*)$", text, flags=re.M)
    return match.group(1) if match else None


def cli(*args):
    return subprocess.run([sys.executable, "-m", "lgmrec_jax.report", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_table_matches_summary(finished_run, tmp_path):
    workdir = copy_run(finished_run, tmp_path / "run")
    summary = read_json(os.path.join(workdir, "summary.json"))
    text = report.report(workdir, plot=False)
    assert header_value(text, "status") == summary["status"]
    assert header_value(text, "best epoch").startswith(f"{summary['best_epoch']} (by valid recall@20)")
    assert header_value(text, "epochs run") == str(summary["epochs_run"])
    assert header_value(text, "wall time").startswith(f"{summary['total_wall_s']:.1f} s")
    values = table_values(text)
    assert len(values) == 2 * len(report.METRICS) * len(report.CUTOFFS)
    for (split, metric, k), value in values.items():
        assert value == summary[f"best_{split}"][f"{metric}@{k}"], (split, metric, k)
    assert "plot: not written (--noplot)" in text


def test_curves_png_is_written(finished_run, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib (the [plot] extra) is not installed")
    workdir = copy_run(finished_run, tmp_path / "run")
    text = report.report(workdir)
    png = os.path.join(workdir, "curves.png")
    assert f"plot: {png}" in text
    with open(png, "rb") as handle:
        assert handle.read(8) == PNG_SIGNATURE
    assert not [name for name in os.listdir(workdir) if ".tmp" in name]


def test_without_matplotlib_says_so(finished_run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    workdir = copy_run(finished_run, tmp_path / "run")
    text = report.report(workdir)
    assert "matplotlib is not installed, no plot written" in text
    assert not os.path.exists(os.path.join(workdir, "curves.png"))


def test_run_in_progress_reports_best_so_far(finished_run, tmp_path):
    workdir = copy_run(finished_run, tmp_path / "run")
    os.remove(os.path.join(workdir, "summary.json"))
    rows = read_rows(workdir)[:2]  # as if the run were still in its third epoch
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    best_epoch = rows[-1]["best_epoch"]
    text = report.report(workdir, plot=False)
    assert header_value(text, "status") == "in progress"
    assert header_value(text, "epochs run") == "2"
    assert header_value(text, "best epoch").startswith(f"{best_epoch} ")
    assert "summed over the epochs so far" in header_value(text, "wall time")
    values = table_values(text)
    assert values[("test", "ndcg", 20)] == rows[best_epoch]["test"]["ndcg@20"]
    assert values[("valid", "recall", 20)] == rows[best_epoch]["valid"]["recall@20"]


def test_summary_older_than_metrics_is_in_progress(finished_run, tmp_path):
    """After a resume with more epochs, summary.json describes fewer epochs than metrics.jsonl."""
    workdir = copy_run(finished_run, tmp_path / "run")
    summary = read_json(os.path.join(workdir, "summary.json"))
    summary["epochs_run"] -= 1
    with open(os.path.join(workdir, "summary.json"), "w") as handle:
        json.dump(summary, handle)
    text = report.report(workdir, plot=False)
    assert header_value(text, "status").startswith("in progress")


def test_non_finite_run_shows_reason_and_best_so_far(finished_run, tmp_path):
    workdir = copy_run(finished_run, tmp_path / "run")
    reason = "non-finite loss or parameters in epoch 4, step 0; the last good checkpoint (epoch 4) is kept"
    with open(os.path.join(workdir, "summary.json"), "w") as handle:
        json.dump({"status": "non_finite", "reason": reason, "epoch": 4, "step": 0}, handle)
    text = report.report(workdir, plot=False)
    assert header_value(text, "status") == "non_finite"
    assert header_value(text, "reason") == reason
    assert table_values(text)[("test", "recall", 20)] is not None


def test_no_epoch_yet(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    text = report.report(str(tmp_path))
    assert "no evaluated epoch yet" in text and "no epoch recorded yet" in text


def test_cli_prints_table_and_plot_location(finished_run, tmp_path):
    workdir = copy_run(finished_run, tmp_path / "run")
    proc = cli(workdir)
    assert proc.returncode == 0, proc.stderr
    assert "test recall" in proc.stdout and "plot: " in proc.stdout
    assert proc.stderr == ""


def cut_off_line(workdir, epoch: int = 2) -> str:
    """Half of an epoch's metrics.jsonl line, without its newline: what a kill during the run's append
    leaves (run.Workdir.append_metrics, fault kill:metrics:E)."""
    line = json.dumps(read_rows(workdir)[epoch], sort_keys=True) + "\n"
    return line[:len(line) // 2]


def test_truncated_last_line_is_skipped_with_a_warning(finished_run, tmp_path, capsys):
    """A run killed while appending epoch 2's line: the two complete lines are reported, as in progress."""
    workdir = copy_run(finished_run, tmp_path / "run")
    os.remove(os.path.join(workdir, "summary.json"))
    rows = read_rows(workdir)[:2]
    path = os.path.join(workdir, "metrics.jsonl")
    with open(path, "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
        handle.write(cut_off_line(finished_run))
    text = report.report(workdir, plot=False)
    assert header_value(text, "status") == "in progress" and header_value(text, "epochs run") == "2"
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"warning: {path} line 3: skipped a truncated last line (not valid JSON, no newline: "
                   "the run was stopped while appending it)"]
    proc = cli(workdir, "--noplot")
    assert proc.returncode == 0 and "test recall" in proc.stdout, proc.stderr
    assert proc.stderr.strip().splitlines() == err


def test_truncated_line_in_the_middle_is_an_error(finished_run, tmp_path):
    """Only the last line can be cut by a kill; a cut line followed by others is corruption."""
    workdir = copy_run(finished_run, tmp_path / "run")
    rows = read_rows(workdir)
    path = os.path.join(workdir, "metrics.jsonl")
    with open(path, "w") as handle:
        handle.write(json.dumps(rows[0]) + "\n" + cut_off_line(finished_run, 1))
        handle.writelines(json.dumps(row) + "\n" for row in rows[1:])
    with pytest.raises(report.ReportError, match=rf"^{re.escape(path)} line 2: not valid JSON"):
        report.report(workdir, plot=False)


@pytest.mark.parametrize("case", ["missing_workdir", "no_metrics", "corrupt_line", "corrupt_summary",
                                  "no_argument", "bad_flag", "row_without_loss", "null_valid", "summary_types",
                                  "identity_not_an_object"])
def test_cli_errors_are_one_line_exit_2(case, finished_run, tmp_path):
    workdir = str(tmp_path / "run")
    args = [workdir]
    if case == "missing_workdir":
        expected = f"error: {workdir}: no such workdir"
    elif case == "no_metrics":
        os.makedirs(workdir)
        expected = "metrics.jsonl: no metrics.jsonl"
    elif case == "corrupt_line":
        copy_run(finished_run, workdir)
        with open(os.path.join(workdir, "metrics.jsonl"), "a") as handle:
            handle.write('{"epoch": 9, "loss": \n')
        expected = f"metrics.jsonl line {len(read_rows(finished_run)) + 1}: not valid JSON"
    elif case == "corrupt_summary":
        copy_run(finished_run, workdir)
        with open(os.path.join(workdir, "summary.json"), "w") as handle:
            handle.write("{")
        expected = "summary.json: not valid JSON"
    elif case in ("row_without_loss", "null_valid", "summary_types", "identity_not_an_object"):
        copy_run(finished_run, workdir)  # valid JSON, not what a run writes
        rows = read_rows(finished_run)
        if case == "row_without_loss":
            rows[1] = {"epoch": 1}
        elif case == "null_valid":
            rows[-1]["valid"] = None
        if case in ("row_without_loss", "null_valid"):
            with open(os.path.join(workdir, "metrics.jsonl"), "w") as handle:
                handle.writelines(json.dumps(r) + "\n" for r in rows)
            os.remove(os.path.join(workdir, "summary.json"))
            expected = ("metrics.jsonl line 2: expected 'loss' to be an object" if case == "row_without_loss" else
                        f"metrics.jsonl line {len(rows)}: expected 'valid' to be an object of metric -> number")
        elif case == "summary_types":
            summary = read_json(os.path.join(workdir, "summary.json"))
            summary["epochs_run"] = str(summary["epochs_run"])
            with open(os.path.join(workdir, "summary.json"), "w") as handle:
                json.dump(summary, handle)
        else:
            with open(os.path.join(workdir, "config.json"), "w") as handle:
                json.dump({"identity": 5}, handle)
        if case in ("summary_types", "identity_not_an_object"):
            expected = f"error: {workdir}: metrics.jsonl, summary.json or config.json lacks a field a run writes"
    elif case == "no_argument":
        args, expected = [], "error: expected one WORKDIR argument, got 0"
    else:
        args, expected = ["--no_such_flag", workdir], "error: bad flag"
    proc = cli(*args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


@pytest.mark.parametrize("matplotlib_installed", [True, False])
@pytest.mark.parametrize("plot", [True, False])
@pytest.mark.parametrize("row, expected", [
    ({"epoch": 1}, "line 2: expected 'loss' to be an object with a number 'total'"),
    ({"epoch": 1, "loss": {"total": 1.0}, "valid": None}, "line 2: expected 'valid' to be an object of metric"),
    ({"epoch": 1, "loss": {"total": 1.0}, "test": {"recall@20": "0.5"}}, "line 2: expected 'test' to be an object"),
    ({"epoch": 1, "loss": {"total": 1.0}, "best_epoch": 0.5}, "line 2: expected 'best_epoch' to be an integer"),
])
def test_malformed_rows_are_refused_with_or_without_a_plot(row, expected, plot, matplotlib_installed, finished_run,
                                                           tmp_path, monkeypatch):
    if not matplotlib_installed:
        monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    workdir = copy_run(finished_run, tmp_path / "run")
    rows = read_rows(finished_run)
    rows[1] = row
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in rows)
    with pytest.raises(report.ReportError, match=re.escape(expected)):
        report.report(workdir, plot=plot)
    assert not os.path.exists(os.path.join(workdir, report.PLOT_NAME))


def test_importing_report_defines_no_global_flags():
    from absl import flags

    assert "plot" not in flags.FLAGS  # only `python -m lgmrec_jax.report` defines --plot
