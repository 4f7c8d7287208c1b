"""One training run in a workdir: train, evaluate, stop early, checkpoint, resume, write results.

Data flow of an epoch e (see WORKSPACE.md):
  host:   sampler.epoch(e) -> padded batches (one transfer per epoch)
  device: run_epoch (lax.scan of train steps, state donated) -> new state, per-batch loss parts
  device: evaluate_split(valid), evaluate_split(test) -> top-50 lists per block
  host:   metrics, early stopping, checkpoint, one line of metrics.jsonl and of the log

Workdir files: config.json, metrics.jsonl, summary.json, checkpoints/, .lock.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import shutil
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from lgmrec_jax import __version__
from lgmrec_jax import checkpoint as ckpt_lib
from lgmrec_jax import evaluation, parallel, sampler as sampler_lib, trainer
from lgmrec_jax.data import Dataset
from lgmrec_jax.early_stopping import EarlyStopping
from lgmrec_jax.graph import build_graph

# Keys whose change does not alter the numbers of a run (execution only): allowed on resume.
EXECUTION_KEYS = ("checkpoint_every", "keep_checkpoints", "tensorboard", "epochs")


class RunError(RuntimeError):
    """A run cannot start or continue; the message is one line for the user."""


class NonFiniteError(RuntimeError):
    pass


def versions() -> dict:
    import flax
    import optax
    import orbax.checkpoint

    return {"lgmrec_jax": __version__, "jax": jax.__version__, "jaxlib": jax.lib.__version__
            if hasattr(jax.lib, "__version__") else None, "flax": flax.__version__, "optax": optax.__version__,
            "orbax_checkpoint": orbax.checkpoint.__version__, "numpy": np.__version__,
            "python": sys.version.split()[0], "backend": jax.default_backend()}


def run_identity(cfg, ds: Dataset) -> dict:
    return {"dataset": ds.name, "config": cfg.to_dict(),
            "dataset_files": ds.checksums() if ds.path else {}}


def identity_differences(old: dict, new: dict) -> list[str]:
    diffs = []
    if old.get("dataset") != new["dataset"]:
        diffs.append(f"dataset: {old.get('dataset')!r} -> {new['dataset']!r}")
    old_cfg, new_cfg = old.get("config", {}), new["config"]
    for key in sorted(set(old_cfg) | set(new_cfg)):
        if key not in EXECUTION_KEYS and old_cfg.get(key) != new_cfg.get(key):
            diffs.append(f"config.{key}: {old_cfg.get(key)!r} -> {new_cfg.get(key)!r}")
    for name in sorted(set(old.get("dataset_files", {})) | set(new["dataset_files"])):
        if old.get("dataset_files", {}).get(name) != new["dataset_files"].get(name):
            diffs.append(f"dataset file {name} changed (sha256)")
    return diffs


def write_json_atomic(path: str, payload) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class Workdir:
    """The run directory: exclusive lock, identity check, output files."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self._lock = None

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def prepare(self, identity: dict, restart: bool) -> None:
        try:
            os.makedirs(self.path, exist_ok=True)
            probe = self.file(".write-probe")
            with open(probe, "w") as handle:
                handle.write("ok")
            os.remove(probe)
        except OSError as err:
            raise RunError(f"{self.path}: workdir is not writable ({err.strerror})") from None
        self.lock()
        if restart:
            for name in os.listdir(self.path):
                if name != ".lock":
                    target = self.file(name)
                    shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
        config_path = self.file("config.json")
        if os.path.exists(config_path):
            with open(config_path) as handle:
                old = json.load(handle)
            diffs = identity_differences(old.get("identity", {}), identity)
            if diffs:
                raise RunError(f"{self.path} holds a run with a different setup ({'; '.join(diffs)}); "
                               f"use --restart to start over or choose another --workdir")

    def lock(self) -> None:
        self._lock = open(self.file(".lock"), "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            self._lock = None
            raise RunError(f"{self.path}: another run is using this workdir (locked); wait for it or "
                           f"choose another --workdir") from None
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(str(os.getpid()))
        self._lock.flush()

    def unlock(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def rewrite_metrics(self, history: list[dict]) -> None:
        tmp = self.file("metrics.jsonl.tmp")
        with open(tmp, "w") as handle:
            for row in history:
                handle.write(json.dumps(row, sort_keys=True) + "\n")
        os.replace(tmp, self.file("metrics.jsonl"))

    def append_metrics(self, row: dict) -> None:
        with open(self.file("metrics.jsonl"), "a") as handle:
            handle.write(json.dumps(row, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


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
        self.optimizer = trainer.make_optimizer(cfg)
        self.graph = build_graph(ds.train, ds.n_users, ds.n_items)
        self.feats = trainer.device_features(ds)
        self.sampler = sampler_lib.NegativeSampler(ds.train, ds.n_items, cfg.train_batch_size, cfg.seed)
        self.runner = parallel.make_runner(self.model, self.optimizer, cfg)
        self.plans = {name: evaluation.plan_split(ds.train, pairs, ds.n_users, ds.n_items, cfg.eval_batch_size)
                      for name, pairs in (("valid", ds.valid), ("test", ds.test)) if len(pairs)}
        self.eval_arrays = {name: tuple(jnp.asarray(a) for a in (p.block_users, p.mask_rows, p.mask_cols))
                            for name, p in self.plans.items()}
        self.evaluate_split = jax.jit(evaluation.make_split_evaluator(self.model, cfg.eval_noise))

    def init_state(self):
        return trainer.init_state(self.model, self.optimizer, self.graph, self.feats, self.cfg.seed)

    def train_epoch(self, state, epoch: int, on_chunk=None):
        """Runs epoch ``epoch`` on a state in the runner's layout (``runner.put``); returns
        (state, per-batch loss parts as a (n_batches, 4) array)."""
        batches = self.sampler.epoch(epoch)
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
        results = {}
        for i, (name, plan) in enumerate(self.plans.items()):
            tops = self.evaluate_split(params, self.graph, self.feats, *self.eval_arrays[name],
                                       jax.random.fold_in(key, i))
            results[name] = evaluation.metrics_from_tops(plan, tops, self.ds.n_users, self.ds.n_items)
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
    the workdir then resumes from there.
    """
    wd = Workdir(workdir)
    identity = run_identity(cfg, ds)
    wd.prepare(identity, restart)
    try:
        return _train(cfg, ds, wd, identity, stop_after_epochs)
    finally:
        wd.unlock()


def _train(cfg, ds, wd: Workdir, identity: dict, stop_after_epochs) -> dict:
    started = time.time()
    with jax.default_matmul_precision(cfg.matmul_precision):
        exp = Experiment(cfg, ds)
        state = exp.init_state()
        checkpoints = ckpt_lib.Checkpoints(wd.file("checkpoints"), cfg.keep_checkpoints)
        restored, meta, skipped = checkpoints.restore_latest(ckpt_lib.abstract_like(state))
        if skipped and restored is not None:
            logging.warning("resuming from checkpoint %d; skipped unreadable checkpoint(s) %s", meta["epoch"],
                            skipped)
        if skipped and restored is None:
            raise RunError(f"{checkpoints.directory}: no checkpoint can be restored (tried {skipped}); "
                           f"use --restart to start over")
        progress = Progress(**meta) if meta else Progress()
        if restored is not None:
            state = restored
            logging.info("resumed %s at epoch %d", wd.path, progress.epoch)
        state = exp.runner.put(state)
        stopper = (EarlyStopping.from_state_dict(progress.stopper) if progress.stopper
                   else EarlyStopping(cfg.stopping_step))
        write_json_atomic(wd.file("config.json"), {"identity": identity, "versions": versions(),
                                                   "n_users": ds.n_users, "n_items": ds.n_items})
        wd.rewrite_metrics(progress.history)
        summary_path = wd.file("summary.json")
        if os.path.exists(summary_path) and progress.epoch and stopper.should_stop:
            with open(summary_path) as handle:
                return json.load(handle)

        epochs_this_call = 0
        status = "max_epochs"
        while progress.epoch < cfg.epochs:
            epoch = progress.epoch
            tick = time.time()
            show = progress_bar(epoch) if sys.stderr.isatty() else None
            state, parts = exp.train_epoch(state, epoch, show)
            loss = dict(zip(("total", "bpr", "hcl", "reg"), map(float, parts.sum(axis=0))))
            host_state = exp.runner.get(state)  # one copy, for evaluation and checkpoints
            check_finite(parts, host_state, epoch, summary_path, progress)
            train_s = time.time() - tick
            row = {"epoch": epoch, "loss": loss, "train_s": round(train_s, 4)}
            stop = False
            if (epoch + 1) % cfg.eval_step == 0 and exp.plans:
                tick = time.time()
                results = exp.evaluate(host_state.params, epoch)
                row["eval_s"] = round(time.time() - tick, 4)
                row.update(results)
                stop = stopper.update(epoch, results["valid"][cfg.valid_metric], results["valid"],
                                      results.get("test", {}))
                row.update(best_epoch=stopper.best_epoch, patience_left=stopper.patience_left)
            progress.history.append(row)
            progress.epoch = epoch + 1
            log_epoch(row, stopper, cfg.valid_metric)
            if stop or (epoch + 1) % cfg.checkpoint_every == 0 or progress.epoch >= cfg.epochs:
                progress.stopper = stopper.state_dict()
                meta = dataclasses.asdict(progress)
                meta["wall_s"] = progress.wall_s + time.time() - started  # earlier sessions + this one
                valid_value = row.get("valid", {}).get(cfg.valid_metric)
                checkpoints.save(progress.epoch, host_state, meta, None if valid_value is None else round(valid_value, 4))
            wd.append_metrics(row)
            epochs_this_call += 1
            if stop:
                status = "early_stopped"
                break
            if stop_after_epochs is not None and epochs_this_call >= stop_after_epochs:
                checkpoints.close()
                return {"status": "interrupted", "epoch": progress.epoch}
        checkpoints.close()
        summary = {
            "status": status,
            "dataset": ds.name,
            "best_epoch": stopper.best_epoch,
            "best_valid": stopper.best_valid,
            "best_test": stopper.best_test,
            "epochs_run": progress.epoch,
            "valid_metric": cfg.valid_metric,
            "total_wall_s": round(progress.wall_s + time.time() - started, 3),
        }
        write_json_atomic(summary_path, summary)
        return summary


def check_finite(parts: np.ndarray, state, epoch: int, summary_path: str, progress: Progress) -> None:
    """Stops the run on a NaN/inf loss or parameter; summary.json records why."""
    bad_rows = np.flatnonzero(~np.isfinite(parts).all(axis=1))
    if not bad_rows.size and trainer.finite_state(state):
        return
    where = f"step {int(bad_rows[0])}" if bad_rows.size else "after its last step (parameters)"
    reason = (f"non-finite loss or parameters in epoch {epoch}, {where}; the last good checkpoint "
              f"(epoch {progress.epoch}) is kept")
    write_json_atomic(summary_path, {"status": "non_finite", "reason": reason, "epoch": epoch,
                                     "step": int(bad_rows[0]) if bad_rows.size else None,
                                     "last_good_checkpoint_epoch": progress.epoch})
    raise NonFiniteError(reason)


def log_epoch(row: dict, stopper: EarlyStopping, metric: str) -> None:
    valid = row.get("valid", {})
    logging.info("epoch %4d  loss %.4f  train %.2fs  eval %ss  valid %s %s ndcg@20 %s  best %s (epoch %d)  "
                 "patience %d", row["epoch"], row["loss"]["total"], row["train_s"],
                 f"{row['eval_s']:.2f}" if "eval_s" in row else "-", metric, fmt(valid.get(metric)),
                 fmt(valid.get("ndcg@20")), fmt(stopper.best if stopper.best >= 0 else None), stopper.best_epoch,
                 max(stopper.patience_left, 0))
