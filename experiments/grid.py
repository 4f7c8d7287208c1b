"""Trains every config of a grid, same-shape configs together as one compiled program.

    python -m experiments.grid --grid=alpha --dataset=synthetic_baby
    python -m experiments.grid --grid=search --dataset=clothing --grid_shard=3/640   # array job 3 of 640

A grid is a file under ``experiments/grids/`` (or any ``.py`` path) with ``sweep(add)`` or
``sweep(add, ctx)``; each ``add(key=value, ...)`` is the dataset's config with those keys. Configs that
differ only in per-config keys train as one program (lgmrec_jax.multi; ``--batching=map`` is bitwise the
single runs), the others one after another through the compilation cache; ``--mode=sequential`` runs
plain single runs. Each config gets a single run's workdir under ``configs/<id>/``; ``results.csv``,
``results.md`` and a plot per swept key sum up (selection by validation). A rerun resumes; shards
(``--grid_shard``, or one per process under ``jax.distributed``) are joined by experiments/grid_merge.py.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import json
import math
import os
import re
import shutil
import socket
import sys
import traceback
from typing import Any, Optional

from absl import app, flags, logging

GRIDS_PACKAGE = "experiments.grids"
GRIDS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "grids")
MODES = ("group", "sequential")
# What a grid writes in its workdir, besides a <param>.png per swept parameter; --restart deletes these alone.
GRID_OUTPUTS = ("grid.json", "results.csv", "results.md", "configs", "groups", "shards")
SUMMARY_KEYS = ("status", "best_epoch", "epochs_run", "total_wall_s")
TABLE_METRICS = (("valid", "recall@20"), ("valid", "ndcg@20"), ("test", "recall@10"), ("test", "recall@20"),
                 ("test", "ndcg@10"), ("test", "ndcg@20"), ("test", "precision@20"), ("test", "map@20"))
PLOT_METRIC = "recall@20"


class GridError(ValueError):
    """A grid cannot be expanded, run or merged; the message is one line for the user."""


# ---------------------------------------------------------------------------------------------
# Grid files and their configs
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GridContext:
    """What a grid's ``sweep(add, ctx)`` may look at."""

    dataset: str
    config_name: str  # baby / sports / clothing / tiny / default (lgmrec_jax.configs.config_name)
    base: Any  # the resolved base config (a copy; changing it changes nothing)


class Point:
    """One config of a grid (slots and lazy fields: a search grid has millions)."""

    __slots__ = ("index", "cid", "overrides", "seed", "given_label", "cfg")

    def __init__(self, index: int, cid: str, overrides: dict, seed: int, given_label: Optional[str] = None):
        self.index = index  # position in the grid's order
        self.cid = cid  # config id = directory name under configs/
        self.overrides = overrides  # the keys the grid set, seed included
        self.seed = seed
        self.given_label = given_label
        self.cfg = None  # the resolved ConfigDict (resolve())

    @property
    def setting_overrides(self) -> dict:
        return {k: v for k, v in self.overrides.items() if k != "seed"}

    @property
    def setting(self) -> str:
        """Canonical JSON of the overrides without the seed: the seeds of a setting share it."""
        return json.dumps(self.setting_overrides, sort_keys=True)

    @property
    def label(self) -> str:
        return self.given_label or slug(self.setting_overrides)

    def manifest(self) -> dict:
        return {"index": self.index, "cid": self.cid, "label": self.label, "overrides": self.overrides,
                "setting": self.setting, "seed": self.seed}


def available_grids() -> list[str]:
    return sorted(f[:-3] for f in os.listdir(GRIDS_DIR) if f.endswith(".py") and not f.startswith("_"))


def load_grid(name: str):
    """A grid module by name (experiments/grids/<name>.py) or by path to a .py file."""
    if name.endswith(".py"):
        if not os.path.isfile(name):
            raise GridError(f"grid file {name} not found")
        spec = importlib.util.spec_from_file_location(f"_grid_{os.path.basename(name)[:-3]}", name)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as err:  # noqa: BLE001  the user's file: say where, not a traceback
            raise GridError(f"grid file {name}: {where(err, name)}{type(err).__name__}: {err}") from None
    else:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or name not in available_grids():
            raise GridError(f"unknown grid {name!r}; available: {', '.join(available_grids())} "
                            f"(or a path to a .py file with a sweep(add) function)")
        module = importlib.import_module(f"{GRIDS_PACKAGE}.{name}")
    if not callable(getattr(module, "sweep", None)):
        raise GridError(f"grid {name!r} has no sweep(add) function")
    return module


def where(err: BaseException, path: str) -> str:
    """'line N: ' of the innermost frame of ``err`` in the file ``path`` (a syntax error's own line), or ''."""
    if isinstance(err, SyntaxError) and err.lineno:
        return f"line {err.lineno}: "
    line = None
    for frame, lineno in traceback.walk_tb(err.__traceback__):
        if os.path.abspath(frame.f_code.co_filename) == os.path.abspath(path):
            line = lineno
    return f"line {line}: " if line else ""


def grid_name(name: str) -> str:
    return os.path.basename(name)[:-3] if name.endswith(".py") else name


def fmt_value(value) -> str:
    if isinstance(value, float):
        return repr(value) if value != int(value) or abs(value) >= 1e16 else f"{value:.1f}"
    return str(value)


_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]")
_ITEM_TEXT: dict = {}


def _item_text(key: str, value) -> str:
    memo = (key, type(value), value)
    text = _ITEM_TEXT.get(memo)
    if text is None:
        text = _ITEM_TEXT[memo] = _UNSAFE.sub("_", f"{key}={fmt_value(value)}")
    return text


def slug(overrides: dict) -> str:
    """A readable, filesystem-safe id of a set of overrides (long ones end in a hash)."""
    if not overrides:
        return "base"
    text = ",".join([_item_text(k, overrides[k]) for k in sorted(overrides)])
    if len(text) > 100:
        text = f"{text[:80]}-{hashlib.sha1(text.encode()).hexdigest()[:10]}"
    return text


def known_keys() -> set:
    from lgmrec_jax.configs import default

    return set(default.get_config().keys())


def expand(name: str, dataset: str, base_cfg, seeds: Optional[list[int]] = None) -> list[Point]:
    """Every config of grid ``name`` on ``dataset`` (unresolved: see :func:`resolve`).

    Cheap per config (a search grid has millions), so every shard can expand the whole grid.
    """
    from lgmrec_jax import configs

    module = load_grid(name)
    gname = grid_name(name)
    known = known_keys()
    added: list[tuple[dict, Optional[str]]] = []

    def add(label: Optional[str] = None, **overrides):
        unknown = sorted(set(overrides) - known)
        if unknown:
            note = getattr(module, "UNKNOWN_KEY_NOTE", "")
            raise GridError(f"grid {gname!r}: add({', '.join(f'{k}=...' for k in unknown)}) sets unknown config "
                            f"key(s) {', '.join(map(repr, unknown))}; known keys: {', '.join(sorted(known))}"
                            + (f" ({note})" if note else ""))
        infinite = [k for k, v in sorted(overrides.items()) if isinstance(v, float) and not math.isfinite(v)]
        if infinite:
            raise GridError(f"grid {gname!r}: add({infinite[0]}={overrides[infinite[0]]}) is not a finite number")
        added.append((overrides, label))

    ctx = GridContext(dataset, configs.config_name(dataset), base_cfg.copy_and_resolve_references())
    params = inspect.signature(module.sweep).parameters
    try:
        module.sweep(add, ctx) if len(params) >= 2 else module.sweep(add)
    except GridError:
        raise
    except Exception as err:  # noqa: BLE001  a bug in the grid's sweep(): where, not a traceback
        raise GridError(f"grid {gname!r}: sweep() failed: {where(err, module.__file__)}"
                        f"{type(err).__name__}: {err}") from None
    if not added:
        raise GridError(f"grid {gname!r} adds no config")
    points, seen = [], set()
    base_seed = int(base_cfg.seed)
    for overrides, label in added:
        runs = ([overrides] if "seed" in overrides or not seeds
                else [{**overrides, "seed": s} for s in seeds])
        for ov in runs:
            cid = slug(ov)
            if cid in seen:
                raise GridError(f"grid {gname!r} adds the config {cid!r} twice")
            seen.add(cid)
            points.append(Point(len(points), cid, ov, int(ov.get("seed", base_seed)), label))
    return points


def resolve(points: list[Point], base_cfg, name: str) -> list[Point]:
    """Sets each point's resolved config (base updated with its overrides) and validates it, its
    matmul precision against this backend included."""
    from lgmrec_jax import configs, parallel

    precisions_checked = set()
    for p in points:
        cfg = base_cfg.copy_and_resolve_references()
        for key, value in p.overrides.items():
            try:
                cfg[key] = value
            except (TypeError, ValueError) as err:
                raise GridError(f"grid {grid_name(name)!r}, config {p.cid}: {key}={value!r}: {err}") from None
        try:
            configs.validate(cfg)
            if cfg.matmul_precision not in precisions_checked:  # a search shard resolves thousands
                parallel.check_matmul_precision(cfg.matmul_precision)
                precisions_checked.add(cfg.matmul_precision)
        except configs.ConfigError as err:
            raise GridError(f"grid {grid_name(name)!r}, config {p.cid}: {err}") from None
        p.cfg = cfg
    return points


def swept_keys(points: list) -> list[str]:
    """Keys set by some config of the grid, other than the seed, in first-seen order."""
    keys = []
    for p in points:
        overrides = p.overrides if isinstance(p, Point) else p["overrides"]
        keys += [k for k in overrides if k != "seed" and k not in keys]
    return keys


# ---------------------------------------------------------------------------------------------
# Shards and groups
# ---------------------------------------------------------------------------------------------

def parse_shard(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not match or int(match.group(2)) < 1 or int(match.group(1)) >= int(match.group(2)):
        raise GridError(f"--grid_shard is {text!r}, expected i/n with 0 <= i < n (e.g. 0/4)")
    return int(match.group(1)), int(match.group(2))


def shard_points(points: list[Point], index: int, count: int) -> list[Point]:
    """Shard ``index`` of ``count``: a contiguous block of the configs ordered by program.

    Programs are ordered by first appearance in the grid, configs within one by grid order, so
    same-shape configs stay together (and in one shard, unless a program is larger than a shard).
    """
    from lgmrec_jax.multi import PER_CONFIG_KEYS

    if count == 1:
        return list(points)
    rank: dict = {}

    def key(p: Point):
        shape = tuple(sorted((k, type(v).__name__, v) for k, v in p.overrides.items() if k not in PER_CONFIG_KEYS))
        return rank.setdefault(shape, len(rank)), p.index

    ordered = sorted(points, key=key)
    lo, hi = len(ordered) * index // count, len(ordered) * (index + 1) // count
    return sorted(ordered[lo:hi], key=lambda p: p.index)


def make_groups(points: list[Point], max_group: int) -> list[tuple[str, list[Point]]]:
    """Same-program configs in chunks of at most ``max_group``; ids are stable across reruns."""
    from lgmrec_jax.multi import program_key

    by_key: dict[str, list[Point]] = {}
    for p in points:
        by_key.setdefault(program_key(p.cfg), []).append(p)
    groups = []
    for members in by_key.values():
        for start in range(0, len(members), max_group):
            chunk = members[start:start + max_group]
            digest = hashlib.sha1("\n".join(p.cid for p in chunk).encode()).hexdigest()[:12]
            groups.append((f"group-{digest}", chunk))
    return groups


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------

def default_workdir(name: str, dataset: str) -> str:
    return os.path.join("runs", "grid", grid_name(name), dataset)


MANIFEST_LIST_LIMIT = 10000  # grid.json lists the configs of grids up to this size


def base_config(dataset: str, overrides: Optional[dict] = None):
    """The dataset's config updated with the command line's --config.* overrides."""
    from lgmrec_jax import configs

    base = configs.for_dataset(dataset)
    for key, value in (overrides or {}).items():
        if key not in base:
            raise GridError(f"unknown config key {key!r} in the base overrides")
        try:
            base[key] = value
        except (TypeError, ValueError) as err:
            raise GridError(f"--config.{key}={value!r}: {err}") from None
    return base


def manifest_of(name: str, dataset: str, points: list[Point], base_overrides: dict, seeds, valid_metric: str,
                grid_path: Optional[str] = None, emulate_precision: Optional[str] = None,
                mode: Optional[str] = None) -> dict:
    """What grid.json records: enough to expand the grid again (grid_merge does), and its configs."""
    manifest = {"grid": grid_name(name), "grid_source": grid_path or name, "dataset": dataset,
                "base_overrides": base_overrides, "seeds": seeds, "n_configs": len(points),
                "swept": swept_keys(points), "valid_metric": valid_metric}
    if mode:
        manifest["mode"] = mode
    if emulate_precision:  # its products are not this machine's own (experiments/precision_emulation.py)
        manifest["emulate_precision"] = emulate_precision
    if len(points) <= MANIFEST_LIST_LIMIT:
        manifest["configs"] = [p.manifest() for p in points]
    return manifest


def refuse_other_grid(workdir: str, before: dict, manifest: dict) -> None:
    """GridError when the workdir's grid.json records another grid, dataset, mode or precision emulation:
    their configs and tables must not mix (a grid.json from before "mode" was recorded passes on it)."""
    keys = [key for key in ("grid", "dataset", "mode") if key in before] + ["emulate_precision"]
    changed = [key for key in keys if before.get(key) != manifest.get(key)]
    if changed:
        what = "; ".join(f"{key}: {before.get(key)} -> {manifest.get(key)}" for key in changed)
        raise GridError(f"{workdir} holds another grid run ({what}): their results must not mix; rerun it as it "
                        f"was, use --restart (without --grid_shard) to discard it, or choose another --workdir")


def write_json_unique(path: str, payload) -> None:
    """Atomic JSON write that shards writing the same file at once cannot garble."""
    from lgmrec_jax.workdir import write_json_atomic

    write_json_atomic(path, payload, tmp=f"{path}.{os.getpid()}.{socket.gethostname()}.tmp")


def setup_compilation_cache(path: Optional[str]) -> Optional[str]:
    """JAX's persistent compilation cache at ``path`` (None: lgmrec_jax.compile_cache's default
    directory; "": off); returns the directory used."""
    from lgmrec_jax import compile_cache

    if path == "":
        return None
    return compile_cache.enable(os.path.abspath(path) if path else None)


def run_grid(name: str, dataset: str, data_dir: str, workdir: Optional[str] = None,
             base_overrides: Optional[dict] = None, seeds: Optional[list[int]] = None,
             shard: tuple[int, int] = (0, 1), devices: int = 1, max_group: int = 64, mode: str = "group",
             repack: bool = True, restart: bool = False, eval_chunk: Optional[int] = None,
             stop_after_epochs: Optional[int] = None, plots: bool = True, batching: str = "map",
             emulate_precision: Optional[str] = None) -> dict:
    """Runs (or resumes) shard ``shard`` of grid ``name``; returns {"summaries": {cid: summary}, ...}.
    ``emulate_precision`` ("gpu" or "tpu", CPUs only) computes every product as that accelerator
    computes the configs' matmul precision (experiments/precision_emulation.py); such a grid has a
    workdir of its own by default and is never resumed as a plain one, nor the other way round."""
    import jax

    emulation = contextlib.nullcontext()
    if emulate_precision:
        from experiments import precision_emulation

        if jax.default_backend() != "cpu":
            raise GridError(f"emulate_precision replaces the CPU's products; this is a {jax.default_backend()} "
                            f"(run with JAX_PLATFORMS=cpu, or without it)")
        workdir = workdir or f"{default_workdir(name, dataset)}_emulated_{emulate_precision}"
        emulation = precision_emulation.emulating_dot_algorithms(emulate_precision)
    with emulation:
        return _run_grid(name, dataset, data_dir, workdir, base_overrides, seeds, shard, devices, max_group, mode,
                         repack, restart, eval_chunk, stop_after_epochs, plots, batching, emulate_precision)


def _run_grid(name, dataset, data_dir, workdir, base_overrides, seeds, shard, devices, max_group, mode, repack,
              restart, eval_chunk, stop_after_epochs, plots, batching, emulate_precision=None) -> dict:
    import jax

    from lgmrec_jax import distributed, multi, run as run_lib, workdir as workdir_lib
    from lgmrec_jax.data import load_dataset

    if mode not in MODES:
        raise GridError(f"--mode is {mode!r}, expected one of {MODES}")
    if max_group < 1:
        raise GridError(f"--max_group is {max_group}, expected at least 1")
    n_local = jax.local_device_count()
    devices = devices or n_local
    if not 1 <= devices <= n_local:
        raise GridError(f"--devices is {devices}, expected 0 (all) to {n_local} local devices")
    base_overrides = dict(base_overrides or {})
    base = base_config(dataset, base_overrides)
    points = expand(name, dataset, base, seeds)
    shadowed = sorted(set(base_overrides) & set().union(*(p.overrides for p in points)))
    if shadowed:
        logging.warning("the grid sets %s per config: the --config value(s) given for %s are not used",
                        ", ".join(shadowed), "them" if len(shadowed) > 1 else "it")
    mine = resolve(shard_points(points, *shard), base, name)
    if mode == "group":  # a group spreads whole configs over --devices: each config is on one device
        for p in mine:
            p.cfg.num_devices = 1
    workdir = workdir or default_workdir(name, dataset)
    groups = make_groups(mine, 1 if mode == "sequential" else max_group)
    grid_path = os.path.abspath(name) if name.endswith(".py") else None
    manifest = manifest_of(name, dataset, points, base_overrides, seeds, base.valid_metric, grid_path,
                           emulate_precision, mode)
    ds = load_dataset(data_dir, dataset)  # bad data stops the grid before anything is deleted or written
    manifest_path = os.path.join(workdir, "grid.json")
    whole_restart = restart and shard[1] == 1  # discards grid.json too; a shard's restart keeps it
    before = read_json(manifest_path) if os.path.isdir(workdir) and not whole_restart else None
    if before is not None:  # before a shard's restart deletes its configs: they may be another grid's
        refuse_other_grid(workdir, before, manifest)
    if restart and os.path.isdir(workdir):
        if whole_restart:
            try:
                workdir_lib.clear_for_restart(workdir, GRID_OUTPUTS, suffixes=(".png",))
            except workdir_lib.RunError as err:
                raise GridError(str(err)) from None
        else:  # only this shard's configs and groups: other shards may share the workdir
            for path in [config_dir(workdir, p.cid) for p in mine] + [os.path.join(workdir, "groups", g)
                                                                      for g, _ in groups]:
                shutil.rmtree(path, ignore_errors=True)
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as err:
        raise GridError(f"{workdir}: cannot create the grid's workdir ({err.strerror}); choose another "
                        f"--workdir") from None
    if before is None:  # an existing record is replaced only once this run's configs have been accepted
        write_json_unique(manifest_path, manifest)
    checksums = ds.checksums() if ds.path else {}
    summaries = {}
    logging.info("grid %s on %s: %d configs, shard %d/%d holds %d in %d program group(s)", grid_name(name),
                 dataset, len(points), shard[0], shard[1], len(mine), len(groups))
    for gid, chunk in groups:
        if mode == "sequential":
            for p in chunk:
                try:
                    with distributed.process_local():  # this process's shard: its own single runs
                        summaries[p.cid] = run_lib.train_and_evaluate(
                            p.cfg, ds, config_dir(workdir, p.cid), stop_after_epochs=stop_after_epochs)
                except run_lib.NonFiniteError:  # recorded in its summary.json; the grid goes on
                    summaries[p.cid] = read_json(os.path.join(config_dir(workdir, p.cid), "summary.json"))
            continue
        members = [multi.Member(p.cid, p.cfg, config_dir(workdir, p.cid),
                                {"grid": {"name": grid_name(name), "config_id": p.cid, "label": p.label,
                                          "overrides": p.overrides, "group": gid, "group_size": len(chunk),
                                          "devices": devices, "batching": batching}})
                   for p in chunk]
        try:
            summaries.update(multi.train_group(members, ds, os.path.join(workdir, "groups", gid), devices, repack,
                                               eval_chunk, stop_after_epochs, checksums, batching=batching))
        except multi.GroupError as err:
            raise GridError(f"group {gid}: {err}") from None
    write_json_unique(manifest_path, manifest)
    out_dir = workdir if shard[1] == 1 else os.path.join(workdir, "shards", f"{shard[0]}-of-{shard[1]}")
    rows = collect_rows(mine, base.valid_metric, [workdir])
    write_tables(manifest, rows, out_dir, plots=plots and shard[1] == 1)
    return {"summaries": summaries, "workdir": workdir, "tables": out_dir, "configs": [p.cid for p in mine]}


def config_dir(workdir: str, cid: str) -> str:
    return os.path.join(workdir, "configs", cid)


# ---------------------------------------------------------------------------------------------
# Tables and plots
# ---------------------------------------------------------------------------------------------

def read_json(path: str) -> Optional[dict]:
    """The JSON object in ``path`` (None if there is no such file); GridError naming the file if it
    is not one."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as handle:
            payload = json.load(handle)
    except (OSError, ValueError) as err:
        raise GridError(f"{path}: not readable as JSON ({err})") from None
    if not isinstance(payload, dict):
        raise GridError(f"{path}: not a JSON object")
    return payload


def collect_rows(points: list[Point], valid_metric: str, inputs: list[str]) -> list[dict]:
    """One row per config, from the first input workdir holding its final summary."""
    from lgmrec_jax.multi import FINAL_STATUSES

    rows = []
    for entry in (p.manifest() for p in points):
        summary, source = None, None
        for root in inputs:
            found = read_json(os.path.join(config_dir(root, entry["cid"]), "summary.json"))
            if found is not None and found.get("status") in FINAL_STATUSES:
                summary, source = found, root
                break
        row = {"config_id": entry["cid"], "label": entry["label"], "setting": entry["setting"],
               "seed": entry["seed"], "overrides": entry["overrides"], "source": source}
        row["status"] = summary["status"] if summary else "missing"
        for key in ("best_epoch", "epochs_run", "total_wall_s"):
            row[key] = summary.get(key) if summary else None
        for split, metric in TABLE_METRICS + ((("valid", valid_metric),)):
            block = (summary or {}).get(f"best_{split}") or {}
            row[f"{split}_{metric}"] = block.get(metric)
        rows.append(row)
    return rows


def write_csv(manifest: dict, rows: list[dict], path: str) -> None:
    swept = manifest["swept"]
    metric_cols = []
    for split, metric in ((("valid", manifest["valid_metric"]),) + TABLE_METRICS):
        if f"{split}_{metric}" not in metric_cols:
            metric_cols.append(f"{split}_{metric}")
    header = ["config_id", "label", *swept, "seed", "status", "best_epoch", "epochs_run", *metric_cols,
              "total_wall_s"]
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for row in rows:
            values = {**row, **{k: row["overrides"].get(k, "") for k in swept}}
            writer.writerow(["" if values.get(h) is None else values.get(h) for h in header])
    os.replace(tmp, path)


def mean_std(values: list[float]) -> tuple[Optional[float], Optional[float]]:
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def settings_of(rows: list[dict], valid_metric: str) -> list[dict]:
    """Rows aggregated per setting (over seeds), in grid order."""
    settings: dict[str, dict] = {}
    for row in rows:
        s = settings.setdefault(row["setting"], {"setting": row["setting"], "label": row["label"],
                                                 "overrides": {k: v for k, v in row["overrides"].items()
                                                               if k != "seed"}, "rows": []})
        s["rows"].append(row)
    for s in settings.values():
        done = [r for r in s["rows"] if r["status"] != "missing"]
        s["n_done"], s["n"] = len(done), len(s["rows"])
        for col in {f"valid_{valid_metric}", "valid_recall@20", "test_recall@20", "test_ndcg@20", "best_epoch"}:
            s[col] = mean_std([r[col] for r in done if r.get(col) is not None])
    return list(settings.values())


def fmt_ms(pair) -> str:
    mean, std = pair
    if mean is None:
        return "–"
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def best_setting(settings: list[dict], column: str) -> Optional[dict]:
    scored = [s for s in settings if s[column][0] is not None]
    return max(scored, key=lambda s: s[column][0]) if scored else None  # ties: first in grid order


def markdown(manifest: dict, rows: list[dict]) -> str:
    vm = manifest["valid_metric"]
    settings = settings_of(rows, vm)
    best = best_setting(settings, f"valid_{vm}")
    best_by_test = best_setting(settings, "test_recall@20")
    swept = manifest["swept"]
    n_done = sum(r["status"] != "missing" for r in rows)
    lines = [f"# Grid `{manifest['grid']}` on `{manifest['dataset']}`", "",
             f"{len(rows)} configs in {len(settings)} settings; {n_done} finished"
             + (f", {len(rows) - n_done} missing (not run or not finished)" if n_done < len(rows) else "") + ".",
             "Values are mean ± sample standard deviation over the seeds of a setting, each taken at that "
             "run's best validation epoch (early stopping on the rounded validation metric).", "",
             "Every config: the dataset's config"
             + (", with " + ", ".join(f"`{k}={fmt_value(v)}`" for k, v in sorted(manifest["base_overrides"].items()))
                if manifest.get("base_overrides") else " unchanged")
             + f" except what the settings set; seeds {', '.join(map(str, manifest.get('seeds') or [])) or 'of the grid'}.",
             "",
             *([f"**Emulated**: every product was computed on a CPU as a {manifest['emulate_precision'].upper()} "
                "computes the configs' matmul precision (`--emulate_precision`, experiments/precision_emulation.py).",
                ""] if manifest.get("emulate_precision") else []),
             f"**Selection is by validation**: ★ marks the setting with the best mean valid {vm}. The reference's "
             f"grid search (`quick_start`) keeps the combination with the best *test* Recall@20 instead "
             f"(SPEC §4.6), i.e. it selects on the test set"
             + (f"; its pick here would be `{best_by_test['label']}`." if best_by_test else "."), ""]
    valid_cols = [f"valid {vm}"] + (["valid recall@20"] if vm != "recall@20" else [])
    header = ["", "setting", *swept, "seeds", *valid_cols, "test recall@20", "test ndcg@20", "best epoch"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    for s in settings:
        cells = ["★" if s is best else "", s["label"], *(fmt_value(s["overrides"].get(k, "")) for k in swept),
                 f"{s['n_done']}/{s['n']}", fmt_ms(s[f"valid_{vm}"])]
        if vm != "recall@20":
            cells.append(fmt_ms(s["valid_recall@20"]))
        epoch = s["best_epoch"]
        cells += [fmt_ms(s["test_recall@20"]), fmt_ms(s["test_ndcg@20"]),
                  "–" if epoch[0] is None else f"{epoch[0]:.1f}"]
        if s is best:
            cells = [cells[0]] + [f"**{c}**" if c not in ("", "–") else c for c in cells[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Per-config rows (every seed): `results.csv`; per-config runs: `configs/<config_id>/`."]
    return "\n".join(lines) + "\n"


def save_recall_plot(fig, ax, path: str, title: str) -> None:
    import matplotlib.pyplot as plt

    ax.set_ylabel("Recall@20")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_param(settings: list[dict], param: str, best: Optional[dict], path: str, title: str) -> bool:
    """valid/test Recall@20 against one swept parameter, error bars over seeds; False if not plottable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = best["overrides"] if best else {}
    with_param = [s for s in settings if param in s["overrides"] and s["valid_recall@20"][0] is not None]
    # A slice through the best setting: the other swept keys held at its values.
    sliced = [s for s in with_param
              if all(s["overrides"].get(k) == v for k, v in others.items() if k != param)]
    chosen = sliced if len({fmt_value(s["overrides"][param]) for s in sliced}) >= 2 else with_param
    points: dict[str, list] = {}
    for s in chosen:
        points.setdefault(fmt_value(s["overrides"][param]), []).append(s)
    if len(points) < 2:
        return False
    values = [group[0]["overrides"][param] for group in points.values()]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    order = sorted(range(len(values)), key=lambda i: values[i]) if numeric else list(range(len(values)))
    groups = [list(points.values())[i] for i in order]
    xs = [values[i] for i in order] if numeric else list(range(len(order)))
    fig, ax = plt.subplots(figsize=(6, 4))
    for column, name, marker in (("valid_recall@20", "valid", "o"), ("test_recall@20", "test", "s")):
        # Several settings per value (no slice possible): the best by mean valid recall@20.
        picked = [max(g, key=lambda s: s["valid_recall@20"][0]) for g in groups]
        ys = [s[column][0] for s in picked]
        errs = [s[column][1] or 0.0 for s in picked]
        ax.errorbar(xs, ys, yerr=errs, marker=marker, capsize=3, label=f"{name} Recall@20")
    if numeric:
        positive = [v for v in xs if v > 0]
        if positive and max(positive) / min(positive) >= 50:
            if min(xs) > 0:
                ax.set_xscale("log", base=2 if all(float(v).is_integer() for v in xs) else 10)
            else:
                ax.set_xscale("symlog", linthresh=min(positive))
    else:
        ax.set_xticks(xs)
        ax.set_xticklabels([fmt_value(values[i]) for i in order])
    ax.set_xlabel(param)
    save_recall_plot(fig, ax, path, title)
    return True


def plot_settings(settings: list[dict], path: str, title: str) -> bool:
    """valid/test Recall@20 per setting (by label), for grids whose parameters cannot be plotted
    one at a time (the ablation: each switch has one off value)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [s for s in settings if s["valid_recall@20"][0] is not None]
    if len(shown) < 2:
        return False
    xs = list(range(len(shown)))
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(shown)), 4))
    for offset, (column, name, marker) in zip((-0.1, 0.1), (("valid_recall@20", "valid", "o"),
                                                            ("test_recall@20", "test", "s"))):
        ax.errorbar([x + offset for x in xs], [s[column][0] for s in shown],
                    yerr=[s[column][1] or 0.0 for s in shown], fmt=marker, capsize=3, label=f"{name} Recall@20")
    ax.set_xticks(xs)
    ax.set_xticklabels([s["label"] for s in shown], rotation=30 if len(shown) > 5 else 0, ha="right"
                       if len(shown) > 5 else "center")
    save_recall_plot(fig, ax, path, title)
    return True


def write_tables(manifest: dict, rows: list[dict], out_dir: str, plots: bool = True) -> list[str]:
    """results.csv, results.md and (with matplotlib) one PNG per swept parameter; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    written = [os.path.join(out_dir, "results.csv"), os.path.join(out_dir, "results.md")]
    write_csv(manifest, rows, written[0])
    with open(written[1], "w") as handle:
        handle.write(markdown(manifest, rows))
    if not plots:
        return written
    if importlib.util.find_spec("matplotlib") is None:  # optional: the [plot] extra
        logging.info("matplotlib is not installed: no plots (pip install matplotlib)")
        return written
    settings = settings_of(rows, manifest["valid_metric"])
    best = best_setting(settings, f"valid_{manifest['valid_metric']}")
    for param in manifest["swept"]:
        path = os.path.join(out_dir, f"{re.sub(r'[^A-Za-z0-9_.-]', '_', param)}.png")
        n_seeds = max(len(s["rows"]) for s in settings)
        title = f"{manifest['grid']} on {manifest['dataset']}" + (
            f" (mean ± std over {n_seeds} seeds)" if n_seeds > 1 else "")
        if plot_param(settings, param, best, path, title):
            written.append(path)
    if len(written) == 2 and len(settings) <= 40:  # no parameter could be plotted on its own
        path = os.path.join(out_dir, "settings.png")
        if plot_settings(settings, path, f"{manifest['grid']} on {manifest['dataset']}"):
            written.append(path)
    return written


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

FLAGS = flags.FLAGS


def define_flags() -> None:
    from lgmrec_jax import distributed, train

    train.define_run_flags()  # --dataset, --data_dir, --workdir, --restart, --num_devices
    train.define_config_flag()
    flags.DEFINE_string("grid", None, "Grid name (experiments/grids/<name>.py) or path to a .py grid file.")
    flags.DEFINE_string("grid_shard", "0/1", "Run shard i of n (0-based), e.g. 3/50 for array job 3 of 50.")
    flags.DEFINE_list("seeds", None, "Seeds for every config that sets none, e.g. 0,1,2.")
    flags.DEFINE_enum("mode", "group", MODES, "group: same-shape configs as one program; sequential: one "
                      "single run after another.")
    flags.DEFINE_enum("batching", "map", ("map", "vmap", "vmap_columns"), "How a group's configs share its "
                      "program: map (one after another inside it; the single runs' numbers exactly), vmap "
                      "(batched; equal to float32 reassociation), vmap_columns (vmap, and each sparse "
                      "propagation once over all configs' columns). See lgmrec_jax/multi.py.")
    flags.DEFINE_integer("devices", 1, "Local devices to spread each group's configs over (0 = all).")
    flags.DEFINE_integer("max_group", 64, "Most configs in one program.")
    flags.DEFINE_bool("repack", True, "vmap: shrink a group's program once at most half of its configs are active "
                      "(under map a finished config costs nothing).")
    flags.DEFINE_integer("eval_chunk", 0, "vmap: configs evaluated at once (0 = as many as keep their score "
                         "blocks under 2 GiB; lower it to bound evaluation memory further).")
    flags.DEFINE_string("compilation_cache_dir", None, "JAX persistent compilation cache (default: $LGMREC_JAX_CACHE "
                        "or ~/.cache/lgmrec_jax/xla; '' = off).")
    flags.DEFINE_bool("dry_run", False, "Print the configs and program groups of this shard; train nothing.")
    flags.DEFINE_enum("emulate_precision", None, ["gpu", "tpu"], "On a CPU, compute every product the way "
                      "that accelerator computes the configs' matmul_precision (experiments/precision_emulation.py:"
                      " TF32 or bfloat16 passes); default workdir runs/grid/<grid>/"
                      "<dataset>_emulated_<gpu|tpu>.")
    distributed.define_flags()


def main(argv):
    from lgmrec_jax import distributed
    from lgmrec_jax.data import DatasetError
    from lgmrec_jax.cli import fail, setup_logging
    from lgmrec_jax.run import NonFiniteError, RunError
    from ml_collections import config_flags

    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; flags take the form --name=value")
    if not FLAGS.grid:
        fail(f"--grid is required; available grids: {', '.join(available_grids())}")
    setup_logging()
    try:
        index, count = parse_shard(FLAGS.grid_shard)
        pid, n_proc = distributed.initialize_from_flags()
        index, count = index * n_proc + pid, count * n_proc
        setup_compilation_cache(FLAGS.compilation_cache_dir)
        try:
            seeds = [int(s) for s in FLAGS.seeds] if FLAGS.seeds else None
        except ValueError:
            raise GridError(f"--seeds={','.join(FLAGS.seeds)}: expected comma-separated integers") from None
        overrides = config_flags.get_override_values(FLAGS["config"])
        if FLAGS.num_devices is not None:  # lgmrec_jax.train's flag: per-config devices (--mode=sequential)
            overrides["num_devices"] = FLAGS.num_devices
        if FLAGS.dry_run:
            base = base_config(FLAGS.dataset, overrides)
            everything = expand(FLAGS.grid, FLAGS.dataset, base, seeds)
            points = resolve(shard_points(everything, index, count), base, FLAGS.grid)
            print(f"grid {grid_name(FLAGS.grid)} on {FLAGS.dataset}: {len(everything)} configs; shard "
                  f"{index}/{count}: {len(points)}")
            for gid, chunk in make_groups(points, 1 if FLAGS.mode == "sequential" else FLAGS.max_group):
                print(f"{gid}: {len(chunk)} config(s): {', '.join(p.cid for p in chunk[:8])}"
                      + (" ..." if len(chunk) > 8 else ""))
            return
        result = run_grid(FLAGS.grid, FLAGS.dataset, FLAGS.data_dir, FLAGS.workdir, overrides, seeds,
                          (index, count), FLAGS.devices, FLAGS.max_group, FLAGS.mode, FLAGS.repack, FLAGS.restart,
                          FLAGS.eval_chunk or None, batching=FLAGS.batching,
                          emulate_precision=FLAGS.emulate_precision)
    except (GridError, DatasetError, RunError, ValueError) as err:  # ValueError: also DistributedError
        fail(str(err))
    except NonFiniteError as err:
        fail(str(err), code=3)
    except KeyboardInterrupt:
        fail("interrupted; finished configs and the groups' newest checkpoints are intact: rerun the same "
             "command to resume", code=130)
    statuses: dict[str, int] = {}
    for summary in result["summaries"].values():
        statuses[summary.get("status")] = statuses.get(summary.get("status"), 0) + 1
    print(json.dumps({"workdir": result["workdir"], "tables": result["tables"], "configs": len(result["configs"]),
                      "statuses": statuses}, indent=2, sort_keys=True))


def run():
    from lgmrec_jax.cli import parse_flags
    from lgmrec_jax.train import reject_unknown_config_keys

    reject_unknown_config_keys(sys.argv)
    define_flags()
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
