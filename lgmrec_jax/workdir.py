"""A run's directory: the exclusive lock, the writability probe, the identity record (config,
dataset checksums, versions) checked on resume, atomic writes, and what ``--restart`` may delete."""

from __future__ import annotations

import fcntl
import glob
import json
import os
import shutil
import sys
from typing import Optional

import jax
import numpy as np

from lgmrec_jax import __version__
from lgmrec_jax.data import Dataset
from lgmrec_jax.faults import enospc_at, fault, kill_at

# Keys whose change does not alter the numbers of a run (execution only): allowed on resume.
EXECUTION_KEYS = ("checkpoint_every", "keep_checkpoints", "tensorboard", "epochs", "eval_score_chunk")
# Config keys added after runs were made, with the values that do what those runs did before the key
# existed: a workdir without the key resumes under them (and is refused under any other value).
BEHAVIOUR_BEFORE_KEY = {"tau": (0.2,), "feature_dtype": ("float32",), "eval_topk": ("direct", "grouped")}



class RunError(RuntimeError):
    """A run cannot start or continue; the message is one line for the user."""



def versions() -> dict:
    import flax
    import optax
    import orbax.checkpoint

    try:  # jaxlib's own module: jax.lib's re-export of the version is not kept across releases
        import jaxlib
        jaxlib_version = getattr(jaxlib, "__version__", None)
    except ImportError:
        jaxlib_version = None
    return {"lgmrec_jax": __version__, "jax": jax.__version__, "jaxlib": jaxlib_version,
            "flax": flax.__version__, "optax": optax.__version__,
            "orbax_checkpoint": orbax.checkpoint.__version__, "numpy": np.__version__,
            "python": sys.version.split()[0], "backend": jax.default_backend()}


def run_identity(cfg, ds: Dataset, checksums: Optional[dict] = None) -> dict:
    """What config.json records of a run and a resume checks: dataset, config, the data's checksums
    (``checksums``: computed once by a caller with many configs of one dataset)."""
    if checksums is None:
        checksums = ds.checksums() if ds.path else {}
    return {"dataset": ds.name, "config": cfg.to_dict(), "dataset_files": checksums}


def identity_differences(old: dict, new: dict) -> list[str]:
    diffs = []
    if old.get("dataset") != new["dataset"]:
        diffs.append(f"dataset: {old.get('dataset')!r} -> {new['dataset']!r}")
    old_cfg, new_cfg = old.get("config", {}), new["config"]
    for key in sorted(set(old_cfg) | set(new_cfg)):
        if key not in old_cfg and new_cfg.get(key) in BEHAVIOUR_BEFORE_KEY.get(key, ()):
            continue  # a key added since the run started, set to what the run did before it existed
        if key not in EXECUTION_KEYS and old_cfg.get(key) != new_cfg.get(key):
            diffs.append(f"config.{key}: {old_cfg.get(key)!r} -> {new_cfg.get(key)!r}")
    old_files = old.get("dataset_files", {})
    for name in sorted(set(old_files) | set(new["dataset_files"])):
        before, now = old_files.get(name), new["dataset_files"].get(name)
        if before != now:
            change = "is gone" if now is None else "is new" if before is None else "changed (sha256)"
            diffs.append(f"dataset file {name} {change}")
    return diffs


def write_json_atomic(path: str, payload, tmp: Optional[str] = None) -> None:
    """Writes ``tmp`` (default ``path.tmp``), syncs it and renames it over ``path``."""
    tmp = tmp or f"{path}.tmp"
    with open(tmp, "w") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


# What a run writes in its workdir (curves.png: lgmrec_jax.report's plot); --restart deletes these alone.
RUN_OUTPUTS = (".lock", "checkpoints", "config.json", "metrics.jsonl", "summary.json", "tensorboard",
               "curves.png", ".write-probe")


def clear_for_restart(path: str, outputs: tuple, keep: tuple = (), dry_run: bool = False,
                      suffixes: tuple = ()) -> None:
    """``--restart``: deletes the entries of ``path`` that are ``outputs`` (or their temporary files,
    ``<output>.<suffix>`` or ``<output>-<suffix>``) or end in one of ``suffixes``, except ``keep``.
    Refuses (RunError, nothing deleted) when ``path`` holds anything else: a --workdir pointed at a
    source tree or a data directory must not be emptied. ``dry_run``: the refusal alone."""
    def owned(name):
        return name.endswith(suffixes) or any(name == out or name.startswith((f"{out}.", f"{out}-"))
                                              for out in outputs)

    names = sorted(os.listdir(path))
    foreign = [name for name in names if not owned(name)]
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise RunError(f"{path}: --restart deletes only what a run wrote there, and it also holds {shown}; "
                       f"move those away or choose another --workdir")
    for name in names if not dry_run else ():
        if name not in keep:
            target = os.path.join(path, name)
            shutil.rmtree(target) if os.path.isdir(target) and not os.path.islink(target) else os.remove(target)


class Workdir:
    """The run directory: exclusive lock, identity check, output files."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self._lock = None

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def prepare(self, identity: dict, restart: bool) -> None:
        """Creates and locks the workdir and checks it is writable, before anything is compiled."""
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise RunError(f"{self.path}: workdir exists and is not a directory; choose another --workdir")
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as err:
            raise RunError(f"{self.path}: workdir cannot be created ({err.strerror}); choose another --workdir") \
                from None
        if restart:  # before the lock file: a refused restart leaves the directory as it was
            clear_for_restart(self.path, RUN_OUTPUTS, dry_run=True)
        self.lock()  # before any write: a refused second run touches nothing
        try:
            try:
                probe = self.file(f".write-probe-{os.getpid()}")
                with open(probe, "w") as handle:
                    handle.write("ok")
                    handle.flush()
                    os.fsync(handle.fileno())
                os.remove(probe)
            except OSError as err:
                raise RunError(f"{self.path}: workdir is not writable ({err.strerror}); choose another --workdir") \
                    from None
            for name in ("config.json.tmp", "summary.json.tmp", "metrics.jsonl.tmp"):  # left by a kill
                if os.path.exists(self.file(name)):
                    os.remove(self.file(name))
            for probe in glob.glob(self.file(".write-probe-*")):
                os.remove(probe)
            if restart:
                clear_for_restart(self.path, RUN_OUTPUTS, keep=(".lock",))
            config_path = self.file("config.json")
            if os.path.exists(config_path):
                start_over = "use --restart to start over or choose another --workdir"
                try:
                    with open(config_path) as handle:
                        old = json.load(handle)
                except ValueError as err:
                    raise RunError(f"{config_path}: not valid JSON ({err}); {start_over}") from None
                if not isinstance(old, dict):
                    raise RunError(f"{config_path}: not a JSON object; {start_over}")
                diffs = identity_differences(old.get("identity", {}), identity)
                if diffs:
                    raise RunError(f"{self.path} holds a run with a different setup ({'; '.join(diffs)}); "
                                   f"use --restart to start over or choose another --workdir")
        except BaseException:
            self.unlock()  # a refused start leaves the workdir free
            raise

    def lock(self) -> None:
        try:
            self._lock = open(self.file(".lock"), "a+")
        except OSError as err:
            raise RunError(f"{self.path}: workdir is not writable ({err.strerror}); choose another --workdir") \
                from None
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

    def remove_if_unused(self) -> None:
        """Removes a workdir that holds nothing but its lock (a run that failed before its first write)."""
        try:
            if os.listdir(self.path) == [".lock"]:
                shutil.rmtree(self.path)
        except OSError:
            pass  # gone already, or not ours to remove: nothing was written either way

    def rewrite_metrics(self, history: list[dict]) -> None:
        tmp = self.file("metrics.jsonl.tmp")
        with open(tmp, "w") as handle:
            for row in history:
                handle.write(json.dumps(row, sort_keys=True) + "\n")
        os.replace(tmp, self.file("metrics.jsonl"))

    def append_metrics(self, row: dict) -> None:
        line = json.dumps(row, sort_keys=True) + "\n"
        with open(self.file("metrics.jsonl"), "a") as handle:
            if any(fault(a, "metrics", row["epoch"]) is not None for a in ("kill", "enospc")):
                handle.write(line[:len(line) // 2])
                handle.flush()
                kill_at("metrics", row["epoch"])
                enospc_at("metrics", row["epoch"], handle.name)
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())

    def metrics_epochs(self) -> list[int]:
        """Epochs of the complete lines in metrics.jsonl (a line cut by a kill is skipped)."""
        epochs = []
        if os.path.exists(self.file("metrics.jsonl")):
            with open(self.file("metrics.jsonl")) as handle:
                for line in handle:
                    try:
                        epochs.append(int(json.loads(line)["epoch"]))
                    except (ValueError, KeyError, TypeError):
                        pass
        return epochs
