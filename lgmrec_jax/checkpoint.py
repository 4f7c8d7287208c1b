"""Orbax checkpoints of a run: the latest few plus the best by the valid metric.

A checkpoint holds the train state as an array tree and a JSON block with the rest of what continuing
needs (epoch, early-stopping state, wall time; the sampler and every key are functions of
``(seed, epoch)``). Saves are atomic and run on a thread while the next epoch trains
(:class:`BackgroundSaver`). The JSON block carries a SHA-256 of the arrays, checked on restore, so a
damaged checkpoint is unreadable, never silently different; :meth:`Checkpoints.restore_latest` walks
back to the newest one that restores and moves the unreadable ones aside.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import re
import sys
import time
from typing import Any, Callable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from lgmrec_jax.workdir import write_json_atomic

# Key of the JSON block that holds the arrays' fingerprint; added by save, removed by restore.
FINGERPRINT_KEY = "_state_sha256"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message is one line."""


# {step: valid value or null} of every save, beside the steps: orbax keeps the metrics given to a save
# in memory only, so without it a resumed run could not tell the earlier saves' best, and kept them all.
SCORES_FILE = "scores.json"


class LatestAndBest:
    """An orbax preservation policy: the latest ``keep`` steps, plus the step with the best valid value
    when ``keep_best`` (ties keep the earliest, as early stopping does), over this invocation's saves and
    the earlier invocations' alike (``scores``: step -> value, None for a save without one). A step absent
    from ``scores`` (saved before the file existed) is kept: its value is unknown."""

    def __init__(self, keep: int, keep_best: bool, scores: dict):
        self.keep, self.keep_best, self.scores = keep, keep_best, scores

    def should_preserve(self, checkpoints, *, context=None) -> list[bool]:
        del context
        steps = [c.step for c in checkpoints]
        keep = set(sorted(steps)[-self.keep:])
        if self.keep_best:
            keep |= {s for s in steps if s not in self.scores}
            best = self.best(steps)
            if best is not None:
                keep.add(best)
        return [s in keep for s in steps]

    def best(self, steps) -> Optional[int]:
        scored = [s for s in steps if self.scores.get(s) is not None]
        return max(scored, key=lambda s: (self.scores[s], -s)) if scored else None


def fingerprint(state: Any) -> str:
    """SHA-256 over every leaf's dtype, shape and bytes, in tree order."""
    digest = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(state):
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def state_bytes(state: Any) -> int:
    return int(sum(np.asarray(leaf).nbytes for leaf in jax.tree_util.tree_leaves(state)))


class Checkpoints:
    """The latest ``keep`` checkpoints, plus the best by the valid metric when ``keep_best``.

    They belong to this process alone. Orbax's default under jax.distributed treats a save as a
    collective of all processes (barriers, process 0 writing), which would block or drop the saves
    of a process that trains on its own (a grid's group, lgmrec_jax/group.py); a single run's
    checkpoints are written by process 0 alone (lgmrec_jax/run.py).
    """

    def __init__(self, directory: str, keep: int, keep_best: bool = True, read_only: bool = False):
        """``read_only``: for reading another process's checkpoints (lgmrec_jax.export): the directory
        must exist, and nothing in it is created, cleaned up or saved (a run may be writing there)."""
        quiet_failed_write_echoes()
        self.directory, self.read_only = os.path.abspath(directory), read_only
        self.scores = self._read_scores()
        self.policy = LatestAndBest(keep, keep_best, self.scores)
        me = jax.process_index()
        options = ocp.CheckpointManagerOptions(
            preservation_policy=self.policy, enable_async_checkpointing=False,
            cleanup_tmp_directories=not read_only, create=False,  # orbax refuses create with active_processes
            multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me}))
        try:
            if read_only and not os.path.isdir(self.directory):
                raise FileNotFoundError("no such directory")
            os.makedirs(self.directory, exist_ok=True)
            self.manager = ocp.CheckpointManager(self.directory, options=options)
        except Exception as err:
            raise CheckpointError(f"{self.directory}: cannot open the checkpoint directory ({_first_line(err)})") \
                from None

    def save(self, epoch: int, state: Any, meta: dict, valid_value: Optional[float]) -> None:
        """Saves step ``epoch``; a step of that number already there (one that could not be restored,
        left behind by a fallback to an older checkpoint) is moved aside first."""
        if self.read_only:
            raise CheckpointError(f"{self.directory}: opened read-only, checkpoint {epoch} not saved")
        if epoch in self.manager.all_steps():
            self.quarantine(epoch, "replaced by a new save of the same epoch")
        self.scores[epoch] = None if valid_value is None else float(valid_value)  # the policy reads it
        # Host copies: one transfer serves the fingerprint and the write, and orbax refuses to write a
        # process's own device arrays under jax.distributed ("host local jax.Array").
        state = jax.tree_util.tree_map(np.asarray, state)
        meta = {**meta, FINGERPRINT_KEY: fingerprint(state)}
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        try:
            self.manager.save(epoch, args=args, force=True)
            self.manager.wait_until_finished()
            self._write_scores()
        except Exception as err:  # a full disk, an unwritable directory, ...
            raise CheckpointError(f"{self.directory}: saving checkpoint {epoch} failed ({_os_reason(err)})") \
                from err

    def _read_scores(self) -> dict:
        try:
            with open(os.path.join(self.directory, SCORES_FILE)) as handle:
                return {int(step): value for step, value in json.load(handle).items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, AttributeError) as err:  # unreadable: every earlier step is kept
            logging.warning("%s: %s unreadable (%s); earlier checkpoints are kept", self.directory,
                            SCORES_FILE, err)
            return {}

    def _write_scores(self) -> None:

        present = set(self.manager.all_steps())
        write_json_atomic(os.path.join(self.directory, SCORES_FILE),
                          {str(s): v for s, v in sorted(self.scores.items()) if s in present})

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore(self, epoch: int, abstract_state: Any):
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        restored = self.manager.restore(epoch, args=args)
        state, meta = restored["state"], dict(restored["meta"])
        expected = meta.pop(FINGERPRINT_KEY, None)  # absent in checkpoints written before it existed
        if expected is not None and fingerprint(state) != expected:
            raise CheckpointError(f"checkpoint {epoch}: the restored arrays do not match the SHA-256 recorded "
                                  f"at save time (a corrupted file)")
        return state, meta

    def read_meta(self, epoch: int) -> dict:
        """Step ``epoch``'s JSON block alone (its arrays are not read), fingerprint key included."""
        return dict(self.manager.restore(epoch, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

    def restore_latest(self, abstract_state: Any):
        """(state, meta, skipped) from the newest checkpoint that restores, or (None, None, skipped).

        When an older checkpoint restores, the newer unreadable ones (``skipped``) are moved aside; when
        none restores, nothing is moved.
        """
        skipped = []
        for epoch in reversed(self.steps()):
            try:
                state, meta = self.restore(epoch, abstract_state)
            except Exception as err:  # any unreadable checkpoint: fall back to an older one
                logging.warning("checkpoint %d in %s cannot be restored: %s", epoch, self.directory,
                                _first_line(err))
                skipped.append(epoch)
                continue
            for bad in skipped:
                self.quarantine(bad, "cannot be restored")
            return state, meta, skipped
        return None, None, skipped

    def quarantine(self, epoch: int, why: str) -> str:
        """Moves step ``epoch`` out of the directory (kept for inspection); returns where it went."""
        source = os.path.join(self.directory, str(epoch))
        target_dir = f"{self.directory}.unreadable"
        os.makedirs(target_dir, exist_ok=True)
        target = os.path.join(target_dir, f"{epoch}-{time.time_ns()}")
        os.rename(source, target)
        self.manager.reload()
        logging.warning("checkpoint %d %s: moved to %s", epoch, why, target)
        return target

    def best_step(self) -> Optional[int]:
        return self.policy.best(self.manager.all_steps())

    def close(self) -> None:
        self.manager.close()


def quiet_failed_write_echoes() -> None:
    """Drops the echoes of a failed checkpoint write; the run reports the failure once, in one line.

    When one file of a save cannot be written (a full disk, a file size limit), orbax's other writes
    of that checkpoint fail too and say so from their own threads, at random moments around the
    run's error line: TensorStore callbacks into orbax's already closed event loop raise "Event
    loop is closed" (reported through sys.unraisablehook), and asyncio logs "Task exception was
    never retrieved" with each write's traceback, some before the save itself has raised. Installed
    once per process by the first Checkpoints; only those two kinds of report are dropped.
    """
    global _ECHOES_QUIET
    if _ECHOES_QUIET:
        return
    _ECHOES_QUIET = True
    previous = sys.unraisablehook

    def unraisable(info):
        if isinstance(info.exc_value, RuntimeError) and "Event loop is closed" in str(info.exc_value):
            return
        previous(info)

    sys.unraisablehook = unraisable
    logging.getLogger("asyncio").addFilter(_not_a_write_failure)


_ECHOES_QUIET = False


def _not_a_write_failure(record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    return not (error is not None and "Error writing" in str(error))


class BackgroundSaver:
    """One checkpoint save at a time on a host thread, so that it overlaps the next epoch's training.

    What must follow a save (its epoch's metrics lines, a finished config's summary) is held until
    the save has committed and then run in the caller's thread by :meth:`finish`, which the loop
    calls before it does anything else after the next epoch: the files appear in the order a
    synchronous save gives them, so a kill at any moment leaves one of the states it could leave,
    and a failed save raises there, one epoch later. On a GPU a save (fingerprint and write: 91 ms
    for one config at clothing's size on the project's CPU) would otherwise sit between epochs of
    about 0.1 s.
    """

    def __init__(self):
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending = None  # (future of the save, what follows it)

    def submit(self, save: Callable[[], None], then: Callable[[], None]) -> None:
        """Runs ``save()`` on the thread (it must write host copies: see host_copy) after the previous
        one has finished, and ``then()`` once it has committed."""
        self.finish()
        self._pending = (self._pool.submit(save), then)

    def after_saves(self, fn: Callable[[], None]) -> None:
        """``fn()`` once every save submitted so far, and what follows them, is done."""
        self.finish()
        fn()

    def finish(self) -> None:
        """Waits for the save in flight, raising its error, then runs what follows it."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending[0].result()
            pending[1]()

    def close(self) -> None:
        """Lets a save in flight commit or fail; what would follow it is dropped (as after a kill:
        the next run rewrites the metrics from the checkpoint)."""
        self._pool.shutdown(wait=True)


def host_copy(tree: Any) -> Any:
    """Host copies of every leaf, for a save that runs while the device buffers are donated to the
    next epoch (a NumPy view of a donated CPU buffer would change under the writer)."""
    return jax.tree_util.tree_map(lambda x: np.array(x, copy=True), tree)


def _os_reason(err: BaseException) -> str:
    """The OS error behind a failed write (orbax/TensorStore wrap it in long messages), else the first line."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    code = re.search(r"os_error_code='?(\d+)", str(err))
    return os.strerror(int(code.group(1))) if code else _first_line(err)[:300]


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def abstract_like(tree: Any) -> Any:
    return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)
