"""JAX's persistent compilation cache, on by default for the entry points.

A second run with the same shapes loads its compiled programs from disk instead of compiling them
(experiments.bench --compile_cache measures what that saves). The directory is ``$LGMREC_JAX_CACHE``, else ``~/.cache/lgmrec_jax/xla``; set the variable to an empty
string to turn the cache off.
"""

from __future__ import annotations

import os

import jax
from absl import logging

ENV = "LGMREC_JAX_CACHE"


def cache_dir() -> str | None:
    value = os.environ.get(ENV)
    if value is None:
        return os.path.join(os.path.expanduser("~"), ".cache", "lgmrec_jax", "xla")
    return value or None


def enable(path: str | None = None) -> str | None:
    """Turns the cache on at ``path`` (default :func:`cache_dir`); returns the directory used."""
    path = path if path is not None else cache_dir()
    if not path:
        return None
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:  # an unusable cache only costs compile time: say so, and go on
        logging.warning("%s: cannot hold JAX's compilation cache (%s); compiling without it", path,
                        err.strerror or err)
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return path
