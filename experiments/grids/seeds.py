"""Eight seeds of the dataset's config: one setting, one compiled program (all shapes shared).

Each seed's result equals that of a single run with the same config and seed
(``python -m lgmrec_jax.train --config.seed=S``) up to float32 reassociation; see
experiments/seed_check.py.
"""

SEEDS = tuple(range(8))


def sweep(add):
    for seed in SEEDS:
        add(seed=seed)
