"""Reads the log files the reference writes (MMRec's ``quick_start``, as the authors' LGMRec code runs it).

One invocation of the reference writes one log: a config block (``key=value`` lines), the dataset
statistics, then for each hyperparameter tuple it loops over (seeds included) a header
``=========k/n: Parameters:[names]=(values)=======``, the model summary, one ``epoch N training [...]`` /
``epoch N evaluating [...]`` pair per epoch with its ``valid result:`` and ``test result:`` blocks, an
``updated`` line when the epoch is the best so far, ``+++++Finished training`` when early stopping ended
the tuple, and the tuple's ``best valid result`` / ``test result`` lines; after the last tuple the
``Current BEST``, ``All Over`` and ``BEST`` blocks. This module only parses: it returns what the file
says, with warnings for what is inconsistent or cut off, and raises :class:`LogError` (one line naming
the file and line) for a file that is not such a log. It imports neither jax nor numpy.
"""

from __future__ import annotations

import ast
import dataclasses
import glob
import os
import re
from typing import Optional

# MMRec's logger: '%(asctime)s %(levelname)s %(message)s' with the date as 'Sat 12 Aug 2023 20:35:58'.
PREFIX = re.compile(r"^[A-Z][a-z]{2} \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} [A-Z]+ ?")
CONFIG_LINE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$")
HEADER = re.compile(r"^=+(\d+)/(\d+): Parameters:(\[.*?\])=\((.*)\)=+\s*$")
TRAINING = re.compile(r"^epoch (\d+) training \[time: ([-+0-9.eE]+)s, (.*)\]\s*$")
LOSS = re.compile(r"train[ _]loss\d*: ([-+0-9.eEnaif]+)")
EVALUATING = re.compile(r"^epoch (\d+) evaluating \[time: ([-+0-9.eE]+)s, valid_score: ([-+0-9.eEnaif]+)\]\s*$")
METRIC = re.compile(r"([a-z]+@\d+): ([-+0-9.eEnaif]+)")
UPDATED = re.compile(r"^██ .*--Best validation results updated!!!\s*$")
FINISHED = re.compile(r"^\+{5}Finished training, best eval result in epoch (\d+)\s*$")
EMBEDDING = re.compile(r"^\s*\((user_embedding|item_id_embedding)\): Embedding\((\d+), (\d+)\)")
PARAMETERS = re.compile(r"^\s*Parameters: (\[.*?\])=\((.*)\),?\s*$")
STAT = re.compile(r"^The number of (users|items|inters): (\d+)\s*$")
SPLITS = {"====Training====": "train", "====Validation====": "valid", "====Testing====": "test"}


class LogError(ValueError):
    """The file is not a readable log of the reference; the message is one line for the user."""


@dataclasses.dataclass
class Epoch:
    """One epoch of one tuple: training time and summed loss, evaluation time, valid/test metrics."""

    epoch: int
    train_s: float
    train_loss: float
    line: int
    eval_s: Optional[float] = None
    valid_score: Optional[float] = None
    valid: Optional[dict] = None
    test: Optional[dict] = None
    improved: bool = False  # the reference logged "Best validation results updated" after it

    @property
    def complete(self) -> bool:
        return self.valid is not None and self.test is not None


@dataclasses.dataclass
class TupleRun:
    """One ``Parameters:[...]=(...)`` tuple: one training run of the reference."""

    index: int  # k of "k/n", 1-based
    total: int
    params: dict
    line: int
    epochs: list = dataclasses.field(default_factory=list)
    n_users: Optional[int] = None  # the model's embedding rows (max id + 1)
    n_items: Optional[int] = None
    stopped_early: bool = False
    stop_best_epoch: Optional[int] = None  # from "+++++Finished training, best eval result in epoch N"
    best_valid: Optional[dict] = None  # the tuple's final "best valid result" line
    best_test: Optional[dict] = None  # ... and its "test result" line
    complete: bool = False  # the final lines were written (the run was not cut off)

    @property
    def seed(self):
        return self.params.get("seed")

    @property
    def best_epoch(self) -> Optional[int]:
        """The epoch the reference's early stopping kept: the last one it logged as an update."""
        improved = [e.epoch for e in self.epochs if e.improved and e.complete]
        return improved[-1] if improved else None

    def best(self) -> Optional[Epoch]:
        best = self.best_epoch
        return next((e for e in self.epochs if e.epoch == best), None)


@dataclasses.dataclass
class ReferenceLog:
    """What one log file says."""

    path: str
    config: dict
    stats: dict  # {"all"|"train"|"valid"|"test": {"users": n, "items": n, "inters": n}}
    runs: list
    all_over: list  # [{"params": {...}, "valid": {...}, "test": {...}}] of the "All Over" block
    warnings: list

    @property
    def dataset(self) -> Optional[str]:
        return self.config.get("dataset")


def _value(text: str):
    """A config value as the reference's configurator would hold it (lists, numbers, bools), else text."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


def _metrics(text: str) -> dict:
    return {name: float(value) for name, value in METRIC.findall(text)}


def _params(names_text: str, values_text: str, where: str) -> dict:
    try:
        names = ast.literal_eval(names_text)
        values = ast.literal_eval(f"({values_text},)")
    except (ValueError, SyntaxError):
        raise LogError(f"{where}: cannot read the Parameters tuple {names_text}=({values_text})") from None
    if not isinstance(names, list) or len(names) != len(values):
        raise LogError(f"{where}: the Parameters tuple has {len(values)} values for {names!r}")
    return dict(zip(names, values))


class _Parser:
    def __init__(self, path: str, lines: list[str]):
        self.path, self.lines = path, lines
        self.config, self.stats, self.runs, self.all_over, self.warnings = {}, {}, [], [], []
        self.split = "all"
        self.pending = None  # "valid" | "test": the next line holds that block's metrics
        self.section = None  # None | "all_over" | "best": the final blocks
        self.closed = set()  # ids of the tuples already checked
        self.metric_names = None  # the keys every metrics line must hold

    def where(self, number: int) -> str:
        return f"{self.path} line {number}"

    @property
    def run(self) -> Optional[TupleRun]:
        return self.runs[-1] if self.runs else None

    def epoch(self) -> Optional[Epoch]:
        run = self.run
        return run.epochs[-1] if run and run.epochs else None

    def parse(self) -> ReferenceLog:
        for number, raw in enumerate(self.lines, start=1):
            self.line(number, raw.rstrip("\n"))
        if not self.config and not self.runs:
            raise LogError(f"{self.path}: not a log of the reference (MMRec quick_start): no config block and no "
                           f"'Parameters:[...]=(...)' tuple")
        self.finish()
        return ReferenceLog(path=self.path, config=self.config, stats=self.stats, runs=self.runs,
                            all_over=self.all_over, warnings=self.warnings)

    def line(self, number: int, raw: str) -> None:
        prefix = PREFIX.match(raw)
        text = raw[prefix.end():] if prefix else raw
        if self.pending:
            split, self.pending = self.pending, None
            values = self.metrics(number, text, f"the {split} metrics after '{split} result:'")
            if values is not None:
                setattr(self.epoch(), split, values)
            return
        if not self.runs and not prefix:
            config = CONFIG_LINE.match(text)
            if config and not self.stats:
                self.config[config.group(1)] = _value(config.group(2))
                return
            stat = STAT.match(text)
            if stat:
                self.stats.setdefault(self.split, {})[stat.group(1)] = int(stat.group(2))
                return
            if text.strip() in SPLITS:
                self.split = SPLITS[text.strip()]
                return
        header = HEADER.match(text)
        if header:
            self.close_run(number)
            index, total = int(header.group(1)), int(header.group(2))
            params = _params(header.group(3), header.group(4), self.where(number))
            self.runs.append(TupleRun(index=index, total=total, params=params, line=number))
            self.section = None
            return
        if text.startswith("============All Over"):
            self.close_run(number)
            self.section = "all_over"
            return
        if "BEST" in text and text.strip().startswith("█") and "Current" not in text:
            self.section = "best"
            return
        if self.section == "all_over":
            self.final_block(number, text)
            return
        if self.section == "best":
            return
        run = self.run
        if run is None:
            return  # the dataset statistics and anything else before the first tuple
        self.in_run(number, text, run)

    def in_run(self, number: int, text: str, run: TupleRun) -> None:
        training = TRAINING.match(text)
        if training:
            loss = LOSS.findall(training.group(3))
            if not loss:
                raise LogError(f"{self.where(number)}: expected 'train loss: X' in the training line")
            run.epochs.append(Epoch(epoch=int(training.group(1)), train_s=float(training.group(2)),
                                    train_loss=sum(float(x) for x in loss), line=number))
            return
        evaluating = EVALUATING.match(text)
        epoch = self.epoch()
        if evaluating:
            if epoch is None or epoch.epoch != int(evaluating.group(1)) or epoch.eval_s is not None:
                raise LogError(f"{self.where(number)}: 'epoch {evaluating.group(1)} evaluating' without its "
                               f"'epoch {evaluating.group(1)} training' line")
            epoch.eval_s, epoch.valid_score = float(evaluating.group(2)), float(evaluating.group(3))
            return
        stripped = text.strip()
        if stripped in ("valid result:", "test result:"):
            split = stripped.split()[0]
            if epoch is None or epoch.eval_s is None:
                raise LogError(f"{self.where(number)}: '{stripped}' outside an evaluated epoch")
            self.pending = split
            return
        if UPDATED.match(text):
            if epoch is not None:
                epoch.improved = True
            return
        finished = FINISHED.match(text)
        if finished:
            run.stopped_early, run.stop_best_epoch = True, int(finished.group(1))
            return
        if text.startswith("best valid result:"):
            run.best_valid = _metrics(text)
            return
        if text.startswith("test result:") and METRIC.search(text):
            run.best_test = self.metrics(number, text, "the tuple's final test metrics")
            run.complete = run.best_test is not None
            return
        embedding = EMBEDDING.match(text)
        if embedding:
            rows = int(embedding.group(2))
            if embedding.group(1) == "user_embedding":
                run.n_users = rows
            else:
                run.n_items = rows

    def metrics(self, number: int, text: str, what: str) -> Optional[dict]:
        """The metrics of a line; None for a last line cut off inside them (a killed run)."""
        values = _metrics(text)
        if self.metric_names is None:
            names = self.config.get("metrics"), self.config.get("topk")
            if all(isinstance(n, list) for n in names):
                self.metric_names = {f"{m.lower()}@{k}" for m in names[0] for k in names[1]}
            elif values:
                self.metric_names = set(values)
        if values and set(values) == self.metric_names:
            return values
        if number == len(self.lines) and values and set(values) < self.metric_names:
            self.warnings.append(f"{self.where(number)}: the last line is cut off inside {what}")
            return None
        raise LogError(f"{self.where(number)}: expected {what} ({', '.join(sorted(self.metric_names or ['recall@20']))}), "
                       f"found {text[:60]!r}")

    def final_block(self, number: int, text: str) -> None:
        params = PARAMETERS.match(text)
        if params:
            self.all_over.append({"params": _params(params.group(1), params.group(2), self.where(number)),
                                  "valid": None, "test": None})
        elif self.all_over and text.strip().startswith("best valid:"):
            self.all_over[-1]["valid"] = _metrics(text)
        elif self.all_over and text.strip().startswith("best test:"):
            self.all_over[-1]["test"] = _metrics(text)

    def close_run(self, number: int) -> None:
        """Checks the tuple that ends here; a tuple without its final lines is a cut-off run."""
        run = self.run
        if run is None or id(run) in self.closed:
            return
        self.closed.add(id(run))
        label = f"tuple {run.index}/{run.total} (seed {run.seed})"
        if run.epochs and not run.epochs[-1].complete:
            dropped = run.epochs.pop()
            self.warnings.append(f"{self.path} line {dropped.line}: {label}: epoch {dropped.epoch} is incomplete "
                                 f"(no valid/test result); dropped")
        if not run.complete:
            self.warnings.append(f"{self.path}: {label} ends after {len(run.epochs)} complete epochs without its "
                                 f"final result: the run was cut off (truncated log); its epochs are kept, it has no "
                                 f"best-epoch result")
            return
        best = run.best()
        if run.stop_best_epoch is not None and run.stop_best_epoch != run.best_epoch:
            self.warnings.append(f"{self.path}: {label}: 'Finished training' names epoch {run.stop_best_epoch}, the "
                                 f"update lines epoch {run.best_epoch}")
        if best is not None and (best.valid != run.best_valid or best.test != run.best_test):
            self.warnings.append(f"{self.path}: {label}: the final 'best valid result' / 'test result' lines differ "
                                 f"from epoch {best.epoch}'s blocks; the epoch's blocks are used")

    def finish(self) -> None:
        self.close_run(len(self.lines))
        if self.pending:
            self.warnings.append(f"{self.path}: ends before the {self.pending} metrics of the last epoch")
        if self.runs and self.runs[-1].index < self.runs[-1].total:
            last = self.runs[-1]
            self.warnings.append(f"{self.path}: holds tuples up to {last.index} of {last.total}: the invocation did "
                                 f"not finish")
        by_params = {_key(run.params): run for run in self.runs}
        for entry in self.all_over:
            run = by_params.get(_key(entry["params"]))
            best = run.best() if run else None
            if best is not None and entry["test"] is not None and entry["test"] != best.test:
                changed = sorted(k for k in best.test if entry["test"].get(k) != best.test[k])
                self.warnings.append(f"{self.path}: the 'All Over' block's test result of tuple {run.index}/{run.total} "
                                     f"differs from its best epoch's ({', '.join(changed)}); the epoch's are used")


def _key(params: dict) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in params.items()))


def parse_text(text: str, path: str = "<text>") -> ReferenceLog:
    return _Parser(path, text.splitlines()).parse()


def read_log(path: str) -> ReferenceLog:
    """Parses one log file; :class:`LogError` when it cannot be read or is not the reference's log."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except UnicodeDecodeError as err:
        raise LogError(f"{path}: not a log of the reference (not UTF-8 text: {err.reason} at byte {err.start})") from None
    except OSError as err:
        raise LogError(f"{path}: cannot read ({err.strerror})") from None
    return parse_text(text, path)


def expand(spec: str, is_member, what: str) -> list[str]:
    """``a,b,DIR,GLOB`` as paths: a directory stands for its members (``is_member(path)``), a glob for its
    matches; every part must name at least one. Sorted within a part, in the order given across parts."""
    paths = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if os.path.isdir(part) and not is_member(part):
            found = sorted(os.path.join(part, name) for name in os.listdir(part)
                           if is_member(os.path.join(part, name)))
        elif glob.has_magic(part):
            found = sorted(glob.glob(part))
        else:
            found = [part] if os.path.exists(part) else []
            if not found:
                raise LogError(f"{part}: no such {what}")
        if not found:
            raise LogError(f"{part}: names no {what}")
        paths.extend(p for p in found if p not in paths)
    if not paths:
        raise LogError(f"no {what} given")
    return paths


def log_files(spec: str) -> list[str]:
    """The files ``spec`` names (``LOG[,LOG...]``; a directory stands for its ``*.log`` files)."""
    return expand(spec, lambda p: os.path.isfile(p) and p.endswith(".log"), "log file")
