"""Seeds 1..24 of the dataset's config: one setting, one compiled program per ``--max_group`` block.

Sized for comparisons with the reference's logs (``python -m lgmrec_jax.crosscheck``), whose seed
runs are numbered from 1; under ``--batching=map`` each seed equals a single run with that seed.
With ``--max_group=12`` the first 12 seeds finish (as one program) before the next 12 start.
"""

SEEDS = tuple(range(1, 25))


def sweep(add):
    for seed in SEEDS:
        add(seed=seed)
