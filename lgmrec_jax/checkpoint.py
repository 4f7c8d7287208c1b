"""Orbax checkpoints of a run: the latest few plus the best by the valid metric.

A checkpoint at epoch e holds the train state (parameters and Adam state) as an array tree and a
JSON block with everything else needed to continue: the epoch, the early-stopping state, the run's
wall time so far, and the sampler/RNG state. The sampler and every key are pure functions of
``(seed, epoch)`` (see trainer.stream_key), so that pair is the whole RNG state.

Saves are synchronous and atomic (orbax writes a temporary directory and renames it), so a kill
during a save leaves the previous checkpoints intact. :meth:`Checkpoints.restore_latest` walks back
from the newest step until one restores.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp


def _best_score(metrics: dict) -> float:
    # Ties keep the earliest epoch, as early stopping does (strict improvement only).
    return metrics["valid"] - 1e-9 * metrics["epoch"]


class Checkpoints:
    def __init__(self, directory: str, keep: int):
        self.directory = os.path.abspath(directory)
        policy = pp.AnyPreservationPolicy([pp.LatestN(n=keep), pp.BestN(get_metric_fn=_best_score, n=1)])
        options = ocp.CheckpointManagerOptions(preservation_policy=policy, enable_async_checkpointing=False,
                                               cleanup_tmp_directories=True, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, epoch: int, state: Any, meta: dict, valid_value: Optional[float]) -> None:
        metrics = None if valid_value is None else {"valid": float(valid_value), "epoch": epoch}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self.manager.save(epoch, args=args, metrics=metrics, force=True)
        self.manager.wait_until_finished()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore(self, epoch: int, abstract_state: Any):
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        restored = self.manager.restore(epoch, args=args)
        return restored["state"], restored["meta"]

    def restore_latest(self, abstract_state: Any):
        """(state, meta, skipped) from the newest checkpoint that restores, or (None, None, skipped)."""
        skipped = []
        for epoch in reversed(self.steps()):
            try:
                state, meta = self.restore(epoch, abstract_state)
                return state, meta, skipped
            except Exception as err:  # any unreadable checkpoint: fall back to an older one
                logging.warning("checkpoint %d in %s cannot be restored: %s", epoch, self.directory,
                                str(err).splitlines()[0] if str(err) else type(err).__name__)
                skipped.append(epoch)
        return None, None, skipped

    def best_step(self) -> Optional[int]:
        return self.manager.best_step()

    def close(self) -> None:
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)
