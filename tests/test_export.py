"""lgmrec_jax.export: the exported lists reproduce the recorded metrics, the embeddings their scores,
ids map back through the mapping files; checkpoint choice, a grid config, one-line refusals.

One tiny run (and one tiny grid) is trained per module and shared; a persistent compilation cache
keeps the exports' repeated programs from compiling again.
"""

import csv
import json
import os
import shutil

import jax
import numpy as np
import pytest
from absl import flags

from conftest import read_jsonl
from lgmrec_jax import cli, configs, export, metrics as metrics_lib, run as run_lib
from lgmrec_jax.data import load_dataset
from lgmrec_jax.grid import runner as grid_runner
from lgmrec_jax.model import l2_normalize

FLAGS = flags.FLAGS


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """A persistent compilation cache for this module; the previous settings are restored after."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    old = {n: getattr(jax.config, n) for n in names}
    grid_runner.setup_compilation_cache(os.environ.get("LGMREC_TEST_JAX_CACHE") or str(tmp_path_factory.mktemp("jax")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    yield
    for n, v in old.items():
        jax.config.update(n, v)


@pytest.fixture(scope="module")
def data_dir(synthetic_dir, tmp_path_factory):
    """synthetic_tiny with MMRec's mapping files (raw ids: not the internal ones)."""
    root = tmp_path_factory.mktemp("mapped")
    shutil.copytree(os.path.join(synthetic_dir, "synthetic_tiny"), root / "synthetic_tiny")
    ds = load_dataset(str(root), "synthetic_tiny")
    (root / "synthetic_tiny" / "u_id_mapping.csv").write_text(
        "user_id\tuserID\n" + "".join(f"A{7 * u + 3:05d}\t{u}\n" for u in reversed(range(ds.n_users))))
    (root / "synthetic_tiny" / "i_id_mapping.csv").write_text(
        "asin\titemID\n" + "".join(f"B0{i:04d}X\t{i}\n" for i in range(ds.n_items)))
    return str(root)


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """The tiny config's run: early-stopped after 6 epochs, best epoch 1, checkpoints of 3 epochs kept."""
    workdir = str(tmp_path_factory.mktemp("run") / "wd")
    cfg = configs.for_dataset("synthetic_tiny")
    summary = run_lib.train_and_evaluate(cfg, load_dataset(data_dir, "synthetic_tiny"), workdir)
    rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    kept = sorted(int(s) - 1 for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
    assert summary["best_epoch"] in kept and summary["best_epoch"] != kept[-1] and 0 not in kept
    return {"workdir": workdir, "rows": rows, "best": summary["best_epoch"], "kept": kept}


@pytest.fixture(scope="module", autouse=True)
def export_flags():
    # Another test module may have defined a global --out (experiments.precision_emulation): drop it.
    for name in ("out", "what"):
        if name in FLAGS:
            delattr(FLAGS, name)
    export.define_flags()


def run_main(capsys, *args):
    """export.main in this process: (exit code, stdout, stderr)."""
    FLAGS.unparse_flags()
    code = 0
    try:
        export.main(cli.parse_flags(["lgmrec_jax.export", *map(str, args)]))
    except SystemExit as err:
        code = err.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_tsv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def lists_of(rows, k=50):
    """(users in file order, (n, k) items with -1 pads, (n, k) scores) from the TSV rows."""
    users = list(dict.fromkeys(int(r["userID"]) for r in rows))
    at = {u: i for i, u in enumerate(users)}
    items, scores = np.full((len(users), k), -1), np.full((len(users), k), np.nan, np.float32)
    for r in rows:
        items[at[int(r["userID"])], int(r["rank"]) - 1] = int(r["itemID"])
        scores[at[int(r["userID"])], int(r["rank"]) - 1] = float(r["score"])
    return np.array(users), items, scores


def read_map(path):
    with open(path) as handle:
        next(handle)
        return {int(i): raw for raw, i in (line.rstrip("\n").split("\t") for line in handle)}


def assert_nothing_written(out):
    out = os.path.abspath(str(out))
    assert not os.path.exists(out) or not os.listdir(out)
    parent = os.path.dirname(out)
    if os.path.isdir(parent):
        assert not [n for n in os.listdir(parent) if n.startswith(f".{os.path.basename(out)}.")]


@pytest.mark.parametrize("split", ["test", "valid"])
def test_best_lists_reproduce_the_recorded_metrics_and_raw_ids(trained, data_dir, tmp_path, capsys, split):
    out = tmp_path / "out"
    code, stdout, err = run_main(capsys, trained["workdir"], f"--out={out}", f"--data_dir={data_dir}",
                                 f"--split={split}", "--what=recommendations")
    assert code == 0, err
    assert stdout.strip() == str(out)
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["checkpoint"]["epoch"] == trained["best"] and manifest["checkpoint"]["layout"] == "run"
    rows = read_tsv(out / f"recommendations_{split}.tsv")
    assert list(rows[0]) == ["userID", "rank", "itemID", "score", "raw_user_id", "raw_item_id"]
    ds = load_dataset(data_dir, "synthetic_tiny")
    users, items, scores = lists_of(rows)
    pairs = ds.test if split == "test" else ds.valid
    assert users.tolist() == metrics_lib.evaluation_users(pairs).tolist()
    recorded = trained["rows"][trained["best"]][split]
    assert metrics_lib.topk_metrics(users, items, pairs, ds.n_users, ds.n_items) == recorded  # exactly
    assert manifest["metrics"][split] == {"recomputed": recorded, "recorded": recorded, "equal": True}
    # Training items are masked as in evaluation: they come last (45 items < K), scored -1e10.
    train = set(map(tuple, ds.train.tolist()))
    masked = np.array([[(u, i) in train for i in row] for u, row in zip(users, items)])
    assert (scores[masked] == -1e10).all() and (scores[~masked & (items >= 0)] > -1e9).all()
    assert all((np.diff(s[np.isfinite(s)]) <= 0).all() for s in scores)  # ranked by score
    umap = read_map(os.path.join(data_dir, "synthetic_tiny", "u_id_mapping.csv"))
    imap = read_map(os.path.join(data_dir, "synthetic_tiny", "i_id_mapping.csv"))
    assert all(r["raw_user_id"] == umap[int(r["userID"])] and r["raw_item_id"] == imap[int(r["itemID"])]
               for r in rows)


def test_latest_and_an_epoch_restore_their_own_checkpoints(trained, data_dir, tmp_path):
    ds = load_dataset(data_dir, "synthetic_tiny")
    for which, epoch in (("latest", trained["kept"][-1]), (str(trained["kept"][1]), trained["kept"][1])):
        out = tmp_path / which
        manifest = export.export(trained["workdir"], str(out), data_dir, checkpoint=which, what=["recommendations"])
        assert manifest["checkpoint"]["epoch"] == epoch and manifest["checkpoint"]["step"] == epoch + 1
        users, items, _ = lists_of(read_tsv(out / "recommendations_test.tsv"))
        assert metrics_lib.topk_metrics(users, items, ds.test, ds.n_users, ds.n_items) == trained["rows"][epoch]["test"]


def test_embeddings_reproduce_the_scores_and_hyperedges_are_assignments(trained, data_dir, tmp_path):
    """Without noise (and with one noisy forward shared by all users) the exported embeddings give the
    listed scores; the parts add up to the final embeddings; assignments are distributions."""
    for noise in ("off", "per_eval"):
        out = tmp_path / noise
        manifest = export.export(trained["workdir"], str(out), data_dir, split="all", k=10, parts=True,
                                 eval_noise=noise)
        assert manifest["eval_noise"] == noise and manifest["run_eval_noise"] == "per_block"
        user, item = np.load(out / "user_embeddings.npy"), np.load(out / "item_embeddings.npy")
        users, items, scores = lists_of(read_tsv(out / "recommendations_all.tsv"), k=10)
        assert users.tolist() == list(range(60)) and (items >= 0).all()
        np.testing.assert_allclose(scores, np.einsum("ud,ukd->uk", user[users], item[items]), rtol=1e-5, atol=1e-6)
        assert set(manifest["files"]) >= {
            "cge_user.npy", "mge_v_item.npy", "mge_t_user.npy", "ghe_v_user.npy", "ghe_t_item.npy",
            "hyperedges_v_item.npy", "hyperedges_t_user_argmax.npy"}
        parts = {name: np.concatenate([np.load(out / f"{name}_user.npy"), np.load(out / f"{name}_item.npy")])
                 for name in ("cge", "mge_v", "mge_t", "ghe_v", "ghe_t")}
        fused = parts["cge"] + l2_normalize(parts["mge_v"]) + l2_normalize(parts["mge_t"]) \
            + 0.3 * l2_normalize(parts["ghe_v"] + parts["ghe_t"])
        np.testing.assert_allclose(fused, np.concatenate([user, item]), rtol=1e-5, atol=1e-6)
        for key in ("v_item", "v_user", "t_item", "t_user"):
            soft, hard = np.load(out / f"hyperedges_{key}.npy"), np.load(out / f"hyperedges_{key}_argmax.npy")
            assert soft.shape[1] == 4 and np.allclose(soft.sum(axis=1), 1, atol=1e-5)
            assert (hard == soft.argmax(axis=1)).all()
    off_user = np.load(tmp_path / "off" / "user_embeddings.npy")
    again = export.export(trained["workdir"], str(tmp_path / "off"), data_dir, what=["embeddings"],
                          eval_noise="off", overwrite=True)
    assert set(again["files"]) == {"user_embeddings.npy", "item_embeddings.npy"}  # --overwrite replaced it
    assert (np.load(tmp_path / "off" / "user_embeddings.npy") == off_user).all()  # deterministic


def test_a_grid_config_exports_from_its_group_checkpoints(data_dir, tmp_path):
    """A group of two seeds (feature-less data: LightGCN, a small program) checkpoints their stacked
    state, the latest two epochs only; the second seed's slot exports its own lists."""
    os.makedirs(tmp_path / "data" / "plain")
    shutil.copy(os.path.join(data_dir, "synthetic_tiny", "synthetic_tiny.inter"), tmp_path / "data" / "plain" / "plain.inter")
    grid = tmp_path / "g.py"
    grid.write_text("def sweep(add):\n    for seed in (0, 1):\n        add(seed=seed)\n")
    workdir = tmp_path / "grid"
    grid_runner.run_grid(grid_runner.GridOptions(
        grid=str(grid), dataset="plain", data_dir=str(tmp_path / "data"), workdir=str(workdir),
        base_overrides={"epochs": 3, "stopping_step": 100, "eval_batch_size": 16, "embedding_size": 8,
                        "feat_embed_dim": 8, "keep_checkpoints": 2}, plots=False))
    config = workdir / "configs" / "seed=1"  # the group's second slot
    rows = read_jsonl(config / "metrics.jsonl")
    out = tmp_path / "out"
    manifest = export.export(str(config), str(out), str(tmp_path / "data"), checkpoint="latest")
    assert manifest["checkpoint"]["layout"] == "grid group" and manifest["checkpoint"]["epoch"] == 2
    assert manifest["checkpoint"]["directory"] == str(workdir / "groups" / json.loads(
        (config / "config.json").read_text())["grid"]["group"] / "checkpoints")
    assert "user_embeddings.npy" in manifest["files"] and not any("hyperedges" in f for f in manifest["files"])
    ds = load_dataset(str(tmp_path / "data"), "plain")
    users, items, _ = lists_of(read_tsv(out / "recommendations_test.tsv"))
    assert metrics_lib.topk_metrics(users, items, ds.test, ds.n_users, ds.n_items) == rows[2]["test"]
    assert manifest["metrics"]["test"]["equal"] is True
    with pytest.raises(export.ExportError, match=r"no checkpoint holds epoch 0 of .*a grid group keeps only its "
                                                 r"latest checkpoints .*; kept epochs: 1, 2$"):
        export.export(str(config), str(tmp_path / "none"), str(tmp_path / "data"), checkpoint="0")
    assert_nothing_written(tmp_path / "none")


def test_bad_workdirs_checkpoints_data_and_outputs_are_one_line_errors(trained, data_dir, tmp_path, capsys,
                                                                       monkeypatch):
    wd = trained["workdir"]
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("x")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    changed, gone, badmap = (tmp_path / name for name in ("changed", "gone", "badmap"))
    for root in (changed, gone, badmap):
        shutil.copytree(os.path.join(data_dir, "synthetic_tiny"), root / "synthetic_tiny")
    with open(changed / "synthetic_tiny" / "synthetic_tiny.inter", "a") as handle:
        handle.write("0\t1\t5\t1361627103\t2\n")
    os.remove(gone / "synthetic_tiny" / "image_feat.npy")
    (badmap / "synthetic_tiny" / "i_id_mapping.csv").write_text("asin\titemID\nB1\t0\nB2\t0\n")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(wd, corrupt)
    step = corrupt / "checkpoints" / str(trained["best"] + 1) / "state"
    for base, _, names in os.walk(step):
        for name in names:
            if "ocdbt.process_0" in base and "/d" in base:
                path = os.path.join(base, name)
                data = bytearray(open(path, "rb").read())
                data[len(data) // 2] ^= 0xFF
                open(path, "wb").write(bytes(data))
    out = tmp_path / "out"
    cases = [
        ((tmp_path / "nowhere", f"--out={out}"), f"error: {tmp_path / 'nowhere'}: no such workdir"),
        ((tmp_path / "empty", f"--out={out}"), f"error: {tmp_path / 'empty' / 'config.json'}: not found"),
        ((wd, f"--out={out}", "--checkpoint=first"), "error: --checkpoint=first: expected best, latest or an epoch"),
        ((wd, f"--out={out}", "--checkpoint=0"), f"error: {wd}/checkpoints: no checkpoint holds epoch 0 of {wd}"),
        ((corrupt, f"--out={out}"), f"error: {corrupt}/checkpoints: checkpoint {trained['best'] + 1} cannot be restored"),
        ((wd, f"--out={out}", f"--data_dir={changed}"),
         f"error: {changed}/synthetic_tiny: not the data {wd} was trained on (dataset file synthetic_tiny.inter "
         f"changed (sha256)); give the run's --data_dir"),
        ((wd, f"--out={out}", f"--data_dir={gone}"), "(dataset file image_feat.npy is gone)"),
        ((wd, f"--out={out}", f"--data_dir={tmp_path / 'empty'}"), "dataset directory not found"),
        ((wd, f"--out={out}", f"--data_dir={badmap}"), "i_id_mapping.csv:3: itemID 0 is given twice"),
        ((wd, f"--out={tmp_path / 'a_file'}"), "error: --out=" + str(tmp_path / "a_file") + ": exists and is not a "
                                               "directory"),
        ((wd, f"--out={tmp_path / 'a_file' / 'sub'}"), "is a file, expected a directory"),
        ((wd, f"--out={full}"), "exists and is not empty; use --overwrite to replace it"),
        ((wd, f"--out={os.path.dirname(wd)}", "--overwrite"), f"it holds {wd}, which an export must not replace"),
        ((wd, f"--out={out}", "--what=scores"), "error: --what=scores: expected some of recommendations,"),
        ((wd,), "error: --out is required"),
        ((wd, f"--out={out}", "--k=x"), "error: bad flag:"),
    ]
    for args, message in cases:
        extra = () if any("--data_dir" in str(a) for a in args) else (f"--data_dir={data_dir}",)
        code, _, err = run_main(capsys, *args, *extra)
        last = err.strip().splitlines()[-1] if err.strip() else ""
        assert code == 2 and message in last and last.startswith("error: "), (args, err)
        assert "Traceback" not in err
        assert_nothing_written(out)
    assert (full / "keep.txt").read_text() == "mine" and os.path.isdir(wd)
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # an unwritable parent (the tests run as root)
    code, _, err = run_main(capsys, wd, f"--out={out}", f"--data_dir={data_dir}")
    assert code == 2 and err.strip().splitlines()[-1] == f"error: --out={out}: {tmp_path} is not writable"
    assert_nothing_written(out)
