"""The synthetic_tiny config, for tests and smoke runs: few epochs, small batches."""

from lgmrec_jax.configs import default


def get_config():
    c = default.get_config()
    c.epochs = 6
    c.stopping_step = 3
    c.train_batch_size = 128
    c.eval_batch_size = 16
    c.embedding_size = 16
    c.feat_embed_dim = 16
    c.keep_checkpoints = 2
    # Tests fake 4 CPU devices (tests/conftest.py); sharding a 45-item graph would only add cost.
    c.num_devices = 1
    return c
