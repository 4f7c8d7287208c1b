"""The shards of a grid joined into one set of tables (results.csv, results.md, PNGs).

Each input is a grid workdir written by one or more shards; their grid.json must describe the same
grid (name, source, dataset, base overrides, seeds, size, precision emulation). The grid is expanded
again from that record, so a sweep file changed since the shards ran is caught, and every config's
result is read from the first input whose ``configs/<id>/summary.json`` is final. Config directories
found outside the target workdir are copied into it (checkpoints left out).
"""

from __future__ import annotations

import os
import shutil
from typing import Optional

from lgmrec_jax.grid import GridError, manifest as manifest_lib, spec, tables

IDENTITY_KEYS = ("grid", "grid_source", "dataset", "base_overrides", "seeds", "n_configs", "emulate_precision")


def read_manifest(path: str) -> dict:
    manifest = manifest_lib.read_json(os.path.join(path, "grid.json"))
    if manifest is None:
        raise GridError(f"{path}: no grid.json (not a grid workdir)")
    return manifest


def refuse_foreign_workdir(workdir: str, manifest: dict, first_input: str) -> None:
    """GridError when ``workdir`` (not one of the inputs) already holds something other than this grid:
    merging replaces its config directories and grid.json."""
    if not os.path.isdir(workdir) or not os.listdir(workdir):
        return
    existing = manifest_lib.read_json(os.path.join(workdir, "grid.json"))
    if existing is None:
        raise GridError(f"{workdir}: not empty and not a grid workdir (no grid.json); merge into a new "
                        f"directory or into a workdir of this grid")
    diffs = [k for k in IDENTITY_KEYS if existing.get(k) != manifest.get(k)]
    if diffs:
        raise GridError(f"{workdir}/grid.json describes another grid than {first_input}/grid.json "
                        f"(differs in {', '.join(diffs)}): merging would replace its configs; choose "
                        f"another --workdir")


def merge(inputs: list[str], workdir: Optional[str] = None, allow_partial: bool = False, copy: bool = True,
          plots: bool = True, grids_dir: Optional[str] = None) -> dict:
    """Writes the merged tables into ``workdir`` (default: the first input); returns a summary dict.
    ``grids_dir``: where a grid recorded by name (not by path) is found."""
    if not inputs:
        raise GridError("no input workdirs")
    manifests = [read_manifest(path) for path in inputs]
    first = manifests[0]
    for path, other in zip(inputs[1:], manifests[1:]):
        diffs = [k for k in IDENTITY_KEYS if other.get(k) != first.get(k)]
        if diffs:
            raise GridError(f"{path}/grid.json describes another grid than {inputs[0]}/grid.json "
                            f"(differs in {', '.join(diffs)})")
    workdir = workdir or inputs[0]
    if os.path.abspath(workdir) not in {os.path.abspath(p) for p in inputs}:
        refuse_foreign_workdir(workdir, first, inputs[0])
    source = first["grid_source"]
    if source.endswith(".py") and not os.path.isfile(source):
        raise GridError(f"the grid file {source} recorded in grid.json is not here")
    base = spec.base_config(first["dataset"], first["base_overrides"])
    points = spec.expand(source, first["dataset"], base, first["seeds"], grids_dir)
    if len(points) != first["n_configs"]:
        raise GridError(f"grid {first['grid']!r} now has {len(points)} configs, grid.json records "
                        f"{first['n_configs']}: the grid file changed since the shards ran")
    rows = tables.collect_rows(points, first["valid_metric"], inputs)
    missing = [r["config_id"] for r in rows if r["status"] == "missing"]
    if missing and not allow_partial:
        raise GridError(f"{len(missing)} of {len(rows)} configs have no final result in "
                        f"{', '.join(inputs)} (e.g. {missing[0]}); run their shards or pass --allow_partial")
    os.makedirs(workdir, exist_ok=True)
    copied = 0
    if copy:
        for row in rows:
            if row["source"] and os.path.abspath(row["source"]) != os.path.abspath(workdir):
                src = manifest_lib.config_dir(row["source"], row["config_id"])
                dst = manifest_lib.config_dir(workdir, row["config_id"])
                if os.path.exists(dst):
                    shutil.rmtree(dst)
                shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock", "checkpoints"))
                copied += 1
    if os.path.abspath(workdir) not in {os.path.abspath(p) for p in inputs}:
        manifest_lib.write_json_unique(os.path.join(workdir, "grid.json"), first)
    written = tables.write_tables(first, rows, workdir, plots=plots)
    return {"workdir": workdir, "configs": len(rows), "missing": len(missing), "copied": copied,
            "written": written}
