"""experiments/reproduce.py: a run on a tiny synthetic stand-in, the reference numbers, the flags."""

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, shared_path
from experiments import reproduce
from test_crosscheck import log_text

BABY_SIZES = {"n_users": 19445, "n_items": 7050}


@pytest.fixture(scope="module")
def baby_log(tmp_path_factory):
    """A log of baby in the reference's format (two seeds), written here; what reproduce reads from it."""
    path = tmp_path_factory.mktemp("logs") / "LGMRec-baby.log"
    path.write_text(log_text([(999, [0.090, 0.095, 0.0957, 0.0950], 0.003), (1, [0.08, 0.09], 0.0)], epochs=4,
                             **BABY_SIZES))
    return str(path), reproduce.reference_from_logs(str(path))["baby"]


@pytest.fixture(scope="module")
def tiny_reproduction(synthetic_dir, tmp_path_factory, baby_log):
    """Baby's paper settings, two epochs, on synthetic_tiny (the real-sized presets take minutes)."""
    root = str(tmp_path_factory.mktemp("reproduce"))
    request = {"datasets": ["baby"], "variant": "legacy", "data_dir": synthetic_dir, "workdir_root": root,
               "synthetic": True, "synthetic_preset": "tiny", "config_overrides": {"epochs": 2},
               "restart": False, "reference": {"baby": baby_log[1]}}
    return root, reproduce.reproduce(request)


def read_json(path):
    with open(path) as handle:
        return json.load(handle)


def cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "experiments.reproduce", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_reference_is_read_from_the_log(baby_log):
    path, ref = baby_log
    assert ref["best_epoch"] == 2 and ref["valid"]["recall@20"] == 0.0957
    assert (ref["n_users"], ref["n_items"]) == (19445, 7050) and ref["source"] == f"{path} (seed 999)"
    with pytest.raises(reproduce.ReproduceError, match="--reference_logs: .*no such log file"):
        reproduce.reference_from_logs(path + ".missing")


def test_tiny_run_writes_side_by_side_tables(tiny_reproduction, baby_log):
    root, payload = tiny_reproduction
    logged = baby_log[1]["test"]["recall@20"]
    assert read_json(os.path.join(root, "reproduction.json")) == json.loads(json.dumps(payload))
    entry = payload["datasets"]["baby"]
    assert entry["error"] is None and entry["data"] == "synthetic_tiny"
    assert entry["workdir"] == os.path.join(root, "legacy", "baby-synthetic_tiny")
    summary = read_json(os.path.join(entry["workdir"], "summary.json"))
    assert entry["status"] == summary["status"] == "max_epochs" and entry["epochs_run"] == 2
    rows = {row["label"]: row for row in entry["rows"]}
    assert [row["label"] for row in entry["rows"]] == [label for label, _, _ in reproduce.COMPARED]
    assert rows["best epoch"]["ours"] == summary["best_epoch"]
    assert rows["best epoch"]["difference"] == summary["best_epoch"] - 2
    assert rows["valid R@20"]["ours"] == summary["best_valid"]["recall@20"]
    assert rows["test MAP@20"]["ours"] == summary["best_test"]["map@20"]
    assert rows["test R@20"]["reference"] == logged
    assert rows["test R@20"]["difference"] == round(summary["best_test"]["recall@20"] - logged, 4)
    # Shown, but marked not comparable, with both reasons.
    assert entry["comparable"] is False
    assert any("synthetic data (synthetic_tiny)" in r for r in entry["not_comparable_because"])
    assert any("epochs=2" in r for r in entry["not_comparable_because"])
    with open(os.path.join(root, "reproduction.md")) as handle:
        markdown = handle.read()
    assert "## baby" in markdown and "Comparable with the reference: **no**" in markdown
    test_r20 = summary["best_test"]["recall@20"]
    assert f"| test R@20 | {test_r20:.4f} | {logged:.4f} | {test_r20 - logged:+.4f} |" in markdown


def test_tiny_run_uses_the_paper_config_and_variant(tiny_reproduction):
    """Only the data is swapped: the run's config is baby's (not configs/tiny.py) plus the overrides."""
    _, payload = tiny_reproduction
    config = read_json(os.path.join(payload["datasets"]["baby"]["workdir"], "config.json"))["identity"]["config"]
    assert config["legacy_text_user_hyper"] is True
    assert config["epochs"] == 2
    assert (config["embedding_size"], config["train_batch_size"], config["alpha"]) == (64, 2048, 0.3)


def test_configs_follow_the_paper_settings():
    sports = reproduce.config_for("sports", "fixed", {})
    assert sports.legacy_text_user_hyper is False
    assert (sports.n_ui_layers, sports.n_hyper_layer, sports.keep_rate, sports.alpha) == (2, 4, 0.4, 0.6)
    clothing = reproduce.config_for("clothing", "legacy", {"learning_rate": 5e-4})
    assert clothing.legacy_text_user_hyper is True
    assert (clothing.hyper_num, clothing.learning_rate) == (64, 5e-4)


def spec_section_6_1():
    """{dataset: [best epoch, valid R@20, test R@10, R@20, N@10, N@20, P@20, MAP@20]} from SPEC §6.1."""
    with open(shared_path("SPEC.md")) as handle:
        text = handle.read()
    section = text.split("### 6.1", 1)[1].split("###", 1)[0]
    table = {}
    for name in reproduce.PAPER_DATASETS:
        line = next(l for l in section.splitlines() if l.startswith(f"| {name.capitalize()} |"))
        table[name] = [float(cell.strip("* ")) for cell in line.strip("|").split("|")[1:]]
    return table


def test_the_published_logs_give_spec_6_1():
    reference = reproduce.reference_from_logs(shared_path("reference_logs", "published"))
    for name, numbers in spec_section_6_1().items():
        ours = [reproduce.reference_value(reference, name, split, key) for _, split, key in reproduce.COMPARED]
        assert ours == numbers, name
    assert (reference["baby"]["n_users"], reference["baby"]["n_items"]) == (19445, 7050)  # SPEC §1.7


def test_overrides_are_typed_and_checked():
    assert reproduce.parse_overrides("epochs=2, alpha=0.5,tensorboard=false,kernel=bcoo,learning_rate=1") == {
        "epochs": 2, "alpha": 0.5, "tensorboard": False, "kernel": "bcoo", "learning_rate": 1.0}
    assert reproduce.parse_overrides("") == {}
    for text, message in [("epochs", "not key=value"), ("epoch=2", "unknown config key 'epoch'"),
                          ("epochs=two", "is not a int"), ("legacy_text_user_hyper=true", "--variant")]:
        with pytest.raises(reproduce.ReproduceError, match=re.escape(message)):
            reproduce.parse_overrides(text)


def test_data_and_workdir_names():
    assert reproduce.data_name("baby", False, None) == "baby"
    assert reproduce.data_name("baby", True, None) == "synthetic_baby"
    assert reproduce.data_name("sports", True, "tiny") == "synthetic_tiny"
    assert reproduce.run_dir("r", "legacy", "baby", "baby") == os.path.join("r", "legacy", "baby")
    assert reproduce.run_dir("r", "fixed", "baby", "synthetic_tiny") == os.path.join("r", "fixed",
                                                                                      "baby-synthetic_tiny")


def test_real_data_is_comparable_only_with_the_logged_sizes(baby_log):
    reference = {"baby": baby_log[1]}
    assert reproduce.not_comparable_reasons("baby", "baby", 19445, 7050, {}, reference) == []
    reasons = reproduce.not_comparable_reasons("baby", "baby", 100, 7050, {}, reference)
    assert len(reasons) == 1 and "100 users" in reasons[0]
    assert reproduce.not_comparable_reasons("baby", "baby", 19445, 7050, {}, {}) == [
        "no reference log of baby given (--reference_logs)"]


def test_unevaluated_run_has_no_numbers():
    rows = reproduce.comparison_rows("clothing", {"best_epoch": -1, "best_valid": None, "best_test": None}, {})
    assert all(row["ours"] is None and row["reference"] is None and row["difference"] is None for row in rows)


@pytest.mark.parametrize("args, message", [
    (["--datasets=tiny", "--synthetic"], "--datasets: expected a comma-separated subset of baby,sports,clothing"),
    (["--synthetic_preset=tiny"], "--synthetic_preset needs --synthetic"),
    (["--synthetic", "--synthetic_preset=huge"], "--synthetic_preset: unknown preset 'huge'"),
    (["--datasets=baby"], "--data_dir is required"),
    (["--synthetic", "--config_overrides=epochs=x"], "epochs='x' is not a int"),
    (["--variant=new", "--synthetic"], "error: bad flag"),
    (["--synthetic", "--config_overrides=epochs=-1"], "error: --config_overrides: baby: epochs must be >= 0"),
    (["--synthetic", "--datasets=sports", "--config_overrides=alpha=nan"],
     "error: --config_overrides: sports: alpha is nan, expected a finite number"),
    (["--synthetic", "--config_overrides=matmul_precision=foo"],
     "error: --config_overrides: baby: matmul_precision is 'foo', expected one of"),
    (["--synthetic", "--workdir_root=FILE"], "error: --workdir_root=FILE: a file, expected a directory"),
    (["--synthetic", "--reference_logs=FILE"], "error: --reference_logs: FILE: not a log of the reference"),
])
def test_cli_rejects_bad_requests_with_one_line(args, message, tmp_path):
    (tmp_path / "FILE").write_text("x")
    args = [a.replace("FILE", str(tmp_path / "FILE")) for a in args]
    message = message.replace("FILE", str(tmp_path / "FILE"))
    proc = cli(f"--workdir_root={tmp_path / 'r'}", *args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert not (tmp_path / "r").exists()


def test_cli_reports_a_missing_dataset_and_exits_1(tmp_path):
    root = tmp_path / "r"
    proc = cli(f"--data_dir={tmp_path / 'data'}", "--datasets=baby", f"--workdir_root={root}")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "error: baby: " in proc.stderr and "dataset directory not found" in proc.stderr
    payload = read_json(root / "reproduction.json")
    assert "dataset directory not found" in payload["datasets"]["baby"]["error"]
    assert "**error**" in (root / "reproduction.md").read_text()


def test_an_invocation_in_which_every_dataset_fails_keeps_the_earlier_report(tmp_path):
    root = tmp_path / "r"
    root.mkdir()
    (root / "reproduction.json").write_text('{"earlier": true}\n')
    (root / "reproduction.md").write_text("earlier\n")
    proc = cli(f"--data_dir={tmp_path / 'wrong'}", "--datasets=baby,sports", f"--workdir_root={root}")
    assert proc.returncode == 1 and "error: sports: " in proc.stderr
    assert f"every dataset failed: kept the earlier {root / 'reproduction.md'} and .json" in proc.stdout
    assert (root / "reproduction.json").read_text() == '{"earlier": true}\n'
    assert (root / "reproduction.md").read_text() == "earlier\n"


def test_importing_reproduce_defines_no_global_flags():
    from absl import flags

    assert not {"datasets", "variant", "workdir_root", "synthetic"} & set(flags.FLAGS)
