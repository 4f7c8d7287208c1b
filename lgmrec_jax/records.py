"""The records a run writes in its workdir: what an epoch row of ``metrics.jsonl`` must hold for the
readers of a workdir, and which fields are timings (the only fields in which two equal runs differ)."""

from __future__ import annotations

import json
from typing import Optional

TIMING_KEYS = ("train_s", "eval_s", "time_s", "total_wall_s")


def strip_timing(obj):
    """``obj`` (rows, a summary, nested) without its timing fields: what must be equal between a run
    and its resumed, sharded or grid twin."""
    if isinstance(obj, dict):
        return {k: strip_timing(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [strip_timing(v) for v in obj]
    return obj


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def row_problem(row) -> Optional[str]:
    """What is wrong with an epoch row of metrics.jsonl (an integer epoch; a loss object with its
    total; valid/test, where present, metric -> number; an integer best_epoch), or None."""
    if not isinstance(row, dict) or not isinstance(row.get("epoch"), int) or isinstance(row["epoch"], bool):
        return "expected a JSON object with an integer 'epoch'"
    loss = row.get("loss")
    if not isinstance(loss, dict) or not _is_number(loss.get("total")):
        return "expected 'loss' to be an object with a number 'total'"
    for split in ("valid", "test"):
        if split in row and not (isinstance(row[split], dict) and all(map(_is_number, row[split].values()))):
            return f"expected {split!r} to be an object of metric -> number"
    if "best_epoch" in row and not isinstance(row["best_epoch"], int):
        return "expected 'best_epoch' to be an integer"
    return None


# summary.json's status: how a config's training ended (or "interrupted", returned for one that has not).
FINISHED = ("early_stopped", "max_epochs")  # ended normally
NON_FINITE = "non_finite"  # stopped by a NaN/inf loss or parameter
FINAL_STATUSES = FINISHED + (NON_FINITE,)
INTERRUPTED = "interrupted"
LOSS_PARTS = ("total", "bpr", "hcl", "reg")  # the loss object of a row, summed over the epoch's steps


def read_summary(path: str) -> Optional[dict]:
    """A summary.json as a dict; None when it is missing or unreadable."""
    try:
        with open(path) as handle:
            summary = json.load(handle)
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None
