"""Baby (SPEC §4.5): n_ui 2, n_mm 2, n_hyper 1, hyper_num 4, keep_rate 0.5, alpha 0.3."""

from lgmrec_jax.configs import default


def get_config():
    return default.get_config()
