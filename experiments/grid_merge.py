"""Joins the shards of a grid into one set of tables (results.csv, results.md, PNGs).

    python -m experiments.grid_merge --workdir=runs/grid/search/clothing         # shards shared one workdir
    python -m experiments.grid_merge --workdir=merged --inputs=host0/wd,host1/wd  # workdirs copied back

Each input is a grid workdir written by ``python -m experiments.grid --grid_shard=i/n``; their
``grid.json`` must describe the same grid (name, dataset, base overrides, seeds). The grid is
expanded again from that record, and every config's result is read from the first input whose
``configs/<id>/summary.json`` is final. Config directories found outside ``--workdir`` are copied
into it (``--nocopy`` to skip), so the merged workdir holds every per-config run. A config that no
input finished is an error unless ``--allow_partial`` (then its row says ``missing``). The merge is
lgmrec_jax/grid/merge.py; this is its command line.
"""

from __future__ import annotations

import json

from absl import app, flags

from experiments import grids
from lgmrec_jax.cli import fail, parse_flags
from lgmrec_jax.grid import GridError, merge

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
        result = merge.merge(inputs, FLAGS.workdir, FLAGS.allow_partial, FLAGS.copy, grids_dir=grids.DIR)
    except (GridError, ValueError) as err:
        fail(str(err))
    print(json.dumps(result, indent=2, sort_keys=True))


def run():
    define_flags()
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
