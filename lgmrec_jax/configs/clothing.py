"""Clothing (SPEC §4.5): n_ui 2, n_mm 2, n_hyper 2, hyper_num 64, keep_rate 0.2, alpha 0.2."""

from lgmrec_jax.configs import default


def get_config():
    c = default.get_config()
    c.n_hyper_layer = 2
    c.hyper_num = 64
    c.keep_rate = 0.2
    c.alpha = 0.2
    return c
