"""What the benchmark scripts share: the machine and code a measurement ran on, waiting for a quiet
machine, timing a call, and their reports' files.

bench.py, bench_grid.py, topk_bench.py, precision_emulation.py and torch_proxy.py import these rather
than one another. A report is a JSON file and its Markdown rendering, written together: both
temporary files first, then both renamed, so a failed write (a full disk) leaves the previous pair.
The reference's timings that several reports quote beside ours are here too.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from typing import Callable, Optional

from absl import logging

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The authors' PyTorch code on this project's 2-core CPU machine, baby scale, steady state.
REFERENCE_CPU = {"synthetic_baby": {"epoch_s": 45.0}}
# The authors' code on one H100 at clothing scale, steady state.
REFERENCE_GPU = {"synthetic_clothing": {"epoch_s": 3.0, "eval_s": 4.7}}


# ----------------------------------------------------------------------------------- machine and code


def git(*args: str) -> str:
    """``git ARGS`` in the checkout ("" where git or the repository is not there)."""
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def git_state() -> dict:
    changed = [line[3:] for line in git("status", "--porcelain", "--", "lgmrec_jax").splitlines()]
    return {"commit": git("rev-parse", "HEAD").strip(), "lgmrec_jax_uncommitted": changed}


def code_fingerprint() -> str:
    """sha256 (12 hex) of lgmrec_jax/*.py as they are on disk when a configuration starts: the working
    tree may change between configurations while other people work in it."""
    import hashlib

    digest = hashlib.sha256()
    package = os.path.join(REPO, "lgmrec_jax")
    for name in sorted(os.listdir(package)):
        if name.endswith(".py"):
            with open(os.path.join(package, name), "rb") as handle:
                digest.update(name.encode() + b"\0" + handle.read())
    return digest.hexdigest()[:12]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine() -> dict:
    """The backend, its first device's kind, the host, the versions and the commit."""
    import jax

    from lgmrec_jax.workdir import versions

    dev = jax.devices()[0]
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        mem_gib = None
    return {"backend": jax.default_backend(), "device_kind": dev.device_kind, "device_count": jax.device_count(),
            "cpu": cpu_model(), "cpu_count": os.cpu_count(), "host_memory_gib": mem_gib,
            "platform": platform.platform(), "versions": versions(), "git": git_state()}


# ----------------------------------------------------------------------------------- a quiet machine


class CpuMeter:
    """Process CPU seconds and the share of the machine's CPU capacity used by *other* processes
    over an interval (from /proc/stat and os.times), to tell contended measurements apart.

    A shared CPU machine skews wall-clock times; ``others_share`` near 0 means the measurement had
    the machine to itself, 0.5 on a 2-core machine means another process kept one core busy.
    """

    def __init__(self):
        self.start = self._snapshot()

    @staticmethod
    def _snapshot():
        times = os.times()
        own = times.user + times.system
        try:
            with open("/proc/stat") as handle:
                fields = [int(x) for x in handle.readline().split()[1:]]
            tick = os.sysconf("SC_CLK_TCK")
            idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
            total = sum(fields[:8])
            return own, (total - idle) / tick, total / tick
        except (OSError, ValueError, IndexError):
            return own, None, None

    def stop(self) -> dict:
        own1, busy1, total1 = self._snapshot()
        own0, busy0, total0 = self.start
        out = {"cpu_s": own1 - own0}
        # /proc/stat counts in clock ticks (10 ms): intervals under 0.5 s per CPU give no usable share.
        if busy0 is not None and total1 - total0 > 0.5 * (os.cpu_count() or 1):
            out["others_share"] = min(max((busy1 - busy0 - (own1 - own0)) / (total1 - total0), 0.0), 1.0)
        return out


def others_busy(seconds: float = 2.0) -> Optional[float]:
    """Share of the machine's CPU capacity used by other processes over ``seconds``."""
    meter = CpuMeter()
    time.sleep(seconds)
    return meter.stop().get("others_share")


def wait_idle(max_wait_s: float, threshold: float = 0.2) -> Optional[float]:
    """Waits (up to max_wait_s) until other processes use under ``threshold`` of the CPUs; returns the
    share last seen."""
    deadline = time.time() + max_wait_s
    share = others_busy()
    while share is not None and share > threshold and time.time() < deadline:
        logging.info("other processes use %.0f%% of the CPUs; waiting", 100 * share)
        time.sleep(10)
        share = others_busy()
    return share


def wait_low_load(limit_s: float) -> dict:
    """Waits (up to limit_s) for the 1-minute load average to fall below half the usable cores; returns
    the load average seen when starting."""
    deadline = time.time() + limit_s
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    while time.time() < deadline and os.getloadavg()[0] >= cores / 2:
        time.sleep(5)
    return {"loadavg_at_start": os.getloadavg()}


# ----------------------------------------------------------------------------------- timing


def timed(fn: Callable):
    """(fn(), wall seconds until its result is ready on the device)."""
    import jax

    tick = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    return out, time.perf_counter() - tick


def median(values):
    values = sorted(values)
    n = len(values)
    return None if not n else (values[n // 2] if n % 2 else 0.5 * (values[n // 2 - 1] + values[n // 2]))


# ----------------------------------------------------------------------------------- report files


class ReportError(ValueError):
    """An earlier report cannot be read; the message is one line naming the file."""


def read_json(path: str):
    """The JSON value in ``path``, None if there is no such file; ReportError if it is not JSON."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as handle:
            return json.load(handle)
    except ValueError as err:
        raise ReportError(f"{path}: not valid JSON ({err})") from None


def json_text(payload, indent: int = 2, sort_keys: bool = True) -> str:
    return json.dumps(payload, indent=indent, sort_keys=sort_keys) + "\n"


def write_texts(texts: dict[str, str]) -> None:
    """Writes each path's text: every temporary file first (synced), then each renamed over its path,
    so a failed write leaves the previous files and no temporary one."""
    tmps = {f"{path}.tmp": path for path in texts}
    try:
        for tmp, path in tmps.items():
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with open(tmp, "w") as handle:
                handle.write(texts[path])
                handle.flush()
                os.fsync(handle.fileno())
        for tmp, path in tmps.items():
            os.replace(tmp, path)
    finally:
        for tmp in tmps:
            if os.path.exists(tmp):
                os.remove(tmp)
