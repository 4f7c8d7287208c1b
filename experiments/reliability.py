"""Injects each fault many times into real runs and writes experiments/results/reliability.md.

    python -m experiments.reliability
    python -m experiments.reliability --random_kills=40 --repeats=5 --workers=2

Each trial runs ``python -m lgmrec_jax.train --dataset=synthetic_tiny`` with a fault, then the same
command again until it finishes, and compares summary.json and metrics.jsonl (timings left out) with
an uninterrupted run's. Faults: SIGKILL at random moments and at each named point (lgmrec_jax/faults.py),
a full disk and a file size limit at each write, NaN losses and parameters, corrupted and missing
checkpoints, an unwritable workdir, a second run on the same workdir, and hostile datasets
(lgmrec_jax/hostile_data.py). "Data lost" counts trials where an epoch metrics.jsonl had recorded had no
restorable checkpoint, or a finished rerun differs.
"""

from __future__ import annotations

import collections
import datetime
import glob
import json
import os
import platform
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from typing import Optional

import numpy as np

from lgmrec_jax.hostile_data import HOSTILE, hostile_copy
from lgmrec_jax.records import strip_timing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KILL_POINTS = ("train", "eval", "save", "saved", "metrics", "summary")
ENOSPC_POINTS = ("save", "metrics", "summary")


# ---- Running the CLI ------------------------------------------------------------------------------------
class Harness:
    def __init__(self, root: str, data_dir: str, seed: int):
        self.root, self.data_dir = root, data_dir
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.env = dict(os.environ)
        self.env.pop("LGMREC_FAULT", None)
        self.env["JAX_PLATFORMS"] = "cpu"
        self.env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(root, "xla_cache")
        self.env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        self.counter = 0
        self.ref = None  # (summary, rows), timings
        self.abstract = None

    def workdir(self, tag: str) -> str:
        with self.lock:
            self.counter += 1
            return os.path.join(self.root, "runs", f"{self.counter:04d}-{tag}")

    def randint(self, a, b):
        with self.lock:
            return self.rng.randint(a, b)

    def uniform(self, a, b):
        with self.lock:
            return self.rng.uniform(a, b)

    def choice(self, seq):
        with self.lock:
            return self.rng.choice(seq)

    def command(self, workdir: str, dataset="synthetic_tiny", data_dir=None, extra=()):
        return [sys.executable, "-m", "lgmrec_jax.train", f"--dataset={dataset}",
                f"--data_dir={data_dir or self.data_dir}", f"--workdir={workdir}", *extra]

    def run(self, workdir, fault=None, preexec=None, kill_after=None, kill_after_epoch_line=None, **kw):
        """Runs the CLI; kill_after (s from start) or kill_after_epoch_line (s after the first epoch line)
        sends SIGKILL. Returns (returncode, stderr, stdout, first_epoch_line_s, end_s)."""
        env = dict(self.env)
        if fault:
            env["LGMREC_FAULT"] = fault
        start = time.time()
        proc = subprocess.Popen(self.command(workdir, **kw), cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, preexec_fn=preexec)
        lines, first_epoch = [], []
        seen = threading.Event()

        def read_stderr():
            for line in proc.stderr:
                lines.append(line)
                if not seen.is_set() and re.search(r"\] epoch +0 ", line):
                    first_epoch.append(time.time() - start)
                    seen.set()

        reader = threading.Thread(target=read_stderr, daemon=True)
        reader.start()
        if kill_after is not None:
            try:
                proc.wait(timeout=kill_after)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
        elif kill_after_epoch_line is not None:
            while proc.poll() is None and not seen.wait(0.01):
                pass
            if proc.poll() is None:
                try:
                    proc.wait(timeout=kill_after_epoch_line)
                except subprocess.TimeoutExpired:
                    proc.send_signal(signal.SIGKILL)
        stdout = proc.stdout.read()
        proc.wait()
        reader.join()
        return (proc.returncode, "".join(lines), stdout, first_epoch[0] if first_epoch else None,
                time.time() - start)

    # ---- checks ----
    def outputs(self, workdir):
        with open(os.path.join(workdir, "summary.json")) as handle:
            summary = json.load(handle)
        with open(os.path.join(workdir, "metrics.jsonl")) as handle:
            rows = [json.loads(line) for line in handle]
        return strip_timing(summary), strip_timing(rows)

    def equal(self, workdir) -> bool:
        try:
            return self.outputs(workdir) == self.ref[0]
        except (OSError, ValueError):
            return False

    def finish(self, workdir, max_runs=3) -> tuple[bool, str]:
        """Reruns the plain command until it exits 0; (finished, last stderr)."""
        for _ in range(max_runs):
            rc, err, *_ = self.run(workdir)
            if rc == 0:
                return True, err
        return False, err

    def recorded_epochs(self, workdir) -> int:
        """Complete metrics.jsonl lines: their epochs' checkpoints were committed before them."""
        n = 0
        path = os.path.join(workdir, "metrics.jsonl")
        if os.path.exists(path):
            with open(path) as handle:
                for line in handle:
                    try:
                        json.loads(line)
                        n += 1
                    except ValueError:
                        pass
        return n

    def newest_restorable(self, workdir) -> Optional[int]:
        """The newest checkpoint that restores, checked on a copy (opening it would clean up)."""
        from lgmrec_jax import checkpoint as ckpt_lib

        source = os.path.join(workdir, "checkpoints")
        if not os.path.isdir(source):
            return None
        scratch = tempfile.mkdtemp(dir=self.root)
        try:
            shutil.copytree(source, os.path.join(scratch, "checkpoints"))
            checkpoints = ckpt_lib.Checkpoints(os.path.join(scratch, "checkpoints"), 2)
            for step in reversed(checkpoints.steps()):
                try:
                    checkpoints.restore(step, self.abstract)
                    return step
                except Exception:  # noqa: BLE001 - unreadable: try the next older one
                    continue
            return None
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def nothing_lost(self, workdir) -> bool:
        recorded = self.recorded_epochs(workdir)
        return recorded == 0 or (self.newest_restorable(workdir) or 0) >= recorded

    def landing(self, workdir) -> str:
        """Where a kill landed, judged from what it left."""
        checkpoints = os.path.join(workdir, "checkpoints")
        if not os.path.isdir(checkpoints):
            return "before the workdir was prepared"
        if glob.glob(os.path.join(checkpoints, "*.orbax-checkpoint-tmp*")):
            return "inside a checkpoint save"
        partial = [d for d in os.listdir(checkpoints) if d.isdigit() and not all(
            os.path.exists(os.path.join(checkpoints, d, part)) for part in ("state", "meta", "_CHECKPOINT_METADATA"))]
        if partial:
            return "inside a checkpoint deletion"
        if os.path.exists(os.path.join(workdir, "summary.json.tmp")):
            return "inside the summary write"
        steps = [int(d) for d in os.listdir(checkpoints) if d.isdigit()]
        if not steps:
            return "before the first checkpoint"
        if self.recorded_epochs(workdir) < max(steps):
            return "between a save and its metrics line"
        return "in an epoch or evaluation"


Outcome = collections.namedtuple("Outcome", "fault survived equal lost note na",
                                 defaults=(None, False, "", "n/a (refused, nothing written)"))


# ---- Trials -------------------------------------------------------------------------------------------
def random_kill_trial(h: Harness, epochs_phase: bool, max_kills: int, landings: collections.Counter) -> Outcome:
    name = "random SIGKILL, epochs phase" if epochs_phase else "random SIGKILL, whole run"
    workdir = h.workdir("randkill")
    total, first, end = h.ref[1]
    lost = False
    for _ in range(max_kills):
        if epochs_phase:
            rc, *_ = h.run(workdir, kill_after_epoch_line=h.uniform(0, (end - first) * 1.2))
        else:
            rc, *_ = h.run(workdir, kill_after=h.uniform(0, total * 1.1))
        where = "(finished before the kill)" if rc == 0 else h.landing(workdir)
        with h.lock:
            landings[where] += 1
        if rc == 0:
            break
        lost |= not h.nothing_lost(workdir)
    finished, _ = h.finish(workdir)
    equal = finished and h.equal(workdir)
    return Outcome(name, finished, equal, lost or not equal)


def point_kill_trial(h: Harness, point: str) -> Outcome:
    last = h.ref[0][0]["epochs_run"] - 1
    epoch = last if point == "summary" else h.randint(0, last)
    workdir = h.workdir(f"kill-{point}")
    rc, *_ = h.run(workdir, fault=f"kill:{point}:{epoch}")
    lost = not h.nothing_lost(workdir)
    finished, _ = h.finish(workdir)
    equal = finished and h.equal(workdir)
    return Outcome(f"SIGKILL at {point}", rc == -signal.SIGKILL and finished, equal, lost or not equal,
                   f"epoch {epoch}")


def enospc_trial(h: Harness, point: str) -> Outcome:
    last = h.ref[0][0]["epochs_run"] - 1
    epoch = last if point == "summary" else h.randint(0, last)
    workdir = h.workdir(f"enospc-{point}")
    rc, err, *_ = h.run(workdir, fault=f"enospc:{point}:{epoch}")
    line = err.strip().splitlines()[-1] if err.strip() else ""
    clean = rc == 2 and line.startswith("error: ") and "No space left on device" in line and "Traceback" not in err
    lost = not h.nothing_lost(workdir)
    finished, _ = h.finish(workdir)
    equal = finished and h.equal(workdir)
    return Outcome(f"full disk (ENOSPC) at {point}", clean and finished, equal, lost or not equal)


def fsize_trial(h: Harness) -> Outcome:
    limit = h.randint(2_000, 20_000)  # below the largest checkpoint file (~25 kB): some write fails
    workdir = h.workdir("fsize")

    def limit_writes():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    rc, err, *_ = h.run(workdir, preexec=limit_writes)
    line = err.strip().splitlines()[-1] if err.strip() else ""
    clean = (rc == 2 and line.startswith("error: ") and "File too large" in line and "Traceback" not in err) \
        or rc == 0
    lost = not h.nothing_lost(workdir)
    finished, _ = h.finish(workdir)
    equal = finished and h.equal(workdir)
    return Outcome("file size limit (real EFBIG)", clean and finished, equal, lost or not equal,
                   f"limit {limit} B: " + ("finished" if rc == 0 else line[7:].replace(workdir, "W").split(";")[0]))


def nan_trial(h: Harness, where: str) -> Outcome:
    last = h.ref[0][0]["epochs_run"] - 1
    epoch = h.randint(0, last)
    step = h.randint(0, 3)
    fault = f"nan:loss:{epoch}:{step}" if where == "loss" else f"nan:params:{epoch}"
    workdir = h.workdir(f"nan-{where}")
    rc, err, *_ = h.run(workdir, fault=fault)
    try:
        with open(os.path.join(workdir, "summary.json")) as handle:
            summary = json.load(handle)
    except (OSError, ValueError):
        summary = {}
    wanted = f"epoch {epoch}, step {step}" if where == "loss" else f"epoch {epoch}, after its last step"
    ok = rc == 3 and summary.get("status") == "non_finite" and wanted in summary.get("reason", "") \
        and wanted in err.strip().splitlines()[-1] and summary.get("last_good_checkpoint_epoch") == (epoch or None)
    lost = not h.nothing_lost(workdir)
    finished, _ = h.finish(workdir)
    equal = finished and h.equal(workdir)
    return Outcome(f"NaN in the {where}", ok and finished, equal, lost or not equal, fault)


def corrupt_trial(h: Harness, finished_dir: str) -> Outcome:
    workdir = h.workdir("corrupt")
    shutil.copytree(finished_dir, workdir)
    newest = max(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    files = sorted(p for p in glob.glob(os.path.join(workdir, "checkpoints", str(newest), "**"), recursive=True)
                   if os.path.isfile(p))
    target, mode = h.choice(files), h.choice(("delete", "empty", "half", "flip"))
    if mode == "delete":
        os.remove(target)
    else:
        with open(target, "rb") as handle:
            data = bytearray(handle.read())
        if mode == "empty":
            data = bytearray()
        elif mode == "half":
            data = data[:len(data) // 2]
        elif data:
            data[h.randint(0, len(data) - 1)] ^= 1 << h.randint(0, 7)
        with open(target, "wb") as handle:
            handle.write(bytes(data))
    finished, err = h.finish(workdir)
    equal = finished and h.equal(workdir)
    fell_back = "cannot be restored and were moved to" in err
    note = f"{mode} {os.path.relpath(target, os.path.join(workdir, 'checkpoints'))}: " + (
        "fell back" if fell_back else "restored as is")
    return Outcome("corrupted newest checkpoint", finished, equal, not equal, note)


def no_good_trial(h: Harness, finished_dir: str, how: str) -> Outcome:
    workdir = h.workdir("nogood")
    shutil.copytree(finished_dir, workdir)
    checkpoints = os.path.join(workdir, "checkpoints")
    if how == "state":
        for step in [d for d in os.listdir(checkpoints) if d.isdigit()]:
            shutil.rmtree(os.path.join(checkpoints, step, "state"))
    else:
        shutil.rmtree(checkpoints)
    before = snapshot(workdir)
    rc, err, *_ = h.run(workdir)
    line = err.strip().splitlines()[-1]
    refused = rc == 2 and "use --restart" in line and snapshot(workdir) == before
    rc2, *_ = h.run(workdir, extra=("--restart",))
    equal = rc2 == 0 and h.equal(workdir)
    name = "no restorable checkpoint" if how == "state" else "checkpoints/ deleted, metrics left"
    return Outcome(name, refused and rc2 == 0, equal, not equal)


def snapshot(workdir):
    return {p: (os.path.getsize(p), os.path.getmtime(p)) for p in glob.glob(f"{workdir}/**", recursive=True)
            if os.path.isfile(p)}


def unwritable_trial(h: Harness, how: str) -> Outcome:
    base = h.workdir("unwritable")
    os.makedirs(base)
    if how == "below a file":
        with open(os.path.join(base, "file"), "w") as handle:
            handle.write("x")
        workdir = os.path.join(base, "file", "run")
    else:
        workdir = f"/sys/lgmrec-reliability-{os.getpid()}"
    rc, err, _, first, _ = h.run(workdir)
    lines = err.strip().splitlines()
    ok = (rc == 2 and len(lines) == 1 and lines[0].startswith(f"error: {workdir}: workdir cannot be created")
          and first is None and not os.path.exists(workdir))
    return Outcome(f"unwritable workdir ({how})", ok, None, False,
                   lines[-1][7:].replace(base, "<tmp>") if lines else "")


def second_run_trial(h: Harness) -> Outcome:
    workdir = h.workdir("second")
    env = dict(h.env)
    first = subprocess.Popen(h.command(workdir), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    lock = os.path.join(workdir, ".lock")
    while first.poll() is None and not (os.path.exists(lock) and open(lock).read().strip() == str(first.pid)):
        time.sleep(0.01)
    rc2, err2, *_ = h.run(workdir)
    rc1 = first.wait()
    refused = rc2 == 2 and "another run is using this workdir" in err2.strip().splitlines()[-1]
    equal = rc1 == 0 and h.equal(workdir)
    return Outcome("second run on a running workdir", refused and rc1 == 0, equal, not equal,
                   "" if refused else f"second exited {rc2}")


def hostile_trial(h: Harness, index: int) -> Outcome:
    case, write, message = HOSTILE[index]
    root = h.workdir("hostile")
    os.makedirs(root)
    name = write(root)
    workdir = os.path.join(root, "workdir")
    rc, err, *_ = h.run(workdir, dataset=name, data_dir=root)
    lines = err.strip().splitlines()
    ok = (rc == 2 and len(lines) == 1 and lines[0].startswith(f"error: {root}/") and message in lines[0]
          and not os.path.exists(workdir))
    return Outcome(f"hostile dataset: {case}", ok, None, False, lines[-1][7:].replace(root + "/", "") if lines else "")


def hostile_valid_trial(h: Harness, kind: str) -> Outcome:
    root = h.workdir("hostile-valid")
    os.makedirs(root)
    data_dir = hostile_copy(h.data_dir, root, duplicates=5 if kind == "duplicates" else 0,
                            zero_image=kind == "zero features")
    workdir = os.path.join(root, "run")
    rc, err, *_ = h.run(workdir, data_dir=data_dir)
    if rc != 0:
        return Outcome(f"valid but unusual dataset: {kind}", False, False, False, err.strip().splitlines()[-1])
    summary, rows = h.outputs(workdir)
    finite = all(np.isfinite(r["loss"]["total"]) for r in rows)
    equal = h.equal(workdir) if kind == "BOM + CRLF" else None
    note = {"BOM + CRLF": "parses as the clean file: results equal the reference",
            "duplicates": "5 duplicate training rows kept (as the reference); finite results",
            "zero features": "all-zero image features; finite results"}[kind]
    return Outcome(f"valid but unusual dataset: {kind}", finite, equal, False, note,
                   "n/a (other input: finite results)")


# ---- Report -------------------------------------------------------------------------------------------
def render(outcomes: list[Outcome], landings: collections.Counter, settings: dict, wall_s: float) -> str:
    table = collections.OrderedDict()
    for o in outcomes:
        row = table.setdefault(o.fault, {"n": 0, "survived": 0, "equal": 0, "compared": 0, "lost": 0, "notes": [],
                                         "na": o.na})
        row["n"] += 1
        row["survived"] += bool(o.survived)
        if o.equal is not None:
            row["compared"] += 1
            row["equal"] += bool(o.equal)
        row["lost"] += bool(o.lost)
        if o.note:
            row["notes"].append(o.note)
    lines = [
        "# Reliability: faults injected into real runs",
        "",
        f"Measured {settings['date']} on {settings['machine']} (CPU backend, jax {settings['jax']}, orbax-checkpoint "
        f"{settings['orbax']}), {wall_s / 60:.1f} min, with",
        "",
        f"    {settings['command']}",
        "",
        "Each run is `python -m lgmrec_jax.train --dataset=synthetic_tiny --data_dir=D --workdir=W` (tiny config: "
        "6 epochs, early stopping, a checkpoint per epoch, 2 kept plus the best, seed 999). After a fault the same "
        "command is rerun without it until it finishes; *equal* compares its summary.json and metrics.jsonl with "
        "an uninterrupted run's, wall-time fields left out. *Data lost* counts trials where, right after the "
        "fault, no checkpoint restored for an epoch metrics.jsonl had recorded, or where the finished rerun "
        "differs. How each fault is made: see the docstring of experiments/reliability.py.",
        "",
        "| Fault injected | Times | Survived | Results equal to the uninterrupted run | Data lost |",
        "|---|---:|---:|---:|---:|",
    ]
    for fault, row in table.items():
        equal = f"{row['equal']}/{row['compared']}" if row["compared"] else row["na"]
        lines.append(f"| {fault} | {row['n']} | {row['survived']}/{row['n']} | {equal} | {row['lost']} |")
    total_lost = sum(r["lost"] for r in table.values())
    lines += ["", f"Data lost in all: **{total_lost}**.", "", "## Where the random kills landed", "",
              "| Moment (judged from what the kill left in the workdir) | Kills |", "|---|---:|"]
    for where, n in landings.most_common():
        lines.append(f"| {where} | {n} |")
    lines += ["", "## Details", ""]
    for fault, row in table.items():
        if row["notes"]:
            notes = collections.Counter(row["notes"])
            shown = "; ".join(f"{k} (x{v})" if v > 1 else k for k, v in notes.most_common(12))
            lines.append(f"- **{fault}**: {shown}")
    lines += ["", "## Decisions on unusual but valid input", "",
              "- **UTF-8 BOM, Windows (CRLF) line endings**: accepted. They are encodings of the same table; "
              "the reader strips the BOM and splits on any line ending, and the run equals the clean file's.",
              "- **Duplicate interaction rows**: kept and counted (a warning says how many). The reference keeps "
              "them: its R matrix counts them and its normalised adjacency collapses them (SPEC §3.8 Q6); dropping "
              "them would change the numbers against the reference.",
              "- **All-zero features**: accepted. Zero is a legal feature value; the row normalisation is "
              "F.normalize's (x / max(|x|, 1e-12)), so zero rows stay zero with finite gradients.",
              "- **Extreme features (1e30)**: rejected. Above 1e15 the squared norms of the projected features "
              "overflow float32 and training would produce NaN; the file and row are named instead.",
              "- **Ids far beyond the data** (above int32, or a largest id more than 100x the distinct ids + 1e6): "
              "rejected; every id up to the largest gets an embedding row, so 1e10 would need terabytes.",
              "- **Ids beyond the feature rows**: rejected (feature row r is item r, so every item id needs a row).",
              "",
              "## What was simulated",
              "",
              "- Kills at chosen points use `LGMREC_FAULT` (run.py), which SIGKILLs the process itself at that "
              "point; `kill:save` replaces orbax's commit rename, so the kill lands with every file of the new "
              "checkpoint written and the step not yet committed. Random kills are real SIGKILLs from outside.",
              "- A full disk is simulated: `enospc:*` raises OSError(ENOSPC) at the write (the save: at its commit, "
              "after all files are written; metrics.jsonl: after half the line). The file size limit is a real "
              "kernel-level write failure (EFBIG) inside orbax/TensorStore.",
              "- Read-only workdirs: the process runs as root, so permission bits do not stop writes and "
              "mounts are unavailable; the workdir is placed below a regular file (ENOTDIR) or in /sys (EPERM).",
              ""]
    return "\n".join(lines)


def define_flags():
    from absl import flags

    flags.DEFINE_string("out", os.path.join(REPO, "experiments", "results", "reliability.md"), "Report path.")
    flags.DEFINE_string("scratch", "", "Directory for the runs (default: a temporary one, removed after).")
    flags.DEFINE_integer("random_kills", 10, "Trials of each random-SIGKILL mode.")
    flags.DEFINE_integer("max_kills", 3, "SIGKILLs per random-kill trial at most (each rerun is killed again).")
    flags.DEFINE_integer("repeats", 2, "Trials of each other fault (kill point, ENOSPC point, NaN, ...).")
    flags.DEFINE_integer("corruptions", 8, "Trials of the corrupted-checkpoint fault.")
    flags.DEFINE_integer("workers", 2, "Trials run at the same time.")
    flags.DEFINE_integer("seed", 0, "Seed of the random choices (kill times, epochs, files).")


def main(argv):
    from absl import flags, logging

    del argv
    FLAGS = flags.FLAGS
    logging.get_absl_handler().addFilter(  # orbax logs every restore of the checks at INFO
        lambda record: record.levelno >= logging.converter.STANDARD_WARNING or "orbax" not in record.pathname)
    started = time.time()
    root = FLAGS.scratch or tempfile.mkdtemp(prefix="lgmrec-reliability-")
    os.makedirs(root, exist_ok=True)
    data_dir = os.path.join(root, "data")
    from lgmrec_jax import checkpoint as ckpt_lib, configs, engine as engine_lib
    from lgmrec_jax.data import load_dataset
    import jax
    import orbax.checkpoint

    ds = load_dataset(data_dir, "synthetic_tiny")
    h = Harness(root, data_dir, FLAGS.seed)
    h.abstract = ckpt_lib.abstract_like(engine_lib.SingleEngine(configs.for_dataset("synthetic_tiny"), ds).init_state())

    # The reference; a second plain run times it with a warm compilation cache.
    ref_dir = h.workdir("reference")
    rc, err, *_ = h.run(ref_dir)
    assert rc == 0, err[-2000:]
    shutil.rmtree(ref_dir)
    rc, err, _, first, end = h.run(ref_dir)
    assert rc == 0 and first is not None, err[-2000:]
    summary, rows = h.outputs(ref_dir)
    h.ref = ((summary, rows), (end, first, end))
    logging.info("reference: %s epochs, %s, %.1fs (first epoch line at %.1fs)", summary["epochs_run"],
                 summary["status"], end, first)

    landings = collections.Counter()
    jobs = []
    for epochs_phase in (False, True):
        jobs += [lambda e=epochs_phase: random_kill_trial(h, e, FLAGS.max_kills, landings)] * FLAGS.random_kills
    for _ in range(FLAGS.repeats):
        jobs += [lambda p=p: point_kill_trial(h, p) for p in KILL_POINTS]
        jobs += [lambda p=p: enospc_trial(h, p) for p in ENOSPC_POINTS]
        jobs += [lambda: fsize_trial(h), lambda: nan_trial(h, "loss"), lambda: nan_trial(h, "params"),
                 lambda: second_run_trial(h)]
    jobs += [lambda: corrupt_trial(h, ref_dir)] * FLAGS.corruptions
    jobs += [lambda how=how: no_good_trial(h, ref_dir, how) for how in ("state", "dir")]
    jobs += [lambda how=how: unwritable_trial(h, how) for how in ("below a file", "in /sys")]
    jobs += [lambda i=i: hostile_trial(h, i) for i in range(len(HOSTILE))]
    jobs += [lambda k=k: hostile_valid_trial(h, k) for k in ("BOM + CRLF", "duplicates", "zero features")]

    outcomes = []
    with futures.ThreadPoolExecutor(max_workers=FLAGS.workers) as pool:
        for i, outcome in enumerate(pool.map(lambda job: job(), jobs)):
            outcomes.append(outcome)
            if not outcome.survived or outcome.lost or outcome.equal is False:
                logging.warning("trial %d: %s", i, outcome)
            if i % 10 == 0:
                logging.info("%d/%d trials", i + 1, len(jobs))
    order = {}
    outcomes.sort(key=lambda o: order.setdefault(o.fault, len(order)))
    settings = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "jax": jax.__version__, "orbax": orbax.checkpoint.__version__,
        "command": "python -m experiments.reliability " + " ".join(
            f"--{name}={FLAGS[name].value}" for name in ("random_kills", "max_kills", "repeats", "corruptions",
                                                        "workers", "seed")),
    }
    report = render(outcomes, landings, settings, time.time() - started)
    os.makedirs(os.path.dirname(FLAGS.out), exist_ok=True)
    with open(FLAGS.out, "w") as handle:
        handle.write(report)
    print(report)
    if not FLAGS.scratch:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
