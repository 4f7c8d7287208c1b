"""Fault injection for the reliability tests: ``LGMREC_FAULT=ACTION:POINT:EPOCH[,...]`` (EPOCH 0-based,
``*`` any). Unset, as in every real run, each hook is a no-op.
  kill:train|eval|save|saved|metrics|summary:E   SIGKILL halfway through training, after the valid
                  split's metrics, inside the save (files written, not committed), right after the
                  save, halfway through the metrics line, or with summary.json's temporary file written
  nan:loss:E[:S]  step S (default 0) reports a NaN loss; nan:params:E  a parameter is NaN after E
  enospc:save|metrics|summary:E   OSError(ENOSPC) at that write
"""

from __future__ import annotations

import errno
import logging
import os
import signal
from typing import Optional

import numpy as np

FAULT_ENV = "LGMREC_FAULT"


def fault(action: str, point: str, epoch: int) -> Optional[list]:
    """The extra fields of the first matching fault in $LGMREC_FAULT ([] when none), or None."""
    for spec in os.environ.get(FAULT_ENV, "").split(","):
        parts = spec.strip().split(":")
        if len(parts) >= 3 and parts[:2] == [action, point] and parts[2] in ("*", str(epoch)):
            return parts[3:]
    return None


def kill_at(point: str, epoch: int) -> None:
    if fault("kill", point, epoch) is not None:
        logging.warning("fault injection: SIGKILL at %s of epoch %d", point, epoch)
        os.kill(os.getpid(), signal.SIGKILL)


def enospc_at(point: str, epoch: int, path: str) -> None:
    if fault("enospc", point, epoch) is not None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + " (fault injection)", path)


class FaultInSave:
    """kill:save:E / enospc:save:E: replaces orbax's commit rename for the duration of one save."""

    def __init__(self, epoch: int):
        self.kill = fault("kill", "save", epoch) is not None
        self.enospc = fault("enospc", "save", epoch) is not None
        self.epoch = epoch

    def __enter__(self):
        if self.kill or self.enospc:
            from orbax.checkpoint._src.path import async_path  # the rename that commits a step

            self.module, self.original = async_path, async_path.rename

            async def rename(src, dst):
                if self.kill:
                    logging.warning("fault injection: SIGKILL inside the save of epoch %d", self.epoch)
                    os.kill(os.getpid(), signal.SIGKILL)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + " (fault injection)", str(dst))

            async_path.rename = rename
        return self

    def __exit__(self, *exc):
        if self.kill or self.enospc:
            self.module.rename = self.original


def inject_nan(parts: np.ndarray, finite: np.ndarray, epoch: int):
    """nan:loss:E[:S] / nan:params:E on an epoch's (K, n_batches, 4) loss parts and (K,) finite flags."""
    extra = fault("nan", "loss", epoch)
    if extra is not None:
        parts = parts.copy()
        parts[:, int(extra[0]) if extra else 0, 0] = np.nan
    if fault("nan", "params", epoch) is not None:
        finite = np.zeros_like(finite)
    return parts, finite
