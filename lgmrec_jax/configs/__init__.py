"""Configs in the Flax-examples style: one module per dataset with ``get_config()``.

``default.py`` holds every key with the reference's names (SPEC §1.6, §4.5); the dataset modules
change only what the reference's dataset configs change. :func:`for_dataset` picks the module by
dataset name (``synthetic_baby`` uses ``baby``), falling back to ``default``.
"""

import importlib
import math

import ml_collections

DATASET_CONFIGS = ("baby", "sports", "clothing", "tiny")
EVAL_NOISE_MODES = ("per_block", "per_eval", "off")
KERNELS = ("segment_sum", "bcoo", "ell")
# JAX's precision levels, then two of its dot algorithms that keep float32's accuracy on tensor cores
# (TF32_TF32_F32_X3: three TF32 passes, GPUs only; BF16_BF16_F32_X6: six bfloat16 passes, which is
# what "highest" means on a TPU). Which backend runs which is checked by engine.check_backend.
PRECISIONS = ("highest", "high", "default", "float32", "tensorfloat32", "bfloat16",
              "TF32_TF32_F32_X3", "BF16_BF16_F32_X6")
FEATURE_DTYPES = ("float32", "bfloat16")
EVAL_TOPK_METHODS = ("direct", "grouped", "approx")
MAX_LAYERS = 64  # propagation layers are unrolled into the step: the paper uses up to 4
METRIC_KEYS = tuple(f"{m}@{k}" for m in ("recall", "ndcg", "precision", "map") for k in (5, 10, 20, 50))


class ConfigError(ValueError):
    """A config that cannot run; the message is one line."""


def config_name(dataset: str) -> str:
    base = dataset.removeprefix("synthetic_")
    return base if base in DATASET_CONFIGS else "default"


def for_dataset(dataset: str) -> ml_collections.ConfigDict:
    module = importlib.import_module(f"lgmrec_jax.configs.{config_name(dataset)}")
    return module.get_config()


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the first key whose value cannot run (no JAX needed)."""
    for key, value in cfg.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config: {key} is {value}, expected a finite number")
    checks = [
        (cfg.eval_noise in EVAL_NOISE_MODES, f"eval_noise is {cfg.eval_noise!r}, expected one of {EVAL_NOISE_MODES}"),
        (cfg.kernel in KERNELS, f"kernel is {cfg.kernel!r}, expected one of {KERNELS}"),
        (cfg.eval_topk in EVAL_TOPK_METHODS, f"eval_topk is {cfg.eval_topk!r}, expected one of {EVAL_TOPK_METHODS}"),
        (cfg.eval_score_chunk >= -1,
         f"eval_score_chunk is {cfg.eval_score_chunk}, expected -1 (auto), 0 (whole block) or a user count"),
        (cfg.cf_model in ("lightgcn", "mf"), f"cf_model is {cfg.cf_model!r}, expected 'lightgcn' or 'mf'"),
        (cfg.matmul_precision in PRECISIONS,
         f"matmul_precision is {cfg.matmul_precision!r}, expected one of {PRECISIONS}"),
        (cfg.tau > 0.0, f"tau is {cfg.tau}, expected > 0"),
        (0 <= cfg.seed < 2**32, f"seed is {cfg.seed}, expected 0 <= seed < 2**32"),
        (cfg.learning_rate > 0.0, f"learning_rate is {cfg.learning_rate}, expected > 0"),
        (cfg.cl_weight >= 0.0 and cfg.reg_weight >= 0.0,
         f"cl_weight ({cfg.cl_weight}) and reg_weight ({cfg.reg_weight}) must be >= 0"),
        (cfg.alpha >= 0.0, f"alpha is {cfg.alpha}, expected >= 0 (the weight of the hypergraph embeddings)"),
        (cfg.feature_dtype in FEATURE_DTYPES,
         f"feature_dtype is {cfg.feature_dtype!r}, expected one of {FEATURE_DTYPES}"),
        (0.0 < cfg.keep_rate <= 1.0, f"keep_rate is {cfg.keep_rate}, expected 0 < keep_rate <= 1"),
        (cfg.n_hyper_layer >= 1, f"n_hyper_layer is {cfg.n_hyper_layer}, expected at least 1"),
        (0 <= min(cfg.n_ui_layers, cfg.n_mm_layers) and max(cfg.n_ui_layers, cfg.n_mm_layers) <= MAX_LAYERS,
         f"n_ui_layers ({cfg.n_ui_layers}) and n_mm_layers ({cfg.n_mm_layers}) must be 0 to {MAX_LAYERS} (each "
         f"layer is unrolled into the compiled step)"),
        (cfg.n_hyper_layer <= MAX_LAYERS, f"n_hyper_layer is {cfg.n_hyper_layer}, expected at most {MAX_LAYERS}"),
        (cfg.hyper_num >= 1 and cfg.embedding_size >= 1, "hyper_num and embedding_size must be >= 1"),
        (cfg.train_batch_size > 0 and cfg.eval_batch_size > 0, "batch sizes must be positive"),
        (cfg.epochs >= 0 and cfg.eval_step >= 1 and cfg.checkpoint_every >= 1,
         "epochs must be >= 0, eval_step and checkpoint_every >= 1"),
        (cfg.stopping_step >= 0 and cfg.keep_checkpoints >= 1, "stopping_step >= 0 and keep_checkpoints >= 1"),
        (cfg.num_devices >= 0, f"num_devices is {cfg.num_devices}, expected 0 (all local devices) or more"),
        (cfg.feat_embed_dim == cfg.embedding_size,
         f"feat_embed_dim ({cfg.feat_embed_dim}) must equal embedding_size ({cfg.embedding_size})"),
        (cfg.valid_metric in METRIC_KEYS, f"valid_metric is {cfg.valid_metric!r}, expected e.g. recall@20"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"config: {message}")
