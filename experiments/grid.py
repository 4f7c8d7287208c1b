"""Trains every config of a grid, same-shape configs together as one compiled program.

    python -m experiments.grid --grid=alpha --dataset=synthetic_baby
    python -m experiments.grid --grid=search --dataset=clothing --grid_shard=3/640   # array job 3 of 640

A grid is a file under ``experiments/grids/`` (or any ``.py`` path) with ``sweep(add)`` or
``sweep(add, ctx)``; each ``add(key=value, ...)`` is the dataset's config with those keys. Configs that
differ only in per-config keys train as one program (``--batching=map`` is bitwise the single runs),
the others one after another through the compilation cache; ``--mode=sequential`` runs plain single
runs. Each config gets a single run's workdir under ``configs/<id>/``; ``results.csv``, ``results.md``
and a plot per swept key sum up (selection by validation). A rerun resumes; shards (``--grid_shard``,
or one per process under ``jax.distributed``) are joined by experiments/grid_merge.py. The engine is
lgmrec_jax/grid; this is its command line.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags

from experiments import grids
from lgmrec_jax.grid import GridError, runner, sharding, spec

FLAGS = flags.FLAGS


def define_flags() -> None:
    from lgmrec_jax import distributed, train

    train.define_run_flags()  # --dataset, --data_dir, --workdir, --restart, --num_devices
    train.define_config_flag()
    flags.DEFINE_string("grid", None, "Grid name (experiments/grids/<name>.py) or path to a .py grid file.")
    flags.DEFINE_string("grid_shard", "0/1", "Run shard i of n (0-based), e.g. 3/50 for array job 3 of 50.")
    flags.DEFINE_list("seeds", None, "Seeds for every config that sets none, e.g. 0,1,2.")
    flags.DEFINE_enum("mode", "group", runner.MODES, "group: same-shape configs as one program; sequential: one "
                      "single run after another.")
    flags.DEFINE_enum("batching", "map", ("map", "vmap", "vmap_columns"), "How a group's configs share its "
                      "program: map (one after another inside it; the single runs' numbers exactly), vmap "
                      "(batched; equal to float32 reassociation), vmap_columns (vmap, and each sparse "
                      "propagation once over all configs' columns). See lgmrec_jax/group_engine.py.")
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


def emulation(as_backend: str):
    """The context manager in which the CPU computes products as ``as_backend`` does."""
    from experiments import precision_emulation  # imports JAX internals: only when asked for

    return precision_emulation.emulating_dot_algorithms(as_backend)


def options_from_flags(shard: tuple[int, int]) -> runner.GridOptions:
    from ml_collections import config_flags

    try:
        seeds = [int(s) for s in FLAGS.seeds] if FLAGS.seeds else None
    except ValueError:
        raise GridError(f"--seeds={','.join(FLAGS.seeds)}: expected comma-separated integers") from None
    overrides = config_flags.get_override_values(FLAGS["config"])
    if FLAGS.num_devices is not None:  # lgmrec_jax.train's flag: per-config devices (--mode=sequential)
        overrides["num_devices"] = FLAGS.num_devices
    return runner.GridOptions(
        grid=FLAGS.grid, dataset=FLAGS.dataset, data_dir=FLAGS.data_dir, grids_dir=grids.DIR, workdir=FLAGS.workdir,
        base_overrides=overrides, seeds=seeds, shard=shard, devices=FLAGS.devices, max_group=FLAGS.max_group,
        mode=FLAGS.mode, batching=FLAGS.batching, repack=FLAGS.repack, restart=FLAGS.restart,
        eval_chunk=FLAGS.eval_chunk or None, emulate_precision=FLAGS.emulate_precision,
        emulation=emulation if FLAGS.emulate_precision else None)


def main(argv):
    from lgmrec_jax import distributed
    from lgmrec_jax.cli import fail, setup_logging
    from lgmrec_jax.data import DatasetError
    from lgmrec_jax.grid.training import NonFiniteError
    from lgmrec_jax.workdir import RunError

    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; flags take the form --name=value")
    if not FLAGS.grid:
        fail(f"--grid is required; available grids: {', '.join(spec.available_grids(grids.DIR))}")
    setup_logging()
    try:
        index, count = sharding.parse_shard(FLAGS.grid_shard)
        pid, n_proc = distributed.initialize_from_flags()
        shard = (index * n_proc + pid, count * n_proc)
        runner.setup_compilation_cache(FLAGS.compilation_cache_dir)
        options = options_from_flags(shard)
        if FLAGS.dry_run:
            print(runner.describe(options))
            return
        result = runner.run_grid(options)
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
