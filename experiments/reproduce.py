"""Reproduces the reference's logged LGMRec results on Baby, Sports and Clothing, side by side.

    python -m experiments.reproduce --data_dir=./data --reference_logs=LOGDIR   # all three, legacy variant
    python -m experiments.reproduce --data_dir=./data --variant=fixed --datasets=baby
    python -m experiments.reproduce --synthetic --config_overrides=epochs=2   # smoke run, no real data

Each dataset trains with the paper's settings in ``<workdir_root>/<variant>/<name>`` (a rerun resumes),
then ``reproduction.md`` and ``.json`` set our best epoch and metrics beside the numbers the reference's
log files hold (``--reference_logs``, read by lgmrec_jax.reference_log). ``--variant=legacy`` (default)
is the revision behind the logs; ``--synthetic`` swaps in the ``synthetic_<name>`` presets (marked not
comparable). Exit 0 when every dataset ran, 1 when one failed, 2 for a bad command line.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Optional

from absl import app, flags, logging

from lgmrec_jax import distributed
from lgmrec_jax.cli import fail, parse_flags, setup_logging

PAPER_DATASETS = ("baby", "sports", "clothing")
VARIANTS = ("legacy", "fixed")

# The reference's numbers come from its own log files (``--reference_logs``; the authors' published logs
# are log/LGMRec-{baby,sports,clothing}-Aug-12-2023-*.log of georgeguo-cn/LGMRec, seed 999, legacy
# variant), read by lgmrec_jax.reference_log: the test metrics at the best-validation epoch as logged at
# that epoch, and n_users / n_items as the model's embedding sizes (SPEC §1.7, §6.1).

# (label, split, key): the rows of each side-by-side table; split None is a summary field.
COMPARED = (
    ("best epoch", None, "best_epoch"),
    ("valid R@20", "valid", "recall@20"),
    ("test R@10", "test", "recall@10"),
    ("test R@20", "test", "recall@20"),
    ("test N@10", "test", "ndcg@10"),
    ("test N@20", "test", "ndcg@20"),
    ("test P@20", "test", "precision@20"),
    ("test MAP@20", "test", "map@20"),
)
VARIANT_KEY = "legacy_text_user_hyper"


class ReproduceError(RuntimeError):
    """A bad request (flag or override); the message is one line for the user."""


# ---------------------------------------------------------------------------------------------------------
# Config: the paper's settings, the variant, the overrides


def convert_value(key: str, text: str, current):
    """``text`` as the type of the config's current value (bool before int: bool is an int)."""
    try:
        if isinstance(current, bool):
            if text.lower() in ("true", "1", "yes"):
                return True
            if text.lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
    except ValueError:
        raise ReproduceError(f"--config_overrides: {key}={text!r} is not a {type(current).__name__}") from None
    return text


def parse_overrides(text: str) -> dict:
    """``key=value,key=value`` into a dict of typed values, checked against the default config's keys."""
    from lgmrec_jax.configs import default

    known = default.get_config()
    overrides = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise ReproduceError(f"--config_overrides: {item!r} is not key=value")
        if key == VARIANT_KEY:
            raise ReproduceError(f"--config_overrides: set {VARIANT_KEY} with --variant=legacy|fixed")
        if key not in known:
            raise ReproduceError(f"--config_overrides: unknown config key {key!r}; known keys: "
                                 f"{', '.join(sorted(known.keys()))}")
        overrides[key] = convert_value(key, value.strip(), known[key])
    return overrides


def config_for(paper_name: str, variant: str, overrides: dict):
    from lgmrec_jax import configs

    cfg = configs.for_dataset(paper_name)
    cfg[VARIANT_KEY] = variant == "legacy"
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


# ---------------------------------------------------------------------------------------------------------
# Which data, which workdir


def data_name(paper_name: str, synthetic: bool, synthetic_preset: Optional[str]) -> str:
    if not synthetic:
        return paper_name
    return f"synthetic_{synthetic_preset or paper_name}"


def run_dir(workdir_root: str, variant: str, paper_name: str, data: str) -> str:
    """``<root>/<variant>/<name>``, and ``<name>-<data>`` when the data is a stand-in, so that a
    synthetic run never meets a real one in the same workdir."""
    leaf = paper_name if data == paper_name else f"{paper_name}-{data}"
    return os.path.join(workdir_root, variant, leaf)


# ---------------------------------------------------------------------------------------------------------
# Comparison


def ours_value(summary: dict, split: Optional[str], key: str):
    if split is None:
        value = summary.get(key)
        return None if value is None or value < 0 else value  # best_epoch -1: nothing evaluated
    return (summary.get(f"best_{split}") or {}).get(key)


def reference_from_logs(spec: str) -> dict:
    """{dataset: {"best_epoch", "n_users", "n_items", "valid", "test", "source"}} from the reference's log
    files ``spec`` (comma-separated; a directory stands for its *.log files): per dataset the log's first
    finished tuple, at its best-validation epoch."""
    from lgmrec_jax import reference_log

    found = {}
    try:
        logs = [reference_log.read_log(path) for path in reference_log.log_files(spec)]
    except reference_log.LogError as err:
        raise ReproduceError(f"--reference_logs: {err}") from None
    for log in logs:
        run = next((r for r in log.runs if r.complete and r.best() is not None), None)
        if log.dataset not in PAPER_DATASETS or run is None or log.dataset in found:
            continue
        best = run.best()
        found[log.dataset] = {"best_epoch": best.epoch, "n_users": run.n_users or log.stats["all"]["users"],
                              "n_items": run.n_items or log.stats["all"]["items"], "valid": best.valid,
                              "test": best.test, "source": f"{log.path} (seed {run.seed})"}
    return found


def reference_value(reference: dict, paper_name: str, split: Optional[str], key: str):
    """The logged value, None when no log of that dataset was given."""
    ref = reference.get(paper_name)
    if ref is None:
        return None
    return ref[key] if split is None else ref[split].get(key)


def comparison_rows(paper_name: str, summary: dict, reference: dict) -> list[dict]:
    rows = []
    for label, split, key in COMPARED:
        ours, ref = ours_value(summary, split, key), reference_value(reference, paper_name, split, key)
        difference = None
        if ours is not None and ref is not None:
            difference = ours - ref if split is None else round(ours - ref, 4)
        rows.append({"label": label, "split": split, "key": key, "ours": ours, "reference": ref,
                     "difference": difference})
    return rows


def not_comparable_reasons(paper_name: str, data: str, n_users: int, n_items: int, overrides: dict,
                           reference: dict) -> list[str]:
    reasons = []
    ref = reference.get(paper_name)
    if ref is None:
        reasons.append(f"no reference log of {paper_name} given (--reference_logs)")
    if data != paper_name:
        reasons.append(f"synthetic data ({data}), not the Amazon {paper_name} benchmark")
    elif ref is not None and (n_users, n_items) != (ref["n_users"], ref["n_items"]):
        reasons.append(f"the data has {n_users} users / {n_items} items, the logged {paper_name} "
                       f"{ref['n_users']} / {ref['n_items']}")
    if overrides:
        reasons.append("config overrides: " + ", ".join(f"{k}={v}" for k, v in overrides.items()))
    return reasons


# ---------------------------------------------------------------------------------------------------------
# Running


def run_one(paper_name: str, request: dict) -> dict:
    """Trains (or resumes, or reuses) one dataset's run; returns its entry of reproduction.json."""
    from lgmrec_jax.data import DatasetError, load_dataset
    from lgmrec_jax.run import NonFiniteError, RunError, train_and_evaluate

    data = data_name(paper_name, request["synthetic"], request["synthetic_preset"])
    workdir = run_dir(request["workdir_root"], request["variant"], paper_name, data)
    entry = {"dataset": paper_name, "data": data, "workdir": workdir, "error": None}
    try:
        ds = load_dataset(request["data_dir"], data)
    except DatasetError as err:
        entry["error"] = str(err)
    # Under jax.distributed a run spans every process: all of them train this dataset, or none does.
    if not distributed.all_true(entry["error"] is None):
        entry["error"] = entry["error"] or "its data cannot be loaded on another process (see that process's log)"
        return entry
    try:
        cfg = config_for(paper_name, request["variant"], request["config_overrides"])
        logging.info("%s: training on %s in %s", paper_name, data, workdir)
        summary = train_and_evaluate(cfg, ds, workdir, restart=request["restart"])
    except (DatasetError, RunError, NonFiniteError) as err:
        entry["error"] = str(err)
        return entry
    reference = request.get("reference", {})
    reasons = not_comparable_reasons(paper_name, data, ds.n_users, ds.n_items, request["config_overrides"], reference)
    entry.update(status=summary.get("status"), epochs_run=summary.get("epochs_run"),
                 total_wall_s=summary.get("total_wall_s"), comparable=not reasons,
                 not_comparable_because=reasons, rows=comparison_rows(paper_name, summary, reference))
    return entry


def reproduce(request: dict) -> dict:
    """Runs every requested dataset, writes reproduction.{md,json}; returns the JSON payload.

    ``request`` keys: datasets, variant, data_dir, workdir_root, synthetic, synthetic_preset,
    config_overrides (a dict), restart, and optionally reference (:func:`reference_from_logs`).
    """
    from lgmrec_jax import __version__

    entries = {name: run_one(name, request) for name in request["datasets"]}
    payload = {
        "variant": request["variant"],
        VARIANT_KEY: request["variant"] == "legacy",
        "config_overrides": request["config_overrides"],
        "synthetic": request["synthetic"],
        "synthetic_preset": request["synthetic_preset"],
        "reference_source": "; ".join(ref["source"] for ref in request.get("reference", {}).values()) or None,
        "lgmrec_jax_version": __version__,
        "datasets": entries,
    }
    if distributed.is_primary():  # under jax.distributed the runs' files are process 0's too
        write_outputs(request["workdir_root"], payload)
    return payload


# ---------------------------------------------------------------------------------------------------------
# reproduction.md / reproduction.json


def fmt_value(value, is_epoch: bool) -> str:
    if value is None:
        return "-"
    return str(value) if is_epoch else f"{value:.4f}"


def fmt_difference(value, is_epoch: bool) -> str:
    if value is None:
        return "-"
    return f"{value:+d}" if is_epoch else f"{value:+.4f}"


def dataset_section(entry: dict, variant: str) -> list[str]:
    lines = [f"## {entry['dataset']}", ""]
    if entry["error"]:
        return lines + [f"Data `{entry['data']}`, run `{entry['workdir']}`: **error**: {entry['error']}", ""]
    wall = "-" if entry["total_wall_s"] is None else f"{entry['total_wall_s']:.1f} s"
    lines.append(f"Data `{entry['data']}`, run `{entry['workdir']}`: {entry['status']} after "
                 f"{entry['epochs_run']} epochs, {wall}.")
    lines.append("")
    if entry["comparable"]:
        lines.append("Comparable with the reference: yes.")
    else:
        lines.append("Comparable with the reference: **no** (the reference column is for orientation only): "
                     + "; ".join(entry["not_comparable_because"]) + ".")
    if variant == "fixed":
        lines.append("The reference ran the legacy variant; the differences include the effect of the fix.")
    lines += ["", "| | ours | reference (log) | ours − reference |", "|---|---:|---:|---:|"]
    for row in entry["rows"]:
        is_epoch = row["split"] is None
        lines.append(f"| {row['label']} | {fmt_value(row['ours'], is_epoch)} | "
                     f"{fmt_value(row['reference'], is_epoch)} | {fmt_difference(row['difference'], is_epoch)} |")
    return lines + [""]


def format_markdown(payload: dict) -> str:
    overrides = payload["config_overrides"]
    lines = [
        "# LGMRec reproduction: ours vs the reference's logs",
        "",
        f"- Variant: **{payload['variant']}** (`{VARIANT_KEY}={payload[VARIANT_KEY]}`; the logs were made "
        f"with the legacy one, SPEC §3.8 Q1).",
        f"- Reference: {payload['reference_source'] or 'no log given (--reference_logs)'}; test metrics at the "
        f"best-validation epoch as logged at that epoch.",
        "- Config overrides: " + (", ".join(f"`{k}={v}`" for k, v in overrides.items()) if overrides else "none")
        + ".",
        f"- lgmrec_jax {payload['lgmrec_jax_version']}, written by `experiments/reproduce.py`.",
        "",
    ]
    for entry in payload["datasets"].values():
        lines += dataset_section(entry, payload["variant"])
    return "\n".join(lines)


def write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def every_dataset_failed(payload: dict) -> bool:
    return all(entry["error"] for entry in payload["datasets"].values())


def write_outputs(workdir_root: str, payload: dict) -> None:
    """reproduction.{json,md} of this invocation, except that one in which every dataset failed (a wrong
    --data_dir) leaves an earlier pair in place: it would hold nothing but errors."""
    if every_dataset_failed(payload) and os.path.exists(os.path.join(workdir_root, "reproduction.json")):
        return
    os.makedirs(workdir_root, exist_ok=True)
    write_text_atomic(os.path.join(workdir_root, "reproduction.json"),
                      json.dumps(payload, indent=2, sort_keys=True) + "\n")
    write_text_atomic(os.path.join(workdir_root, "reproduction.md"), format_markdown(payload))


# ---------------------------------------------------------------------------------------------------------
# Command line


def request_from_flags(values) -> dict:
    """The flags as a request for :func:`reproduce`, after checking them."""
    from lgmrec_jax.synthetic import PRESETS
    from lgmrec_jax import configs

    datasets = [name.strip() for name in values.datasets.split(",") if name.strip()]
    unknown = [name for name in datasets if name not in PAPER_DATASETS]
    if unknown or not datasets:
        raise ReproduceError(f"--datasets: expected a comma-separated subset of {','.join(PAPER_DATASETS)}, "
                             f"got {values.datasets!r}")
    if values.synthetic_preset and not values.synthetic:
        raise ReproduceError("--synthetic_preset needs --synthetic")
    if values.synthetic_preset and values.synthetic_preset not in PRESETS:
        raise ReproduceError(f"--synthetic_preset: unknown preset {values.synthetic_preset!r}; "
                             f"expected one of {', '.join(sorted(PRESETS))}")
    if not values.synthetic and not values.data_dir:
        raise ReproduceError("--data_dir is required: the directory holding baby/, sports/, clothing/ in MMRec "
                             "format (or pass --synthetic)")
    if os.path.exists(values.workdir_root) and not os.path.isdir(values.workdir_root):
        raise ReproduceError(f"--workdir_root={values.workdir_root}: a file, expected a directory (or a path to "
                             f"create)")
    overrides = parse_overrides(values.config_overrides)
    for name in datasets:  # a value out of range stops every dataset before any trains
        try:
            configs.validate(config_for(name, values.variant, overrides))
        except configs.ConfigError as err:
            raise ReproduceError(f"--config_overrides: {name}: {str(err).removeprefix('config: ')}") from None
    return {
        "datasets": list(dict.fromkeys(datasets)),  # in the order given, once each
        "variant": values.variant,
        "data_dir": values.data_dir or "./data",
        "workdir_root": values.workdir_root,
        "synthetic": values.synthetic,
        "synthetic_preset": values.synthetic_preset or None,
        "config_overrides": overrides,
        "restart": values.restart,
        "reference": reference_from_logs(values.reference_logs) if values.reference_logs else {},
    }


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; flags take the form --name=value")
    setup_logging()
    try:
        request = request_from_flags(flags.FLAGS)
        distributed.initialize_from_flags()
    except (ReproduceError, distributed.DistributedError) as err:
        fail(str(err))
    root = request["workdir_root"]
    kept = os.path.exists(os.path.join(root, "reproduction.json"))
    payload = reproduce(request)
    if not distributed.is_primary():
        return
    print(format_markdown(payload))
    if kept and every_dataset_failed(payload):
        print(f"every dataset failed: kept the earlier {os.path.join(root, 'reproduction.md')} and .json")
    else:
        print(f"wrote {os.path.join(root, 'reproduction.md')} and {os.path.join(root, 'reproduction.json')}")
    failed = [entry for entry in payload["datasets"].values() if entry["error"]]
    for entry in failed:
        print(f"error: {entry['dataset']}: {entry['error']}", file=sys.stderr)
    sys.exit(1 if failed else 0)


def define_flags() -> None:
    """Defined only when run as a program: importing this module (tests) adds no global flags, and
    lgmrec_jax.train's --data_dir and --restart cannot clash with these."""
    flags.DEFINE_string("datasets", ",".join(PAPER_DATASETS), "Which of baby,sports,clothing to train, comma-separated.")
    flags.DEFINE_enum("variant", "legacy", list(VARIANTS), "legacy: the logged revision (SPEC §3.8 Q1); "
                      "fixed: the corrected model.")
    flags.DEFINE_string("data_dir", None, "Directory holding <name>/<name>.inter and features in MMRec format "
                        "(with --synthetic: where the presets are generated; default ./data).")
    flags.DEFINE_string("workdir_root", os.path.join("runs", "reproduce"),
                        "Runs go to <workdir_root>/<variant>/<dataset>; reproduction.{md,json} to the root.")
    flags.DEFINE_bool("synthetic", False, "Train on the synthetic_<name> presets instead of the real data.")
    flags.DEFINE_string("synthetic_preset", None, "With --synthetic: one preset for every dataset (e.g. tiny, "
                        "for a quick check); default each dataset's own preset.")
    flags.DEFINE_string("config_overrides", "", "key=value,... applied to every dataset's config (e.g. "
                        "epochs=2); makes the results not comparable with the logs.")
    flags.DEFINE_bool("restart", False, "Discard the runs' workdirs and start over (default: resume).")
    flags.DEFINE_string("reference_logs", None, "The reference's log files to compare with, comma-separated (a "
                        "directory stands for its *.log files): the authors' published logs, or any the reference "
                        "wrote; without them the reference column is empty.")
    distributed.define_flags()  # several hosts: each run is one data-parallel program over all of them


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
