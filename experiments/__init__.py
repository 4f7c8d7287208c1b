"""Experiment scripts built on lgmrec_jax: the reproduction of the reference's logged results."""
