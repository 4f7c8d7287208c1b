"""The reference's full search grid (SPEC §4.5): the Cartesian product of its hyper-parameter lists,
as the reference's quick_start runs them (one training per combination).

  n_ui_layers 1..4; n_mm_layers 0..4; n_hyper_layer 1..4; hyper_num 2, 4, ..., 256;
  keep_rate 0.1..1.0; alpha 0.0, (0.01, 0.05 on sports/clothing,) 0.1..1.0;
  cl_weight and reg_weight 0, 1e-6, 1e-5, ..., 0.1

That is 4*5*4*8 = 640 programs of 10*11*7*7 = 5,390 configs each (13 alpha values on sports and
clothing: 6,370) - about 3.4 million configs for baby, meant for a cluster: spread it with
``--grid_shard=i/n`` (each shard a contiguous block of programs) and join with
``python -m experiments.grid_merge``; ``--dry_run`` lists a shard's groups. The reference keeps
the best combination by test Recall@20; the grid tables select by validation.
"""

import itertools

from experiments.grids import alpha as alpha_grid

N_UI_LAYERS = (1, 2, 3, 4)
N_MM_LAYERS = (0, 1, 2, 3, 4)
N_HYPER_LAYER = (1, 2, 3, 4)
HYPER_NUM = tuple(2 ** k for k in range(1, 9))
KEEP_RATE = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
WEIGHTS = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)  # cl_weight and reg_weight


def sweep(add, ctx):
    # Shape keys outermost, so that each program's configs are adjacent.
    for n_ui, n_mm, n_hyper, hyper_num in itertools.product(N_UI_LAYERS, N_MM_LAYERS, N_HYPER_LAYER, HYPER_NUM):
        for keep_rate, alpha, cl_weight, reg_weight in itertools.product(
                KEEP_RATE, alpha_grid.values(ctx.config_name), WEIGHTS, WEIGHTS):
            add(n_ui_layers=n_ui, n_mm_layers=n_mm, n_hyper_layer=n_hyper, hyper_num=hyper_num,
                keep_rate=keep_rate, alpha=alpha, cl_weight=cl_weight, reg_weight=reg_weight)
