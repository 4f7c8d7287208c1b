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
    return c
