"""A single run in a workdir: opens (or resumes) it and trains it through the loop, one config in one slot.

Its checkpoints live in the workdir (:class:`RunStore`: the latest ones and the best by the valid
metric); a resume starts from the newest that restores and rewrites metrics.jsonl from its history,
so a kill anywhere heals, and summary.json exists only for a finished (or non-finite) run. The
engine is one device, or the pmap engine over devices and processes (lgmrec_jax.engine).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from typing import Optional

import jax

from lgmrec_jax import checkpoint as ckpt_lib
from lgmrec_jax import configs, distributed, engine as engine_lib, loop, records, sampler as sampler_lib
from lgmrec_jax.data import Dataset
from lgmrec_jax.early_stopping import EarlyStopping
from lgmrec_jax.loop import NonFiniteError  # noqa: F401  (raised by train_and_evaluate)
from lgmrec_jax.workdir import RunError, Workdir, run_identity, versions

RUN_ID = "run"  # the config id of a single run in the loop


def train_and_evaluate(cfg, ds: Dataset, workdir: str, restart: bool = False,
                       stop_after_epochs: Optional[int] = None) -> dict:
    """Runs (or resumes) the run in ``workdir`` to completion; returns the summary dict.

    ``stop_after_epochs`` ends this invocation early after that many epochs (for tests of resume);
    the workdir then resumes from there. A failing write (full disk, unwritable directory) raises
    RunError; the newest checkpoint is then intact and the same call resumes from it.
    """
    configs.validate(cfg)
    engine_lib.check_backend(cfg)
    wd = Workdir(workdir)
    identity = run_identity(cfg, ds)
    try:  # under jax.distributed every process must run the same thing, or the collectives mix runs
        distributed.check_same_setup({"identity": identity,
                                      "devices": engine_lib.resolve_num_devices(cfg.num_devices)})
    except distributed.DistributedError as err:
        raise RunError(str(err)) from None
    created = not os.path.exists(wd.path)
    loop.on_primary(lambda: wd.prepare(identity, restart))
    try:
        return _train(cfg, ds, wd, identity, stop_after_epochs)
    except ckpt_lib.CheckpointError as err:
        raise RunError(f"{err}; the checkpoints already saved are untouched: fix this and rerun the same "
                       f"command to resume") from None
    except OSError as err:
        raise RunError(f"{err.filename or wd.path}: write failed ({err.strerror}); the newest checkpoint is "
                       f"intact: fix this and rerun the same command to resume") from None
    finally:
        wd.unlock()
        if created and distributed.is_primary():  # a run that failed before any write leaves no workdir
            wd.remove_if_unused()


def make_engine(cfg, ds: Dataset) -> engine_lib.SingleEngine:
    """The engine of a single run: one device, or the pmap engine over devices (and processes)."""
    engine_lib.check_backend(cfg)
    n = engine_lib.resolve_num_devices(cfg.num_devices)
    if n == 1 and not distributed.spans_processes():
        return engine_lib.SingleEngine(cfg, ds)
    from lgmrec_jax import pmap_engine  # the row-sharded multi-device step

    return pmap_engine.PmapEngine(cfg, ds, n)


class RunStore:
    """A single run's checkpoints in its workdir; the JSON block holds the run's progress as
    ``{"epoch", "wall_s", "stopper", "history"}``. Opened on process 0 alone."""

    def __init__(self, cfg, wd: Workdir):
        self.cfg, self.wd = cfg, wd
        self.checkpoints: Optional[ckpt_lib.Checkpoints] = None

    def open(self) -> None:
        self.checkpoints = ckpt_lib.Checkpoints(self.wd.file("checkpoints"), self.cfg.keep_checkpoints)

    def restore(self, state):
        """(restored state or None, ConfigProgress, epoch) of the newest checkpoint that restores; RunError
        when there are checkpoints (or metrics lines that prove one was saved) but none restores."""
        checkpoints = self.checkpoints
        restored, meta, skipped = checkpoints.restore_latest(ckpt_lib.abstract_like(state))
        if restored is not None:
            if skipped:
                logging.warning("resuming from checkpoint %d (after epoch %d): newer checkpoint(s) %s cannot be "
                                "restored and were moved to %s.unreadable", meta["epoch"], meta["epoch"] - 1,
                                skipped, checkpoints.directory)
            progress = loop.ConfigProgress(stopper=meta["stopper"], history=meta["history"], wall_s=meta["wall_s"])
            return restored, progress, meta["epoch"]
        if skipped:
            raise RunError(f"{checkpoints.directory}: no checkpoint can be restored (tried {skipped}, all unreadable "
                           f"or corrupted); use --restart to discard this run and start over")
        proof = [e for e in self.wd.metrics_epochs() if (e + 1) % self.cfg.checkpoint_every == 0]
        if proof:  # a checkpoint is saved before the metrics line of its epoch
            raise RunError(f"{checkpoints.directory}: holds no checkpoint, but metrics.jsonl shows one was saved "
                           f"after epoch {proof[-1]} (deleted?); use --restart to discard this run and start over")
        return None, loop.ConfigProgress(), 0

    def save(self, epoch: int, state, slots: list, progress: dict, valid_value) -> None:
        p = progress[slots[0]]
        meta = {"epoch": epoch, "wall_s": p["wall_s"], "stopper": p["stopper"], "history": p["history"]}
        self.checkpoints.save(epoch, state, meta, valid_value)

    def kept(self, epoch: int):
        """What a non-finite stop in epoch ``epoch`` says of the checkpoints, and the last good one."""
        steps = self.checkpoints.steps() if self.checkpoints is not None else ([epoch] if epoch else [])
        last = steps[-1] if steps else None
        clause = (f"the last good checkpoint (checkpoints/{last}, after {last} epochs) is kept" if last is not None
                  else "no checkpoint had been saved yet")
        return clause, last

    def close(self) -> None:
        if self.checkpoints is not None:
            self.checkpoints.close()


def check_free_space(wd: Workdir, state) -> None:
    """Refuses to start when the workdir's disk cannot hold one more checkpoint (plus 1 MiB)."""
    need = 2 * ckpt_lib.state_bytes(state) + (1 << 20)
    free = shutil.disk_usage(wd.path).free
    if free < need:
        raise RunError(f"{wd.path}: only {free / 2**20:.1f} MiB free on its disk, a checkpoint needs about "
                       f"{need / 2**20:.1f} MiB; free space or choose another --workdir")


def _open(cfg, ds: Dataset, wd: Workdir, identity: dict, store: RunStore, state):
    """Process 0's side of a (re)start: (restored state or None, ConfigProgress, epoch, the summary of a
    run already finished or None)."""
    check_free_space(wd, state)
    store.open()
    restored, progress, epoch = store.restore(state)
    if epoch > cfg.epochs:  # its files would describe a longer run than config.json then says
        raise RunError(f"{wd.path} holds a run of {epoch} epochs, more than epochs={cfg.epochs}: a run "
                       f"is not shortened; ask for {epoch} or more, or use --restart to start over")
    if restored is not None:
        logging.info("resumed %s at epoch %d", wd.path, epoch)
    summary_path, done = wd.file("summary.json"), None
    stopped = progress.stopper is not None and EarlyStopping.from_state_dict(progress.stopper).should_stop
    if stopped or epoch >= cfg.epochs:
        old = records.read_summary(summary_path)
        if old and old.get("status") in records.FINISHED and old.get("epochs_run") == epoch:
            done = old  # a finished run: the same command only reports it
    elif os.path.exists(summary_path):
        os.remove(summary_path)  # from an earlier invocation (a non-finite stop, fewer epochs): stale now
    return restored, progress, epoch, done


def _train(cfg, ds: Dataset, wd: Workdir, identity: dict, stop_after_epochs) -> dict:
    """Under jax.distributed every process runs this in step (the epochs are one program over all
    their devices); process 0 alone restores, evaluates and writes, and broadcasts what it found."""
    started = time.time()
    store = RunStore(cfg, wd)
    board = None
    with jax.default_matmul_precision(cfg.matmul_precision):
        sampler = sampler_lib.for_config(cfg, ds)  # data it refuses is reported before anything is written
        engine = make_engine(cfg, ds)
        state = engine.init_state()
        try:
            restored, progress, epoch, done = (loop.on_primary(lambda: _open(cfg, ds, wd, identity, store, state))
                                               or (None, loop.ConfigProgress(), 0, None))
            # What process 0 found, in one broadcast: a finished run's summary, or where to continue.
            shared = distributed.broadcast_json({"done": done, "epoch": epoch,
                                                 "progress": dataclasses.asdict(progress)},
                                                "process 0's progress of the run")
            if shared["done"] is not None:
                return shared["done"]
            epoch, progress = shared["epoch"], loop.ConfigProgress(**shared["progress"])
            if restored is not None:
                state = restored
            if distributed.spans_processes() and epoch > 0:  # restored (a fresh start is the same everywhere)
                state = distributed.broadcast_tree(state, "process 0's restored state")
            if cfg.tensorboard:
                from lgmrec_jax.tensorboard import TensorBoard

                board = loop.on_primary(lambda: TensorBoard(wd.file("tensorboard"), progress.history))
            run = loop.ConfigRun(loop.Member(RUN_ID, cfg, wd.path), ds, progress, started, board, sampler)
            loop.on_primary(lambda: run.write_config(identity, versions()))
            if distributed.is_primary() and run.active(epoch):
                logging.info("training %s (%d users, %d items, %d training rows; %d steps per epoch) from epoch "
                             "%d; its first epoch includes compiling the step (seconds, or from JAX's "
                             "compilation cache)", ds.name, ds.n_users, ds.n_items, len(ds.train),
                             -(-len(ds.train) // cfg.train_batch_size), epoch)
            options = loop.LoopOptions(stop_after_epochs=stop_after_epochs, raise_non_finite=True)
            return loop.train(engine, {RUN_ID: run}, [RUN_ID], engine.put(state), epoch, store, options)[RUN_ID]
        finally:
            store.close()
            if board is not None:
                board.close()
