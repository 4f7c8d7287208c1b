"""Cross-checks whole runs of ours against the reference's own log files, seed by seed.

    python -m lgmrec_jax.crosscheck --reference=LOG[,LOG...] --runs=WORKDIR[,WORKDIR...] [--out=DIR]

Each reference tuple and each of our runs (single runs or every config of a grid) is one seed. Like is
paired with like: a difference in any compared setting (``SETTINGS``, the dataset's name and size) is
listed key by key and refused unless ``--compare_anyway``. Per metric, at the best validation epoch and
as per-epoch means over windows: mean ± std and n of each side, the difference with its Welch interval,
*different* (Holm-adjusted Welch p) and *equivalent within ±m* (Holm-adjusted TOST, m 2% of the
reference's mean by default); also the curves, train losses and wall times. Markdown on stdout; ``--out``
adds JSON and, with matplotlib, a PNG. Exit 0 when nothing differs, 1 when a statistic does, 2 bad input.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import sys
from typing import Optional

import numpy as np
from absl import app, flags

from lgmrec_jax import crosscheck_stats as st
from lgmrec_jax import reference_log
from lgmrec_jax.cli import fail, out_dir_problem, parse_flags

DEFAULT_METRICS = ("recall@10", "recall@20", "recall@50", "ndcg@10", "ndcg@20", "ndcg@50")
OUTPUT_NAMES = ("crosscheck.md", "crosscheck.json", "crosscheck.png")
FINISHED = ("early_stopped", "max_epochs")  # our statuses with a final best epoch

# Settings both sides have, by the reference's names (ours are the same keys in config.json).
SETTINGS = ("n_ui_layers", "n_mm_layers", "n_hyper_layer", "hyper_num", "keep_rate", "alpha", "cl_weight",
            "reg_weight", "train_batch_size", "learning_rate", "epochs", "stopping_step", "eval_step",
            "embedding_size", "feat_embed_dim", "cf_model", "valid_metric", "eval_batch_size")
# Our options with no key in the reference, at the value that is the reference's behaviour.
REFERENCE_BEHAVIOUR = {"tau": 0.2, "use_cge": True, "use_mge": True, "use_ghe": True, "eval_noise": "per_block",
                       "eval_topk": "exact", "matmul_precision": "highest", "feature_dtype": "float32"}
# The reference's keys we do not vary, at the value that is our behaviour.
OUR_BEHAVIOUR = {"learner": "adam", "weight_decay": 0.0, "learning_rate_scheduler": "constant",
                 "use_neg_sampling": True, "use_full_sampling": False, "filter_out_cod_start_users": True,
                 "inter_splitting_label": "x_label"}
DATA_KEYS = ("dataset", "n_users", "n_items")


class CrosscheckError(RuntimeError):
    """Bad input; the message is one line for the user."""


# ---------------------------------------------------------------------------------------------------------
# Samples: one seed's run, from either side


@dataclasses.dataclass
class Sample:
    side: str  # "reference" | "ours"
    source: str
    seed: object
    settings: dict
    rows: dict  # epoch -> {"valid": {...}, "test": {...}, "loss": float, "train_s": float, "eval_s": float}
    best_epoch: Optional[int]
    complete: bool  # it finished (early stopping or its cap): its best epoch is final
    group: Optional[tuple] = None  # ours in a grid: (grid workdir, program group), for the per-config time

    @property
    def best_test(self) -> Optional[dict]:
        row = self.rows.get(self.best_epoch) if self.complete and self.best_epoch is not None else None
        return row["test"] if row else None

    @property
    def last_epoch(self) -> int:
        return max(self.rows) if self.rows else -1


def _scalar(value):
    return value[0] if isinstance(value, list) and len(value) == 1 else value


def reference_samples(log: reference_log.ReferenceLog, variant: Optional[str]) -> list[Sample]:
    samples = []
    for run in log.runs:
        def get(key):
            return run.params[key] if key in run.params else _scalar(log.config.get(key))
        settings = {key: get(key) for key in SETTINGS}
        if isinstance(settings["valid_metric"], str):
            settings["valid_metric"] = settings["valid_metric"].lower()
        settings.update(REFERENCE_BEHAVIOUR)
        for key, ours in OUR_BEHAVIOUR.items():
            value = log.config.get(key, ours)
            if key == "learning_rate_scheduler":
                value = "constant" if isinstance(value, list) and value and value[0] == 1.0 else value
            settings[key] = value
        settings.update(dataset=log.dataset, n_users=run.n_users or log.stats.get("all", {}).get("users"),
                        n_items=run.n_items or log.stats.get("all", {}).get("items"))
        if variant:
            settings["variant"] = variant
        rows = {e.epoch: {"valid": e.valid, "test": e.test, "loss": e.train_loss, "train_s": e.train_s,
                          "eval_s": e.eval_s} for e in run.epochs}
        samples.append(Sample(side="reference", source=f"{log.path} tuple {run.index}/{run.total}", seed=run.seed,
                              settings=settings, rows=rows, best_epoch=run.best_epoch, complete=run.complete))
    return samples


def is_workdir(path: str) -> bool:
    """A single run's or a grid's workdir."""
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, name))
                                       for name in ("metrics.jsonl", "config.json", "grid.json"))


def run_dirs(spec: str, warnings: list) -> list[str]:
    """Our run workdirs ``spec`` names: every config of a grid, every workdir in a plain directory."""
    dirs = []
    for path in reference_log.expand(spec, is_workdir, "workdir"):
        if not is_workdir(path):
            raise CrosscheckError(f"{path}: not a workdir of ours (no metrics.jsonl, config.json or grid.json)")
        if os.path.exists(os.path.join(path, "grid.json")):
            configs = os.path.join(path, "configs")
            members = sorted(os.listdir(configs)) if os.path.isdir(configs) else []
            for name in members:
                member = os.path.join(configs, name)
                if os.path.exists(os.path.join(member, "metrics.jsonl")):
                    dirs.append(member)
                else:
                    warnings.append(f"{member}: no epoch recorded yet; left out")
            if not members:
                raise CrosscheckError(f"{path}: a grid workdir without configs")
        else:
            dirs.append(path)
    return dirs


def our_sample(path: str) -> Sample:
    from lgmrec_jax import report  # the workdir reader the report command uses

    try:
        run = report.load_run(path)
        result = report.result_of(run)
    except report.ReportError as err:
        raise CrosscheckError(str(err)) from None
    if run.config is None:
        raise CrosscheckError(f"{path}: no config.json: its settings cannot be paired")
    try:
        cfg = run.config["identity"]["config"]
        settings = {key: cfg[key] for key in SETTINGS}
        behaviour = {key: cfg[key] for key in REFERENCE_BEHAVIOUR if key != "eval_topk"}
        behaviour["eval_topk"] = "exact" if cfg["eval_topk"] in ("grouped", "direct") else cfg["eval_topk"]
        settings.update(behaviour, **OUR_BEHAVIOUR, dataset=run.config["identity"]["dataset"],
                        n_users=run.config["n_users"], n_items=run.config["n_items"],
                        variant="legacy" if cfg["legacy_text_user_hyper"] else "fixed")
        rows = {row["epoch"]: {"valid": row.get("valid"), "test": row.get("test"), "loss": row["loss"]["total"],
                               "train_s": row.get("train_s"), "eval_s": row.get("eval_s")} for row in run.rows}
        grid = run.config.get("grid")
        group = (os.path.dirname(os.path.dirname(run.path)), grid["group"]) if isinstance(grid, dict) else None
        seed = cfg["seed"]
    except (KeyError, TypeError) as err:
        raise CrosscheckError(f"{path}: config.json or metrics.jsonl lacks a field a run writes ({err}); was it "
                              f"written by lgmrec_jax?") from None
    return Sample(side="ours", source=run.path, seed=seed, settings=settings,
                  rows={e: r for e, r in rows.items() if r["valid"] and r["test"]}, best_epoch=result.best_epoch,
                  complete=result.status in FINISHED, group=group)


def per_config_times(samples: list[Sample]) -> None:
    """A grid's configs record their program group's epoch time; divided here by the configs of that
    group that ran the epoch (of those read), an estimate of one config's time."""
    counts = {}
    for s in samples:
        for epoch in s.rows if s.group else ():
            counts[(s.group, epoch)] = counts.get((s.group, epoch), 0) + 1
    for s in samples:
        if s.group:
            for epoch, row in s.rows.items():
                for key in ("train_s", "eval_s"):
                    if row[key] is not None:
                        row[key] = row[key] / counts[(s.group, epoch)]


# ---------------------------------------------------------------------------------------------------------
# Pairing like with like


def same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
        except (TypeError, ValueError):
            return False
    return a == b


def differences(ref: dict, ours: dict) -> list[tuple]:
    """[(key, reference value, our value)] of the keys both sides state and disagree on."""
    return [(key, ref[key], ours[key]) for key in ref if key in ours and not same(ref[key], ours[key])]


def groups(samples: list[Sample]) -> list[list[Sample]]:
    """Samples of identical settings (the seed apart), in order of first appearance."""
    found = {}
    for s in samples:
        key = json.dumps({k: repr(v) for k, v in sorted(s.settings.items())})
        found.setdefault(key, []).append(s)
    return list(found.values())


def fmt_mismatch(diffs: list[tuple]) -> str:
    return "; ".join(f"{key}: reference {ref!r}, ours {ours!r}" for key, ref, ours in diffs)


def pair(ref_groups: list, our_groups: list, compare_anyway: bool, warnings: list) -> list[tuple]:
    """[(reference group, our group, differences)]; CrosscheckError when nothing pairs and
    ``compare_anyway`` is off. Unpaired groups are listed in ``warnings``."""
    pairs, used = [], set()
    for ref in ref_groups:
        for j, ours in enumerate(our_groups):
            if j not in used and not differences(ref[0].settings, ours[0].settings):
                pairs.append((ref, ours, []))
                used.add(j)
                break
    if not pairs:
        nearest = []
        for ref in ref_groups:
            j = min(range(len(our_groups)), key=lambda j: len(differences(ref[0].settings, our_groups[j][0].settings)))
            nearest.append((ref, our_groups[j], differences(ref[0].settings, our_groups[j][0].settings)))
        if not compare_anyway:
            detail = " | ".join(f"{ref[0].source}: {fmt_mismatch(d)}" for ref, _, d in nearest)
            raise CrosscheckError(f"the settings differ, nothing to compare like with like ({detail}); pass "
                                  f"--compare_anyway to compare them anyway")
        pairs = nearest
    paired_refs = {id(p[0]) for p in pairs}
    paired_ours = {id(p[1]) for p in pairs}
    for ref in ref_groups:
        if id(ref) not in paired_refs:
            warnings.append(f"{len(ref)} reference tuple(s) like {ref[0].source} match no run of ours: not compared")
    for ours in our_groups:
        if id(ours) not in paired_ours:
            warnings.append(f"{len(ours)} run(s) of ours like {ours[0].source} match no reference tuple: not compared")
    return pairs


# ---------------------------------------------------------------------------------------------------------
# Comparing one pair


@dataclasses.dataclass
class Options:
    metrics: tuple = DEFAULT_METRICS
    windows: Optional[list] = None  # [(first, last)] epochs; None: thirds of the common span, from epoch 5
    margin: float = 0.02
    margin_relative: bool = True
    significance: float = 0.05


def default_windows(span: int) -> list[tuple]:
    if span < 15:
        return [(0, span - 1)] if span > 0 else []
    return [(5, span // 3 - 1), (span // 3, 2 * span // 3 - 1), (2 * span // 3, span - 1)]


def window_value(s: Sample, split: str, metric: str, first: int, last: int) -> Optional[float]:
    """The sample's mean over the window's epochs; a run cut off inside the window has none (a finished one
    that stopped inside it has the epochs it ran)."""
    if not s.complete and s.last_epoch < last:
        return None
    values = [s.rows[e][split][metric] for e in range(first, last + 1) if e in s.rows and metric in s.rows[e][split]]
    return float(np.mean(values)) if values else None


def statistic(label: dict, ours: list, ref: list, options: Options) -> dict:
    ref_d, ours_d = st.describe(ref), st.describe(ours)
    margin = options.margin * abs(ref_d["mean"]) if options.margin_relative and ref_d["mean"] is not None \
        else options.margin
    row = dict(label, reference=ref_d, ours=ours_d, welch=st.welch(ours, ref),
               tost=st.tost(ours, ref, margin, options.significance), values={"reference": ref, "ours": ours})
    return row


def curves(samples: list[Sample], metrics: tuple, last: int) -> dict:
    out = {}
    for epoch in range(last + 1):
        rows = [s.rows[epoch] for s in samples if epoch in s.rows]
        if not rows:
            continue
        entry = {"n": len(rows), "loss": st.describe([r["loss"] for r in rows if r["loss"] is not None])}
        for split in ("valid", "test"):
            for metric in metrics:
                entry[f"{split} {metric}"] = st.describe([r[split][metric] for r in rows if metric in r[split]])
        out[epoch] = entry
    return out


def times(samples: list[Sample]) -> dict:
    """Median per-epoch train and evaluation seconds, epoch 0 left out (it compiles on our side)."""
    out = {}
    for key in ("train_s", "eval_s"):
        values = [r[key] for s in samples for e, r in s.rows.items() if e > 0 and r[key] is not None]
        out[key] = float(np.median(values)) if values else None
    return out


def compare(refs: list[Sample], ours: list[Sample], diffs: list, options: Options) -> dict:
    metrics = [m for m in options.metrics
               if all(m in s.rows[e]["test"] for s in refs + ours for e in list(s.rows)[:1])]
    missing = [m for m in options.metrics if m not in metrics]
    if not metrics:
        raise CrosscheckError(f"none of the metrics {', '.join(options.metrics)} is recorded on both sides")
    stats_rows = []
    ref_done = [s for s in refs if s.best_test]
    our_done = [s for s in ours if s.best_test]
    for metric in metrics:
        stats_rows.append(statistic({"kind": "best", "split": "test", "metric": metric, "window": None},
                                    [s.best_test[metric] for s in our_done], [s.best_test[metric] for s in ref_done],
                                    options))
    span = min(1 + max(s.last_epoch for s in side) for side in (refs, ours))
    cap = refs[0].settings.get("epochs")
    if isinstance(cap, int) and cap > 0:
        span = min(span, cap)
    windows = options.windows if options.windows is not None else default_windows(span)
    for first, last in windows:
        for split in ("valid", "test"):
            for metric in metrics:
                values = {side: [v for v in (window_value(s, split, metric, first, last) for s in samples)
                                 if v is not None] for side, samples in (("ours", ours), ("reference", refs))}
                stats_rows.append(statistic({"kind": "window", "split": split, "metric": metric,
                                             "window": [first, last]}, values["ours"], values["reference"], options))
    family = len([r for r in stats_rows if r["welch"]["p"] is not None])
    alpha = options.significance
    for row, adjusted, adjusted_tost in zip(stats_rows, st.holm([r["welch"]["p"] for r in stats_rows]),
                                            st.holm([r["tost"]["p"] for r in stats_rows])):
        row["p_holm"], row["tost"]["p_holm"] = adjusted, adjusted_tost
        per_test = alpha / max(family, 1)  # Bonferroni's level: what Holm's first step asks of the smallest p
        values = row.pop("values")
        row["detectable"] = st.detectable(row["welch"]["se"], row["welch"]["df"], per_test)
        if adjusted is None:
            row["verdict"] = "untested (needs 2 seeds a side with some spread)"
        elif adjusted < alpha:
            row["verdict"] = "different"
        elif adjusted_tost is not None and adjusted_tost < alpha:
            row["verdict"] = "equivalent"
        else:
            row["seeds_needed"] = st.seeds_for_equivalence(values["ours"], values["reference"],
                                                           row["tost"]["margin"], per_test)
            row["verdict"] = "undecided"
    best_epochs = {side: [s.best_epoch for s in samples if s.best_test]
                   for side, samples in (("reference", refs), ("ours", ours))}
    last = max(s.last_epoch for s in refs + ours)
    ref_times, our_times = times(refs), times(ours)
    return {
        "settings": {"reference": refs[0].settings, "ours": ours[0].settings},
        "mismatches": [{"key": k, "reference": r, "ours": o} for k, r, o in diffs],
        "samples": {side: [{"source": s.source, "seed": s.seed, "best_epoch": s.best_epoch, "complete": s.complete,
                            "epochs": len(s.rows)} for s in samples]
                    for side, samples in (("reference", refs), ("ours", ours))},
        "metrics": metrics, "metrics_missing": missing, "windows": [list(w) for w in windows],
        "statistics": stats_rows,
        "family_size": family,
        "different": sum(r["verdict"] == "different" for r in stats_rows),
        "best_epoch": {side: dict(st.describe(v), values=v, median=float(np.median(v)) if v else None)
                       for side, v in best_epochs.items()} | {"welch": st.welch(best_epochs["ours"],
                                                                                best_epochs["reference"])},
        "curves": {"reference": curves(refs, tuple(metrics), last), "ours": curves(ours, tuple(metrics), last)},
        "times": {"reference": ref_times, "ours": our_times,
                  "ratio": {k: (our_times[k] / ref_times[k] if our_times[k] and ref_times[k] else None)
                            for k in ("train_s", "eval_s")}},
    }


# ---------------------------------------------------------------------------------------------------------
# The whole command, without its output files


def crosscheck(reference: str, runs: str, options: Options, reference_variant: Optional[str] = None,
               compare_anyway: bool = False) -> dict:
    """Reads both sides, pairs them and compares every pair; returns the report's payload."""
    warnings = []
    try:
        logs = [reference_log.read_log(path) for path in reference_log.log_files(reference)]
        dirs = run_dirs(runs, warnings)
    except reference_log.LogError as err:
        raise CrosscheckError(str(err)) from None
    refs = []
    for log in logs:
        warnings.extend(log.warnings)
        found = reference_samples(log, reference_variant)
        if not found:
            raise CrosscheckError(f"{log.path}: a config block but no 'Parameters:[...]=(...)' tuple: no run to compare")
        refs.extend(found)
    ours = sorted((our_sample(path) for path in dirs),
                  key=lambda s: (not isinstance(s.seed, int), s.seed if isinstance(s.seed, int) else 0, s.source))
    per_config_times(ours)
    for s in refs + ours:
        if not s.complete:
            warnings.append(f"{s.source} (seed {s.seed}): not finished; its epochs are in the curves and windows it "
                            f"covers, not in the best-epoch statistics")
    comparisons = []
    for ref_group, our_group, diffs in pair(groups(refs), groups(ours), compare_anyway, warnings):
        for side, group in (("reference", ref_group), ("ours", our_group)):
            if not any(s.rows for s in group):
                raise CrosscheckError(f"{group[0].source}: no evaluated epoch on the {side} side")
        comparisons.append(compare(ref_group, our_group, diffs, options))
    return {"reference_files": [log.path for log in logs], "run_dirs": dirs,
            "reference_variant": reference_variant, "compare_anyway": compare_anyway,
            "options": dataclasses.asdict(options), "warnings": warnings, "comparisons": comparisons,
            "different": sum(c["different"] for c in comparisons),
            "written": datetime.datetime.now().isoformat(timespec="seconds")}


# ---------------------------------------------------------------------------------------------------------
# Markdown


def f4(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def fsigned(x) -> str:
    return "-" if x is None else f"{x:+.4f}"


def msd(d: dict) -> str:
    return "-" if d["mean"] is None else f"{d['mean']:.4f} ± {f4(d['std'])} ({d['n']})"


def interval(ci) -> str:
    return "-" if not ci or None in ci else f"[{ci[0]:+.4f}, {ci[1]:+.4f}]"


def fp(p) -> str:
    return "-" if p is None else (f"{p:.2g}" if p < 0.001 else f"{p:.3f}")


def verdict_text(row: dict) -> str:
    margin = row["tost"]["margin"]
    if row["verdict"] == "equivalent":
        return f"equivalent within ±{margin:.4f}"
    if row["verdict"] == "undecided":
        need = row.get("seeds_needed")
        more = f"~{need} seeds a side would likely show it" if need else "not reachable at the observed difference"
        return f"undecided at ±{margin:.4f} ({more})"
    return row["verdict"]


def statistics_table(rows: list) -> list[str]:
    lines = ["| statistic | reference mean ± std (n) | ours mean ± std (n) | ours − ref | 95% CI | t | Holm p | "
             "TOST 90% CI | detectable | verdict |", "|---|---:|---:|---:|---|---:|---:|---|---:|---|"]
    for r in rows:
        name = f"{r['split']} {r['metric']}" + (f", epochs {r['window'][0]}–{r['window'][1]}" if r["window"] else "")
        w = r["welch"]
        t = "-" if w["t"] is None else f"{w['t']:+.2f}"
        lines.append(f"| {name} | {msd(r['reference'])} | {msd(r['ours'])} | {fsigned(w['difference'])} | "
                     f"{interval(w['ci'])} | {t} | {fp(r['p_holm'])} | {interval(r['tost']['ci'])} | "
                     f"{f4(r['detectable'])} | {verdict_text(r)} |")
    return lines


def fmt_setting(value) -> str:
    return f"`{value!r}`" if not isinstance(value, str) else f"`{value}`"


def comparison_section(c: dict, index: int, total: int, png: Optional[str]) -> list[str]:
    ref_s, our_s = c["samples"]["reference"], c["samples"]["ours"]
    lines = [f"## Comparison {index} of {total}" if total > 1 else "## Comparison", ""]
    lines.append(f"- Reference: {len(ref_s)} runs (seeds {', '.join(str(s['seed']) for s in ref_s)}), "
                 f"{sum(s['complete'] for s in ref_s)} finished.")
    lines.append(f"- Ours: {len(our_s)} runs (seeds {', '.join(str(s['seed']) for s in our_s)}), "
                 f"{sum(s['complete'] for s in our_s)} finished.")
    if c["mismatches"]:
        lines.append("- **Settings differ (compared anyway)**: " + "; ".join(
            f"`{m['key']}` reference {fmt_setting(m['reference'])}, ours {fmt_setting(m['ours'])}"
            for m in c["mismatches"]) + ".")
    else:
        lines.append("- Settings: identical on every compared key (below).")
    n_diff = c["different"]
    lines.append(f"- **Verdict: {n_diff} of {c['family_size']} statistics different** after a Holm correction over "
                 f"all of them (best-epoch and window statistics together).")
    if c["metrics_missing"]:
        lines.append(f"- Not recorded on both sides, left out: {', '.join(c['metrics_missing'])}.")
    lines += ["", "### Settings", "", "| key | reference | ours |", "|---|---|---|"]
    ref_set, our_set = c["settings"]["reference"], c["settings"]["ours"]
    for key in ref_set:
        mark = "" if key not in our_set or same(ref_set[key], our_set[key]) else " **≠**"
        lines.append(f"| {key} | {fmt_setting(ref_set[key])} | {fmt_setting(our_set.get(key, '-'))}{mark} |")
    if "variant" not in ref_set:
        lines.append(f"| variant | not known from the log (--reference_variant) | `{our_set.get('variant')}` |")
    best = [r for r in c["statistics"] if r["kind"] == "best"]
    windows = [r for r in c["statistics"] if r["kind"] == "window"]
    lines += ["", "### Test metrics at the best-validation epoch", "",
              "Per seed: the test value at the epoch its early stopping kept. *detectable*: the smallest true "
              "difference these samples would reveal with 80% power at the Bonferroni level of the family "
              "(what they can still hide). Equivalence: Holm-adjusted TOST p below the significance level.", ""]
    lines += statistics_table(best)
    lines += ["", "### Per-epoch means over epoch windows", "",
              "Per seed: the mean over the window's epochs it ran (a run cut off inside a window is left out of "
              "it).", ""]
    lines += statistics_table(windows)
    be = c["best_epoch"]
    lines += ["", "### Best epoch", "", "| | mean ± std (n) | median | epochs |", "|---|---:|---:|---|"]
    for side in ("reference", "ours"):
        d = be[side]
        mean = "-" if d["mean"] is None else f"{d['mean']:.1f} ± {'-' if d['std'] is None else format(d['std'], '.1f')} ({d['n']})"
        median = "-" if d["median"] is None else format(d["median"], "g")
        lines.append(f"| {side} | {mean} | {median} | {', '.join(map(str, sorted(d['values'])))} |")
    t = be["welch"]["t"]
    lines += ["", f"Welch t of the best epochs (ours − reference): {'-' if t is None else f'{t:+.2f}'}, "
                  f"p {fp(be['welch']['p'])} (not in the verdict's family).", ""]
    main = next((m for m in ("recall@20", "ndcg@20") if m in c["metrics"]), c["metrics"][0])
    second = next((m for m in ("ndcg@20", "recall@50") if m in c["metrics"] and m != main), None)
    shown = [m for m in (main, second) if m]
    lines += ["### Curves: per-epoch means over seeds", "",
              "| epoch | n ref/ours | " + " | ".join(f"{split} {m} ref / ours" for split in ("valid", "test")
                                                      for m in shown) + " | train loss ref / ours |",
              "|---:|---:|" + "---:|" * (2 * len(shown)) + "---:|"]
    ref_c, our_c = c["curves"]["reference"], c["curves"]["ours"]
    for epoch in sorted(set(ref_c) | set(our_c), key=int):
        r, o = ref_c.get(epoch), our_c.get(epoch)
        cells = [f"{r['n'] if r else 0}/{o['n'] if o else 0}"]
        for split in ("valid", "test"):
            for m in shown:
                cells.append(f"{f4(r[f'{split} {m}']['mean']) if r else '-'} / {f4(o[f'{split} {m}']['mean']) if o else '-'}")
        cells.append(f"{f4(r['loss']['mean']) if r else '-'} / {f4(o['loss']['mean']) if o else '-'}")
        lines.append(f"| {epoch} | " + " | ".join(cells) + " |")
    tm = c["times"]
    lines += ["", "### Wall time per epoch (machine-dependent)", "",
              "Medians over epochs ≥ 1 of all seeds. They compare machines and loads as much as code: the two "
              "sides rarely ran on the same machine at the same time. A grid config's time is its program "
              "group's divided by the group's configs that ran that epoch.", "",
              "| | reference | ours | ours / reference |", "|---|---:|---:|---:|"]
    for key, label in (("train_s", "training s"), ("eval_s", "evaluation s")):
        ratio = tm["ratio"][key]
        lines.append(f"| {label} | {f4(tm['reference'][key])} | {f4(tm['ours'][key])} | "
                     f"{'-' if ratio is None else f'{ratio:.2f}'} |")
    if png:
        lines += ["", f"![curves]({png})"]
    return lines + [""]


def format_markdown(payload: dict, png: Optional[str] = None) -> str:
    o = payload["options"]
    margin = f"{o['margin'] * 100:g}% of the reference's mean" if o["margin_relative"] else f"±{o['margin']:g}"
    lines = ["# Cross-check: ours against the reference's logs", "",
             f"- Reference logs: {', '.join(f'`{p}`' for p in payload['reference_files'])}.",
             f"- Our runs: {len(payload['run_dirs'])} workdirs"
             + (f" under `{os.path.commonpath(payload['run_dirs'])}`" if payload["run_dirs"] else "") + ".",
             f"- Significance {o['significance']:g}; equivalence margin {margin}; differences are ours − reference.",
             f"- **{payload['different']} statistic(s) different** over {len(payload['comparisons'])} comparison(s)"
             f" (exit status {1 if payload['different'] else 0}).", ""]
    if payload["warnings"]:
        lines += ["Warnings:", ""] + [f"- {w}" for w in payload["warnings"]] + [""]
    total = len(payload["comparisons"])
    for i, c in enumerate(payload["comparisons"], start=1):
        lines += comparison_section(c, i, total, png if i == 1 else None)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# The plot


def plot(comparison: dict, path: str) -> bool:
    """Valid/test curves of the main metrics and the train loss, mean ± std bands per side; False when
    matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return False
    import logging

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # its font-cache note is noise on stderr
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [m for m in ("recall@20", "ndcg@20") if m in comparison["metrics"]] or comparison["metrics"][:1]
    panels = [(f"{split} {m}", f"{split} {m}") for m in shown for split in ("valid", "test")] + [("loss", "train loss")]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    for ax, (key, title) in zip(np.atleast_1d(axes), panels):
        for side, colour in (("reference", "C0"), ("ours", "C1")):
            curve = comparison["curves"][side]
            epochs = sorted(curve, key=int)
            xs = np.array([int(e) for e in epochs])
            mean = np.array([curve[e][key]["mean"] for e in epochs], dtype=float)
            std = np.array([curve[e][key]["std"] or 0.0 for e in epochs], dtype=float)
            n = len(comparison["samples"][side])
            ax.plot(xs, mean, color=colour, label=f"{side} ({n} seeds)")
            ax.fill_between(xs, mean - std, mean + std, color=colour, alpha=0.25, linewidth=0)
        ax.set(title=title, xlabel="epoch")
        if key == "loss":
            ax.set_yscale("log")
    np.atleast_1d(axes)[0].legend(fontsize="small")
    figure.suptitle("per-epoch mean ± std over seeds")
    figure.tight_layout()
    try:
        figure.savefig(path, dpi=90, format="png")
    finally:
        plt.close(figure)
    return True


# ---------------------------------------------------------------------------------------------------------
# Command line


def write_outputs(out: str, payload: dict) -> list[str]:
    """crosscheck.{md,json,png} in ``out``, each written whole and renamed into place."""
    from lgmrec_jax.workdir import write_json_atomic

    os.makedirs(out, exist_ok=True)
    written = []
    png = os.path.join(out, OUTPUT_NAMES[2])
    tmp_png = f"{png}.tmp"
    if payload["comparisons"] and plot(payload["comparisons"][0], tmp_png):
        os.replace(tmp_png, png)
        written.append(png)
    markdown = format_markdown(payload, OUTPUT_NAMES[2] if written else None)
    write_json_atomic(os.path.join(out, OUTPUT_NAMES[1]), payload)
    md = os.path.join(out, OUTPUT_NAMES[0])
    with open(f"{md}.tmp", "w") as handle:
        handle.write(markdown + "\n")
    os.replace(f"{md}.tmp", md)
    return [md, os.path.join(out, OUTPUT_NAMES[1])] + written


def parse_windows(text: str) -> Optional[list]:
    if not text:
        return None
    windows = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        first, sep, last = part.partition("-")
        try:
            window = (int(first), int(last))
        except ValueError:
            raise CrosscheckError(f"--windows: {part!r} is not FIRST-LAST (epochs, e.g. 5-19)") from None
        if not sep or window[0] < 0 or window[1] < window[0]:
            raise CrosscheckError(f"--windows: {part!r} is not FIRST-LAST with 0 <= FIRST <= LAST")
        windows.append(window)
    return windows


def parse_margin(text: str) -> tuple[float, bool]:
    relative = text.strip().endswith("%")
    try:
        value = float(text.strip().rstrip("%"))
    except ValueError:
        raise CrosscheckError(f"--margin: {text!r} is not a number or a percentage (e.g. 2% or 0.005)") from None
    if not (math.isfinite(value) and value > 0):
        raise CrosscheckError(f"--margin: {text!r} must be positive")
    return (value / 100 if relative else value), relative


def execute(values) -> int:
    """Runs the command for parsed flag values; returns the exit status (printing the report or an error)."""
    try:
        if not values.reference or not values.runs:
            raise CrosscheckError("--reference=LOG[,LOG...] and --runs=WORKDIR[,WORKDIR...] are both required")
        if values.out and out_dir_problem(values.out):
            raise CrosscheckError(f"--out={values.out}: {out_dir_problem(values.out)}")
        margin, relative = parse_margin(values.margin)
        metrics = tuple(m.strip().lower() for m in values.metrics.split(",") if m.strip())
        if not metrics:
            raise CrosscheckError("--metrics: no metric given")
        if not 0 < values.significance < 1:
            raise CrosscheckError(f"--significance: {values.significance} is not between 0 and 1")
        options = Options(metrics=metrics, windows=parse_windows(values.windows), margin=margin,
                          margin_relative=relative, significance=values.significance)
        payload = crosscheck(values.reference, values.runs, options,
                             reference_variant=values.reference_variant or None,
                             compare_anyway=values.compare_anyway)
    except CrosscheckError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for warning in payload["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    if values.out:
        try:
            written = write_outputs(values.out, payload)
        except OSError as err:
            print(f"error: --out={values.out}: cannot write ({err.strerror or err})", file=sys.stderr)
            return 2
        print(format_markdown(payload, OUTPUT_NAMES[2] if len(written) == 3 else None))
        print(f"\nwrote {', '.join(written)}")
    else:
        print(format_markdown(payload))
    return 1 if payload["different"] else 0


def define_flags(values=flags.FLAGS) -> None:
    """Defined only when run as a program (or on a private registry, :func:`cli`): importing this module
    adds no global flags."""
    flags.DEFINE_string("reference", None, "The reference's log files: LOG[,LOG...]; a directory stands for its "
                        "*.log files, a glob for its matches.", flag_values=values)
    flags.DEFINE_string("runs", None, "Our workdirs: WORKDIR[,WORKDIR...] (single runs or grids; a directory of "
                        "workdirs or a glob stands for several).", flag_values=values)
    flags.DEFINE_string("out", None, "Also write crosscheck.md, crosscheck.json and crosscheck.png here.",
                        flag_values=values)
    flags.DEFINE_string("metrics", ",".join(DEFAULT_METRICS), "Metrics compared, comma-separated.",
                        flag_values=values)
    flags.DEFINE_string("windows", "", "Epoch windows FIRST-LAST,... of the per-epoch means (default: thirds of "
                        "the epochs both sides ran, from epoch 5).", flag_values=values)
    flags.DEFINE_string("margin", "2%", "Equivalence margin: a percentage of the reference's mean, or an "
                        "absolute value.", flag_values=values)
    flags.DEFINE_float("significance", 0.05, "Family-wise level of both verdicts.", flag_values=values)
    flags.DEFINE_enum("reference_variant", "", ["", "legacy", "fixed"], "Which variant the reference ran "
                      "(SPEC §3.8 Q1), where known: then it must match ours (legacy_text_user_hyper).",
                      flag_values=values)
    flags.DEFINE_bool("compare_anyway", False, "Compare even when settings differ (the differences are listed).",
                      flag_values=values)


def cli(argv: list[str]) -> int:
    """The command on ``argv`` (``argv[0]`` the program) with a registry of its own: what tests call in-process."""
    values = flags.FlagValues()
    define_flags(values)
    try:
        rest = values(argv)
    except flags.Error as err:
        print(f"error: bad flag: {err}", file=sys.stderr)
        return 2
    if len(rest) > 1:
        print(f"error: unexpected arguments {rest[1:]}; every input is a --flag", file=sys.stderr)
        return 2
    return execute(values)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; every input is a --flag")
    sys.exit(execute(flags.FLAGS))


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
