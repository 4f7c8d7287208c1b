"""Sports with the logged run's values (SPEC §4.5): n_ui 2, n_hyper 4, keep_rate 0.4, alpha 0.6.

The repository's configs disagree (n_ui 4 or 2, n_hyper 1); the log is the only one with results.
"""

from lgmrec_jax.configs import default


def get_config():
    c = default.get_config()
    c.n_ui_layers = 2
    c.n_mm_layers = 2
    c.n_hyper_layer = 4
    c.hyper_num = 4
    c.keep_rate = 0.4
    c.alpha = 0.6
    return c
