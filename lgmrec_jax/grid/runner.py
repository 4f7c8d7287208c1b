"""Runs (or resumes) a shard of a grid: its configs expanded, resolved, grouped and trained.

Configs that differ only in per-config keys train as one program (lgmrec_jax.group_engine, through
lgmrec_jax.grid.training), the others one after another; ``mode="sequential"`` runs plain single
runs. Each config gets a single run's workdir under ``configs/<id>/``, and the shard's tables are
written at the end. Bad data or a refused workdir stops the grid before anything is deleted or
written. Everything the caller chooses is one GridOptions value.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Callable, ContextManager, NamedTuple, Optional

from absl import logging

from lgmrec_jax.grid import GridError, manifest as manifest_lib, sharding, spec, tables
from lgmrec_jax.grid.spec import Point

MODES = ("group", "sequential")


@dataclasses.dataclass(frozen=True)
class GridOptions:
    """What a grid run is asked to do (experiments/grid.py builds one from its flags)."""

    grid: str  # a name that grids_dir holds as <name>.py, or a path to a .py sweep file
    dataset: str
    data_dir: str
    grids_dir: Optional[str] = None  # where named grids live
    workdir: Optional[str] = None  # default runs/grid/<grid>/<dataset> (+ _emulated_<gpu|tpu>)
    base_overrides: dict = dataclasses.field(default_factory=dict)  # --config.* for every config
    seeds: Optional[list[int]] = None  # each config that sets no seed, once per seed
    shard: tuple[int, int] = (0, 1)  # (i, n): shard i of n
    devices: int = 1  # local devices a group's configs are spread over (0: all)
    max_group: int = 64  # most configs in one program
    mode: str = "group"  # group | sequential
    batching: str = "map"  # map | vmap | vmap_columns (lgmrec_jax.group_engine)
    repack: bool = True
    restart: bool = False
    eval_chunk: Optional[int] = None
    stop_after_epochs: Optional[int] = None  # stop each group after this many epochs (tests: a kill)
    plots: bool = True
    # On a CPU, compute the products as that accelerator ("gpu" or "tpu") computes the configs' matmul
    # precision; ``emulation(emulate_precision)`` is the context manager that does it.
    emulate_precision: Optional[str] = None
    emulation: Optional[Callable[[str], ContextManager]] = None


class Plan(NamedTuple):
    """What a shard of a grid will train."""

    base: object  # the base config (the dataset's, with the base overrides)
    points: list[Point]  # the whole grid
    mine: list[Point]  # this shard's configs, resolved
    groups: list[tuple[str, list[Point]]]  # (group id, its configs)


def setup_compilation_cache(path: Optional[str]) -> Optional[str]:
    """JAX's persistent compilation cache at ``path`` (None: lgmrec_jax.compile_cache's default
    directory; "": off); returns the directory used."""
    from lgmrec_jax import compile_cache

    if path == "":
        return None
    return compile_cache.enable(os.path.abspath(path) if path else None)


def plan(options: GridOptions) -> Plan:
    """Expands the grid and resolves and groups the shard's configs; trains nothing."""
    base_overrides = dict(options.base_overrides or {})
    base = spec.base_config(options.dataset, base_overrides)
    points = spec.expand(options.grid, options.dataset, base, options.seeds, options.grids_dir)
    shadowed = sorted(set(base_overrides) & set().union(*(p.overrides for p in points)))
    if shadowed:
        logging.warning("the grid sets %s per config: the --config value(s) given for %s are not used",
                        ", ".join(shadowed), "them" if len(shadowed) > 1 else "it")
    mine = spec.resolve(sharding.shard_points(points, *options.shard), base, options.grid)
    if options.mode == "group":  # a group spreads whole configs over --devices: each config is on one device
        for p in mine:
            p.cfg.num_devices = 1
    groups = sharding.make_groups(mine, 1 if options.mode == "sequential" else options.max_group)
    return Plan(base, points, mine, groups)


def describe(options: GridOptions) -> str:
    """The configs and program groups of the shard (``--dry_run``)."""
    p = plan(options)
    index, count = options.shard
    lines = [f"grid {spec.grid_name(options.grid)} on {options.dataset}: {len(p.points)} configs; shard "
             f"{index}/{count}: {len(p.mine)}"]
    for gid, chunk in p.groups:
        lines.append(f"{gid}: {len(chunk)} config(s): {', '.join(q.cid for q in chunk[:8])}"
                     + (" ..." if len(chunk) > 8 else ""))
    return "\n".join(lines)


def run_grid(options: GridOptions) -> dict:
    """Runs (or resumes) the shard; returns {"summaries": {cid: summary}, "workdir", "tables", "configs"}.
    A grid with ``emulate_precision`` has a workdir of its own by default and is never resumed as a
    plain one, nor the other way round."""
    import jax

    emulation = contextlib.nullcontext()
    if options.emulate_precision:
        if options.emulation is None:
            raise GridError(f"emulate_precision={options.emulate_precision!r} needs the emulation that computes "
                            f"it (GridOptions.emulation)")
        if jax.default_backend() != "cpu":
            raise GridError(f"emulate_precision replaces the CPU's products; this is a {jax.default_backend()} "
                            f"(run with JAX_PLATFORMS=cpu, or without it)")
        workdir = (options.workdir or f"{manifest_lib.default_workdir(options.grid, options.dataset)}"
                                      f"_emulated_{options.emulate_precision}")
        options = dataclasses.replace(options, workdir=workdir)
        emulation = options.emulation(options.emulate_precision)
    with emulation:
        return _run_grid(options)


def _run_grid(options: GridOptions) -> dict:
    import jax

    from lgmrec_jax import distributed
    from lgmrec_jax.data import load_dataset
    from lgmrec_jax.grid import training

    if options.mode not in MODES:
        raise GridError(f"--mode is {options.mode!r}, expected one of {MODES}")
    if options.max_group < 1:
        raise GridError(f"--max_group is {options.max_group}, expected at least 1")
    n_local = jax.local_device_count()
    devices = options.devices or n_local
    if not 1 <= devices <= n_local:
        raise GridError(f"--devices is {devices}, expected 0 (all) to {n_local} local devices")
    name, dataset, shard = options.grid, options.dataset, options.shard
    base, points, mine, groups = plan(options)
    workdir = options.workdir or manifest_lib.default_workdir(name, dataset)
    grid_path = os.path.abspath(name) if name.endswith(".py") else None
    manifest = manifest_lib.manifest_of(name, dataset, points, dict(options.base_overrides or {}), options.seeds,
                                        base.valid_metric, grid_path, options.emulate_precision, options.mode)
    ds = load_dataset(options.data_dir, dataset)  # bad data stops the grid before anything is deleted or written
    manifest_lib.prepare_workdir(workdir, manifest, options.restart, whole=shard[1] == 1,
                                 shard_paths=[manifest_lib.config_dir(workdir, p.cid) for p in mine]
                                 + [manifest_lib.group_dir(workdir, g) for g, _ in groups])
    checksums = ds.checksums() if ds.path else {}
    summaries = {}
    logging.info("grid %s on %s: %d configs, shard %d/%d holds %d in %d program group(s)", spec.grid_name(name),
                 dataset, len(points), shard[0], shard[1], len(mine), len(groups))
    for gid, chunk in groups:
        if options.mode == "sequential":
            for p in chunk:
                cdir = manifest_lib.config_dir(workdir, p.cid)
                try:
                    with distributed.process_local():  # this process's shard: its own single runs
                        summaries[p.cid] = training.train_and_evaluate(
                            p.cfg, ds, cdir, stop_after_epochs=options.stop_after_epochs)
                except training.NonFiniteError:  # recorded in its summary.json; the grid goes on
                    summaries[p.cid] = manifest_lib.read_json(os.path.join(cdir, "summary.json"))
            continue
        members = [training.Member(p.cid, p.cfg, manifest_lib.config_dir(workdir, p.cid),
                                   {"grid": {"name": spec.grid_name(name), "config_id": p.cid, "label": p.label,
                                             "overrides": p.overrides, "group": gid, "group_size": len(chunk),
                                             "devices": devices, "batching": options.batching}})
                   for p in chunk]
        try:
            summaries.update(training.train_group(members, ds, manifest_lib.group_dir(workdir, gid), training.GroupOptions(
                n_devices=devices, repack=options.repack, eval_chunk=options.eval_chunk, batching=options.batching,
                stop_after_epochs=options.stop_after_epochs, checksums=checksums)))
        except training.GroupError as err:
            raise GridError(f"group {gid}: {err}") from None
    manifest_lib.write_json_unique(os.path.join(workdir, "grid.json"), manifest)
    out_dir = manifest_lib.shard_tables_dir(workdir, shard)
    rows = tables.collect_rows(mine, base.valid_metric, [workdir])
    tables.write_tables(manifest, rows, out_dir, plots=options.plots and shard[1] == 1)
    return {"summaries": summaries, "workdir": workdir, "tables": out_dir, "configs": [p.cid for p in mine]}
