"""The grid engine: a seeds grid as one program equals single runs; shards, merge, resume, repack,
devices, two processes, tables and config validation.

Compiled programs are the cost here, so the module shares a persistent compilation cache and
most mechanics use a feature-less copy of synthetic_tiny ("plain": LightGCN-only, small programs).
"""

import csv
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO, free_port, read_jsonl
from lgmrec_jax.records import strip_timing
from lgmrec_jax import configs, run as run_lib
from lgmrec_jax.grid import GridError, merge as grid_merge, runner, sharding, spec, tables
from lgmrec_jax import workdir as workdir_lib
from lgmrec_jax.data import DatasetError, load_dataset

GRIDS_DIR = os.path.join(REPO, "experiments", "grids")  # the shipped sweeps
TINY = {"epochs": 3, "stopping_step": 100}
PLAIN = {"epochs": 2, "stopping_step": 100, "train_batch_size": 128, "eval_batch_size": 16,
         "embedding_size": 8, "feat_embed_dim": 8, "keep_checkpoints": 2}


def run_grid(grid, dataset, data_dir, workdir=None, base_overrides=None, **options):
    """runner.run_grid, its GridOptions given as arguments (named grids from the shipped directory)."""
    return runner.run_grid(runner.GridOptions(grid=grid, dataset=dataset, data_dir=data_dir, workdir=workdir,
                                              base_overrides=base_overrides or {}, grids_dir=GRIDS_DIR, **options))


def expand(name, dataset, base, seeds=None):
    return spec.expand(name, dataset, base, seeds, GRIDS_DIR)


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """A persistent compilation cache for this module; the previous settings are restored after."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    old = {n: getattr(jax.config, n) for n in names}
    path = os.environ.get("LGMREC_TEST_JAX_CACHE") or str(tmp_path_factory.mktemp("jax_cache"))
    runner.setup_compilation_cache(path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    yield path
    for n, v in old.items():
        jax.config.update(n, v)


@pytest.fixture(scope="module")
def plain_dir(synthetic_dir, tmp_path_factory):
    """A data_dir with "plain": synthetic_tiny's interactions without feature files."""
    data_dir = tmp_path_factory.mktemp("plain_data")
    os.makedirs(data_dir / "plain")
    shutil.copy(os.path.join(synthetic_dir, "synthetic_tiny", "synthetic_tiny.inter"), data_dir / "plain" / "plain.inter")
    return str(data_dir)


def grid_file(tmp_path, body: str, name="g.py") -> str:
    path = tmp_path / name
    path.write_text(body)
    return str(path)


ALPHA_SEEDS = """
def sweep(add):
    for alpha in (0.3, 0.7):
        for seed in (0, 1):
            add(alpha=alpha, seed=seed)
"""


def read_csv(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def config_outputs(workdir, cid):
    d = os.path.join(workdir, "configs", cid)
    return strip_timing(read_jsonl(os.path.join(d, "metrics.jsonl"))), strip_timing(
        json.load(open(os.path.join(d, "summary.json"))))


def assert_close_runs(rows_a, rows_b, rtol=2e-5):
    """Equal epochs, evaluation metrics equal, losses equal up to float32 reassociation."""
    assert [r["epoch"] for r in rows_a] == [r["epoch"] for r in rows_b]
    for a, b in zip(rows_a, rows_b):
        np.testing.assert_allclose([a["loss"][k] for k in sorted(a["loss"])],
                                   [b["loss"][k] for k in sorted(b["loss"])], rtol=rtol)
        assert {k: v for k, v in a.items() if k != "loss"} == {k: v for k, v in b.items() if k != "loss"}


@pytest.mark.slow
def test_seed_grid_is_one_program_equal_to_single_runs(synthetic_dir, tmp_path):
    """The shipped 8-seed grid on synthetic_tiny: one group, and each seed's metrics.jsonl and
    summary.json equal those of a single run with that seed."""
    result = run_grid("seeds", "synthetic_tiny", synthetic_dir, str(tmp_path / "grid"), TINY)
    assert len(result["summaries"]) == 8
    groups = {json.load(open(tmp_path / "grid" / "configs" / cid / "config.json"))["grid"]["group"]
              for cid in result["summaries"]}
    assert len(groups) == 1  # the 8 seeds ran as one program
    ds = load_dataset(synthetic_dir, "synthetic_tiny")
    for seed in range(8):
        cfg = configs.for_dataset("synthetic_tiny")
        cfg.update(TINY, seed=seed)
        single = run_lib.train_and_evaluate(cfg, ds, str(tmp_path / f"single{seed}"))
        rows, summary = config_outputs(tmp_path / "grid", f"seed={seed}")
        assert summary == strip_timing(single)
        # batching=map (the default): bitwise the single run's numbers, losses included
        assert rows == strip_timing(read_jsonl(tmp_path / f"single{seed}" / "metrics.jsonl"))
        grid_cfg = json.load(open(tmp_path / "grid" / "configs" / f"seed={seed}" / "config.json"))
        single_cfg = json.load(open(tmp_path / f"single{seed}" / "config.json"))
        assert grid_cfg["identity"] == single_cfg["identity"]  # the same resolved config and dataset
    table = read_csv(tmp_path / "grid" / "results.csv")
    assert [r["seed"] for r in table] == [str(s) for s in range(8)]
    assert "8/8" in (tmp_path / "grid" / "results.md").read_text()


def test_shards_merge_into_the_unsharded_tables(plain_dir, tmp_path):
    g = grid_file(tmp_path, ALPHA_SEEDS)
    whole = run_grid(g, "plain", plain_dir, str(tmp_path / "whole"), PLAIN)
    parts = [run_grid(g, "plain", plain_dir, str(tmp_path / f"host{i}"), PLAIN, shard=(i, 2))
             for i in range(2)]
    assert sorted(parts[0]["configs"] + parts[1]["configs"]) == sorted(whole["configs"])
    assert not set(parts[0]["configs"]) & set(parts[1]["configs"])
    assert os.path.exists(tmp_path / "host1" / "shards" / "1-of-2" / "results.csv")

    with pytest.raises(GridError, match="2 of 4 configs have no final result"):
        grid_merge.merge([str(tmp_path / "host0")], str(tmp_path / "partial"))
    partial = grid_merge.merge([str(tmp_path / "host0")], str(tmp_path / "partial"), allow_partial=True)
    assert partial["missing"] == 2
    assert sorted(r["status"] for r in read_csv(tmp_path / "partial" / "results.csv")).count("missing") == 2

    merged = grid_merge.merge([str(tmp_path / "host0"), str(tmp_path / "host1")], str(tmp_path / "merged"))
    assert merged["missing"] == 0 and merged["copied"] == 4
    drop = lambda rows: [{k: v for k, v in r.items() if k != "total_wall_s"} for r in rows]
    assert drop(read_csv(tmp_path / "merged" / "results.csv")) == drop(read_csv(tmp_path / "whole" / "results.csv"))
    for cid in whole["configs"]:  # sharding changes no number
        assert config_outputs(tmp_path / "merged", cid)[1] == config_outputs(tmp_path / "whole", cid)[1]
    md = (tmp_path / "merged" / "results.md").read_text()
    assert md.count("| ★ |") == 1 and "selects on the test set" in md

    # A --workdir that holds another grid, or files of no grid, is refused before anything is replaced.
    other = run_grid(g, "plain", plain_dir, str(tmp_path / "other"), {**PLAIN, "epochs": 1}, shard=(0, 2))
    recorded = (tmp_path / "other" / "grid.json").read_text()
    with pytest.raises(GridError, match=r"other/grid.json describes another grid than .*host0/grid.json "
                                                 r"\(differs in base_overrides\): merging would replace its configs"):
        grid_merge.merge([str(tmp_path / "host0"), str(tmp_path / "host1")], str(tmp_path / "other"))
    assert (tmp_path / "other" / "grid.json").read_text() == recorded
    assert sorted(os.listdir(tmp_path / "other" / "configs")) == sorted(other["configs"])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine\n")
    with pytest.raises(GridError, match=r"mine: not empty and not a grid workdir \(no grid.json\)"):
        grid_merge.merge([str(tmp_path / "host0"), str(tmp_path / "host1")], str(tmp_path / "mine"))
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]


@pytest.mark.slow
def test_killed_group_resumes_and_finished_configs_are_skipped(plain_dir, tmp_path):
    g = grid_file(tmp_path, ALPHA_SEEDS)
    kw = dict(base_overrides=PLAIN, shard=(0, 2))
    straight = run_grid(g, "plain", plain_dir, str(tmp_path / "a"), **kw)
    interrupted = run_grid(g, "plain", plain_dir, str(tmp_path / "b"), stop_after_epochs=1, **kw)
    assert {s["status"] for s in interrupted["summaries"].values()} == {"interrupted"}
    resumed = run_grid(g, "plain", plain_dir, str(tmp_path / "b"), **kw)
    for cid in straight["configs"]:
        assert strip_timing(resumed["summaries"][cid]) == strip_timing(straight["summaries"][cid])
        assert config_outputs(tmp_path / "b", cid) == config_outputs(tmp_path / "a", cid)
    metrics = tmp_path / "b" / "configs" / straight["configs"][0] / "metrics.jsonl"
    rows = read_jsonl(metrics)  # the config's clock over both calls, as a single run's time_s
    assert rows[0]["time_s"] >= rows[0]["train_s"] + rows[0]["eval_s"] - 1e-3  # time_s is rounded to 1 ms
    assert rows[1]["time_s"] - rows[0]["time_s"] >= rows[1]["train_s"] + rows[1]["eval_s"] - 2e-3, rows
    before = metrics.stat().st_mtime_ns
    again = run_grid(g, "plain", plain_dir, str(tmp_path / "b"), **kw)  # all finished: nothing runs
    assert metrics.stat().st_mtime_ns == before
    assert strip_timing(again["summaries"]) == strip_timing(resumed["summaries"])


def test_repacked_group_equals_masked_group(plain_dir, tmp_path, caplog):
    """vmap: two configs stop after 1 epoch, the group shrinks to the other two, which are unaffected."""
    g = grid_file(tmp_path, """
def sweep(add):
    for seed in (0, 1):
        add(seed=seed, epochs=1)
        add(seed=seed, alpha=0.7)
""")
    caplog.set_level("INFO")
    packed = run_grid(g, "plain", plain_dir, str(tmp_path / "packed"), PLAIN, batching="vmap")
    assert "repacked to 2 slots (2 active)" in caplog.text
    run_grid(g, "plain", plain_dir, str(tmp_path / "masked"), PLAIN, batching="vmap", repack=False)
    for cid in packed["configs"]:
        rows_p, summary_p = config_outputs(tmp_path / "packed", cid)
        rows_m, summary_m = config_outputs(tmp_path / "masked", cid)
        assert summary_p == summary_m
        assert_close_runs(rows_p, rows_m)
    assert {s["epochs_run"] for s in packed["summaries"].values()} == {1, 2}


def test_devices_and_batchings_give_the_same_results(plain_dir, tmp_path):
    """map on one device against: map over 2 devices, vmap, vmap with column propagation."""
    g = grid_file(tmp_path, ALPHA_SEEDS)
    one = run_grid(g, "plain", plain_dir, str(tmp_path / "one"), PLAIN, shard=(0, 2))
    run_grid(g, "plain", plain_dir, str(tmp_path / "two"), PLAIN, shard=(0, 2), devices=2)
    for batching in ("vmap", "vmap_columns"):
        run_grid(g, "plain", plain_dir, str(tmp_path / batching), PLAIN, shard=(0, 2), batching=batching)
    for cid in one["configs"]:
        rows_1, summary_1 = config_outputs(tmp_path / "one", cid)
        for other in ("two", "vmap", "vmap_columns"):
            rows_2, summary_2 = config_outputs(tmp_path / other, cid)
            assert summary_1 == summary_2
            assert_close_runs(rows_1, rows_2)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["group", "sequential"])
def test_two_processes_with_jax_distributed_split_the_grid(plain_dir, tmp_path, compilation_cache, mode):
    """Each process trains its own shard; in sequential mode each config is a process-local single run
    (not one run spanning both processes)."""
    g = grid_file(tmp_path, ALPHA_SEEDS)
    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    common = ["--dataset=plain", f"--data_dir={plain_dir}", f"--grid={g}", f"--workdir={tmp_path / 'wd'}",
              f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--mode={mode}",
              f"--compilation_cache_dir={compilation_cache}"] + [f"--config.{k}={v}" for k, v in PLAIN.items()]
    procs = [subprocess.Popen([sys.executable, "-m", "experiments.grid", *common, f"--process_id={i}"], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    printed = [json.loads(out[out.index("{\n"):]) for out, _ in outs]
    assert {p["tables"].rsplit("/", 1)[-1] for p in printed} == {"0-of-2", "1-of-2"}
    merged = grid_merge.merge([str(tmp_path / "wd")])
    assert merged["missing"] == 0 and merged["configs"] == 4


def test_tables_mean_std_and_selection_by_validation(tmp_path):
    manifest = {"grid": "g", "dataset": "d", "swept": ["alpha"], "valid_metric": "recall@20",
                "base_overrides": {"stopping_step": 5, "epochs": 20}, "seeds": [0, 1]}

    def row(alpha, seed, valid, test):
        overrides = {"alpha": alpha, "seed": seed}
        return {"config_id": f"alpha={alpha},seed={seed}", "label": f"alpha={alpha}", "seed": seed,
                "setting": json.dumps({"alpha": alpha}), "overrides": overrides, "source": None,
                "status": "early_stopped", "best_epoch": 3, "epochs_run": 10, "total_wall_s": 1.0,
                "valid_recall@20": valid, "valid_ndcg@20": 0.1, "test_recall@10": 0.1, "test_recall@20": test,
                "test_ndcg@10": 0.1, "test_ndcg@20": 0.05, "test_precision@20": 0.01, "test_map@20": 0.02}

    rows = [row(0.1, 0, 0.10, 0.30), row(0.1, 1, 0.12, 0.30), row(0.5, 0, 0.20, 0.20), row(0.5, 1, 0.22, 0.20)]
    written = tables.write_tables(manifest, rows, str(tmp_path))
    md = (tmp_path / "results.md").read_text()
    best_line = next(line for line in md.splitlines() if line.startswith("| ★"))
    assert "alpha=0.5" in best_line and "0.2100 ± 0.0141" in best_line  # by validation, sample std
    assert "its pick here would be `alpha=0.1`" in md  # the reference's test-set pick, named
    assert ("Every config: the dataset's config, with `epochs=20`, `stopping_step=5` except what the settings "
            "set; seeds 0, 1.") in md  # how the table was made, beyond the swept values
    table = read_csv(tmp_path / "results.csv")
    assert [r["alpha"] for r in table] == ["0.1", "0.1", "0.5", "0.5"] and table[2]["valid_recall@20"] == "0.2"
    pytest.importorskip("matplotlib")
    assert str(tmp_path / "alpha.png") in written
    assert (tmp_path / "alpha.png").read_bytes().startswith(b"\x89PNG")


def test_grid_validation_errors(tmp_path):
    base = spec.base_config("synthetic_tiny")
    bogus = grid_file(tmp_path, "def sweep(add):\n    add(alpha=0.1)\n    add(bogus_key=1)\n", "bogus.py")
    with pytest.raises(GridError, match=r"grid 'bogus': add\(bogus_key=...\) sets unknown config key\(s\) "
                                                 r"'bogus_key'; known keys: .*alpha"):
        expand(bogus, "synthetic_tiny", base)
    twice = grid_file(tmp_path, "def sweep(add):\n    add(alpha=0.1)\n    add(alpha=0.1)\n", "twice.py")
    with pytest.raises(GridError, match="adds the config 'alpha=0.1' twice"):
        expand(twice, "synthetic_tiny", base)
    bad = grid_file(tmp_path, "def sweep(add):\n    add(keep_rate=0.0)\n    add(hyper_num='many')\n", "bad.py")
    points = expand(bad, "synthetic_tiny", base)
    with pytest.raises(GridError, match=r"config keep_rate=0.0: config: keep_rate is 0.0"):
        spec.resolve(points[:1], base, bad)
    with pytest.raises(GridError, match=r"config hyper_num=many: hyper_num='many'"):
        spec.resolve(points[1:], base, bad)
    for text in ("2/2", "x", "1/0"):
        with pytest.raises(GridError, match="expected i/n"):
            sharding.parse_shard(text)
    with pytest.raises(GridError, match="unknown grid 'nope'; available: ablation, alpha"):
        spec.load_sweep("nope", GRIDS_DIR)


def test_shipped_grids_expand_on_synthetic_presets():
    for name in spec.available_grids(GRIDS_DIR):
        for dataset in ("synthetic_tiny", "synthetic_clothing"):
            base = spec.base_config(dataset)
            points = expand(name, dataset, base) if name != "search" else None
            if points is not None:
                spec.resolve(points, base, name)
    assert [p.label for p in expand("ablation", "synthetic_tiny", base)] == [
        "LGMRec", "w/o CGE", "w/o MGE", "w/o GHE", "w/o HCL"]
    alphas = [p.overrides["alpha"] for p in expand("alpha", "synthetic_clothing", base)]
    assert alphas[:3] == [0.0, 0.01, 0.05] and len(alphas) == 13
    assert len(expand("alpha", "synthetic_baby", base)) == 11
    taus = spec.resolve(expand("tau", "synthetic_tiny", base), base, "tau")
    from lgmrec_jax import group_engine
    assert len({group_engine.program_key(p.cfg) for p in taus}) == 1  # one program for the whole sweep
    assert [p.overrides["hyper_num"] for p in expand("hyper_num", "baby", base)] == [
        2, 4, 8, 16, 32, 64, 128, 256]
    shard = sharding.shard_points(expand("hyper_num", "baby", base, seeds=[0, 1]), 1, 4)
    assert [p.cid for p in shard] == ["hyper_num=8,seed=0", "hyper_num=8,seed=1", "hyper_num=16,seed=0",
                                      "hyper_num=16,seed=1"]


def test_cli_reports_grid_errors_in_one_line(tmp_path):
    bogus = grid_file(tmp_path, "def sweep(add):\n    add(use_hypergraph=False)\n", "bogus.py")
    proc = subprocess.run([sys.executable, "-m", "experiments.grid", f"--grid={bogus}", "--dataset=synthetic_tiny",
                           f"--workdir={tmp_path / 'wd'}", "--compilation_cache_dir="], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "unknown config key(s) 'use_hypergraph'" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "wd").exists()


def test_column_propagation_equals_plain_vmap():
    """ColumnOps.propagate under vmap (one propagation over all configs' columns) gives plain
    vmap's values and gradients, for the symmetric A_hat and for R (whose backward is R^T)."""
    from lgmrec_jax import graph as graph_lib, group_engine, model as model_lib

    rng = np.random.default_rng(0)
    n_users, n_items, k = 12, 9, 3
    train = np.stack([np.repeat(np.arange(n_users), 3), rng.integers(0, n_items, 3 * n_users)], axis=1)
    g = graph_lib.build_graph(train, n_users, n_items)
    local, columns = model_lib.LocalOps("segment_sum"), group_engine.ColumnOps()
    for matrix, n_rows, n_cols, width in ((g.norm_adj, n_users + n_items, n_users + n_items, 4),
                                          (g.interactions, n_users, n_items, 5)):
        x = jax.numpy.asarray(rng.normal(size=(k, n_cols, width)), jax.numpy.float32)
        w = jax.numpy.asarray(rng.normal(size=(k, n_rows, width)), jax.numpy.float32)

        def loss(ops, xk, wk):
            return jax.numpy.sum(jax.numpy.tanh(ops.propagate(matrix, xk, n_rows)) * wk)

        outs = [jax.jit(jax.vmap(jax.value_and_grad(lambda xk, wk, o=o: loss(o, xk, wk))))(x, w)
                for o in (local, columns)]
        for a, b in zip(jax.tree_util.tree_leaves(outs[0]), jax.tree_util.tree_leaves(outs[1])):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
        # Unbatched use (a single config) is the plain propagation.
        np.testing.assert_allclose(np.asarray(columns.propagate(matrix, x[0], n_rows)),
                                   np.asarray(local.propagate(matrix, x[0], n_rows)), rtol=1e-6)


def test_traced_values_reach_their_own_config():
    """A map group whose configs differ in every traced key trains each config as its single run
    (to float32 reassociation: a traced value is not constant-folded as a single run's is)."""
    from lgmrec_jax import data, engine as engine_lib, group_engine, sampler as sampler_lib, step as step_lib

    rng = np.random.default_rng(1)
    n_users, n_items = 12, 9
    train = np.stack([np.repeat(np.arange(n_users), 3), rng.integers(0, n_items, 3 * n_users)], axis=1)
    ds = data.from_arrays(train, train[:6], train[6:12], n_users, n_items, v_feat=rng.random((n_items, 7)),
                          t_feat=rng.random((n_items, 5)))
    cfgs = []
    for seed, alpha, keep, cl, reg, lr, tau in ((0, 0.1, 0.5, 1e-4, 1e-6, 1e-3, 0.2),
                                                (1, 0.9, 0.8, 1e-2, 1e-3, 3e-3, 0.5)):
        cfg = configs.for_dataset("default")
        cfg.update(embedding_size=8, feat_embed_dim=8, n_ui_layers=1, n_mm_layers=1, train_batch_size=16,
                   num_devices=1, seed=seed, alpha=alpha, keep_rate=keep, cl_weight=cl, reg_weight=reg,
                   learning_rate=lr, tau=tau)
        cfgs.append(cfg)
    prog = group_engine.GroupEngine(cfgs[0], ds, batching="map", uniform=group_engine.uniform_values(cfgs))
    assert prog.uniform == {}
    states = prog.init([0, 1])
    per = [sampler_lib.NegativeSampler(ds.train, n_items, 16, c.seed).epoch(0) for c in cfgs]
    states, parts, _ = prog.run_epoch(states, cfgs, per, 0, np.ones(2, bool))
    params = prog.get(states.params)
    for k, cfg in [(1, cfgs[1])]:  # the second slot, every value unlike the first's (one single run: compile time)
        exp = engine_lib.SingleEngine(cfg, ds)
        state, single_parts = exp.train_epoch(exp.put(exp.init_state()), 0)
        np.testing.assert_allclose(parts[k], single_parts, rtol=1e-5)
        for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(exp.get(state).params)):
            np.testing.assert_allclose(a[k], np.asarray(b), rtol=1e-4, atol=1e-6)
        # Evaluation reads alpha and tau (the Gumbel softmax) per config too: same metrics from the same params.
        single_params = exp.get(state).params
        stacked = jax.tree_util.tree_map(lambda x: np.stack([np.asarray(x)] * 2), single_params)
        grid_metrics = prog.evaluate(step_lib.TrainState(prog.put(stacked), None), cfgs, 0)
        assert grid_metrics[k] == exp.evaluate_params(single_params, 0)


def test_group_checkpoint_is_written_while_the_next_epoch_trains(plain_dir, tmp_path, monkeypatch):
    """As for single runs: the group's save of epoch e runs while epoch e + 1 trains, and the configs'
    metrics lines of epoch e are written only after that checkpoint has committed."""
    import collections
    import threading

    from lgmrec_jax import checkpoint as ckpt_lib, group_engine

    training = collections.defaultdict(threading.Event)
    overlapped, lines_at_save = [], []
    real_epoch, real_save = group_engine.GroupEngine.run_epoch, ckpt_lib.Checkpoints.save
    workdir = tmp_path / "grid"

    started = []

    def run_epoch(self, states, cfgs, batches, epoch, active, on_chunk=None):
        training[len(started)].set()  # epoch e of a fresh group is its e-th call
        started.append(True)
        return real_epoch(self, states, cfgs, batches, epoch, active, on_chunk)

    def save(self, step, state, meta, valid_value):
        lines = [len(read_jsonl(p)) for p in workdir.glob("configs/*/metrics.jsonl")]
        lines_at_save.append((step, sorted(set(lines))))
        if step < 3:  # step e + 1 is epoch e's checkpoint; the last epoch has no next one
            overlapped.append(training[step].wait(timeout=30))
        real_save(self, step, state, meta, valid_value)

    monkeypatch.setattr(group_engine.GroupEngine, "run_epoch", run_epoch)
    monkeypatch.setattr(ckpt_lib.Checkpoints, "save", save)
    result = run_grid(grid_file(tmp_path, ALPHA_SEEDS), "plain", plain_dir, str(workdir),
                      dict(PLAIN, epochs=3), shard=(0, 2))
    assert overlapped == [True, True]
    # When epoch e's checkpoint is written, the lines of epochs before e exist and e's does not yet.
    assert lines_at_save == [(1, [0]), (2, [1]), (3, [2])]
    assert {s["status"] for s in result["summaries"].values()} == {"max_epochs"}
    for cid in result["configs"]:
        assert len(read_jsonl(workdir / "configs" / cid / "metrics.jsonl")) == 3


@pytest.mark.slow
def test_emulated_precision_grid_computes_the_accelerators_products(synthetic_dir, tmp_path):
    """--emulate_precision=tpu trains with a TPU's one-pass bfloat16 products for precision 'default'
    (on a CPU otherwise float32), in a workdir of its own, which a plain grid never resumes."""
    g = grid_file(tmp_path, "def sweep(add):\n    add()\n")
    common = [sys.executable, "-m", "experiments.grid", f"--grid={g}", "--dataset=synthetic_tiny",
              f"--data_dir={synthetic_dir}", "--compilation_cache_dir=", "--config.epochs=1",
              "--config.matmul_precision=default"]
    env = {**os.environ, "PYTHONPATH": REPO}
    emulated_dir = tmp_path / "runs" / "grid" / "g" / "synthetic_tiny_emulated_tpu"
    losses = {}
    for name, extra in (("plain", [f"--workdir={tmp_path / 'plain'}"]), ("tpu", ["--emulate_precision=tpu"])):
        proc = subprocess.run(common + extra, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        workdir = os.path.join(tmp_path, json.loads(proc.stdout[proc.stdout.index("{"):])["workdir"])
        (config_dir,) = [os.path.join(workdir, "configs", c) for c in os.listdir(os.path.join(workdir, "configs"))]
        losses[name] = read_jsonl(os.path.join(config_dir, "metrics.jsonl"))[0]["loss"]["bpr"]
    assert os.path.realpath(workdir) == os.path.realpath(emulated_dir)
    assert 1e-6 < abs(losses["tpu"] - losses["plain"]) / losses["plain"] < 1e-1, losses
    assert json.loads((emulated_dir / "grid.json").read_text())["emulate_precision"] == "tpu"
    assert "**Emulated**: every product was computed on a CPU as a TPU" in (emulated_dir / "results.md").read_text()
    proc = subprocess.run(common + [f"--workdir={emulated_dir}"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {emulated_dir} holds another grid run (emulate_precision: tpu -> None): their results must not "
        "mix; rerun it as it was, use --restart (without --grid_shard) to discard it, or choose another --workdir")


def test_a_precision_the_backend_cannot_run_is_refused_before_anything_is_written(synthetic_dir, tmp_path):
    g = grid_file(tmp_path, "def sweep(add):\n    add(matmul_precision='TF32_TF32_F32_X3')\n")
    with pytest.raises(GridError, match=r"config matmul_precision=TF32_TF32_F32_X3: matmul_precision 'TF32_TF32_F32_X3' does not run "
                                                 r"on this backend \(cpu\)"):
        run_grid(g, "synthetic_tiny", synthetic_dir, str(tmp_path / "wd"), TINY)
    assert not (tmp_path / "wd").exists()


def test_a_refused_rerun_leaves_the_grid_record_as_it_was(synthetic_dir, tmp_path):
    """A rerun whose configs differ from the trained ones is refused, and grid.json still describes
    the runs that are there (grid_merge reads it)."""
    g = grid_file(tmp_path, "def sweep(add):\n    add()\n")
    workdir = tmp_path / "wd"
    run_grid(g, "synthetic_tiny", synthetic_dir, str(workdir), {**TINY, "epochs": 1, "seed": 999})
    recorded = (workdir / "grid.json").read_text()
    with pytest.raises(workdir_lib.RunError, match="different setup"):
        run_grid(g, "synthetic_tiny", synthetic_dir, str(workdir), {**TINY, "epochs": 1, "seed": 5})
    assert (workdir / "grid.json").read_text() == recorded


@pytest.mark.parametrize("body,message", [
    ("def sweep(add)\n    add()\n", r"grid file .*g\.py: line 1: SyntaxError"),
    ("import no_such_module\n", r"grid file .*g\.py: line 1: ModuleNotFoundError: No module named 'no_such_module'"),
    ("def sweep(add):\n    add()\n    1 / 0\n", r"grid 'g': sweep\(\) failed: line 3: ZeroDivisionError"),
])
def test_a_broken_grid_file_is_reported_with_its_line(tmp_path, body, message):
    base = spec.base_config("synthetic_tiny")
    with pytest.raises(GridError, match=message):
        expand(grid_file(tmp_path, body), "synthetic_tiny", base)


def test_bad_data_stops_a_grid_before_it_writes(tmp_path):
    g = grid_file(tmp_path, "def sweep(add):\n    add()\n")
    with pytest.raises(DatasetError, match="dataset directory not found"):
        run_grid(g, "nope", str(tmp_path), str(tmp_path / "wd"), TINY)
    assert not (tmp_path / "wd").exists()


def test_restart_checks_the_data_first_and_deletes_only_what_a_grid_wrote(plain_dir, tmp_path):
    g = grid_file(tmp_path, "def sweep(add):\n    add()\n")
    workdir = tmp_path / "wd"
    run_grid(g, "plain", plain_dir, str(workdir), {**PLAIN, "epochs": 1})
    written = sorted(os.listdir(workdir))
    assert {"grid.json", "results.csv", "results.md", "configs", "groups"} <= set(written)
    with pytest.raises(DatasetError, match="dataset directory not found"):
        run_grid(g, "nope", plain_dir, str(workdir), {**PLAIN, "epochs": 1}, restart=True)
    assert sorted(os.listdir(workdir)) == written  # bad data: the old results are still there
    (workdir / "notes.txt").write_text("mine\n")
    with pytest.raises(GridError, match=r"wd: --restart deletes only what a run wrote there, and it "
                                                 r"also holds notes.txt; move those away"):
        run_grid(g, "plain", plain_dir, str(workdir), {**PLAIN, "epochs": 1}, restart=True)
    assert sorted(os.listdir(workdir)) == sorted(written + ["notes.txt"])
    (workdir / "notes.txt").unlink()
    (workdir / "alpha.png").write_text("an old plot")
    run_grid(g, "plain", plain_dir, str(workdir), {**PLAIN, "epochs": 1}, restart=True)
    assert sorted(os.listdir(workdir)) == written


@pytest.mark.parametrize("change", ["grid", "dataset", "mode"])
def test_a_workdir_of_another_grid_is_refused(plain_dir, tmp_path, change):
    g = grid_file(tmp_path, "def sweep(add):\n    add()\n")
    other = grid_file(tmp_path, "def sweep(add):\n    add(alpha=0.5)\n", name="other.py")
    workdir = tmp_path / "wd"
    run_grid(g, "plain", plain_dir, str(workdir), {**PLAIN, "epochs": 1})
    recorded = (workdir / "grid.json").read_text()
    shutil.copytree(os.path.join(plain_dir, "plain"), tmp_path / "data" / "plain2")
    os.rename(tmp_path / "data" / "plain2" / "plain.inter", tmp_path / "data" / "plain2" / "plain2.inter")
    args = {"grid": (other, "plain", plain_dir, {}), "dataset": (g, "plain2", str(tmp_path / "data"), {}),
            "mode": (g, "plain", plain_dir, {"mode": "sequential"})}[change]
    expected = {"grid": "grid: g -> other", "dataset": "dataset: plain -> plain2", "mode": "mode: group -> sequential"}
    with pytest.raises(GridError, match=rf"holds another grid run \({expected[change]}\): their results "
                                                 rf"must not mix"):
        run_grid(args[0], args[1], args[2], str(workdir), {**PLAIN, "epochs": 1}, **args[3])
    assert (workdir / "grid.json").read_text() == recorded
    assert sorted(os.listdir(workdir / "configs")) == ["base"]


def test_a_finished_group_is_neither_extended_nor_shortened(plain_dir, tmp_path):
    """A group whose members all finished at max_epochs keeps its results: a rerun asking for another
    number of epochs is refused (a single run is extended instead), and grid.json is left as it was."""
    g = grid_file(tmp_path, ALPHA_SEEDS)
    workdir = tmp_path / "wd"
    run_grid(g, "plain", plain_dir, str(workdir), PLAIN)
    recorded = (workdir / "grid.json").read_text()
    for epochs in (3, 1):
        with pytest.raises(GridError, match=rf"config alpha=0.3,seed=0 finished after 2 epochs "
                                                     rf"\(max_epochs\), and asks for epochs={epochs}: a finished "
                                                     rf"group is neither extended nor shortened"):
            run_grid(g, "plain", plain_dir, str(workdir), {**PLAIN, "epochs": epochs})
        assert (workdir / "grid.json").read_text() == recorded


def test_a_non_finite_value_in_a_grid_is_refused_before_anything_runs(tmp_path):
    base = spec.base_config("synthetic_tiny")
    with pytest.raises(GridError, match=r"grid 'g': add\(reg_weight=inf\) is not a finite number"):
        expand(grid_file(tmp_path, "def sweep(add):\n    add(reg_weight=float('inf'))\n"),
               "synthetic_tiny", base)


def test_a_base_override_the_grid_sets_per_config_is_named_in_a_warning(plain_dir, tmp_path, caplog):
    g = grid_file(tmp_path, "def sweep(add):\n    add(alpha=0.5)\n")
    with caplog.at_level("WARNING"):
        run_grid(g, "plain", plain_dir, str(tmp_path / "wd"), {**PLAIN, "epochs": 1, "alpha": 0.77})
    assert "the grid sets alpha per config: the --config value(s) given for it are not used" in caplog.text
    config = json.loads((tmp_path / "wd" / "configs" / "alpha=0.5" / "config.json").read_text())
    assert config["identity"]["config"]["alpha"] == 0.5


def test_a_shard_restart_of_another_grid_is_refused_before_it_deletes(plain_dir, tmp_path):
    g = grid_file(tmp_path, "def sweep(add):\n    add()\n    add(alpha=0.5)\n")
    workdir = tmp_path / "wd"
    for i in range(2):
        run_grid(g, "plain", plain_dir, str(workdir), {**PLAIN, "epochs": 1}, shard=(i, 2))
    configs_before = sorted(os.listdir(workdir / "configs"))
    with pytest.raises(GridError, match=r"holds another grid run \(mode: group -> sequential\)"):
        run_grid(g, "plain", plain_dir, str(workdir), {**PLAIN, "epochs": 1}, shard=(0, 2), restart=True,
                 mode="sequential")
    assert sorted(os.listdir(workdir / "configs")) == configs_before == ["alpha=0.5", "base"]
    assert all(os.path.exists(workdir / "configs" / c / "summary.json") for c in configs_before)


def test_a_config_that_goes_non_finite_in_a_group_does_not_stop_the_others(synthetic_dir, tmp_path):
    g = grid_file(tmp_path, "def sweep(add):\n    add(learning_rate=1e30)\n    add(learning_rate=1e-3)\n")
    result = run_grid(g, "synthetic_tiny", synthetic_dir, str(tmp_path / "wd"), {**TINY, "epochs": 2})
    assert {cid: s["status"] for cid, s in result["summaries"].items()} == {
        "learning_rate=1e+30": "non_finite", "learning_rate=0.001": "max_epochs"}
    rows = read_jsonl(tmp_path / "wd" / "configs" / "learning_rate=0.001" / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [0, 1] and all(r["time_s"] > 0 for r in rows)
