"""Exports what a trained run computes: top-K recommendations, embeddings, hyperedge assignments.

    python -m lgmrec_jax.export runs/baby --out=exports/baby --data_dir=./data
    python -m lgmrec_jax.export runs/grid/seeds/baby/configs/seed=3 --out=exports/seed3 --checkpoint=latest

WORKDIR is a single run's or one grid config's; the model is rebuilt from its config.json on the dataset
it names (checksums checked) with one checkpoint (``best``, ``latest`` or an epoch; a grid group keeps
only its latest). ``recommendations_<split>.tsv`` holds the evaluation's own top-K lists (its blocks,
noise keys and top-k method, training items masked), so their metrics equal the recorded ones;
``*_embeddings.npy`` and ``hyperedges_*.npy`` come from one evaluation-mode forward (``--eval_noise``).
``export.json`` says what each file is. Errors are one line, exit 2, nothing written.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from typing import NamedTuple, Optional

import jax
import numpy as np
from absl import app, flags, logging

from lgmrec_jax import checkpoint as ckpt_lib
from lgmrec_jax import cli, configs, engine as engine_lib, evaluation, metrics as metrics_lib, step as step_lib
from lgmrec_jax import report, workdir as workdir_lib
from lgmrec_jax.configs import default as default_config
from lgmrec_jax.data import Dataset, DatasetError, load_dataset
from lgmrec_jax.graph import build_graph
from lgmrec_jax.model import LGMRec

WHAT = ("recommendations", "embeddings", "hyperedges")
SPLITS = ("test", "valid", "all")
FORWARD_KEY_INDEX = 2  # --split=all and the embeddings/hyperedges: the index after the evaluated splits
ID_MAPS = {"user": ("u_id_mapping.csv", "userID"), "item": ("i_id_mapping.csv", "itemID")}
TSV_CHUNK = 50_000  # users formatted at a time


class ExportError(RuntimeError):
    """The export cannot be made; the message is one line for the user."""


@dataclasses.dataclass
class Source:
    """A workdir's record: its config, epoch rows, and where its checkpoints are."""

    workdir: str
    record: dict  # config.json
    cfg: object  # the run's ConfigDict
    rows: list  # metrics.jsonl
    checkpoints: str  # the checkpoint directory
    config_id: Optional[str] = None  # a grid group's config: its slot name in the group checkpoints

    @property
    def layout(self) -> str:
        return "run" if self.config_id is None else "grid group"


# ---- Reading the workdir --------------------------------------------------------------------------


def read_source(workdir: str) -> Source:
    """config.json (the config rebuilt from it), metrics.jsonl and the checkpoint directory of a run's
    or a grid config's workdir."""
    path = os.path.abspath(workdir)
    if not os.path.isdir(path):
        raise ExportError(f"{path}: no such workdir (expected a run's directory with config.json and checkpoints)")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise ExportError(f"{config_path}: not found; expected a workdir written by lgmrec_jax.train or "
                          f"experiments.grid")
    try:
        record = report.read_json(config_path)
        rows = report.read_metrics(os.path.join(path, "metrics.jsonl")) \
            if os.path.exists(os.path.join(path, "metrics.jsonl")) else []
    except report.ReportError as err:
        raise ExportError(str(err)) from None
    identity = record.get("identity")
    if not isinstance(identity, dict) or not isinstance(identity.get("config"), dict) \
            or not isinstance(identity.get("dataset"), str):
        raise ExportError(f"{config_path}: no identity.config / identity.dataset; expected the config.json of a "
                          f"run")
    cfg = rebuild_config(identity["config"], config_path)
    grid = record.get("grid") if isinstance(record.get("grid"), dict) else {}
    own = os.path.join(path, "checkpoints")
    if os.path.isdir(own) or not grid.get("group"):  # a single run, or a grid's --mode=sequential config
        return Source(path, record, cfg, rows, own)
    group_dir = os.path.join(os.path.dirname(os.path.dirname(path)), "groups", str(grid["group"]), "checkpoints")
    if os.path.basename(os.path.dirname(path)) != "configs" or not os.path.isdir(group_dir):
        raise ExportError(f"{path}: a config of grid group {grid['group']}, whose checkpoints {group_dir} are "
                          f"missing (a grid's workdir holds configs/ and groups/ side by side)")
    return Source(path, record, cfg, rows, group_dir, config_id=str(grid.get("config_id", os.path.basename(path))))


def rebuild_config(recorded: dict, where: str):
    """The recorded config as a ConfigDict; a key added since the run was made takes the value that does
    what the run did (workdir.BEHAVIOUR_BEFORE_KEY), and a key this version does not know is an error."""
    cfg = default_config.get_config()
    unknown = sorted(set(recorded) - set(cfg))
    if unknown:
        raise ExportError(f"{where}: config key(s) {', '.join(unknown)} unknown to this version of lgmrec_jax")
    for key in cfg:
        value = recorded.get(key, workdir_lib.BEHAVIOUR_BEFORE_KEY.get(key, (None,))[0])
        if value is None:
            raise ExportError(f"{where}: config has no {key!r}; this version cannot rebuild the run")
        try:
            cfg[key] = value
        except (TypeError, ValueError) as err:
            raise ExportError(f"{where}: config.{key}={value!r}: {err}") from None
    try:
        configs.validate(cfg)
        engine_lib.check_matmul_precision(cfg.matmul_precision)
    except configs.ConfigError as err:
        raise ExportError(f"{where}: {err}") from None
    return cfg


def load_data(source: Source, data_dir: str) -> Dataset:
    """The dataset the run names, under ``data_dir``, refused unless its files are the recorded ones."""
    identity = source.record["identity"]
    try:
        ds = load_dataset(data_dir, identity["dataset"], generate_synthetic=False)
    except DatasetError as err:
        raise ExportError(f"{err} (the dataset of {source.workdir}; give its --data_dir)") from None
    diffs = workdir_lib.identity_differences(identity, workdir_lib.run_identity(source.cfg, ds))
    if diffs:
        raise ExportError(f"{ds.path}: not the data {source.workdir} was trained on ({'; '.join(diffs)}); "
                          f"give the run's --data_dir")
    sizes = (source.record.get("n_users"), source.record.get("n_items"))
    if sizes != (ds.n_users, ds.n_items):
        raise ExportError(f"{ds.path}: {ds.n_users} users and {ds.n_items} items, config.json records {sizes[0]} "
                          f"and {sizes[1]}")
    return ds


def read_id_map(path: str, column: str, n: int) -> Optional[np.ndarray]:
    """Raw ids by internal id from a tab-separated mapping file with a header (``<raw>\\t<column>``, as
    MMRec and data_prep write them), or None without the file; it must name every id 0..n-1 once."""
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8-sig") as handle:
            lines = handle.read().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ExportError(f"{path}: cannot be read ({getattr(err, 'strerror', None) or err})") from None
    header = lines[0].split("\t") if lines else []
    if len(header) != 2 or column not in header:
        raise ExportError(f"{path}:1: header {header!r}, expected two tab-separated columns, one of them {column}")
    at, raw_at = header.index(column), 1 - header.index(column)
    names = np.full(n, None, dtype=object)
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 2 or not fields[at].strip().isdigit():
            raise ExportError(f"{path}:{number}: expected a raw id and a {column} (a non-negative integer), "
                              f"tab-separated")
        index = int(fields[at])
        if index >= n or names[index] is not None:
            why = f"beyond the dataset's {n}" if index >= n else "given twice"
            raise ExportError(f"{path}:{number}: {column} {index} is {why}")
        names[index] = fields[raw_at]
    missing = np.flatnonzero(names == None)  # noqa: E711  (an object array's missing entries)
    if missing.size:
        raise ExportError(f"{path}: no raw id for {column} {int(missing[0])} ({missing.size} missing of {n})")
    return names


# ---- Choosing and restoring the checkpoint --------------------------------------------------------


class Kept(NamedTuple):
    """Where a kept checkpoint holds an epoch's state."""

    step: int
    slot: Optional[int] = None  # the config's row in a group's stacked state; None for a run
    n_slots: int = 0  # the rows of that stacked state


def kept_epochs(source: Source, checkpoints: ckpt_lib.Checkpoints) -> dict:
    """{epoch: Kept} of the epochs whose state a kept checkpoint holds. A run's step s holds the state
    after s epochs; a group's step holds each config as far as it had trained (its history there), its
    state kept unchanged once it finished."""
    steps = checkpoints.steps()
    if source.config_id is None:
        return {step - 1: Kept(step) for step in steps}
    kept = {}
    for step in reversed(steps):
        try:
            meta = checkpoints.read_meta(step)
        except Exception as err:  # noqa: BLE001  an unreadable checkpoint holds nothing to export
            logging.warning("group checkpoint %d in %s cannot be read: %s", step, checkpoints.directory,
                            str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
            continue
        slots, progress = meta.get("slots", []), (meta.get("configs") or {}).get(source.config_id)
        if source.config_id in slots and progress and progress.get("status") != "non_finite" and progress["history"]:
            kept.setdefault(len(progress["history"]) - 1, Kept(step, slots.index(source.config_id), len(slots)))
    return kept


def choose_epoch(which: str, source: Source, kept: dict) -> int:
    """The epoch ``--checkpoint`` names: best (the run's recorded best epoch), latest, or a number."""
    if not kept:
        raise ExportError(f"{source.checkpoints}: holds no checkpoint of {source.workdir}")
    shown = ", ".join(map(str, sorted(kept)))
    if which == "latest":
        return max(kept)
    if which == "best":
        best, _, _ = report.best_so_far(source.rows)
        if best is None:
            raise ExportError(f"{source.workdir}: no evaluated epoch in metrics.jsonl, so no best one; use "
                              f"--checkpoint=latest or an epoch ({shown})")
        epoch, what = best, f"epoch {best} (the best by valid {source.cfg.valid_metric})"
    else:
        if not which.isdigit():
            raise ExportError(f"--checkpoint={which}: expected best, latest or an epoch number (0-based, as in "
                              f"metrics.jsonl)")
        epoch, what = int(which), f"epoch {which}"
    if epoch not in kept:
        keeps = ("a grid group keeps only its latest checkpoints (keep_checkpoints), no best"
                 if source.layout == "grid group" else "the run keeps its latest checkpoints and its best")
        raise ExportError(f"{source.checkpoints}: no checkpoint holds {what} of {source.workdir}: {keeps}; "
                          f"kept epochs: {shown}")
    return epoch


def restore_params(checkpoints: ckpt_lib.Checkpoints, kept: Kept, abstract_state):
    """The parameters of one kept checkpoint (its SHA-256 checked), for a group its config's slot."""
    step, slot = kept.step, kept.slot
    if slot is not None:  # the group's state stacks its configs along a leading axis
        abstract_state = jax.tree_util.tree_map(
            lambda s: jax.ShapeDtypeStruct((kept.n_slots,) + s.shape, s.dtype), abstract_state)
    try:
        state, _ = checkpoints.restore(step, abstract_state)
    except Exception as err:  # noqa: BLE001  unreadable, corrupted, or of other shapes than the config's
        text = str(err).strip()
        raise ExportError(f"{checkpoints.directory}: checkpoint {step} cannot be restored "
                          f"({text.splitlines()[0] if text else type(err).__name__})") from None
    params = state.params if slot is None else jax.tree_util.tree_map(lambda x: np.asarray(x)[slot], state.params)
    if not step_lib.finite_state(step_lib.TrainState(params, None)):
        raise ExportError(f"{checkpoints.directory}: checkpoint {step} holds non-finite parameters")
    return params


# ---- The output directory -------------------------------------------------------------------------


def out_problem(out: str, overwrite: bool, protected: tuple = ()) -> Optional[str]:
    """Why ``out`` cannot receive the export (checked before anything is computed), or None."""
    path = os.path.abspath(out)
    for keep in protected:
        if os.path.commonpath([path, keep]) == path:
            return f"it holds {keep}, which an export must not replace"
    if os.path.lexists(path):
        if not os.path.isdir(path):
            return "exists and is not a directory"
        if os.listdir(path) and not overwrite:
            return "exists and is not empty; use --overwrite to replace it, or choose another --out"
        return cli.out_dir_problem(os.path.dirname(path)) or cli.out_dir_problem(path)
    return cli.out_dir_problem(path)


class Staging:
    """A temporary directory beside ``out`` that becomes ``out`` on :meth:`commit` (replacing an empty or,
    with --overwrite, any ``out``); :meth:`discard` removes it and any parent directory it created."""

    def __init__(self, out: str):
        self.out = os.path.abspath(out)
        parent, self.created = os.path.dirname(self.out), []
        missing = parent
        while not os.path.exists(missing):
            self.created.append(missing)
            missing = os.path.dirname(missing)
        try:
            os.makedirs(parent, exist_ok=True)
            self.path = tempfile.mkdtemp(prefix=f".{os.path.basename(self.out)}.tmp-", dir=parent)
        except OSError as err:
            self.discard()
            raise ExportError(f"--out={out}: cannot be written ({err.strerror})") from None

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def commit(self) -> None:
        old = None
        if os.path.lexists(self.out):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(self.out)}.old-", dir=os.path.dirname(self.out))
            os.replace(self.out, os.path.join(old, "out"))
        os.replace(self.path, self.out)
        if old is not None:
            shutil.rmtree(old)

    def discard(self) -> None:
        if getattr(self, "path", None) and os.path.isdir(self.path):
            shutil.rmtree(self.path, ignore_errors=True)
        for path in self.created:  # innermost first
            try:
                os.rmdir(path)
            except OSError:
                pass


# ---- What is exported -----------------------------------------------------------------------------


@dataclasses.dataclass
class Lists:
    """One split's top-K lists: rows in evaluation order."""

    users: np.ndarray  # (n,)
    items: np.ndarray  # (n, k), -1 past a small catalogue
    scores: np.ndarray  # (n, k) float32, -1e10 for a masked training item


class Model:
    """The run's model with restored parameters, and the evaluation's functions for it."""

    def __init__(self, cfg, ds: Dataset, model: LGMRec, graph, feats, params, epoch: int, eval_noise: str):
        self.cfg, self.ds, self.params, self.eval_noise = cfg, ds, params, eval_noise
        self.model, self.graph, self.feats = model, graph, feats
        self.eval_key = step_lib.stream_key(cfg.seed, step_lib.EVAL_STREAM, epoch)
        self.base = jax.jit(evaluation.make_noise_free(self.model))(params, self.graph, self.feats)

    def key(self, index: int) -> jax.Array:
        return jax.random.fold_in(self.eval_key, index)

    def top_k(self, plan: evaluation.SplitPlan, index: int, k: int) -> Lists:
        """The evaluation of ``plan`` (its blocks, noise and top-k method) keeping K items and scores."""
        evaluate = jax.jit(evaluation.make_split_evaluator(
            self.model, self.eval_noise, self.cfg.eval_topk, evaluation.resolve_score_chunk(self.cfg.eval_score_chunk),
            k=k, with_scores=True))
        tops = evaluate(self.params, self.graph, self.feats, *plan.device_arrays(), self.key(index), base=self.base)
        n = len(plan.users)
        return Lists(np.asarray(plan.users), np.asarray(tops.items).reshape(-1, k)[:n],
                     np.asarray(tops.scores).reshape(-1, k)[:n])

    def forward(self):
        """(Outputs, noise) of one evaluation-mode forward from the key of index FORWARD_KEY_INDEX."""
        noise = evaluation.evaluation_noise(self.model, self.eval_noise, self.key(FORWARD_KEY_INDEX))
        out = jax.jit(lambda p, b, z: self.model.apply(p, b, z, method=LGMRec.with_noise))(self.params, self.base, noise)
        return out, noise


def recomputed_metrics(lists: Lists, pairs: np.ndarray, ds: Dataset) -> dict:
    """The split's metrics from the exported lists (cutoffs up to K), as evaluation computes them."""
    k = lists.items.shape[1]
    cutoffs = tuple(c for c in metrics_lib.TOPK if c <= k)
    depth = min(k, max(metrics_lib.TOPK))
    return metrics_lib.topk_metrics(lists.users, lists.items[:, :depth], pairs, ds.n_users, ds.n_items, cutoffs)


def write_tsv(path: str, lists: Lists, user_names, item_names) -> int:
    """The lists as tab-separated rows (the -1 pads of a small catalogue left out); returns the row count."""
    k = lists.items.shape[1]
    header = ["userID", "rank", "itemID", "score"] + (["raw_user_id", "raw_item_id"] if user_names is not None else [])
    count, started, n = 0, time.time(), len(lists.users)
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        handle.write("\t".join(header) + "\n")
        for start in range(0, n, TSV_CHUNK):
            items = lists.items[start:start + TSV_CHUNK]
            keep = (items >= 0).ravel()
            users = np.repeat(lists.users[start:start + TSV_CHUNK], k)[keep].tolist()
            ranks = np.tile(np.arange(1, k + 1), len(items))[keep].tolist()
            kept_items = items.ravel()[keep]
            scores = lists.scores[start:start + TSV_CHUNK].ravel()[keep].tolist()
            if user_names is None:
                lines = [f"{u}\t{r}\t{i}\t{s:.9g}\n" for u, r, i, s in zip(users, ranks, kept_items.tolist(), scores)]
            else:
                lines = [f"{u}\t{r}\t{i}\t{s:.9g}\t{user_names[u]}\t{item_names[i]}\n"
                         for u, r, i, s in zip(users, ranks, kept_items.tolist(), scores)]
            handle.writelines(lines)
            count += len(lines)
            if n > TSV_CHUNK:
                logging.info("%s: %d of %d users written (%.1f s)", os.path.basename(path),
                             min(start + TSV_CHUNK, n), n, time.time() - started)
    return count


def _save(staging: Staging, files: dict, name: str, array, what: str) -> None:
    array = np.asarray(array)
    np.save(staging.file(name), array)
    files[name] = {"what": what, "shape": list(array.shape), "dtype": str(array.dtype)}


def _split_rows(array, n_users: int) -> tuple:
    array = np.asarray(array)
    return array[:n_users], array[n_users:]


def export(workdir: str, out: str, data_dir: str = "./data", checkpoint: str = "best", k: int = 50,
           split: str = "test", what=WHAT, parts: bool = False, eval_noise: Optional[str] = None,
           overwrite: bool = False) -> dict:
    """Writes the export of ``workdir`` to ``out`` (see the module docstring); returns export.json's
    content. Raises ExportError, with nothing written, when it cannot be made."""
    what = tuple(dict.fromkeys(what))
    unknown = [w for w in what if w not in WHAT]
    if unknown or not what:
        raise ExportError(f"--what={','.join(what)}: expected some of {','.join(WHAT)}")
    if split not in SPLITS:
        raise ExportError(f"--split={split}: expected one of {', '.join(SPLITS)}")
    if k < 1:
        raise ExportError(f"--k={k}: expected at least 1")
    if eval_noise is not None and eval_noise not in configs.EVAL_NOISE_MODES:
        raise ExportError(f"--eval_noise={eval_noise}: expected one of {', '.join(configs.EVAL_NOISE_MODES)}")
    problem = out_problem(out, overwrite, (os.path.abspath(workdir),))
    if problem:
        raise ExportError(f"--out={out}: {problem}")

    started = time.time()
    source = read_source(workdir)
    cfg = source.cfg
    ds = load_data(source, data_dir)
    problem = out_problem(out, overwrite, (os.path.abspath(workdir), ds.path))
    if problem:
        raise ExportError(f"--out={out}: {problem}")
    names = {side: read_id_map(os.path.join(ds.path, file), column, ds.n_users if side == "user" else ds.n_items)
             for side, (file, column) in ID_MAPS.items()}
    if (names["user"] is None) != (names["item"] is None):
        present = [ID_MAPS[s][0] for s in names if names[s] is not None]
        logging.warning("%s: only %s present; raw ids need both mapping files", ds.path, present[0])
        names = {"user": None, "item": None}
    pairs = {"valid": ds.valid, "test": ds.test}
    if split != "all" and not len(pairs[split]):
        raise ExportError(f"{ds.path}: the dataset has no {split} split (use --split=all or another split)")
    mode = eval_noise or cfg.eval_noise

    with jax.default_matmul_precision(cfg.matmul_precision):
        model = step_lib.make_model(cfg, ds)
        try:
            checkpoints = ckpt_lib.Checkpoints(source.checkpoints, cfg.keep_checkpoints, read_only=True)
        except ckpt_lib.CheckpointError as err:
            raise ExportError(str(err)) from None
        try:
            kept = kept_epochs(source, checkpoints)
            epoch = choose_epoch(checkpoint, source, kept)
            graph = build_graph(ds.train, ds.n_users, ds.n_items, cfg.kernel)
            feats = step_lib.device_features(ds, cfg.feature_dtype)
            abstract = jax.eval_shape(lambda: step_lib.init_state(model, step_lib.make_optimizer(cfg.learning_rate),
                                                                 graph, feats, cfg.seed))
            params = restore_params(checkpoints, kept[epoch], abstract)
        finally:
            checkpoints.close()
        step = kept[epoch].step
        logging.info("export of %s: checkpoint %d of %s (epoch %d, %s), eval_noise %s", source.workdir, step,
                     source.checkpoints, epoch, checkpoint, mode)
        exported = Model(cfg, ds, model, graph, feats, params, epoch, mode)
        row = next((r for r in source.rows if r.get("epoch") == epoch), {})
        manifest = {
            "workdir": source.workdir,
            "checkpoint": {"requested": checkpoint, "epoch": epoch, "directory": source.checkpoints, "step": step,
                           "layout": source.layout, **({"config_id": source.config_id} if source.config_id else {})},
            "dataset": {"name": ds.name, "path": ds.path, "n_users": ds.n_users, "n_items": ds.n_items,
                        "id_maps": [ID_MAPS[s][0] for s in ID_MAPS if names[s] is not None]},
            "eval_noise": mode, "run_eval_noise": cfg.eval_noise, "eval_topk": cfg.eval_topk,
            "noise_keys": (f"stream_key(seed={cfg.seed}, EVAL_STREAM, epoch={epoch}) folded with valid 0, test 1, "
                           f"all users and the forward {FORWARD_KEY_INDEX}"),
            "files": {}, "metrics": {},
        }
        files = manifest["files"]
        staging = Staging(out)
        try:
            if "recommendations" in what:
                manifest["k"], manifest["split"] = k, split
                _export_recommendations(exported, staging, manifest, split, k, pairs, names, row)
            if "embeddings" in what or "hyperedges" in what:
                tick = time.time()
                out_, noise = exported.forward()
                logging.info("forward (%s noise): %.1f s", mode, time.time() - tick)
                if "embeddings" in what:
                    _export_embeddings(exported, staging, files, out_, parts)
                if "hyperedges" in what:
                    _export_hyperedges(exported, staging, files, noise)
            manifest["seconds"] = round(time.time() - started, 3)
            workdir_lib.write_json_atomic(staging.file("export.json"), manifest)
            staging.commit()
        except OSError as err:
            staging.discard()
            raise ExportError(f"--out={out}: write failed ({err.strerror or err})") from None
        except BaseException:
            staging.discard()
            raise
    logging.info("exported %s to %s (%d files, %.1f s)", source.workdir, os.path.abspath(out), len(files) + 1,
                 time.time() - started)
    return manifest


def _export_recommendations(exported: Model, staging: Staging, manifest: dict, split: str, k: int, pairs: dict,
                            names: dict, row: dict) -> None:
    cfg, ds = exported.cfg, exported.ds
    tick = time.time()
    if split == "all":
        plan = evaluation.plan_all_users(ds.train, ds.n_users, ds.n_items, cfg.eval_batch_size)
        index = FORWARD_KEY_INDEX
    else:
        plan = evaluation.plan_split(ds.train, pairs[split], ds.n_users, ds.n_items, cfg.eval_batch_size)
        index = evaluation.evaluated_splits(pairs).index(split)
    logging.info("%s: top-%d of %d users, in %d blocks of %d", split, k, len(plan.users), plan.block_users.shape[0],
                 plan.block_users.shape[1])
    lists = exported.top_k(plan, index, k)
    logging.info("%s: scored in %.1f s", split, time.time() - tick)
    file = f"recommendations_{split}.tsv"
    n_rows = write_tsv(staging.file(file), lists, names["user"], names["item"])
    users = f"each user of the {split} split, in evaluation order" if split != "all" else "every user"
    raw = ", raw_user_id, raw_item_id from the mapping files" if names["user"] is not None else ""
    manifest["files"][file] = {
        "what": f"top-{k} items of {users}: userID, rank (from 1), itemID, score (user . item embedding of the "
                f"forward that scored it; -1e10: a masked training item){raw}",
        "rows": n_rows, "users": int(len(lists.users))}
    if split != "all":
        recomputed = recomputed_metrics(lists, pairs[split], ds)
        recorded = {key: row[split][key] for key in recomputed if key in row.get(split, {})} or None
        equal = recorded == recomputed if recorded is not None else None
        manifest["metrics"][split] = {"recomputed": recomputed, "recorded": recorded, "equal": equal}
        if equal is False and exported.eval_noise == cfg.eval_noise:
            logging.warning("%s: the metrics recomputed from the lists differ from metrics.jsonl's of epoch %d "
                            "(exported on another backend than the run's evaluation?)", split,
                            manifest["checkpoint"]["epoch"])


def _export_embeddings(exported: Model, staging: Staging, files: dict, out_, parts: bool) -> None:
    n_users, model = exported.ds.n_users, exported.model
    _save(staging, files, "user_embeddings.npy", out_.user, "final user embeddings (U, d): the model's output")
    _save(staging, files, "item_embeddings.npy", out_.item, "final item embeddings (I, d); score = user . item")
    if not parts:
        return
    c_user, c_item = _split_rows(exported.base.c, n_users)
    what = "CGE output C (LightGCN mean over layers)" if model.cf_model == "lightgcn" and model.use_cge \
        else "ID embedding tables (no CGE propagation: cf_model mf or use_cge=False)"
    _save(staging, files, "cge_user.npy", c_user, f"users' {what}")
    _save(staging, files, "cge_item.npy", c_item, f"items' {what}")
    mge = jax.jit(lambda p, g, f: model.apply(p, g, f, method=LGMRec.mge_outputs))(
        exported.params, exported.graph, exported.feats)
    for m, value in mge.items():
        for side, rows in zip(("user", "item"), _split_rows(value, n_users)):
            _save(staging, files, f"mge_{m}_{side}.npy", rows,
                  f"{side}s' MGE output M_{m} of modality {m}, before the normalisation with which it is added")
    for key, value in out_.hyper.items():
        m, side = key.split("_")
        _save(staging, files, f"ghe_{key}.npy", value,
              f"{side}s' GHE output G_{m} of modality {m} (hypergraph propagation); the final embeddings add "
              f"alpha={model.alpha} * nrm(sum of the modalities' G), nrm = row-wise L2 normalisation")


def _export_hyperedges(exported: Model, staging: Staging, files: dict, noise) -> None:
    model = exported.model
    if not exported.base.logits:
        logging.warning("no hyperedges to export: the model has no hypergraph (no features or use_ghe=False)")
        return
    assign = jax.jit(lambda p, logits, z: model.apply(p, logits, z, method=LGMRec.assignments))(
        exported.params, exported.base.logits, noise)
    for key, value in assign.items():
        m, side = key.split("_")
        legacy = " (legacy_text_user_hyper: the raw logits the logged revision used)" \
            if key == "t_user" and model.legacy_text_user_hyper else ""
        _save(staging, files, f"hyperedges_{key}.npy", value,
              f"{side}s' soft assignment to the {model.hyper_num} hyperedges of modality {m}: Gumbel softmax at "
              f"tau={model.tau} ({exported.eval_noise} noise){legacy}")
        _save(staging, files, f"hyperedges_{key}_argmax.npy", np.asarray(value).argmax(axis=1).astype(np.int32),
              f"{side}s' hyperedge of modality {m}: the arg-max of hyperedges_{key}.npy")


# ---- Command line ---------------------------------------------------------------------------------


def define_flags() -> None:
    """Defined only when run as a program (importing this module adds no global flags)."""
    flags.DEFINE_string("out", None, "Directory to write the export to (created; must be absent or empty "
                        "unless --overwrite).")
    flags.DEFINE_string("data_dir", "./data", "Directory holding the run's dataset directory.")
    flags.DEFINE_string("checkpoint", "best", "best (the best epoch by the valid metric), latest, or an epoch "
                        "number (0-based, as in metrics.jsonl).")
    flags.DEFINE_integer("k", 50, "Items per user in the recommendations.")
    flags.DEFINE_enum("split", "test", list(SPLITS), "Users to recommend for: those of the test or valid split, "
                      "or all users.")
    flags.DEFINE_list("what", list(WHAT), f"What to export, some of {','.join(WHAT)}.")
    flags.DEFINE_bool("parts", False, "With embeddings: also the CGE, MGE and GHE outputs.")
    flags.DEFINE_enum("eval_noise", None, list(configs.EVAL_NOISE_MODES), "Noise of the forward (default: the "
                      "run's eval_noise; off: deterministic).")
    flags.DEFINE_bool("overwrite", False, "Replace an existing non-empty --out.")


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        cli.fail(f"expected one WORKDIR argument, got {len(argv) - 1}; usage: python -m lgmrec_jax.export WORKDIR "
                 f"--out=DIR")
    FLAGS = flags.FLAGS
    if not FLAGS.out:
        cli.fail("--out is required: the directory to write the export to")
    cli.setup_logging()
    try:
        export(argv[1], FLAGS.out, data_dir=FLAGS.data_dir, checkpoint=FLAGS.checkpoint, k=FLAGS.k,
               split=FLAGS.split, what=FLAGS.what, parts=FLAGS.parts, eval_noise=FLAGS.eval_noise,
               overwrite=FLAGS.overwrite)
    except ExportError as err:
        cli.fail(str(err))
    except KeyboardInterrupt:
        cli.fail("interrupted; nothing was written", code=130)
    print(os.path.abspath(FLAGS.out))


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
