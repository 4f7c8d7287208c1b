"""Shipped grids for ``python -m experiments.grid --grid=NAME``: one module per study, each with
``sweep(add)`` or ``sweep(add, ctx)`` (see lgmrec_jax/grid/spec.py). Every grid runs on any dataset,
the synthetic presets included; keys not set by a grid keep the dataset's config.

  seeds          8 seeds (0..7) of the dataset's config: one program, the seed-equality check
  ablation       LGMRec, w/o CGE, w/o MGE, w/o GHE, w/o HCL (the paper's ablation study)
  hyper_num      hyper_num 2, 4, ..., 256
  alpha          alpha 0.0, (0.01, 0.05 on sports/clothing,) 0.1, ..., 1.0
  n_hyper_layer  n_hyper_layer 1..4
  search         the reference's full search grid (SPEC §4.5): the Cartesian product of its lists
"""

import os

DIR = os.path.dirname(os.path.abspath(__file__))  # what experiments/grid.py passes as grids_dir
