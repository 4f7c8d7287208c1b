"""Generates a built-in synthetic dataset: ``python -m data_prep.synthetic --preset=baby --data_dir=./data``.

The generator is lgmrec_jax.synthetic (load_dataset also runs it on first use of a ``synthetic*`` name).
"""

from absl import app

from lgmrec_jax import synthetic
from lgmrec_jax.cli import parse_flags

if __name__ == "__main__":
    synthetic.define_flags()
    app.run(synthetic.main, flags_parser=parse_flags)
