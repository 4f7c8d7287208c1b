"""A grid's results as tables: one row per config (results.csv) and one per setting (results.md).

A setting is a config without its seed; its row holds the mean and sample standard deviation over
its seeds, each run taken at its best validation epoch. The best setting is picked by validation, and
the reference's pick by test Recall@20 is named beside it, since that one selects on the test set.
Rows come from the first input workdir whose summary.json for the config is final, so the shards of
a grid merge into the tables of the whole.
"""

from __future__ import annotations

import csv
import importlib.util
import math
import os
from typing import Optional

from absl import logging

from lgmrec_jax.grid import manifest as manifest_lib, plots as plots_lib
from lgmrec_jax.grid.spec import Point, fmt_value

TABLE_METRICS = (("valid", "recall@20"), ("valid", "ndcg@20"), ("test", "recall@10"), ("test", "recall@20"),
                 ("test", "ndcg@10"), ("test", "ndcg@20"), ("test", "precision@20"), ("test", "map@20"))


def collect_rows(points: list[Point], valid_metric: str, inputs: list[str]) -> list[dict]:
    """One row per config, from the first input workdir holding its final summary."""
    from lgmrec_jax.grid.training import FINAL_STATUSES

    rows = []
    for entry in (p.manifest() for p in points):
        summary, source = None, None
        for root in inputs:
            found = manifest_lib.read_json(os.path.join(manifest_lib.config_dir(root, entry["cid"]), "summary.json"))
            if found is not None and found.get("status") in FINAL_STATUSES:
                summary, source = found, root
                break
        row = {"config_id": entry["cid"], "label": entry["label"], "setting": entry["setting"],
               "seed": entry["seed"], "overrides": entry["overrides"], "source": source}
        row["status"] = summary["status"] if summary else "missing"
        for key in ("best_epoch", "epochs_run", "total_wall_s"):
            row[key] = summary.get(key) if summary else None
        for split, metric in TABLE_METRICS + ((("valid", valid_metric),)):
            block = (summary or {}).get(f"best_{split}") or {}
            row[f"{split}_{metric}"] = block.get(metric)
        rows.append(row)
    return rows


def write_csv(manifest: dict, rows: list[dict], path: str) -> None:
    swept = manifest["swept"]
    metric_cols = []
    for split, metric in ((("valid", manifest["valid_metric"]),) + TABLE_METRICS):
        if f"{split}_{metric}" not in metric_cols:
            metric_cols.append(f"{split}_{metric}")
    header = ["config_id", "label", *swept, "seed", "status", "best_epoch", "epochs_run", *metric_cols,
              "total_wall_s"]
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for row in rows:
            values = {**row, **{k: row["overrides"].get(k, "") for k in swept}}
            writer.writerow(["" if values.get(h) is None else values.get(h) for h in header])
    os.replace(tmp, path)


def mean_std(values: list[float]) -> tuple[Optional[float], Optional[float]]:
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def settings_of(rows: list[dict], valid_metric: str) -> list[dict]:
    """Rows aggregated per setting (over seeds), in grid order."""
    settings: dict[str, dict] = {}
    for row in rows:
        s = settings.setdefault(row["setting"], {"setting": row["setting"], "label": row["label"],
                                                 "overrides": {k: v for k, v in row["overrides"].items()
                                                               if k != "seed"}, "rows": []})
        s["rows"].append(row)
    for s in settings.values():
        done = [r for r in s["rows"] if r["status"] != "missing"]
        s["n_done"], s["n"] = len(done), len(s["rows"])
        for col in {f"valid_{valid_metric}", "valid_recall@20", "test_recall@20", "test_ndcg@20", "best_epoch"}:
            s[col] = mean_std([r[col] for r in done if r.get(col) is not None])
    return list(settings.values())


def fmt_ms(pair) -> str:
    mean, std = pair
    if mean is None:
        return "–"
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def best_setting(settings: list[dict], column: str) -> Optional[dict]:
    scored = [s for s in settings if s[column][0] is not None]
    return max(scored, key=lambda s: s[column][0]) if scored else None  # ties: first in grid order


def markdown(manifest: dict, rows: list[dict]) -> str:
    vm = manifest["valid_metric"]
    settings = settings_of(rows, vm)
    best = best_setting(settings, f"valid_{vm}")
    best_by_test = best_setting(settings, "test_recall@20")
    swept = manifest["swept"]
    n_done = sum(r["status"] != "missing" for r in rows)
    lines = [f"# Grid `{manifest['grid']}` on `{manifest['dataset']}`", "",
             f"{len(rows)} configs in {len(settings)} settings; {n_done} finished"
             + (f", {len(rows) - n_done} missing (not run or not finished)" if n_done < len(rows) else "") + ".",
             "Values are mean ± sample standard deviation over the seeds of a setting, each taken at that "
             "run's best validation epoch (early stopping on the rounded validation metric).", "",
             "Every config: the dataset's config"
             + (", with " + ", ".join(f"`{k}={fmt_value(v)}`" for k, v in sorted(manifest["base_overrides"].items()))
                if manifest.get("base_overrides") else " unchanged")
             + f" except what the settings set; seeds {', '.join(map(str, manifest.get('seeds') or [])) or 'of the grid'}.",
             "",
             *([f"**Emulated**: every product was computed on a CPU as a {manifest['emulate_precision'].upper()} "
                "computes the configs' matmul precision (`--emulate_precision`, experiments/precision_emulation.py).",
                ""] if manifest.get("emulate_precision") else []),
             f"**Selection is by validation**: ★ marks the setting with the best mean valid {vm}. The reference's "
             f"grid search (`quick_start`) keeps the combination with the best *test* Recall@20 instead "
             f"(SPEC §4.6), i.e. it selects on the test set"
             + (f"; its pick here would be `{best_by_test['label']}`." if best_by_test else "."), ""]
    valid_cols = [f"valid {vm}"] + (["valid recall@20"] if vm != "recall@20" else [])
    header = ["", "setting", *swept, "seeds", *valid_cols, "test recall@20", "test ndcg@20", "best epoch"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    for s in settings:
        cells = ["★" if s is best else "", s["label"], *(fmt_value(s["overrides"].get(k, "")) for k in swept),
                 f"{s['n_done']}/{s['n']}", fmt_ms(s[f"valid_{vm}"])]
        if vm != "recall@20":
            cells.append(fmt_ms(s["valid_recall@20"]))
        epoch = s["best_epoch"]
        cells += [fmt_ms(s["test_recall@20"]), fmt_ms(s["test_ndcg@20"]),
                  "–" if epoch[0] is None else f"{epoch[0]:.1f}"]
        if s is best:
            cells = [cells[0]] + [f"**{c}**" if c not in ("", "–") else c for c in cells[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Per-config rows (every seed): `results.csv`; per-config runs: `configs/<config_id>/`."]
    return "\n".join(lines) + "\n"


def write_tables(manifest: dict, rows: list[dict], out_dir: str, plots: bool = True) -> list[str]:
    """results.csv, results.md and (with matplotlib) one PNG per swept parameter; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    written = [os.path.join(out_dir, "results.csv"), os.path.join(out_dir, "results.md")]
    write_csv(manifest, rows, written[0])
    with open(written[1], "w") as handle:
        handle.write(markdown(manifest, rows))
    if not plots:
        return written
    if importlib.util.find_spec("matplotlib") is None:  # optional: the [plot] extra
        logging.info("matplotlib is not installed: no plots (pip install matplotlib)")
        return written
    settings = settings_of(rows, manifest["valid_metric"])
    best = best_setting(settings, f"valid_{manifest['valid_metric']}")
    return written + plots_lib.write_plots(manifest, settings, best, out_dir)
