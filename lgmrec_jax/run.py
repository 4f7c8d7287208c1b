"""One training run in a workdir: train, evaluate, stop early, checkpoint, resume, write results.

An epoch: the sampler's batches go to the device once; the runner's compiled ``lax.scan`` of train
steps returns the new state; valid and test are evaluated; metrics and early stopping on the host;
the checkpoint is written on a thread while the next epoch trains, then the epoch's row of
metrics.jsonl. A resume starts from the newest checkpoint that restores and rewrites metrics.jsonl
from its history, so a kill anywhere heals; summary.json exists only for a finished (or non-finite)
run. The workdir itself (lock, identity, atomic writes) is lgmrec_jax.workdir.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from typing import Optional

import jax
import numpy as np

from lgmrec_jax import checkpoint as ckpt_lib
from lgmrec_jax import configs, distributed, evaluation, faults, parallel, sampler as sampler_lib, trainer
from lgmrec_jax.data import Dataset, DatasetError
from lgmrec_jax.early_stopping import EarlyStopping
from lgmrec_jax.graph import build_graph
from lgmrec_jax.workdir import RunError, Workdir, run_identity, versions, write_json_atomic

FINISHED = ("early_stopped", "max_epochs")  # summary.json statuses of a run that ended normally


class NonFiniteError(RuntimeError):
    pass


@dataclasses.dataclass
class Progress:
    """Resumable loop state, stored in each checkpoint's JSON block."""

    epoch: int = 0  # next epoch to run
    wall_s: float = 0.0
    stopper: Optional[dict] = None
    history: list = dataclasses.field(default_factory=list)


class Experiment:
    """Compiled functions and host plans for one (config, dataset)."""

    def __init__(self, cfg, ds: Dataset):
        self.cfg, self.ds = cfg, ds
        self.model = trainer.make_model(cfg, ds)
        self.optimizer = trainer.make_optimizer(cfg.learning_rate)
        self.graph = build_graph(ds.train, ds.n_users, ds.n_items, cfg.kernel)
        self.feats = trainer.device_features(ds, cfg.feature_dtype)
        try:
            self.sampler = sampler_lib.NegativeSampler(ds.train, ds.n_items, cfg.train_batch_size, cfg.seed)
        except DatasetError as err:  # the data cannot be trained on: say which data
            raise DatasetError(f"{ds.path or ds.name}: {err}") from None
        self.batches = sampler_lib.Prefetcher(self.sampler)  # epoch e + 1 is sampled while e trains
        self.runner = parallel.make_runner(self.model, self.optimizer, cfg)
        pairs = {"valid": ds.valid, "test": ds.test}
        self.plans = {name: evaluation.plan_split(ds.train, pairs[name], ds.n_users, ds.n_items, cfg.eval_batch_size)
                      for name in evaluation.evaluated_splits(pairs)}
        self.eval_arrays = {name: p.device_arrays() for name, p in self.plans.items()}
        self.evaluate_split = jax.jit(evaluation.make_split_evaluator(
            self.model, cfg.eval_noise, cfg.eval_topk, evaluation.resolve_score_chunk(cfg.eval_score_chunk)))
        self.noise_free = jax.jit(evaluation.make_noise_free(self.model))
        # On CPUs the splits are evaluated from threads of their own (evaluation.map_splits): the same
        # programs and numbers, with their top-ks on several cores at once.
        self.concurrent_splits = jax.default_backend() == "cpu"

    def init_state(self):
        return trainer.init_state(self.model, self.optimizer, self.graph, self.feats, self.cfg.seed)

    def train_epoch(self, state, epoch: int, on_chunk=None):
        """Runs epoch ``epoch`` on a state in the runner's layout (``runner.put``); returns
        (state, per-batch loss parts as a (n_batches, 4) array)."""
        batches = self.batches.epoch(epoch)
        key = trainer.stream_key(self.cfg.seed, trainer.TRAIN_STREAM, epoch)
        n = batches.users.shape[0]
        chunk = n if on_chunk is None else max(1, -(-n // 20))
        parts = []
        for start in range(0, n, chunk):
            piece = trainer.to_batch(tuple(a[start:start + chunk] for a in batches))
            state, losses = self.runner.run_epoch(state, self.graph, self.feats, piece, key, start)
            parts.append(np.stack([np.asarray(x) for x in losses], axis=1))
            if on_chunk is not None:
                on_chunk(min(start + chunk, n), n)
        return state, np.concatenate(parts)

    def evaluate(self, params, epoch: int) -> dict:
        key = trainer.stream_key(self.cfg.seed, trainer.EVAL_STREAM, epoch)
        base = self.noise_free(params, self.graph, self.feats)  # shared by the splits
        names = list(self.plans)

        def split_hits(i: int):  # dispatched; map_splits decides where it is waited for
            return self.evaluate_split(params, self.graph, self.feats, *self.eval_arrays[names[i]],
                                       jax.random.fold_in(key, i), base=base).hits

        results = {}
        for name, hits in zip(names, evaluation.map_splits(split_hits, len(names), self.concurrent_splits)):
            results[name] = evaluation.metrics_from_hits(self.plans[name], hits)
            faults.kill_at("eval", epoch)  # fault injection (no-op unless LGMREC_FAULT asks)
        return results


def progress_bar(epoch: int):
    def show(done: int, total: int):
        width = 30
        filled = width * done // total
        sys.stderr.write(f"\repoch {epoch:4d} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} batches")
        if done == total:
            sys.stderr.write("\r" + " " * (width + 40) + "\r")
        sys.stderr.flush()
    return show


def fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def train_and_evaluate(cfg, ds: Dataset, workdir: str, restart: bool = False,
                       stop_after_epochs: Optional[int] = None) -> dict:
    """Runs (or resumes) the run in ``workdir`` to completion; returns the summary dict.

    ``stop_after_epochs`` ends this invocation early after that many epochs (for tests of resume);
    the workdir then resumes from there. A failing write (full disk, unwritable directory) raises
    RunError; the newest checkpoint is then intact and the same call resumes from it.
    """
    configs.validate(cfg)
    parallel.check_backend(cfg)
    wd = Workdir(workdir)
    identity = run_identity(cfg, ds)
    try:  # under jax.distributed every process must run the same thing, or the collectives mix runs
        distributed.check_same_setup({"identity": identity,
                                      "devices": parallel.resolve_num_devices(cfg.num_devices)})
    except distributed.DistributedError as err:
        raise RunError(str(err)) from None
    created = not os.path.exists(wd.path)
    _on_primary(lambda: wd.prepare(identity, restart))
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


def _check_free_space(wd: Workdir, state) -> None:
    """Refuses to start when the workdir's disk cannot hold one more checkpoint (plus 1 MiB)."""
    need = 2 * ckpt_lib.state_bytes(state) + (1 << 20)
    free = shutil.disk_usage(wd.path).free
    if free < need:
        raise RunError(f"{wd.path}: only {free / 2**20:.1f} MiB free on its disk, a checkpoint needs about "
                       f"{need / 2**20:.1f} MiB; free space or choose another --workdir")


def _restore(cfg, wd: Workdir, checkpoints: ckpt_lib.Checkpoints, state):
    """(restored state or None, Progress) of the newest checkpoint that restores; RunError when there are
    checkpoints (or metrics lines that prove one was saved) but none restores."""
    restored, meta, skipped = checkpoints.restore_latest(ckpt_lib.abstract_like(state))
    if restored is not None:
        if skipped:
            logging.warning("resuming from checkpoint %d (after epoch %d): newer checkpoint(s) %s cannot be "
                            "restored and were moved to %s.unreadable", meta["epoch"], meta["epoch"] - 1,
                            skipped, checkpoints.directory)
        return restored, Progress(**meta)
    if skipped:
        raise RunError(f"{checkpoints.directory}: no checkpoint can be restored (tried {skipped}, all unreadable "
                       f"or corrupted); use --restart to discard this run and start over")
    proof = [e for e in wd.metrics_epochs() if (e + 1) % cfg.checkpoint_every == 0]
    if proof:  # a checkpoint is saved before the metrics line of its epoch
        raise RunError(f"{checkpoints.directory}: holds no checkpoint, but metrics.jsonl shows one was saved "
                       f"after epoch {proof[-1]} (deleted?); use --restart to discard this run and start over")
    return None, Progress()


def _read_summary(path: str) -> Optional[dict]:
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _on_primary(fn, what: str = "process 0's work on the workdir"):
    """fn() on process 0 alone, the workdir's owner under jax.distributed (elsewhere None); a failure
    there is raised on every process, so no process waits for a collective that never comes."""
    result, failure = None, None
    if distributed.is_primary():
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001  re-raised below, after the others have heard of it
            failure = err
    text = None
    if failure is not None:  # the run's own errors are one line already; name anything else's type
        known = isinstance(failure, (RunError, ckpt_lib.CheckpointError, OSError))
        text = str(failure) if known else f"{type(failure).__name__}: {failure}"
    message = distributed.broadcast_json(text, what)
    if failure is not None:
        raise failure
    if message is not None:
        raise RunError(f"process 0: {message}")
    return result


def _open_workdir(cfg, ds, wd: Workdir, identity: dict, state):
    """Process 0's side of a (re)start: (checkpoints, restored state or None, Progress, board, the
    summary of a run already finished or None)."""
    _check_free_space(wd, state)
    checkpoints = ckpt_lib.Checkpoints(wd.file("checkpoints"), cfg.keep_checkpoints)
    restored, progress = _restore(cfg, wd, checkpoints, state)
    if progress.epoch > cfg.epochs:  # its files would describe a longer run than config.json then says
        checkpoints.close()
        raise RunError(f"{wd.path} holds a run of {progress.epoch} epochs, more than epochs={cfg.epochs}: a run "
                       f"is not shortened; ask for {progress.epoch} or more, or use --restart to start over")
    if restored is not None:
        logging.info("resumed %s at epoch %d", wd.path, progress.epoch)
    write_json_atomic(wd.file("config.json"), {"identity": identity, "versions": versions(),
                                               "n_users": ds.n_users, "n_items": ds.n_items})
    wd.rewrite_metrics(progress.history)
    board = TensorBoard(wd.file("tensorboard"), progress.history) if cfg.tensorboard else None
    summary_path, done = wd.file("summary.json"), None
    stopped = progress.stopper is not None and EarlyStopping.from_state_dict(progress.stopper).should_stop
    if stopped or progress.epoch >= cfg.epochs:
        old = _read_summary(summary_path)
        if old and old.get("status") in FINISHED and old.get("epochs_run") == progress.epoch:
            done = old  # a finished run: the same command only reports it
    elif os.path.exists(summary_path):
        os.remove(summary_path)  # from an earlier invocation (a non-finite stop, fewer epochs): stale now
    return checkpoints, restored, progress, board, done


def _save(checkpoints: ckpt_lib.Checkpoints, epoch: int, state, meta: dict, valid_value) -> None:
    with faults.FaultInSave(epoch):  # no-op unless LGMREC_FAULT asks
        checkpoints.save(epoch + 1, state, meta, None if valid_value is None else round(valid_value, 4))
    faults.kill_at("saved", epoch)


class Saver:
    """The run's checkpoints through a ckpt_lib.BackgroundSaver: epoch e's checkpoint is written on a
    host thread while epoch e + 1 trains, and epoch e's metrics.jsonl line follows its commit. Process 0
    alone saves; every method is collective (a failed save is raised on every process)."""

    def __init__(self, wd: Workdir, checkpoints, board):
        self.wd, self.checkpoints, self.board = wd, checkpoints, board
        self.background = ckpt_lib.BackgroundSaver() if distributed.is_primary() else None

    def submit(self, epoch: int, state, meta: dict, valid_value, row: dict) -> None:
        """Starts epoch ``epoch``'s save and holds its row until the save has committed."""
        def start():
            copy = ckpt_lib.host_copy(state)  # the device state is donated to the next epoch
            self.background.submit(lambda: _save(self.checkpoints, epoch, copy, meta, valid_value),
                                   lambda: _record(self.wd, self.board, row))
        _on_primary(start)

    def record(self, row: dict) -> None:
        """The row of an epoch without a checkpoint, after every earlier row."""
        _on_primary(lambda: self.background.after_saves(lambda: _record(self.wd, self.board, row)))

    def finish(self) -> None:
        _on_primary(lambda: self.background.finish())

    def close(self) -> None:
        if self.background is not None:
            self.background.close()


def _record(wd: Workdir, board, row: dict) -> None:
    wd.append_metrics(row)
    if board is not None:
        board.write(row)


def _train(cfg, ds, wd: Workdir, identity: dict, stop_after_epochs) -> dict:
    """The run loop. Under jax.distributed every process runs it in step (the epochs are one
    program over all their devices); process 0 alone evaluates and writes, and broadcasts the
    restored state and each evaluation's metrics, so every process takes the same decisions."""
    started = time.time()
    with jax.default_matmul_precision(cfg.matmul_precision):
        exp = Experiment(cfg, ds)
        state = exp.init_state()
        checkpoints, restored, progress, board, done = (
            _on_primary(lambda: _open_workdir(cfg, ds, wd, identity, state)) or (None, None, Progress(), None, None))
        saver = Saver(wd, checkpoints, board)
        try:
            return _run_epochs(cfg, ds, wd, exp, state, restored, progress, done, saver, started,
                               stop_after_epochs)
        finally:
            saver.close()
            if checkpoints is not None:
                checkpoints.close()
            exp.batches.close()
            if board is not None:
                board.close()


def _run_epochs(cfg, ds, wd: Workdir, exp: Experiment, state, restored, progress: Progress, done,
                saver: Saver, started: float, stop_after_epochs) -> dict:
    """The epochs of _train, from its opened workdir (process 0's; None elsewhere) to the summary."""
    primary = distributed.is_primary()
    # What process 0 found, in one broadcast: a finished run's summary, or where to continue.
    shared = distributed.broadcast_json({"done": done, "progress": dataclasses.asdict(progress)},
                                        "process 0's progress of the run")
    if shared["done"] is not None:
        return shared["done"]
    if restored is not None:
        state = restored
    if distributed.spans_processes():
        progress = Progress(**shared["progress"])
        if progress.epoch > 0:  # restored from a checkpoint (a fresh start is the same everywhere)
            state = distributed.broadcast_tree(state, "process 0's restored state")
    state = exp.runner.put(state)
    stopper = (EarlyStopping.from_state_dict(progress.stopper) if progress.stopper
               else EarlyStopping(cfg.stopping_step))
    summary_path = wd.file("summary.json") if primary else None

    if primary and not stopper.should_stop and progress.epoch < cfg.epochs:
        logging.info("training %s (%d users, %d items, %d training rows; %d steps per epoch) from epoch %d; "
                     "its first epoch includes compiling the step (seconds, or from JAX's compilation cache)",
                     ds.name, ds.n_users, ds.n_items, len(ds.train), -(-len(ds.train) // cfg.train_batch_size),
                     progress.epoch)
    epochs_this_call = 0
    while not stopper.should_stop and progress.epoch < cfg.epochs:
        epoch = progress.epoch
        tick = time.time()
        show = progress_bar(epoch) if sys.stderr.isatty() else None
        if faults.fault("kill", "train", epoch) is not None:  # fault injection: SIGKILL halfway through
            show = lambda done, total, epoch=epoch: done * 2 >= total and faults.kill_at("train", epoch)
        first = epochs_this_call == 0  # its compile, and the step's first collectives across processes
        with (distributed.waiting_for(f"the other processes in epoch {epoch}, the first of this invocation")
              if first else contextlib.nullcontext()):
            state, parts = exp.train_epoch(state, epoch, show)
        saver.finish()  # the previous epoch's checkpoint, written while this epoch trained, and its row
        loss = dict(zip(("total", "bpr", "hcl", "reg"), map(float, parts.sum(axis=0))))
        host_state = exp.runner.get(state)  # one copy, for evaluation and checkpoints
        parts, host_state = faults.inject_nan(parts, host_state, epoch)  # no-op unless LGMREC_FAULT asks
        check_finite(parts, host_state, epoch, summary_path, progress,
                     saver.checkpoints.steps() if primary else None)
        train_s = time.time() - tick
        row = {"epoch": epoch, "loss": loss, "train_s": round(train_s, 4)}
        stop = False
        if (epoch + 1) % cfg.eval_step == 0 and exp.plans:
            tick = time.time()
            results = distributed.broadcast_json(
                _on_primary(lambda: exp.evaluate(host_state.params, epoch), f"process 0's evaluation of epoch {epoch}"),
                f"process 0's metrics of epoch {epoch}")
            row["eval_s"] = round(time.time() - tick, 4)
            row.update(results)
            stop = stopper.update(epoch, results["valid"][cfg.valid_metric], results["valid"],
                                  results.get("test", {}))
            row.update(best_epoch=stopper.best_epoch, patience_left=stopper.patience_left)
        # The run's wall clock at the end of this epoch's evaluation, over every invocation of it (setup and
        # compilation included): metrics against time, and the host's cost between epochs
        # (time_s[e] - time_s[e-1] - train_s[e] - eval_s[e]).
        row["time_s"] = round(progress.wall_s + time.time() - started, 3)
        progress.history.append(row)
        progress.epoch = epoch + 1
        log_epoch(row, stopper, cfg.valid_metric)
        if stop or (epoch + 1) % cfg.checkpoint_every == 0 or progress.epoch >= cfg.epochs:
            progress.stopper = stopper.state_dict()
            meta = dataclasses.asdict(progress)
            meta["wall_s"] = progress.wall_s + time.time() - started  # earlier invocations + this one
            saver.submit(epoch, host_state, meta, row.get("valid", {}).get(cfg.valid_metric), row)
        else:
            saver.record(row)
        epochs_this_call += 1
        if stop_after_epochs is not None and epochs_this_call >= stop_after_epochs and not stop \
                and progress.epoch < cfg.epochs:
            saver.finish()
            return {"status": "interrupted", "epoch": progress.epoch}
    saver.finish()
    summary = {
        "status": "early_stopped" if stopper.should_stop else "max_epochs",
        "dataset": ds.name,
        "best_epoch": stopper.best_epoch,
        "best_valid": stopper.best_valid,
        "best_test": stopper.best_test,
        "epochs_run": progress.epoch,
        "valid_metric": cfg.valid_metric,
        "total_wall_s": round(progress.wall_s + time.time() - started, 3),
    }
    if primary:
        write_summary(summary_path, summary, progress.epoch - 1)
    return summary


def write_summary(path: str, summary: dict, last_epoch: int) -> None:
    """write_json_atomic with the kill:summary / enospc:summary fault points."""
    if faults.fault("kill", "summary", last_epoch) is not None or faults.fault("enospc", "summary", last_epoch) is not None:
        with open(f"{path}.tmp", "w") as handle:
            handle.write(json.dumps(summary)[:40])
        faults.kill_at("summary", last_epoch)
        faults.enospc_at("summary", last_epoch, f"{path}.tmp")
    write_json_atomic(path, summary)


def check_finite(parts: np.ndarray, state, epoch: int, summary_path: Optional[str], progress: Progress,
                 checkpoint_steps: Optional[list] = None) -> None:
    """Stops the run on a NaN/inf loss or parameter; summary.json records why. ``checkpoint_steps``
    are the saved checkpoints (default: one at ``progress.epoch``, as with checkpoint_every=1)."""
    bad_rows = np.flatnonzero(~np.isfinite(parts).all(axis=1))
    if not bad_rows.size and trainer.finite_state(state):
        return
    where = f"step {int(bad_rows[0])}" if bad_rows.size else "after its last step (parameters)"
    steps = list(checkpoint_steps) if checkpoint_steps is not None else ([progress.epoch] if progress.epoch else [])
    last = steps[-1] if steps else None
    kept = (f"the last good checkpoint (checkpoints/{last}, after {last} epochs) is kept" if last is not None
            else "no checkpoint had been saved yet")
    reason = f"non-finite loss or parameters in epoch {epoch}, {where}; {kept}"
    if summary_path is not None:  # None: not process 0 (lgmrec_jax/distributed.py)
        write_summary(summary_path, {"status": "non_finite", "reason": reason, "epoch": epoch,
                                     "step": int(bad_rows[0]) if bad_rows.size else None,
                                     "last_good_checkpoint_epoch": last}, epoch)
    raise NonFiniteError(reason)


class TensorBoard:
    """Optional TensorBoard events beside metrics.jsonl (``config.tensorboard``, [tensorboard] extra).

    The event file is rewritten from the run's history on every start, so a resumed run has no
    duplicate or missing points.
    """

    SCALARS = ("recall@20", "ndcg@20")

    def __init__(self, logdir: str, history: list):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise RunError("config.tensorboard=True needs tensorboardX: pip install -e '.[tensorboard]'") from None
        shutil.rmtree(logdir, ignore_errors=True)
        self.writer = SummaryWriter(logdir)
        for row in history:
            self.write(row)

    def write(self, row: dict) -> None:
        epoch = row["epoch"]
        for part, value in row["loss"].items():
            self.writer.add_scalar(f"loss/{part}", value, epoch)
        for split in ("valid", "test"):
            for metric in self.SCALARS:
                if metric in row.get(split, {}):
                    self.writer.add_scalar(f"{split}/{metric}", row[split][metric], epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def log_epoch(row: dict, stopper: EarlyStopping, metric: str) -> None:
    valid = row.get("valid", {})
    logging.info("epoch %4d  loss %.4f  train %.2fs  eval %ss  valid %s %s ndcg@20 %s  best %s (epoch %d)  "
                 "patience %d", row["epoch"], row["loss"]["total"], row["train_s"],
                 f"{row['eval_s']:.2f}" if "eval_s" in row else "-", metric, fmt(valid.get(metric)),
                 fmt(valid.get("ndcg@20")), fmt(stopper.best if stopper.best >= 0 else None), stopper.best_epoch,
                 max(stopper.patience_left, 0))
