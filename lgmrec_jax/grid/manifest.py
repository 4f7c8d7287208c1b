"""A grid's workdir: its layout, grid.json, and what a rerun or ``--restart`` may do to it.

grid.json records enough to expand the grid again (grid_merge does) and, up to a size, its configs.
A workdir holding another grid, dataset, mode or precision emulation is refused before anything is
deleted or written, since their configs and tables must not mix. ``--restart`` of the whole grid
deletes the grid's own outputs alone (GRID_OUTPUTS); a shard's restart deletes its configs and groups.
Writes are atomic, and shards writing one file at once cannot garble it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from typing import Optional

from lgmrec_jax.grid import GridError
from lgmrec_jax.grid.spec import Point, grid_name, swept_keys

# What a grid writes in its workdir, besides a <param>.png per swept parameter; --restart deletes these alone.
GRID_OUTPUTS = ("grid.json", "results.csv", "results.md", "configs", "groups", "shards")
MANIFEST_LIST_LIMIT = 10000  # grid.json lists the configs of grids up to this size


def default_workdir(name: str, dataset: str) -> str:
    return os.path.join("runs", "grid", grid_name(name), dataset)


def config_dir(workdir: str, cid: str) -> str:
    return os.path.join(workdir, "configs", cid)


def group_dir(workdir: str, gid: str) -> str:
    return os.path.join(workdir, "groups", gid)


def shard_tables_dir(workdir: str, shard: tuple[int, int]) -> str:
    """Where a shard's tables go: the workdir itself for the whole grid."""
    return workdir if shard[1] == 1 else os.path.join(workdir, "shards", f"{shard[0]}-of-{shard[1]}")


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


def write_json_unique(path: str, payload) -> None:
    """Atomic JSON write that shards writing the same file at once cannot garble."""
    from lgmrec_jax.workdir import write_json_atomic

    write_json_atomic(path, payload, tmp=f"{path}.{os.getpid()}.{socket.gethostname()}.tmp")


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


def prepare_workdir(workdir: str, manifest: dict, restart: bool, whole: bool, shard_paths: list[str]) -> None:
    """Readies ``workdir`` for a (shard of a) grid: refuses another grid's, applies ``restart`` (the
    whole grid's outputs when ``whole``, else the shard's own ``shard_paths``), and records grid.json
    where there was none. An existing record is replaced only once the run's configs have been accepted
    (the caller writes it again at the end)."""
    from lgmrec_jax import workdir as workdir_lib

    manifest_path = os.path.join(workdir, "grid.json")
    whole_restart = restart and whole  # discards grid.json too; a shard's restart keeps it
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
            for path in shard_paths:
                shutil.rmtree(path, ignore_errors=True)
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as err:
        raise GridError(f"{workdir}: cannot create the grid's workdir ({err.strerror}); choose another "
                        f"--workdir") from None
    if before is None:
        write_json_unique(manifest_path, manifest)
