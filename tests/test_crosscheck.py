"""python -m lgmrec_jax.crosscheck: the reference's log reader, the statistics, pairing, exit codes.

The logs here are written by the tests in the reference's format (MMRec quick_start); the real ones
are read from ../shared/reference_logs at run time (skipped where absent).
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, shared_path
from lgmrec_jax import crosscheck, crosscheck_stats as st, reference_log as rl

METRIC_NAMES = [f"{m}@{k}" for m in ("recall", "ndcg", "precision", "map") for k in (5, 10, 20, 50)]
FACTORS = {"recall": 1.0, "ndcg": 0.45, "precision": 0.06, "map": 0.3}
SETTING = {"n_ui_layers": 2, "n_mm_layers": 2, "n_hyper_layer": 1, "hyper_num": 4, "keep_rate": 0.5,
           "alpha": 0.3, "cl_weight": 0.0001, "reg_weight": 1e-06}
STAMP = "Sun 06 Dec 2026 21:15:31 INFO "


def metrics_of(value: float) -> dict:
    """All 16 metrics of an epoch whose recall@20 is ``value`` (the others scale with it)."""
    out = {}
    for name in METRIC_NAMES:
        metric, k = name.split("@")
        out[name] = round(value * FACTORS[metric] * (int(k) / 20) ** 0.5, 4)
    out["recall@20"] = round(value, 4)
    return out


def metrics_line(values: dict) -> str:
    return "".join(f"{name}: {values[name]:.4f}    " for name in METRIC_NAMES)


def jitter(seed: int, epoch: int) -> float:
    """Seed-dependent test noise, so that the best epochs' test values spread."""
    return float(np.random.default_rng([seed, epoch, 7]).normal(0.0, 0.002))


def log_text(runs, dataset="baby", epochs=60, stopping_step=20, n_users=30, n_items=20, settings=None):
    """A log in the reference's format. ``runs``: [(seed, [valid recall@20 per epoch], test offset)];
    every tuple's other settings are ``settings`` (default SETTING), or a run's 4th item (a dict)."""
    names = list(SETTING) + ["seed"]
    settings = settings or SETTING
    lines = [STAMP + "██Server: \tvm", STAMP, "use_gpu=False", f"seed={[r[0] for r in runs]}",
             "embedding_size=64", "weight_decay=0.0", f"epochs={epochs}", f"stopping_step={stopping_step}",
             "train_batch_size=2048", "learner=adam", "learning_rate=0.001", "learning_rate_scheduler=[1.0, 50]",
             "eval_step=1", "use_neg_sampling=True", "use_full_sampling=False", "field_separator=\t",
             "metrics=['Recall', 'NDCG', 'Precision', 'MAP']", "topk=[5, 10, 20, 50]", "valid_metric=Recall@20",
             "eval_batch_size=4096", "filter_out_cod_start_users=True", "inter_splitting_label=x_label",
             f"hyper_parameters={names}"]
    lines += [f"{k}=[{v}]" for k, v in settings.items()]
    lines += ["feat_embed_dim=64", "cf_model=lightgcn", "model=LGMRec", f"dataset={dataset}", "device=cpu", "", "",
              STAMP + dataset, f"The number of users: {n_users}", "Average actions of users: 10.0",
              f"The number of items: {n_items - 1}", f"The number of inters: {n_users * 10}", STAMP,
              "====Training====", dataset, f"The number of users: {n_users}", STAMP, "", "=" * 33, ""]
    finals = []
    for k, run in enumerate(runs, start=1):
        seed, curve, offset = run[:3]
        tuple_settings = run[3] if len(run) > 3 else settings
        values = tuple(tuple_settings.values()) + (seed,)
        lines.append(f"{STAMP}=========={k}/{len(runs)}: Parameters:{names}={values!r}=======")
        lines += [STAMP + "LGMRec(", f"  (user_embedding): Embedding({n_users}, 64)",
                  f"  (item_id_embedding): Embedding({n_items}, 64)", ")", "Trainable parameters: 123"]
        best, bad, best_epoch = -1.0, 0, None
        for epoch, value in enumerate(curve):
            valid, test = metrics_of(value), metrics_of(value + offset + jitter(seed, epoch))
            lines.append(f"{STAMP}epoch {epoch} training [time: {1 + epoch / 100:.2f}s, train loss: {40 - epoch / 10:.4f}]")
            lines.append(f"{STAMP}epoch {epoch} evaluating [time: 0.50s, valid_score: {valid['recall@20']:.6f}]")
            lines += [STAMP + "valid result: ", metrics_line(valid), STAMP + "test result: ", metrics_line(test)]
            if valid["recall@20"] > best:
                best, bad, best_epoch, best_valid, best_test = valid["recall@20"], 0, epoch, valid, test
                lines.append(STAMP + "██ LGMRec--Best validation results updated!!!")
            else:
                bad += 1
                if bad > stopping_step:
                    lines.append(f"{STAMP}+++++Finished training, best eval result in epoch {best_epoch}")
                    break
        lines.append(f"{STAMP}best valid result: {metrics_line(best_valid)}")
        lines.append(f"{STAMP}test result: {metrics_line(best_test)}")
        lines += [STAMP + "████Current BEST████:", f"Parameters: {names}={values!r},", f"Valid: {metrics_line(best_valid)},",
                  f"Test: {metrics_line(best_test)}", "", ""]
        finals.append((values, best_valid, best_test))
    lines += [STAMP, "============All Over====================="]
    for values, valid, test in finals:
        lines += [f"{STAMP}Parameters: {names}={values!r}", f" best valid: {metrics_line(valid)},",
                  f" best test: {metrics_line(test)}"]
    lines += [STAMP, "", "█████████████ BEST ████████████████", f"{STAMP}\tParameters: {names}={finals[0][0]!r},",
              f"Valid: {metrics_line(finals[0][1])},", f"Test: {metrics_line(finals[0][2])}", "", ""]
    return "\n".join(lines) + "\n"


def curve(seed: int, shift: float = 0.0, epochs: int = 30) -> list:
    """A rising valid recall@20 curve with seed-dependent noise (the same curve for the same seed)."""
    noise = np.random.default_rng(seed).normal(0.0, 0.003, epochs)
    return [0.2 + shift + 0.002 * min(e, 20) + noise[e] for e in range(epochs)]


def write(path, text) -> str:
    path.write_text(text)
    return str(path)


def write_workdir(path, seed, values, overrides=None, status="max_epochs", grid=None, n_items=20):
    """One of our workdirs as run.py writes it, with ``values`` as the per-epoch valid recall@20."""
    from lgmrec_jax.configs import default

    cfg = default.get_config().to_dict()
    cfg.update({"epochs": 60, "seed": seed, "num_devices": 1, **(overrides or {})})
    os.makedirs(path)
    config = {"identity": {"config": cfg, "dataset": "baby", "dataset_files": {}}, "n_users": 30,
              "n_items": n_items, "versions": {}}
    if grid:
        config["grid"] = grid
    rows, best, best_epoch = [], -1.0, -1
    for epoch, value in enumerate(values):
        valid, test = metrics_of(value), metrics_of(value + 0.01 + jitter(seed, epoch))
        if valid["recall@20"] > best:
            best, best_epoch = valid["recall@20"], epoch
        rows.append({"epoch": epoch, "loss": {"total": 40 - epoch / 10, "bpr": 1.0, "hcl": 1.0, "reg": 1.0},
                     "train_s": 2.0, "eval_s": 0.25, "valid": valid, "test": test, "best_epoch": best_epoch,
                     "patience_left": 20, "time_s": float(epoch)})
    with open(os.path.join(path, "config.json"), "w") as handle:
        json.dump(config, handle)
    with open(os.path.join(path, "metrics.jsonl"), "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    if status:
        summary = {"status": status, "best_epoch": best_epoch, "epochs_run": len(rows), "dataset": "baby",
                   "best_valid": rows[best_epoch]["valid"], "best_test": rows[best_epoch]["test"],
                   "total_wall_s": 1.0, "valid_metric": "recall@20"}
        with open(os.path.join(path, "summary.json"), "w") as handle:
            json.dump(summary, handle)
    return str(path)


@pytest.fixture
def reference(tmp_path):
    """A log of 8 seeds under SETTING."""
    return write(tmp_path / "ref.log", log_text([(s, curve(s), 0.01) for s in range(1, 9)]))


def our_runs(root, seeds, shift=0.0, **kwargs):
    return ",".join(write_workdir(root / f"seed{s}", s, curve(s + 100, shift), **kwargs) for s in seeds)


def run_cli(capsys, *args):
    code = crosscheck.cli(["crosscheck", *args])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------------------------
# The log reader


def test_reads_a_log_written_the_reference_way(tmp_path):
    text = log_text([(1, [0.20, 0.21, 0.215, 0.214], 0.01), (2, [0.19, 0.22, 0.22, 0.219], 0.0)], epochs=4)
    log = rl.read_log(write(tmp_path / "a.log", text))
    assert log.warnings == []
    assert log.dataset == "baby" and log.config["epochs"] == 4 and log.config["seed"] == [1, 2]
    assert log.config["field_separator"] == "\t" and log.config["valid_metric"] == "Recall@20"
    assert log.stats["all"] == {"users": 30, "items": 19, "inters": 300}
    first, second = log.runs
    assert (first.index, first.total, first.seed, first.params["keep_rate"]) == (1, 2, 1, 0.5)
    assert (first.n_users, first.n_items) == (30, 20)
    assert [e.epoch for e in first.epochs] == [0, 1, 2, 3] and first.complete and not first.stopped_early
    assert first.best_epoch == 2 and first.best().test["recall@20"] == round(0.215 + 0.01 + jitter(1, 2), 4)
    assert first.epochs[1].train_loss == 39.9 and first.epochs[1].train_s == 1.01 and first.epochs[1].eval_s == 0.5
    assert first.epochs[3].valid["recall@20"] == 0.214 and first.epochs[3].valid_score == 0.214
    # A tie does not update (epoch 2 equals epoch 1's 0.22): the earlier epoch is kept.
    assert second.best_epoch == 1
    assert [entry["params"]["seed"] for entry in log.all_over] == [1, 2]


def test_early_stopping_lines(tmp_path):
    values = [0.20, 0.25] + [0.24] * 5
    log = rl.read_log(write(tmp_path / "a.log", log_text([(3, values, 0.0)], stopping_step=2)))
    (run,) = log.runs
    assert run.stopped_early and run.stop_best_epoch == 1 == run.best_epoch
    assert len(run.epochs) == 5 and run.complete  # stopped after 3 non-improving epochs


def test_truncated_log_keeps_its_complete_epochs_with_a_warning(tmp_path):
    text = log_text([(1, curve(1, epochs=6), 0.0), (2, curve(2, epochs=6), 0.0)])
    lines = text.splitlines(keepends=True)
    second = next(i for i, line in enumerate(lines) if "2/2: Parameters" in line)
    cut = next(i for i in range(second, len(lines)) if "epoch 3 evaluating" in lines[i])
    log = rl.read_log(write(tmp_path / "cut.log", "".join(lines[:cut + 3])))  # ends after epoch 3's valid block
    first, killed = log.runs
    assert first.complete and len(first.epochs) == 6
    assert not killed.complete and [e.epoch for e in killed.epochs] == [0, 1, 2]
    assert any("epoch 3 is incomplete" in w for w in log.warnings)
    assert any("tuple 2/2 (seed 2) ends after 3 complete epochs" in w and "truncated" in w for w in log.warnings)
    # Cut inside a metrics line (a kill during the write): the same epochs, one more warning.
    partial = "".join(lines[:cut + 4])[:-60]
    log = rl.read_log(write(tmp_path / "cut2.log", partial))
    assert [e.epoch for e in log.runs[1].epochs] == [0, 1, 2]
    assert any("the last line is cut off" in w for w in log.warnings)


@pytest.mark.parametrize("content, message", [
    ("just some text\nnothing here\n", "not a log of the reference"),
    (b"\x89PNG\r\n\x1a\n\x00\xff", "not UTF-8 text"),
    ("", "not a log of the reference"),
])
def test_a_file_that_is_not_a_log(tmp_path, capsys, content, message, reference):
    path = tmp_path / "x.log"
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    with pytest.raises(rl.LogError, match=message):
        rl.read_log(str(path))
    runs = our_runs(tmp_path, [1, 2])
    code, out, err = run_cli(capsys, f"--reference={path}", f"--runs={runs}")
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [err.strip()] and err.startswith(f"error: {path}") and message in err


def test_a_corrupt_line_inside_a_log_names_its_line(tmp_path):
    lines = log_text([(1, curve(1, epochs=4), 0.0)]).splitlines()
    bad = next(i for i, line in enumerate(lines) if line.endswith("valid result: ")) + 1
    lines[bad] = "garbage"
    with pytest.raises(rl.LogError, match=rf"line {bad + 1}: expected the valid metrics"):
        rl.parse_text("\n".join(lines) + "\n", "f.log")


def test_paths_directories_and_globs(tmp_path, reference):
    other = write(tmp_path / "b.log", log_text([(9, curve(9), 0.0)]))
    (tmp_path / "notes.txt").write_text("x")
    assert rl.log_files(str(tmp_path)) == [other, reference]  # sorted; notes.txt is not a log
    assert rl.log_files(str(tmp_path / "*.log")) == [other, reference]
    assert rl.log_files(f"{other},{reference}") == [other, reference]
    with pytest.raises(rl.LogError, match="no such log file"):
        rl.log_files(str(tmp_path / "missing.log"))
    with pytest.raises(rl.LogError, match="names no log file"):
        rl.log_files(str(tmp_path / "*.nothing"))


# ---------------------------------------------------------------------------------------------------------
# The statistics


def test_welch_interval_worked_by_hand():
    """ours 1,2,3,4 and reference 3,4,5,6: difference −2; each variance 5/3, so se = sqrt(2·(5/3)/4)
    = 0.912871 and Welch's df is exactly 6; t = −2/0.912871 = −2.190890; the 95% interval is −2 ±
    t(0.975, 6)·se = −2 ± 2.446912·0.912871, the 90% one −2 ± 1.943180·0.912871."""
    out = st.welch([1, 2, 3, 4], [3, 4, 5, 6])
    assert out["difference"] == -2.0
    assert out["se"] == pytest.approx(0.912871, abs=1e-6)
    assert out["df"] == pytest.approx(6.0, abs=1e-9)
    assert out["t"] == pytest.approx(-2.190890, abs=1e-6)
    assert out["ci"] == pytest.approx([-2 - 2.446912 * 0.912871, -2 + 2.446912 * 0.912871], abs=1e-5)
    assert 0.05 < out["p"] < 0.1  # |t| below t(0.975, 6), above t(0.95, 6) = 1.943
    inside = st.tost([1, 2, 3, 4], [3, 4, 5, 6], margin=4.0)
    assert inside["ci"] == pytest.approx([-2 - 1.943180 * 0.912871, -2 + 1.943180 * 0.912871], abs=1e-5)
    assert inside["p"] < 0.05  # [-3.774, -0.226] lies inside ±4
    outside = st.tost([1, 2, 3, 4], [3, 4, 5, 6], margin=3.0)
    assert outside["p"] > 0.05  # ... but not inside ±3


def test_holm_by_hand():
    # Sorted: 0.01·3 = 0.03; 0.03·2 = 0.06; 0.04·1 = 0.04, raised to the running 0.06.
    assert st.holm([0.01, 0.04, 0.03, None]) == pytest.approx([0.03, 0.06, 0.06, None])
    assert st.holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])  # 0.8·2 capped at 1, and 0.9 raised to it
    assert st.holm([]) == []


def test_untestable_samples_give_no_numbers():
    assert st.welch([0.2], [0.1, 0.3])["t"] is None
    assert st.welch([0.2, 0.2], [0.2, 0.2])["p"] is None
    assert st.describe([0.5]) == {"n": 1, "mean": 0.5, "std": None}


def test_seeds_for_equivalence_and_detectable():
    ours, ref = [0.20, 0.21, 0.19, 0.20], [0.20, 0.19, 0.21, 0.20]
    assert st.seeds_for_equivalence(ours, ref, margin=0.0) is None
    wide, narrow = st.seeds_for_equivalence(ours, ref, 0.02), st.seeds_for_equivalence(ours, ref, 0.005)
    assert 2 <= wide < narrow
    assert st.seeds_for_equivalence([0.3, 0.31], [0.2, 0.21], margin=0.05) is None  # difference 0.1 > margin
    w = st.welch(ours, ref)
    small, large = st.detectable(w["se"], w["df"]), st.detectable(w["se"] * 2, w["df"])
    assert small > 0 and large == pytest.approx(2 * small)


# ---------------------------------------------------------------------------------------------------------
# Pairing and verdicts, through the command


def test_same_settings_same_distribution_exit_0(tmp_path, capsys, reference):
    runs = our_runs(tmp_path, range(1, 9))
    out_dir = tmp_path / "out"
    code, out, err = run_cli(capsys, f"--reference={reference}", f"--runs={runs}", f"--out={out_dir}")
    assert code == 0, err
    payload = json.loads((out_dir / "crosscheck.json").read_text())
    (comparison,) = payload["comparisons"]
    assert comparison["mismatches"] == [] and comparison["different"] == 0
    assert comparison["windows"] == [[5, 9], [10, 19], [20, 29]]  # thirds of the 30 epochs both ran
    best = [r for r in comparison["statistics"] if r["kind"] == "best"]
    assert [r["metric"] for r in best] == list(crosscheck.DEFAULT_METRICS)
    assert best[1]["reference"]["n"] == 8 and best[1]["ours"]["n"] == 8
    assert comparison["family_size"] == 6 + 3 * 2 * 6
    assert "Verdict: 0 of 42 statistics different" in (out_dir / "crosscheck.md").read_text()
    assert "0 statistic(s) different" in out
    assert comparison["times"]["ratio"]["train_s"] == pytest.approx(2.0 / 1.15, rel=0.1)


def test_shifted_metrics_are_different_exit_1(tmp_path, capsys, reference):
    runs = our_runs(tmp_path, range(1, 9), shift=0.03)
    code, out, err = run_cli(capsys, f"--reference={reference}", f"--runs={runs}", "--windows=5-14,15-29")
    assert code == 1, err
    assert "**Verdict: 30 of 30 statistics different**" in out
    assert "| test recall@20 |" in out and "different |" in out


def test_a_setting_mismatch_is_refused_key_by_key(tmp_path, capsys, reference):
    runs = our_runs(tmp_path, range(1, 5), overrides={"keep_rate": 0.2, "learning_rate": 0.01})
    out_dir = tmp_path / "out"
    code, out, err = run_cli(capsys, f"--reference={reference}", f"--runs={runs}", f"--out={out_dir}")
    assert code == 2 and out == "" and not out_dir.exists()
    (line,) = err.strip().splitlines()
    assert line.startswith("error: the settings differ")
    assert "keep_rate: reference 0.5, ours 0.2" in line and "learning_rate: reference 0.001, ours 0.01" in line
    assert "--compare_anyway" in line
    code, out, err = run_cli(capsys, f"--reference={reference}", f"--runs={runs}", "--compare_anyway")
    assert code in (0, 1) and "**Settings differ (compared anyway)**: `keep_rate` reference `0.5`, ours `0.2`" in out


def test_a_changed_setting_that_moves_the_metrics_either_refused_or_different(tmp_path, capsys, reference):
    runs = our_runs(tmp_path, range(1, 9), shift=-0.04, overrides={"learning_rate": 0.0001})
    code, _, err = run_cli(capsys, f"--reference={reference}", f"--runs={runs}")
    assert code == 2 and "learning_rate: reference 0.001, ours 0.0001" in err
    code, out, _ = run_cli(capsys, f"--reference={reference}", f"--runs={runs}", "--compare_anyway")
    assert code == 1 and "statistics different" in out


@pytest.mark.parametrize("kind", ["dataset_size", "variant", "ours_only_option", "epochs_cap"])
def test_other_keys_that_pair(tmp_path, capsys, reference, kind):
    args, expected = [], None
    if kind == "dataset_size":
        runs, expected = our_runs(tmp_path, [1, 2], n_items=21), "n_items: reference 20, ours 21"
    elif kind == "variant":
        runs, expected = our_runs(tmp_path, [1, 2]), "variant: reference 'legacy', ours 'fixed'"
        args = ["--reference_variant=legacy"]
    elif kind == "ours_only_option":
        runs, expected = our_runs(tmp_path, [1, 2], overrides={"use_ghe": False}), "use_ghe: reference True, ours False"
    else:
        runs, expected = our_runs(tmp_path, [1, 2], overrides={"epochs": 1000}), "epochs: reference 60, ours 1000"
    code, _, err = run_cli(capsys, f"--reference={reference}", f"--runs={runs}", *args)
    assert code == 2 and expected in err


def test_two_settings_in_one_file_pair_with_their_own(tmp_path, capsys):
    other = dict(SETTING, keep_rate=0.2, hyper_num=64)
    text = log_text([(1, curve(1), 0.01), (2, curve(2), 0.01, other), (3, curve(3), 0.01, other),
                     (4, curve(4), 0.01)])
    log = rl.read_log(write(tmp_path / "two.log", text))
    assert [r.params["keep_rate"] for r in log.runs] == [0.5, 0.2, 0.2, 0.5]
    refs = crosscheck.reference_samples(log, None)
    assert [len(g) for g in crosscheck.groups(refs)] == [2, 2]
    runs = our_runs(tmp_path, [1, 2, 3], overrides={"keep_rate": 0.2, "hyper_num": 64})
    code, out, err = run_cli(capsys, f"--reference={tmp_path / 'two.log'}", f"--runs={runs}")
    assert code == 0, err
    assert "Reference: 2 runs (seeds 2, 3)" in out and "Ours: 3 runs (seeds 1, 2, 3)" in out
    assert "warning: 2 reference tuple(s) like" in err and "match no run of ours: not compared" in err


def test_grid_workdirs_every_config_and_per_config_times(tmp_path, capsys, reference):
    grid = tmp_path / "grid"
    os.makedirs(grid / "configs")
    (grid / "grid.json").write_text(json.dumps({"grid": "seeds", "dataset": "baby"}))
    for s in range(1, 5):
        write_workdir(grid / "configs" / f"seed={s}", s, curve(s + 50),
                      grid={"group": "g1", "group_size": 4, "batching": "map"})
    os.makedirs(grid / "configs" / "seed=5")  # created, no epoch yet
    single = write_workdir(tmp_path / "single", 9, curve(59))
    code, out, err = run_cli(capsys, f"--reference={reference}", f"--runs={grid},{single}",
                             f"--out={tmp_path / 'out'}")
    assert code == 0, err
    payload = json.loads((tmp_path / "out" / "crosscheck.json").read_text())
    assert [s["seed"] for s in payload["comparisons"][0]["samples"]["ours"]] == [1, 2, 3, 4, 9]
    assert "seed=5: no epoch recorded yet; left out" in err
    samples = [crosscheck.our_sample(str(grid / "configs" / f"seed={s}")) for s in (1, 2)]
    crosscheck.per_config_times(samples)
    assert samples[0].rows[3]["train_s"] == 1.0  # the group's 2.0 s over the two configs read


def test_unfinished_runs_stay_out_of_the_best_epoch_statistics(tmp_path, capsys, reference):
    runs = our_runs(tmp_path, [1, 2, 3]) + "," + write_workdir(tmp_path / "live", 4, curve(4)[:12], status=None)
    code, out, err = run_cli(capsys, f"--reference={reference}", f"--runs={runs}", "--windows=0-9,10-20")
    assert code == 0, err
    assert "Ours: 4 runs (seeds 1, 2, 3, 4), 3 finished." in out
    assert "live (seed 4): not finished" in err
    # Window 0-9 holds the live run (12 epochs), window 10-20 does not.
    assert "| 0.2" in out and "(4) |" in out and "valid recall@20, epochs 10–20 |" in out


@pytest.mark.parametrize("args, message", [
    ([], "--reference=LOG[,LOG...] and --runs=WORKDIR[,WORKDIR...] are both required"),
    (["--margin=abc"], "--margin: 'abc' is not a number"),
    (["--margin=-1%"], "must be positive"),
    (["--windows=9-3"], "--windows: '9-3' is not FIRST-LAST"),
    (["--metrics=recall@99"], "none of the metrics recall@99"),
    (["--no_such_flag"], "error: bad flag"),
    (["--runs=/nonexistent/dir"], "/nonexistent/dir: no such workdir"),
    (["--out=FILE"], "is a file, expected a directory"),
])
def test_bad_requests_are_one_line_exit_2(tmp_path, capsys, reference, args, message):
    (tmp_path / "FILE").write_text("x")
    runs = our_runs(tmp_path, [1, 2])
    base = [f"--reference={reference}", f"--runs={runs}"] if args else []
    args = [a.replace("FILE", str(tmp_path / "FILE")) for a in args]
    code, out, err = run_cli(capsys, *base, *args)
    assert code == 2 and out == ""
    (line,) = err.strip().splitlines()
    assert line.startswith("error: ") and message in line


def test_png_only_with_matplotlib(tmp_path, capsys, reference, monkeypatch):
    runs = our_runs(tmp_path, [1, 2, 3])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails: as without the [plot] extra
    code, out, err = run_cli(capsys, f"--reference={reference}", f"--runs={runs}", f"--out={tmp_path / 'o'}")
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / "o")) == ["crosscheck.json", "crosscheck.md"]
    assert "![curves]" not in (tmp_path / "o" / "crosscheck.md").read_text()


def test_module_stays_light_and_defines_no_global_flags():
    code = ("import sys; from absl import flags; import lgmrec_jax.crosscheck; "
            "assert 'jax' not in sys.modules and 'matplotlib' not in sys.modules, 'heavy import'; "
            "assert 'reference' not in flags.FLAGS and 'runs' not in flags.FLAGS")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_entry_point_as_a_program(tmp_path, reference):
    runs = our_runs(tmp_path, [1, 2])
    proc = subprocess.run([sys.executable, "-m", "lgmrec_jax.crosscheck", f"--reference={reference}",
                           f"--runs={runs}", "--margin=0.01"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "# Cross-check" in proc.stdout, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "lgmrec_jax.crosscheck", "--margin=x"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


def test_a_real_tiny_run_is_read(synthetic_dir, tmp_path, capsys):
    """A workdir written by run.py itself (synthetic_tiny, 2 epochs) against a log of its settings."""
    from lgmrec_jax import configs, run
    from lgmrec_jax.data import load_dataset

    cfg = configs.for_dataset("synthetic_tiny")
    cfg.epochs = 2
    ds = load_dataset(synthetic_dir, "synthetic_tiny")
    workdir = str(tmp_path / "run")
    run.train_and_evaluate(cfg, ds, workdir)
    sample = crosscheck.our_sample(workdir)
    assert sample.complete and sorted(sample.rows) == [0, 1] and sample.best_test is not None
    settings = {k: cfg[k] for k in SETTING}
    text = log_text([(s, [0.1, 0.11], 0.0) for s in (1, 2)], dataset="synthetic_tiny", epochs=2,
                    stopping_step=cfg.stopping_step, n_users=ds.n_users, n_items=ds.n_items, settings=settings)
    text = text.replace("train_batch_size=2048", f"train_batch_size={cfg.train_batch_size}")
    text = text.replace("embedding_size=64", f"embedding_size={cfg.embedding_size}")
    text = text.replace("feat_embed_dim=64", f"feat_embed_dim={cfg.feat_embed_dim}")
    text = text.replace("eval_batch_size=4096", f"eval_batch_size={cfg.eval_batch_size}")
    log = write(tmp_path / "tiny.log", text)
    code, out, err = run_cli(capsys, f"--reference={log}", f"--runs={workdir}")
    assert code == 0, err
    assert "Settings: identical on every compared key" in out


# ---------------------------------------------------------------------------------------------------------
# The real logs


SPEC_6_1 = {  # best epoch, valid R@20, test R@10, R@20, N@10, N@20, P@20, MAP@20 (SPEC §6.1)
    "baby": (31, 0.0957, 0.0644, 0.0982, 0.0347, 0.0434, 0.0054, 0.0272),
    "sports": (72, 0.1034, 0.0713, 0.1057, 0.0384, 0.0473, 0.0059, 0.0299),
    "clothing": (66, 0.0829, 0.0558, 0.0830, 0.0303, 0.0372, 0.0043, 0.0241),
}


def test_published_logs_give_spec_6_1():
    directory = shared_path("reference_logs", "published")
    logs = {log.dataset: log for log in map(rl.read_log, rl.log_files(directory))}
    assert sorted(logs) == sorted(SPEC_6_1)
    for name, expected in SPEC_6_1.items():
        (run,) = logs[name].runs
        best = run.best()
        got = (run.best_epoch, best.valid["recall@20"], best.test["recall@10"], best.test["recall@20"],
               best.test["ndcg@10"], best.test["ndcg@20"], best.test["precision@20"], best.test["map@20"])
        assert got == expected, name
        assert run.seed == 999 and run.stopped_early and run.stop_best_epoch == expected[0]
    # The final blocks' inconsistency SPEC §6.1 describes (baby and sports) is reported, clothing's is not.
    assert any("'All Over'" in w for w in logs["baby"].warnings)
    assert any("'All Over'" in w for w in logs["sports"].warnings)
    assert not logs["clothing"].warnings


def test_synthetic_settings_logs():
    baby = [rl.read_log(p) for p in rl.log_files(shared_path("reference_logs", "synthetic_baby_settings"))]
    assert sorted(r.seed for log in baby for r in log.runs) == list(range(1, 13))
    assert all(r.complete for log in baby for r in log.runs) and not any(log.warnings for log in baby)
    sports = [rl.read_log(p) for p in rl.log_files(shared_path("reference_logs", "synthetic_sports_settings"))]
    runs = [r for log in sports for r in log.runs]
    assert [r.seed for r in runs if r.complete] == [1, 2, 3, 4, 5, 6, 7, 8]
    (killed,) = [r for r in runs if not r.complete]
    assert killed.seed == 9 and len(killed.epochs) == 5
    assert any("seed 9" in w and "truncated" in w for w in sports[1].warnings)
    assert all(r.params["n_ui_layers"] == 4 and r.params["n_hyper_layer"] == 1 for r in runs)
