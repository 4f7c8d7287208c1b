"""Grid throughput: configs per hour for K same-shape configs in one program, against running them
one after another, and the grid's step time over 1, 2 and 4 devices.

    python -m experiments.bench_grid                                   # CPU: synthetic, K = 1, 4, 16, 64
    python -m experiments.bench_grid --dataset=synthetic_clothing --sizes=1,4,16 --tag=gpu
    python -m experiments.bench_grid --seed_check --dataset=synthetic_baby --seed_check_epochs=3

Per ``--batchings`` (map, vmap, vmap_columns): the epoch and evaluation of a group of K against one
single run, their ratio, and configs per hour at ``--nominal_epochs`` epochs per config.
``--seed_check`` instead trains the ``seeds`` grid and the same seeds as single runs and records how
they differ. Results: ``<out>/bench_grid_<tag>.{json,md}``, one section per invocation.
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()

import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from experiments import benchmarking  # noqa: E402
from experiments.benchmarking import timed  # noqa: E402
from lgmrec_jax import cli, train as _train  # noqa: E402

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defined only when run as a program: importing this module (tests) adds no global flags that could
    clash with another entry point's."""
    _train.define_run_flags()  # --dataset, --data_dir, --workdir, as lgmrec_jax.train
    flags.DEFINE_list("sizes", ["1", "4", "16", "64"], "Group sizes K measured on one device.")
    flags.DEFINE_list("batchings", ["map", "vmap", "vmap_columns"], "Group programs to time "
                      "(lgmrec_jax.group_engine.BATCHINGS).")
    flags.DEFINE_list("device_counts", ["1", "2", "4"], "Device counts for the step-time measurement.")
    flags.DEFINE_integer("device_configs", 4, "Configs in the group spread over devices.")
    flags.DEFINE_string("device_batching", "map", "Batching of the group spread over devices.")
    flags.DEFINE_integer("epochs", 2, "Timed epochs (after one compiling epoch) per measurement.")
    flags.DEFINE_integer("nominal_epochs", 50, "Epochs per config assumed for configs per hour.")
    flags.DEFINE_string("out", "experiments/results", "Output directory.")
    flags.DEFINE_string("tag", None, "Result file tag (default: the backend, e.g. cpu).")
    flags.DEFINE_bool("seed_check", False, "Run the 8-seed grid against 8 single runs instead of the timings.")
    flags.DEFINE_integer("seed_check_epochs", 3, "Epochs per run in --seed_check.")
    flags.DEFINE_string("seed_check_batching", "map", "Batching of the seeds grid in --seed_check.")
    flags.DEFINE_float("wait_idle_s", 0.0, "Wait up to this long for the 1-minute load average to fall below "
                       "half the cores before measuring (other processes distort CPU timings).")


def configs_for(base, k: int):
    """K configs of one program: seeds 0..K-1, alphas spread over [0.1, 1.0]."""
    cfgs = []
    for i in range(k):
        cfg = base.copy_and_resolve_references()
        cfg.seed = i
        cfg.alpha = round(0.1 + 0.9 * i / max(k - 1, 1), 4)
        cfgs.append(cfg)
    return cfgs


def bench_single(base, ds, epochs: int) -> dict:
    from lgmrec_jax import engine as engine_lib

    exp = engine_lib.SingleEngine(base, ds)
    state = exp.put(exp.init_state())
    (state, _), first = timed(lambda: exp.train_epoch(state, 0))
    train = []
    for e in range(1, epochs + 1):
        (state, _), t = timed(lambda: exp.train_epoch(state, e))
        train.append(t)
    params = exp.get(state).params
    _, eval_first = timed(lambda: exp.evaluate_params(params, 0))
    evals = [timed(lambda: exp.evaluate_params(params, e))[1] for e in range(1, epochs + 1)]
    n_batches = exp.sampler.n_batches
    return {"train_epoch_s": statistics.median(train), "eval_s": statistics.median(evals),
            "first_epoch_s": first, "first_eval_s": eval_first, "n_batches": n_batches,
            "step_s": statistics.median(train) / n_batches}


def bench_group(base, ds, k: int, n_devices: int, epochs: int, evaluate: bool = True,
                batching: str = "map") -> dict:
    from lgmrec_jax import group_engine, sampler as sampler_lib

    cfgs = configs_for(base, k)
    prog = group_engine.GroupEngine(base, ds, n_devices, batching=batching)
    seeds = [c.seed for c in cfgs]
    samplers = [sampler_lib.NegativeSampler(ds.train, ds.n_items, c.train_batch_size, c.seed) for c in cfgs]
    active = np.ones(k, bool)
    states, init_s = timed(lambda: prog.init(seeds))

    def epoch(states, e):
        return prog.run_epoch(states, cfgs, [s.epoch(e) for s in samplers], e, active)

    (states, _, _), first = timed(lambda: epoch(states, 0))
    train = []
    for e in range(1, epochs + 1):
        (states, _, _), t = timed(lambda: epoch(states, e))
        train.append(t)
    out = {"k": k, "devices": n_devices, "batching": batching, "init_s": init_s, "first_epoch_s": first,
           "train_epoch_s": statistics.median(train), "n_batches": samplers[0].n_batches,
           "step_s": statistics.median(train) / samplers[0].n_batches}
    if evaluate:
        _, eval_first = timed(lambda: prog.evaluate(states, cfgs, 0))
        out["first_eval_s"] = eval_first
        out["eval_s"] = statistics.median(timed(lambda: prog.evaluate(states, cfgs, e))[1]
                                          for e in range(1, epochs + 1))
    return out


def seed_check(dataset: str, data_dir: str, epochs: int, workdir: str, batching: str) -> dict:
    """The 8-seed grid as one program against 8 single runs; returns the comparison."""
    from experiments import grids
    from lgmrec_jax import configs, run
    from lgmrec_jax.data import load_dataset
    from lgmrec_jax.grid import runner

    overrides = {"epochs": epochs, "stopping_step": 1000, "num_devices": 1}
    tick = time.perf_counter()
    result = runner.run_grid(runner.GridOptions(grid="seeds", grids_dir=grids.DIR, dataset=dataset, data_dir=data_dir,
                                                workdir=os.path.join(workdir, "grid"), base_overrides=overrides,
                                                restart=True, batching=batching))
    grid_s = time.perf_counter() - tick
    group = {json.load(open(os.path.join(workdir, "grid", "configs", cid, "config.json")))["grid"]["group"]
             for cid in result["summaries"]}
    ds = load_dataset(data_dir, dataset)
    per_seed, single_s = [], 0.0
    for cid, summary in result["summaries"].items():
        cfg = configs.for_dataset(dataset)
        cfg.update(overrides, seed=summary_seed(cid))
        single_dir = os.path.join(workdir, f"single-{cid}")
        tick = time.perf_counter()
        single = run.train_and_evaluate(cfg, ds, single_dir, restart=True)
        single_s += time.perf_counter() - tick
        rows_g = read_jsonl(os.path.join(workdir, "grid", "configs", cid, "metrics.jsonl"))
        rows_s = read_jsonl(os.path.join(single_dir, "metrics.jsonl"))
        loss_rel = max(abs(a["loss"][k] - b["loss"][k]) / max(abs(b["loss"][k]), 1e-30)
                       for a, b in zip(rows_g, rows_s) for k in b["loss"])
        metric_abs = max(abs(a[split][m] - b[split][m]) for a, b in zip(rows_g, rows_s)
                         for split in ("valid", "test") for m in b[split])
        per_seed.append({
            "config": cid, "best_epoch": [summary["best_epoch"], single["best_epoch"]],
            "summary_equal": all(summary[k] == single[k] for k in ("best_epoch", "best_valid", "best_test",
                                                                    "epochs_run", "status")),
            "metrics_rows_equal": all(a[split] == b[split] for a, b in zip(rows_g, rows_s) for split in ("valid", "test")),
            "max_loss_rel_diff": loss_rel, "max_metric_abs_diff": metric_abs,
            "grid_valid": summary["best_valid"]["recall@20"], "single_valid": single["best_valid"]["recall@20"],
            "grid_test": summary["best_test"]["recall@20"], "single_test": single["best_test"]["recall@20"]})
    return {"dataset": dataset, "epochs": epochs, "groups": len(group), "batching": batching, "grid_wall_s": grid_s,
            "singles_wall_s": single_s, "per_seed": per_seed,
            "all_summaries_equal": all(p["summary_equal"] for p in per_seed),
            "max_loss_rel_diff": max(p["max_loss_rel_diff"] for p in per_seed),
            "max_metric_abs_diff": max(p["max_metric_abs_diff"] for p in per_seed)}


def summary_seed(cid: str) -> int:
    return int(cid.split("seed=")[1].split(",")[0])


def read_jsonl(path):
    with open(path) as handle:
        return [json.loads(line) for line in handle]


def machine() -> dict:
    """The machine as this report records it (fields of its own, not benchmarking.machine's)."""
    import flax
    import optax

    return {"backend": jax.default_backend(), "devices": [str(d) for d in jax.local_devices()],
            "device_kind": jax.local_devices()[0].device_kind, "cpu": benchmarking.cpu_model(),
            "cpu_count": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "python": sys.version.split()[0], "jax": jax.__version__, "flax": flax.__version__,
            "optax": optax.__version__, "numpy": np.__version__,
            "git": benchmarking.git("rev-parse", "--short", "HEAD").strip()}


def machine_line(m: dict) -> str:
    return (f"Machine: {m['cpu']}, {m['affinity'] or m['cpu_count']} cores usable, devices {m['device_kind']} "
            f"x{len(m['devices'])}; jax {m['jax']}, flax {m['flax']}, optax {m['optax']}; commit {m['git']}.")


def timing_markdown(result: dict) -> list[str]:
    n = result["nominal_epochs"]
    single = result["single"]
    seq_epoch = single["train_epoch_s"] + single["eval_s"]
    lines = [f"## Throughput: K same-shape configs on one device ({result['dataset']})", "",
             f"Command: `{result['command']}`; load average when it started: "
             f"{', '.join(f'{x:.1f}' for x in result['load']['loadavg_at_start'])}.",
             f"Dataset: {result['stats']}. Config: the dataset's config; the K configs differ in seed and alpha.",
             f"Medians over {result['epochs_timed']} epochs after a compiling one. configs/h assumes {n} epochs "
             "per config (train + valid/test evaluation every epoch).", "",
             "| K | program | train epoch (s) | eval (s) | train epoch / single's | config-epochs / h | configs / h "
             "| speed-up vs one after another | first epoch incl. compile (s) |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| 1 | single run | {single['train_epoch_s']:.3f} | {single['eval_s']:.3f} | 1.00 | "
             f"{3600 / seq_epoch:.0f} | {3600 / seq_epoch / n:.1f} | 1.00 | {single['first_epoch_s']:.1f} |"]
    for g in result["groups"]:
        total = g["train_epoch_s"] + g["eval_s"]
        ratio = g["train_epoch_s"] / single["train_epoch_s"]
        program = g["batching"]
        lines.append(f"| {g['k']} | {program} | {g['train_epoch_s']:.3f} | {g['eval_s']:.3f} | {ratio:.2f} "
                     f"| {3600 * g['k'] / total:.0f} | {3600 * g['k'] / total / n:.1f} | "
                     f"{seq_epoch * g['k'] / total:.2f} | {g['first_epoch_s']:.1f} |")
    lines += ["", "One after another, K configs take K single epochs, so their configs/h is the single run's; "
              "speed-up = K x (single train + eval) / (group train + eval).", "",
              f"## Step time over devices (K = {result['device_configs']} configs, pmap of the "
              f"{result['devices'][0]['batching'] if result['devices'] else ''} group program)", "",
              "| devices | configs per device | step (ms) | train epoch (s) | first epoch incl. compile (s) |",
              "|---|---|---|---|---|"]
    for d in result["devices"]:
        lines.append(f"| {d['devices']} | {d['k'] // d['devices']} | {1000 * d['step_s']:.1f} | "
                     f"{d['train_epoch_s']:.3f} | {d['first_epoch_s']:.1f} |")
    if result["machine"]["backend"] == "cpu":
        lines += ["", "On CPU the devices are fake (`--xla_force_host_platform_device_count`) and share the "
                  "same cores, so more devices cannot be faster here: this checks the multi-device path, not "
                  "its speed."]
    return lines


def seed_check_markdown(check: dict) -> list[str]:
    batching = check.get("batching", "vmap")
    lines = [f"## Seed check, batching={batching}: 8-seed grid as one program vs 8 single runs "
             f"({check['dataset']}, {check['epochs']} epochs)", "",
             f"Command: `{check['command']}`; load average when it started: "
             f"{', '.join(f'{x:.1f}' for x in check['load']['loadavg_at_start'])}.",
             *([machine_line(check["machine"])] if "machine" in check else []),
             f"Program groups: {check['groups']} (one program for the 8 seeds). Wall time: grid "
             f"{check['grid_wall_s']:.0f} s, the 8 single runs {check['singles_wall_s']:.0f} s.",
             f"Every seed's summary.json (best epoch, best valid and test metrics, epochs, status) equal to its "
             f"single run's: **{check['all_summaries_equal']}**. Largest relative difference of an epoch's "
             f"summed loss terms: {check['max_loss_rel_diff']:.2e}; largest difference of any rounded "
             f"valid/test metric in any epoch: {check['max_metric_abs_diff']:.4f}.", "",
             "| config | best epoch grid / single | valid R@20 grid / single | test R@20 grid / single "
             "| rows equal | max loss rel. diff |", "|---|---|---|---|---|---|"]
    for p in check["per_seed"]:
        lines.append(f"| {p['config']} | {p['best_epoch'][0]} / {p['best_epoch'][1]} | {p['grid_valid']:.4f} / "
                     f"{p['single_valid']:.4f} | {p['grid_test']:.4f} / {p['single_test']:.4f} | "
                     f"{p['metrics_rows_equal']} | {p['max_loss_rel_diff']:.1e} |")
    lines += [""] + check.get("notes", [])
    return lines


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# Grid engine measurements ({m['backend']})", "",
             f"{machine_line(m)} Other processes shared the machine; the load average at each start is given.",
             "(A section measured by another invocation names its own machine and commit.)", ""]
    if "single" in result:
        lines += timing_markdown(result) + [""]
    for batching in ("map", "vmap", "vmap_columns"):
        if f"seed_check_{batching}" in result:
            lines += seed_check_markdown(result[f"seed_check_{batching}"]) + [""]
    lines += result.get("notes", [])
    return "\n".join(lines) + "\n"


def check_flags() -> None:
    """Every flag that can be checked before the minutes of measuring (cli.fail: one line, exit 2)."""
    from lgmrec_jax import group_engine

    try:
        sizes, counts = [int(k) for k in FLAGS.sizes], [int(d) for d in FLAGS.device_counts]
    except ValueError:
        cli.fail(f"--sizes={','.join(FLAGS.sizes)} and --device_counts={','.join(FLAGS.device_counts)}: expected "
                 f"integers")
    if min(sizes + counts, default=1) < 1 or FLAGS.epochs < 1 or FLAGS.seed_check_epochs < 1 \
            or FLAGS.device_configs < 1 or FLAGS.nominal_epochs < 1:
        cli.fail("--sizes, --device_counts, --epochs, --seed_check_epochs, --device_configs and --nominal_epochs "
                 "must be >= 1")
    for flag in ("batchings", "device_batching", "seed_check_batching"):
        values = FLAGS[flag].value if isinstance(FLAGS[flag].value, list) else [FLAGS[flag].value]
        unknown = [b for b in values if b not in group_engine.BATCHINGS]
        if unknown:
            cli.fail(f"--{flag}={unknown[0]}: unknown; expected one of {list(group_engine.BATCHINGS)}")
    cli.require_out_dir(FLAGS.out)


def read_result(json_path: str) -> dict:
    """The sections measured before (each invocation adds or replaces its own); one line if unreadable."""
    try:
        result = benchmarking.read_json(json_path)
    except benchmarking.ReportError as err:
        cli.fail(f"{err}; this command adds to it: repair or move it")
    if result is None:
        return {}
    if not isinstance(result, dict):
        cli.fail(f"{json_path}: not a JSON object; this command adds to it: repair or move it")
    return result


def write_result(result: dict, json_path: str, md_path: str) -> None:
    # a killed write leaves the earlier sections whole
    benchmarking.write_texts({json_path: benchmarking.json_text(result), md_path: markdown(result)})


def main(argv):
    from lgmrec_jax import configs
    from lgmrec_jax.data import DatasetError, load_dataset, statistics as ds_statistics

    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}; every input is a --flag")
    check_flags()
    logging.set_verbosity(logging.INFO)
    tag = FLAGS.tag or jax.default_backend()
    json_path = os.path.join(FLAGS.out, f"bench_grid_{tag}.json")
    result = read_result(json_path)
    command = "python -m experiments.bench_grid " + " ".join(sys.argv[1:])
    try:
        ds = load_dataset(FLAGS.data_dir, FLAGS.dataset)
    except DatasetError as err:
        cli.fail(str(err))
    load = benchmarking.wait_low_load(FLAGS.wait_idle_s)
    if FLAGS.seed_check:
        import tempfile

        from lgmrec_jax.grid import runner

        runner.setup_compilation_cache("")  # no cache: the wall times include compiling
        workdir = FLAGS.workdir or tempfile.mkdtemp(prefix="seed_check_")  # --workdir: lgmrec_jax.train's flag
        check = seed_check(FLAGS.dataset, FLAGS.data_dir, FLAGS.seed_check_epochs, workdir, FLAGS.seed_check_batching)
        here = machine()
        result.setdefault("machine", here)
        result[f"seed_check_{FLAGS.seed_check_batching}"] = {**check, "command": command, "load": load,
                                                             "machine": here}
    else:
        result["machine"] = machine()  # the timing section's
        base = configs.for_dataset(FLAGS.dataset)
        base.num_devices = 1  # the single-run baseline on one device, as each config of a group
        stats = ds_statistics(ds)
        result.update({"dataset": FLAGS.dataset, "command": command, "load": load,
                       "nominal_epochs": FLAGS.nominal_epochs, "epochs_timed": FLAGS.epochs,
                       "device_configs": FLAGS.device_configs,
                       "stats": f"{ds.n_users} users, {ds.n_items} items, {len(ds.train)} train rows, features "
                                f"{stats['features']}"})
        with jax.default_matmul_precision(base.matmul_precision):
            logging.info("single run")
            result["single"] = bench_single(base, ds, FLAGS.epochs)
            logging.info("%s", result["single"])
            result["groups"] = []
            for k in map(int, FLAGS.sizes):
                for batching in FLAGS.batchings:
                    logging.info("group of %d, batching %s", k, batching)
                    result["groups"].append(bench_group(base, ds, k, 1, FLAGS.epochs, batching=batching))
                    logging.info("%s", result["groups"][-1])
            result["devices"] = []
            for d in map(int, FLAGS.device_counts):
                if d > jax.local_device_count():
                    continue
                logging.info("group of %d over %d devices", FLAGS.device_configs, d)
                result["devices"].append(bench_group(base, ds, FLAGS.device_configs, d, FLAGS.epochs,
                                                     evaluate=False, batching=FLAGS.device_batching))
                logging.info("%s", result["devices"][-1])
    write_result(result, json_path, os.path.join(FLAGS.out, f"bench_grid_{tag}.md"))
    print(markdown(result))


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
