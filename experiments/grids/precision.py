"""JAX's three matmul precision levels, float32 features: what each does to the metrics.

    python -m experiments.grid --grid=precision --dataset=synthetic --seeds=0,1,2 --emulate_precision=tpu

On a CPU the three levels compute the same float32 products; ``--emulate_precision=tpu`` (or ``gpu``)
computes them as that accelerator does (experiments/precision_emulation.py): on a TPU ``default`` is
one bfloat16 pass, ``high`` three and ``highest`` six; on a GPU ``default`` and ``high`` are one TF32
pass. On the accelerator itself, run it without the flag. The bfloat16-feature half of the question
is experiments/grids/numerics.py.
"""

LEVELS = ("highest", "high", "default")


def sweep(add, ctx):
    del ctx  # the same settings on every dataset
    for precision in LEVELS:
        add(matmul_precision=precision)
