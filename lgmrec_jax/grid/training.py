"""What the grid calls of the training code, in one module.

Every use of lgmrec_jax.multi (the group engine), lgmrec_jax.run (single runs) and lgmrec_jax.parallel
(the backend checks) by this package goes through the names below, so a change of those modules'
names or signatures is met here alone. Importing this module imports JAX.
"""

from __future__ import annotations

from lgmrec_jax import multi, parallel, run as run_lib

# The group engine (lgmrec_jax/multi.py).
Member = multi.Member
GroupError = multi.GroupError
train_group = multi.train_group
program_key = multi.program_key
PER_CONFIG_KEYS = multi.PER_CONFIG_KEYS  # the keys that configs of one program may differ in
FINAL_STATUSES = multi.FINAL_STATUSES  # a summary.json with one of these is a finished config
BATCHINGS = multi.BATCHINGS

# Single runs (lgmrec_jax/run.py): --mode=sequential.
train_and_evaluate = run_lib.train_and_evaluate
NonFiniteError = run_lib.NonFiniteError

# What a config asks of this backend (lgmrec_jax/parallel.py).
check_matmul_precision = parallel.check_matmul_precision
