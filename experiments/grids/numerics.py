"""The numerics study: matmul precision x feature storage type, each a named option
(lgmrec_jax/configs/default.py) whose effect on the metrics is measured before it becomes a default.

    python -m experiments.grid --grid=numerics --dataset=clothing --data_dir=./data --seeds=0,1,2

  highest / float32    the reference's arithmetic (the default)
  default / float32    JAX's default matmul precision: TF32 on NVIDIA GPUs, bf16 passes on TPUs
                       (the same as highest on CPU)
  highest / bfloat16   features stored and projected in bf16 (f32 accumulation)
  default / bfloat16   both
Each setting is its own program (the options change the compiled code); run it with several seeds
and compare the rows' valid/test Recall@20 (mean ± std over seeds) in results.md.
"""

SETTINGS = (("highest", "float32"), ("default", "float32"), ("highest", "bfloat16"), ("default", "bfloat16"))


def sweep(add, ctx):
    del ctx  # the same settings on every dataset
    for precision, feature_dtype in SETTINGS:
        add(matmul_precision=precision, feature_dtype=feature_dtype)
