"""Trains LGMRec with the reference's protocol.

    python -m lgmrec_jax.train                                  # built-in synthetic dataset
    python -m lgmrec_jax.train --dataset=clothing --data_dir=./data --config.alpha=0.3

The config starts from the dataset's module in lgmrec_jax/configs (baby, sports, clothing; the
default otherwise); ``--config.KEY=VALUE`` overrides any key and unknown keys are errors. Running the
same command on the same workdir resumes it; ``--restart`` starts over.

Exit status: 0 done, 2 bad input or a run that cannot start or continue (one line ``error: ...`` on
stderr: the dataset is read and checked first, before JAX is imported or the workdir is touched, so
bad data fails fast and leaves nothing behind), 3 a NaN/inf loss or parameter (summary.json says
where). A killed run resumes when the same command is run again (see run.py).
"""

from __future__ import annotations

import json
import logging as py_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from lgmrec_jax import configs
from lgmrec_jax.configs import default as default_config
from lgmrec_jax.data import DatasetError, load_dataset

FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", "synthetic", "Dataset name: a directory <data_dir>/<dataset>/ in MMRec format, "
                    "or synthetic / synthetic_{tiny,baby,sports,clothing} (generated on first use).")
flags.DEFINE_string("data_dir", "./data", "Directory holding the dataset directories.")
flags.DEFINE_string("workdir", None, "Run directory (default: runs/<dataset>).")
flags.DEFINE_bool("restart", False, "Discard what the workdir holds and start over.")


def define_config_flag() -> None:
    """Defines --config; ml_collections reads --config.* overrides from sys.argv right here."""
    if "config" not in FLAGS:
        config_flags.DEFINE_config_dict("config", default_config.get_config(),
                                        "Hyperparameters; override with --config.KEY=VALUE.", lock_config=True)


def resolved_config(dataset: str):
    """The dataset's config module, then the command line's --config.* overrides."""
    cfg = configs.for_dataset(dataset)
    cfg.update_from_flattened_dict(config_flags.get_override_values(FLAGS["config"]))
    return cfg


def validate_config(cfg) -> None:
    """Raises run.RunError (one line) for a config that cannot run."""
    from lgmrec_jax.evaluation import EVAL_NOISE_MODES
    from lgmrec_jax.graph import KERNELS
    from lgmrec_jax.run import RunError

    checks = [
        (cfg.eval_noise in EVAL_NOISE_MODES, f"eval_noise is {cfg.eval_noise!r}, expected one of {EVAL_NOISE_MODES}"),
        (cfg.kernel in KERNELS, f"kernel is {cfg.kernel!r}, expected one of {KERNELS}"),
        (cfg.cf_model in ("lightgcn", "mf"), f"cf_model is {cfg.cf_model!r}, expected 'lightgcn' or 'mf'"),
        (cfg.matmul_precision in ("highest", "high", "default", "float32", "tensorfloat32", "bfloat16"),
         f"matmul_precision is {cfg.matmul_precision!r}, expected highest, high or default"),
        (0.0 < cfg.keep_rate <= 1.0, f"keep_rate is {cfg.keep_rate}, expected 0 < keep_rate <= 1"),
        (cfg.n_hyper_layer >= 1, f"n_hyper_layer is {cfg.n_hyper_layer}, expected at least 1"),
        (cfg.train_batch_size > 0 and cfg.eval_batch_size > 0, "batch sizes must be positive"),
        (cfg.epochs >= 0 and cfg.eval_step >= 1 and cfg.checkpoint_every >= 1,
         "epochs must be >= 0, eval_step and checkpoint_every >= 1"),
        (cfg.feat_embed_dim == cfg.embedding_size,
         f"feat_embed_dim ({cfg.feat_embed_dim}) must equal embedding_size ({cfg.embedding_size})"),
        (cfg.valid_metric in {f"{m}@{k}" for m in ("recall", "ndcg", "precision", "map") for k in (5, 10, 20, 50)},
         f"valid_metric is {cfg.valid_metric!r}, expected e.g. recall@20"),
    ]
    for ok, message in checks:
        if not ok:
            raise RunError(f"config: {message}")


def fail(message: str, code: int = 2):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


class QuietLibraries(py_logging.Filter):
    """Keeps our INFO lines and drops the per-save INFO chatter of orbax and JAX's backend probing; orbax's
    errors keep their one-line message but not their traceback (a failed save is reported by the run,
    e.g. ``error: .../checkpoints: saving checkpoint 3 failed (No space left on device)``)."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        noisy = "orbax" in record.pathname or "xla_bridge" in record.pathname
        if noisy and record.exc_info:
            record.exc_info, record.exc_text = None, None
        return record.levelno >= py_logging.WARNING or not noisy


def setup_logging() -> None:
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(QuietLibraries())


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; flags take the form --name=value")
    setup_logging()
    workdir = FLAGS.workdir or os.path.join("runs", FLAGS.dataset)
    cfg = resolved_config(FLAGS.dataset)
    try:
        ds = load_dataset(FLAGS.data_dir, FLAGS.dataset)
    except DatasetError as err:
        fail(str(err))
    from lgmrec_jax.run import NonFiniteError, RunError, train_and_evaluate  # JAX: only for good data

    try:
        validate_config(cfg)
        summary = train_and_evaluate(cfg, ds, workdir, restart=FLAGS.restart)
    except (DatasetError, RunError) as err:
        fail(str(err))
    except NonFiniteError as err:
        fail(str(err), code=3)
    print(json.dumps(summary, indent=2, sort_keys=True))


def reject_unknown_config_keys(argv: list[str]) -> None:
    known = set(default_config.get_config().keys())
    for arg in argv[1:]:
        if arg.startswith("--config."):
            key = arg[len("--config."):].split("=", 1)[0]
            if key not in known:
                fail(f"{arg.split('=', 1)[0]}: unknown config key {key!r}; known keys: {', '.join(sorted(known))}")


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with one-line errors (exit 2) for bad values."""
    try:
        return FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as err:
        fail(f"bad flag: {err}")


def run():
    reject_unknown_config_keys(sys.argv)
    define_config_flag()
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
