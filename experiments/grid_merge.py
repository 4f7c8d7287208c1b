"""Joins the shards of a grid into one set of tables (results.csv, results.md, PNGs).

    python -m experiments.grid_merge --workdir=runs/grid/search/clothing         # shards shared one workdir
    python -m experiments.grid_merge --workdir=merged --inputs=host0/wd,host1/wd  # workdirs copied back

Each input is a grid workdir written by ``python -m experiments.grid --grid_shard=i/n``; their
``grid.json`` must describe the same grid (name, dataset, base overrides, seeds). The grid is
expanded again from that record, and every config's result is read from the first input whose
``configs/<id>/summary.json`` is final. Config directories found outside ``--workdir`` are copied
into it (``--nocopy`` to skip), so the merged workdir holds every per-config run. A config that no
input finished is an error unless ``--allow_partial`` (then its row says ``missing``).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional

from absl import app, flags

from experiments import grid as grid_lib
from lgmrec_jax.cli import fail, parse_flags

IDENTITY_KEYS = ("grid", "grid_source", "dataset", "base_overrides", "seeds", "n_configs", "emulate_precision")


def read_manifest(path: str) -> dict:
    manifest = grid_lib.read_json(os.path.join(path, "grid.json"))
    if manifest is None:
        raise grid_lib.GridError(f"{path}: no grid.json (not a grid workdir)")
    return manifest


def refuse_foreign_workdir(workdir: str, manifest: dict, first_input: str) -> None:
    """GridError when ``workdir`` (not one of the inputs) already holds something other than this grid:
    merging replaces its config directories and grid.json."""
    if not os.path.isdir(workdir) or not os.listdir(workdir):
        return
    existing = grid_lib.read_json(os.path.join(workdir, "grid.json"))
    if existing is None:
        raise grid_lib.GridError(f"{workdir}: not empty and not a grid workdir (no grid.json); merge into a new "
                                 f"directory or into a workdir of this grid")
    diffs = [k for k in IDENTITY_KEYS if existing.get(k) != manifest.get(k)]
    if diffs:
        raise grid_lib.GridError(f"{workdir}/grid.json describes another grid than {first_input}/grid.json "
                                 f"(differs in {', '.join(diffs)}): merging would replace its configs; choose "
                                 f"another --workdir")


def merge(inputs: list[str], workdir: Optional[str] = None, allow_partial: bool = False, copy: bool = True,
          plots: bool = True) -> dict:
    """Writes the merged tables into ``workdir`` (default: the first input); returns a summary dict."""
    if not inputs:
        raise grid_lib.GridError("no input workdirs")
    manifests = [read_manifest(path) for path in inputs]
    first = manifests[0]
    for path, other in zip(inputs[1:], manifests[1:]):
        diffs = [k for k in IDENTITY_KEYS if other.get(k) != first.get(k)]
        if diffs:
            raise grid_lib.GridError(f"{path}/grid.json describes another grid than {inputs[0]}/grid.json "
                                     f"(differs in {', '.join(diffs)})")
    workdir = workdir or inputs[0]
    if os.path.abspath(workdir) not in {os.path.abspath(p) for p in inputs}:
        refuse_foreign_workdir(workdir, first, inputs[0])
    source = first["grid_source"]
    if source.endswith(".py") and not os.path.isfile(source):
        raise grid_lib.GridError(f"the grid file {source} recorded in grid.json is not here")
    base = grid_lib.base_config(first["dataset"], first["base_overrides"])
    points = grid_lib.expand(source, first["dataset"], base, first["seeds"])
    if len(points) != first["n_configs"]:
        raise grid_lib.GridError(f"grid {first['grid']!r} now has {len(points)} configs, grid.json records "
                                 f"{first['n_configs']}: the grid file changed since the shards ran")
    rows = grid_lib.collect_rows(points, first["valid_metric"], inputs)
    missing = [r["config_id"] for r in rows if r["status"] == "missing"]
    if missing and not allow_partial:
        raise grid_lib.GridError(f"{len(missing)} of {len(rows)} configs have no final result in "
                                 f"{', '.join(inputs)} (e.g. {missing[0]}); run their shards or pass --allow_partial")
    os.makedirs(workdir, exist_ok=True)
    copied = 0
    if copy:
        for row in rows:
            if row["source"] and os.path.abspath(row["source"]) != os.path.abspath(workdir):
                src = grid_lib.config_dir(row["source"], row["config_id"])
                dst = grid_lib.config_dir(workdir, row["config_id"])
                if os.path.exists(dst):
                    shutil.rmtree(dst)
                shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock", "checkpoints"))
                copied += 1
    if os.path.abspath(workdir) not in {os.path.abspath(p) for p in inputs}:
        grid_lib.write_json_unique(os.path.join(workdir, "grid.json"), first)
    written = grid_lib.write_tables(first, rows, workdir, plots=plots)
    return {"workdir": workdir, "configs": len(rows), "missing": len(missing), "copied": copied,
            "written": written}


FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "Where the merged tables go (default: the first input).")
    flags.DEFINE_list("inputs", None, "Grid workdirs of the shards (default: --workdir).")
    flags.DEFINE_bool("allow_partial", False, "Write the tables even if some configs have no result.")
    flags.DEFINE_bool("copy", True, "Copy config directories found in other inputs into --workdir.")


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; flags take the form --name=value")
    inputs = FLAGS.inputs or ([FLAGS.workdir] if FLAGS.workdir else None)
    if not inputs:
        fail("give --workdir (a grid workdir) or --inputs=DIR1,DIR2,...")
    try:
        result = merge(inputs, FLAGS.workdir, FLAGS.allow_partial, FLAGS.copy)
    except (grid_lib.GridError, ValueError) as err:
        fail(str(err))
    print(json.dumps(result, indent=2, sort_keys=True))


def run():
    define_flags()
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
