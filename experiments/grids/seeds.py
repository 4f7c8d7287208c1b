"""Eight seeds of the dataset's config: one setting, one compiled program (all shapes shared).

Under the default ``--batching=map`` each seed's results are bitwise those of a single run with the
same config and seed (``python -m lgmrec_jax.train --config.seed=S --num_devices=1``); measured on
synthetic_tiny (tests/test_grid.py) and synthetic_baby
(``python -m experiments.bench_grid --seed_check --dataset=synthetic_baby``, results in
experiments/results/bench_grid_cpu.md).
"""

SEEDS = tuple(range(8))


def sweep(add):
    for seed in SEEDS:
        add(seed=seed)
