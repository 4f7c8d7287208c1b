"""What the grid calls of the training code, in one module.

Every use of lgmrec_jax.group (a group through the loop), lgmrec_jax.run (single runs) and
lgmrec_jax.engine (the backend checks) by this package goes through the names below, so a change of those modules'
names or signatures is met here alone. Importing this module imports JAX.
"""

from __future__ import annotations

from lgmrec_jax import engine, group, group_engine, records, run as run_lib

# A group of configs (lgmrec_jax/group.py on the group engine, lgmrec_jax/group_engine.py).
Member = group.Member
GroupError = group.GroupError
GroupOptions = group.GroupOptions
train_group = group.train_group
program_key = group_engine.program_key
PER_CONFIG_KEYS = group_engine.PER_CONFIG_KEYS  # the keys that configs of one program may differ in
FINAL_STATUSES = records.FINAL_STATUSES  # a summary.json with one of these is a finished config
BATCHINGS = group_engine.BATCHINGS

# Single runs (lgmrec_jax/run.py): --mode=sequential.
train_and_evaluate = run_lib.train_and_evaluate
NonFiniteError = run_lib.NonFiniteError

# What a config asks of this backend (lgmrec_jax/engine.py).
check_matmul_precision = engine.check_matmul_precision
