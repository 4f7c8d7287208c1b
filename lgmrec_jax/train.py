"""Trains LGMRec with the reference's protocol.

    python -m lgmrec_jax.train                                  # built-in synthetic dataset
    python -m lgmrec_jax.train --dataset=clothing --data_dir=./data --config.alpha=0.3

The config is the dataset's module in lgmrec_jax/configs with ``--config.KEY=VALUE`` overrides. The
same command on the same workdir resumes it; ``--restart`` starts over. Exit status: 0 done; 2 bad
input or a run that cannot start or continue (one ``error: ...`` line; the data is checked before the
workdir is touched); 3 a NaN/inf loss or parameter; 4 a process of several waited longer than
``--distributed_timeout`` for the others. Several hosts: lgmrec_jax/distributed.py.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from lgmrec_jax import configs, distributed
from lgmrec_jax.cli import fail, parse_flags, setup_logging
from lgmrec_jax.configs import default as default_config
from lgmrec_jax.data import DatasetError, load_dataset

FLAGS = flags.FLAGS


def define_run_flags() -> None:
    """--dataset, --data_dir, --workdir, --restart, --num_devices (shared with experiments/grid.py).
    Defined when a program starts, never on import, so importing this module defines no flags."""
    flags.DEFINE_string("dataset", "synthetic", "Dataset name: a directory <data_dir>/<dataset>/ in MMRec "
                        "format, or synthetic / synthetic_{tiny,baby,sports,clothing} (generated on first use).")
    flags.DEFINE_string("data_dir", "./data", "Directory holding the dataset directories.")
    flags.DEFINE_string("workdir", None, "Run directory (default: runs/<dataset>).")
    flags.DEFINE_bool("restart", False, "Discard what the workdir holds and start over.")
    flags.DEFINE_integer("num_devices", None, "Devices of each process for the data-parallel training step (0: "
                         "all local devices; default: config.num_devices, which is 0).")


def define_config_flag() -> None:
    """Defines --config; ml_collections reads --config.* overrides from sys.argv right here."""
    if "config" not in FLAGS:
        config_flags.DEFINE_config_dict("config", default_config.get_config(),
                                        "Hyperparameters; override with --config.KEY=VALUE.", lock_config=True)


def resolved_config(dataset: str):
    """The dataset's config module, then the command line's --config.* overrides and --num_devices."""
    cfg = configs.for_dataset(dataset)
    cfg.update_from_flattened_dict(config_flags.get_override_values(FLAGS["config"]))
    if FLAGS.num_devices is not None:
        cfg.num_devices = FLAGS.num_devices
    return cfg


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; flags take the form --name=value")
    setup_logging()
    if FLAGS.workdir == "":
        fail("--workdir is empty; give a directory, or leave the flag out for runs/<dataset>")
    workdir = FLAGS.workdir or os.path.join("runs", FLAGS.dataset)
    cfg = resolved_config(FLAGS.dataset)
    try:
        configs.validate(cfg)
        ds = load_dataset(FLAGS.data_dir, FLAGS.dataset)  # synthetic data is generated: it can take a while
    except (configs.ConfigError, DatasetError) as err:
        fail(str(err))
    except KeyboardInterrupt:
        fail("interrupted before training started (no workdir was written); rerun the same command", code=130)
    from lgmrec_jax import compile_cache  # JAX is imported only once the input is known to be good
    from lgmrec_jax.run import NonFiniteError, RunError, train_and_evaluate

    try:
        distributed.initialize_from_flags()
        compile_cache.enable()
        summary = train_and_evaluate(cfg, ds, workdir, restart=FLAGS.restart)
    except (configs.ConfigError, DatasetError, RunError, distributed.DistributedError) as err:
        fail(str(err))
    except NonFiniteError as err:
        fail(str(err), code=3)
    except KeyboardInterrupt:
        fail("interrupted; the newest checkpoint is intact: rerun the same command to resume", code=130)
    if distributed.is_primary():
        print(json.dumps(summary, indent=2, sort_keys=True))


def reject_unknown_config_keys(argv: list[str]) -> None:
    known = set(default_config.get_config().keys())
    for arg in argv[1:]:
        if arg.startswith("--config."):
            key = arg[len("--config."):].split("=", 1)[0]
            if key not in known:
                fail(f"{arg.split('=', 1)[0]}: unknown config key {key!r}; known keys: {', '.join(sorted(known))}")


def run():
    reject_unknown_config_keys(sys.argv)
    define_run_flags()
    distributed.define_flags()
    define_config_flag()
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
