"""The training loop of every run: K >= 1 config slots through one engine, each config with its own files.

An epoch: each active config's batches (sampled while the previous epoch trained), the engine's
compiled epoch, the non-finite check, the evaluation, early stopping and the epoch's rows; every
``checkpoint_every`` epochs, and when a config finishes, a checkpoint of the engine's states is written
on a thread while the next epoch trains, and the rows and summaries follow its commit. A single run
(lgmrec_jax.run) and a grid group (lgmrec_jax.group) differ only in their engine and checkpoint store.
Under jax.distributed (single runs) process 0 alone evaluates and writes and broadcasts what it found.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import sys
import time
from typing import Any, Callable, Optional

import numpy as np

from lgmrec_jax import checkpoint as ckpt_lib
from lgmrec_jax import distributed, faults, records, sampler as sampler_lib
from lgmrec_jax.data import Dataset
from lgmrec_jax.early_stopping import EarlyStopping
from lgmrec_jax.workdir import RunError, Workdir, write_json_atomic


class NonFiniteError(RuntimeError):
    pass


@dataclasses.dataclass
class Member:
    """One config of a loop: its id, resolved config and workdir; ``extra`` goes to config.json."""

    cid: str
    cfg: Any
    workdir: str
    extra: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ConfigProgress:
    """A config's resumable loop state (checkpoints hold it in their JSON block)."""

    status: Optional[str] = None  # None while training; a records.FINAL_STATUSES value once done
    stopper: Optional[dict] = None
    history: list = dataclasses.field(default_factory=list)
    wall_s: float = 0.0  # its clock (time_s) over the invocations before this one
    non_finite: Optional[dict] = None  # the non_finite summary, when that is the status


@dataclasses.dataclass
class LoopOptions:
    """How a loop differs between a single run and a group."""

    stop_after_epochs: Optional[int] = None  # end this invocation early (tests of resume)
    raise_non_finite: bool = False  # a NaN stops the whole invocation (a run: exit 3), else only its config
    repack: bool = False  # move the active configs into fewer slots once half have finished
    name: Optional[str] = None  # a group's name in its log lines; None: a single run's log lines
    on_epoch: Optional[Callable[[dict], None]] = None  # called with each epoch's timings


def on_primary(fn, what: str = "process 0's work on the workdir"):
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


class ConfigRun:
    """One config's bookkeeping: early stopping, its rows, its clock, its summary and its files."""

    def __init__(self, member: Member, ds: Dataset, progress: ConfigProgress, started: float, board=None,
                 sampler: Optional[sampler_lib.NegativeSampler] = None):
        self.member, self.cfg, self.ds = member, member.cfg, ds
        # Its batches; made first, so that data the sampler refuses is reported before anything is written.
        self.sampler = sampler or sampler_lib.for_config(self.cfg, ds)
        self.workdir = Workdir(member.workdir)
        self.progress, self.started, self.board = progress, started, board
        self.stopper = (EarlyStopping.from_state_dict(progress.stopper) if progress.stopper
                        else EarlyStopping(self.cfg.stopping_step))

    @property
    def epochs_done(self) -> int:
        return len(self.progress.history)

    def active(self, epoch: int) -> bool:
        return self.progress.status is None and not self.stopper.should_stop and epoch < self.cfg.epochs

    def clock(self) -> float:
        """time_s: the config's wall clock over every invocation of it, setup and compilation included."""
        return self.progress.wall_s + time.time() - self.started

    def write_config(self, identity: dict, versions: dict) -> None:
        """config.json, and metrics.jsonl rewritten from the restored history (a kill anywhere heals)."""
        write_json_atomic(self.workdir.file("config.json"), {
            "identity": identity, "versions": versions, "n_users": self.ds.n_users, "n_items": self.ds.n_items,
            **self.member.extra})
        self.workdir.rewrite_metrics(self.progress.history)

    def train_row(self, epoch: int, parts: np.ndarray, finite: bool, train_s: float, kept) -> Optional[dict]:
        """The epoch's row, or None when its loss or parameters are not finite (the config then stops;
        ``kept()``: (what the reason says of the checkpoints, the last good one's epoch))."""
        bad = np.flatnonzero(~np.isfinite(parts).all(axis=1))
        if bad.size or not finite:
            where = f"step {int(bad[0])}" if bad.size else "after its last step (parameters)"
            clause, last = kept()
            self.progress.status = records.NON_FINITE
            self.progress.non_finite = {
                "status": records.NON_FINITE, "epoch": epoch, "step": int(bad[0]) if bad.size else None,
                "reason": f"non-finite loss or parameters in epoch {epoch}, {where}" + (f"; {clause}" if clause else ""),
                "last_good_checkpoint_epoch": last}
            return None
        loss = dict(zip(records.LOSS_PARTS, map(float, parts.sum(axis=0))))
        return {"epoch": epoch, "loss": loss, "train_s": round(train_s, 4)}

    def end_epoch(self, row: dict, results: Optional[dict], eval_s: float) -> None:
        """Adds the evaluation, updates early stopping and the status, and closes the row (time_s)."""
        epoch = row["epoch"]
        if results is not None:
            row["eval_s"] = round(eval_s, 4)
            row.update(results)
            self.stopper.update(epoch, results["valid"][self.cfg.valid_metric], results["valid"],
                                results.get("test", {}))
            row.update(best_epoch=self.stopper.best_epoch, patience_left=self.stopper.patience_left)
        # The config's wall clock at the end of this epoch's evaluation: metrics against time, and the
        # host's cost between epochs (time_s[e] - time_s[e-1] - train_s[e] - eval_s[e]).
        row["time_s"] = round(self.clock(), 3)
        self.progress.history.append(row)
        self.progress.stopper = self.stopper.state_dict()
        if self.stopper.should_stop:
            self.progress.status = "early_stopped"
        elif epoch + 1 >= self.cfg.epochs:
            self.progress.status = "max_epochs"

    def checkpoint_progress(self) -> dict:
        """The progress to store in a checkpoint: its clock up to now."""
        return dict(dataclasses.asdict(self.progress), wall_s=self.clock())

    def summary(self) -> dict:
        if self.progress.status == records.NON_FINITE:
            return dict(self.progress.non_finite)
        return {"status": self.progress.status, "dataset": self.ds.name, "best_epoch": self.stopper.best_epoch,
                "best_valid": self.stopper.best_valid, "best_test": self.stopper.best_test,
                "epochs_run": self.epochs_done, "valid_metric": self.cfg.valid_metric,
                "total_wall_s": round(self.clock(), 3)}

    def record(self, row: dict) -> None:
        self.workdir.append_metrics(row)
        if self.board is not None:
            self.board.write(row)

    def write_summary(self) -> dict:
        summary = self.summary()
        write_summary(self.workdir.file("summary.json"), summary, self.epochs_done - 1 if self.epochs_done else 0)
        return summary


def write_summary(path: str, summary: dict, last_epoch: int) -> None:
    """write_json_atomic with the kill:summary / enospc:summary fault points."""
    if faults.fault("kill", "summary", last_epoch) is not None or faults.fault("enospc", "summary", last_epoch) is not None:
        with open(f"{path}.tmp", "w") as handle:
            handle.write(json.dumps(summary)[:40])
        faults.kill_at("summary", last_epoch)
        faults.enospc_at("summary", last_epoch, f"{path}.tmp")
    write_json_atomic(path, summary)


class Saver:
    """Checkpoints through a ckpt_lib.BackgroundSaver: epoch e's checkpoint is written on a host thread
    while epoch e + 1 trains, and epoch e's files follow its commit. Process 0 alone saves; every
    method is collective (a failed save is raised on every process)."""

    def __init__(self):
        self.background = ckpt_lib.BackgroundSaver() if distributed.is_primary() else None

    def submit(self, save: Callable[[], None], then: Callable[[], None]) -> None:
        on_primary(lambda: self.background.submit(save, then))

    def after_saves(self, fn: Callable[[], None]) -> None:
        on_primary(lambda: self.background.after_saves(fn))

    def finish(self) -> None:
        on_primary(lambda: self.background.finish())

    def close(self) -> None:
        if self.background is not None:
            self.background.close()


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


def padded(items: list, multiple: int) -> list:
    return items + [None] * (-len(items) % multiple)


def train(engine, runs: dict, slots: list, states, epoch: int, store, opts: LoopOptions,
          summaries: Optional[dict] = None) -> dict:
    """Trains the configs of ``runs`` ({cid: ConfigRun}) in ``slots`` (cids, None for padding) from
    ``states`` (the engine's layout) at ``epoch`` until each has finished; returns {cid: summary}
    ({"status": "interrupted"} for those left unfinished by ``opts.stop_after_epochs``).

    ``summaries``: those of configs finished in an earlier call (their files are final). ``store`` keeps
    the checkpoints: ``save(epoch, host_states, slots, progress by cid, valid_value)`` and
    ``kept(epoch)`` (what a non-finite stop says of them)."""
    summaries = dict(summaries or {})
    prefetcher = sampler_lib.Prefetcher({cid: run.sampler for cid, run in runs.items()})  # epoch e + 1 is sampled while e trains
    saver = Saver()
    epochs_this_call = 0
    first_cfg = next(iter(runs.values())).cfg
    try:
        while any(c is not None and runs[c].active(epoch) for c in slots):
            tick = time.time()
            active = np.array([c is not None and runs[c].active(epoch) for c in slots])
            live = [c for k, c in enumerate(slots) if active[k]]
            slot_cids = [c if active[k] else live[0] for k, c in enumerate(slots)]  # inactive slots: any live config
            cfgs = [runs[c].cfg for c in slot_cids]
            per_config = prefetcher.epoch(epoch, live)
            show = progress_bar(epoch) if opts.name is None and sys.stderr.isatty() else None
            if faults.fault("kill", "train", epoch) is not None:  # fault injection: SIGKILL halfway through
                show = lambda done, total, epoch=epoch: done * 2 >= total and faults.kill_at("train", epoch)
            first = epochs_this_call == 0  # its compile, and the step's first collectives across processes
            with (distributed.waiting_for(f"the other processes in epoch {epoch}, the first of this invocation")
                  if first else contextlib.nullcontext()):
                states, parts, finite = engine.run_epoch(states, cfgs, [per_config[c] for c in slot_cids], epoch,
                                                         active, show)
            saver.finish()  # the previous epoch's checkpoint, written while this epoch trained, and its files
            parts, finite = faults.inject_nan(parts, finite, epoch)  # no-op unless LGMREC_FAULT asks
            train_s = time.time() - tick
            rows, finished = {}, []
            kept = lambda: store.kept(epoch)  # asked only of a non-finite config
            for k, cid in enumerate(slots):
                if active[k]:
                    row = runs[cid].train_row(epoch, parts[k], bool(finite[k]), train_s, kept)
                    if row is None:
                        finished.append(cid)
                    else:
                        rows[cid] = row
            if finished and opts.raise_non_finite:
                run = runs[finished[0]]
                on_primary(run.write_summary)
                raise NonFiniteError(run.progress.non_finite["reason"])
            evaluated = (epoch + 1) % first_cfg.eval_step == 0 and bool(engine.plans) and bool(rows)
            results, eval_s = [None] * len(slots), 0.0
            if evaluated:
                tick_eval = time.time()
                evaluating = np.array([c in rows for c in slots])
                results = distributed.broadcast_json(
                    on_primary(lambda: engine.evaluate(states, cfgs, epoch, evaluating),
                               f"process 0's evaluation of epoch {epoch}"),
                    f"process 0's metrics of epoch {epoch}")
                eval_s = time.time() - tick_eval
            for k, cid in enumerate(slots):
                if cid in rows:
                    runs[cid].end_epoch(rows[cid], results[k] if evaluated else None, eval_s)
                    if runs[cid].progress.status is not None:
                        finished.append(cid)
            epoch += 1
            epochs_this_call += 1
            if opts.name is None:
                for cid in rows:
                    log_epoch(rows[cid], runs[cid].stopper, runs[cid].cfg.valid_metric)
            n_live = sum(c is not None and runs[c].active(epoch) for c in slots)
            if opts.repack and engine.can_repack and n_live and len(slots) > engine.n_slots \
                    and n_live <= len(slots) // 2:
                keep = [k for k, c in enumerate(slots) if c is not None and runs[c].active(epoch)]
                keep = keep + [keep[0]] * (-len(keep) % engine.n_slots)
                states = engine.repack(states, keep)
                slots = padded([slots[k] for k in keep[:n_live]], engine.n_slots)
                logging.info("group %s: repacked to %d slots (%d active)", opts.name, len(slots), n_live)
            done = {cid: runs[cid].summary() for cid in finished}
            summaries.update(done)
            files = _epoch_files(runs, rows, done, epoch - 1)
            if finished or epoch % first_cfg.checkpoint_every == 0 or not n_live:
                valid = [rows[c].get("valid", {}).get(runs[c].cfg.valid_metric) for c in rows]
                save = _save_fn(store, epoch, engine, states, slots, runs, valid[0] if len(valid) == 1 else None)
                saver.submit(save, files)
            else:
                saver.after_saves(files)
            wall = time.time() - tick
            if opts.on_epoch is not None:
                opts.on_epoch({"epoch": epoch - 1, "slots": len(slots), "active": int(active.sum()),
                               "train_s": train_s, "eval_s": eval_s, "wall_s": wall})
            if opts.name is not None:
                log_group_epoch(opts.name, runs, slots, rows, epoch - 1, active, train_s, eval_s, finished)
            if opts.stop_after_epochs is not None and epochs_this_call >= opts.stop_after_epochs:
                break
        saver.finish()
        for cid, run in runs.items():
            if cid in summaries:
                continue
            if run.progress.status is None and not run.active(epoch):  # its end was reached before this call
                run.progress.status = "early_stopped" if run.stopper.should_stop else "max_epochs"
            if run.progress.status in records.FINAL_STATUSES:
                summaries[cid] = on_primary(run.write_summary) or run.summary()
            else:
                summaries[cid] = {"status": records.INTERRUPTED, "epoch": epoch}
        return summaries
    finally:
        prefetcher.close()
        saver.close()


def _save_fn(store, epoch: int, engine, states, slots: list, runs: dict, valid_value):
    """What the saver's thread runs for the checkpoint after ``epoch`` epochs (host copies taken now:
    the device states are donated to the next epoch)."""
    copy = engine.host_copy(states) if distributed.is_primary() else None
    progress = {c: run.checkpoint_progress() for c, run in runs.items()}
    rounded = None if valid_value is None else round(valid_value, 4)

    def save():
        with faults.FaultInSave(epoch - 1):  # no-op unless LGMREC_FAULT asks
            store.save(epoch, copy, list(slots), progress, rounded)
        faults.kill_at("saved", epoch - 1)
    return save


def _epoch_files(runs: dict, rows: dict, summaries: dict, epoch: int):
    """An epoch's metrics lines, then its finished configs' summaries (after its checkpoint)."""
    def write():
        for cid, row in rows.items():
            runs[cid].record(row)
        for cid, summary in summaries.items():
            write_summary(runs[cid].workdir.file("summary.json"), summary, epoch)
    return write


def log_epoch(row: dict, stopper: EarlyStopping, metric: str) -> None:
    valid = row.get("valid", {})
    logging.info("epoch %4d  loss %.4f  train %.2fs  eval %ss  valid %s %s ndcg@20 %s  best %s (epoch %d)  "
                 "patience %d", row["epoch"], row["loss"]["total"], row["train_s"],
                 f"{row['eval_s']:.2f}" if "eval_s" in row else "-", metric, fmt(valid.get(metric)),
                 fmt(valid.get("ndcg@20")), fmt(stopper.best if stopper.best >= 0 else None), stopper.best_epoch,
                 max(stopper.patience_left, 0))


def log_group_epoch(name: str, runs: dict, slots: list, rows: dict, epoch: int, active, train_s: float,
                    eval_s: float, finished: list) -> None:
    bests = sorted(runs[c].stopper.best for c in slots if c in rows)
    metric = next(iter(runs.values())).cfg.valid_metric
    logging.info("group %s epoch %4d  %d/%d configs active  train %.2fs  eval %.2fs  best valid %s "
                 "min/median/max %s  %d finished", name, epoch, int(active.sum()), len(slots), train_s, eval_s,
                 metric, "/".join(f"{x:.4f}" for x in (bests[0], bests[len(bests) // 2], bests[-1])) if bests else "-",
                 len(finished))
