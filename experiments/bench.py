"""Benchmarks: compile, train epoch, evaluation, full run, memory and scaling, on any backend.

    python -m experiments.bench --presets=baby --kernel=segment_sum,bcoo --append      # this CPU
    python -m experiments.bench --presets=clothing --scales=0.5,2 --full_run --compile_cache --append
    python -m experiments.bench --presets=clothing --trace --append                    # device time by kind

Each configuration (dataset x kernel x precision x patch set) runs in its own process. Results go to
``<out>/bench_<tag>.{json,md}`` with machine, versions, commit and command; ``--append`` adds to an
existing report, which is otherwise refused. ``--scales`` adds Clothing scaled up or down,
``--compile_only`` sizes a program without training it, ``--profile`` times ablations of the step,
``--trace`` sums a profiler trace (experiments/trace_summary.py), and ``--patch`` measures a named
candidate change (:data:`PATCHES`) inside the benchmark process only. ``--helpfull`` lists the rest.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import re
import time
from typing import NamedTuple, Optional

from absl import app, flags, logging

from experiments import trace_summary  # no jax either: plain JSON
from experiments.benchmarking import (REFERENCE_CPU, REFERENCE_GPU, REPO, CpuMeter, ReportError,
                                      code_fingerprint, git_state, json_text, machine, median, read_json,
                                      wait_idle, write_texts)
from lgmrec_jax import cli  # no jax either
from lgmrec_jax.configs import default as default_config  # no jax: the config module is plain Python

PRESET_NAMES = ("tiny", "default", "baby", "sports", "clothing")
RESULT_FIELDS = ("dataset", "kernel", "matmul_precision", "n_users", "n_items", "n_train", "n_batches",
                 "setup_s", "compile", "first_epoch_s", "epoch_s", "epoch_times_s", "sampler_s",
                 "steps_per_s", "eval_s", "eval_times_s", "eval_compile_s", "memory")

FLAGS = flags.FLAGS
@dataclasses.dataclass
class Settings:
    presets: tuple = ("baby",)
    scales: tuple = ()
    scaled: tuple = ()  # (catalogue, interactions) scale pairs of clothing
    feature_dims: Optional[tuple] = None
    epochs_to_time: int = 3
    compile_only: bool = False  # setup, compile and XLA's program memory only (sizing large scales)
    eval_repeats: int = 3
    full_run: bool = False
    full_run_presets: tuple = ()  # empty: every dataset
    max_epochs: int = 0
    kernels: tuple = ("segment_sum",)
    precisions: tuple = ("highest",)
    feature_dtypes: tuple = ("float32",)
    eval_topks: tuple = (default_config.get_config().eval_topk,)
    patch_sets: tuple = ()  # tuples of PATCHES names; each is one more configuration
    baseline: bool = True  # the unpatched configuration too
    profile: bool = False
    profile_steps: int = 16
    trace: bool = False
    compile_cache: bool = False
    isolate: bool = True
    wait_idle_s: int = 0
    out: str = os.path.join(REPO, "experiments", "results")
    tag: str = ""
    append: bool = False
    data_dir: str = "./data"


# ----------------------------------------------------------------------------------- datasets


def dataset_names(settings: Settings) -> list[str]:
    names = []
    for preset in settings.presets:
        if preset not in PRESET_NAMES:
            raise ValueError(f"unknown preset {preset!r}; expected one of {PRESET_NAMES}")
        names.append("synthetic" if preset == "default" else f"synthetic_{preset}")
    suffix = f"_f{settings.feature_dims[0]}-{settings.feature_dims[1]}" if settings.feature_dims else ""
    names += [f"synthetic_clothing_x{float(scale):g}{suffix}" for scale in settings.scales]
    names += [f"synthetic_clothing_c{float(c):g}_e{float(e):g}{suffix}" for c, e in settings.scaled]
    return names


class Scaled(NamedTuple):
    """Clothing with its catalogue (users and items) and its interactions scaled separately."""

    catalogue: float
    interactions: float
    feature_dims: Optional[tuple]


SCALED_NAME = re.compile(r"synthetic_clothing_(?:x(?P<x>[0-9.]+)|c(?P<c>[0-9.]+)_e(?P<e>[0-9.]+))"
                         r"(?:_f(?P<image>[0-9]+)-(?P<text>[0-9]+))?")


def parse_scaled(name: str) -> Optional[Scaled]:
    """The scales of synthetic_clothing_x<both> or synthetic_clothing_c<catalogue>_e<interactions>,
    each with an optional _f<IMAGE>-<TEXT> suffix; None for any other name."""
    m = SCALED_NAME.fullmatch(name)
    if m is None:
        return None
    dims = (int(m["image"]), int(m["text"])) if m["image"] else None
    if m["x"] is not None:
        return Scaled(float(m["x"]), float(m["x"]), dims)
    return Scaled(float(m["c"]), float(m["e"]), dims)


def scaled_preset(scaled: Scaled):
    from lgmrec_jax import synthetic

    base = synthetic.PRESETS["clothing"]
    dims = scaled.feature_dims or (base.image_dim, base.text_dim)
    return dataclasses.replace(base, n_users=max(10, round(base.n_users * scaled.catalogue)),
                               n_items=max(10, round(base.n_items * scaled.catalogue)),
                               n_interactions=round(base.n_interactions * scaled.interactions),
                               image_dim=int(dims[0]), text_dim=int(dims[1]))


def load(name: str, data_dir: str):
    """The dataset and its config (scaled clothing uses the clothing config)."""
    from lgmrec_jax import configs
    from lgmrec_jax.data import load_dataset

    scaled = parse_scaled(name)
    if scaled is None:
        return load_dataset(data_dir, name), configs.for_dataset(name)
    from lgmrec_jax import synthetic

    out_dir = os.path.join(os.path.abspath(data_dir), name)
    if not os.path.isdir(out_dir):
        logging.info("generating %s into %s", name, out_dir)
        synthetic.generate(scaled_preset(scaled), out_dir, name)
    return load_dataset(data_dir, name, generate_synthetic=False), configs.for_dataset("synthetic_clothing")


# ----------------------------------------------------------------------------------- patches

_UNDO = []  # (object, attribute, original value) of the applied patches, newest last


def _set(obj, name: str, value) -> None:
    _UNDO.append((obj, name, getattr(obj, name)))
    setattr(obj, name, value)


def undo_patches() -> None:
    while _UNDO:
        obj, name, value = _UNDO.pop()
        setattr(obj, name, value)


def _patch_infonce_vmap():
    """losses.infonce as a per-row function (logsumexp over all
    candidates, which subtracts the row max) vectorised with jax.vmap. Kept to measure that
    change against the current code in one run."""
    import jax
    import jax.numpy as jnp

    from lgmrec_jax import losses
    from lgmrec_jax.model import TAU, l2_normalize

    def infonce_row(anchor, positive, candidates_normed, tau=TAU):
        a, p = l2_normalize(anchor), l2_normalize(positive)
        return jax.nn.logsumexp(candidates_normed @ a / tau) - jnp.dot(a, p) / tau

    def infonce(anchors, positives, candidates, mask, tau=TAU):
        per_row = jax.vmap(infonce_row, in_axes=(0, 0, None, None))(anchors, positives, l2_normalize(candidates), tau)
        return jnp.sum(per_row * mask)

    _set(losses, "infonce", infonce)


def _patch_propagate_transpose():
    """graph.propagate (segment_sum kernel) with a custom VJP whose backward is again a sorted
    segment_sum over the transposed matrix, instead of autodiff's scatter-add into x[cols].

    The transpose's sorted order is computed inside the program from the indices (an argsort per
    call); a real change would precompute it once on the host in build_host_graph (Graph fields).
    """
    import jax
    import jax.numpy as jnp

    from lgmrec_jax import graph as graph_lib
    import lgmrec_jax.model as model_lib

    original = graph_lib.propagate

    def spmm(rows, cols, vals, x, n_rows):
        return jax.ops.segment_sum(vals[:, None] * x[cols], rows, num_segments=n_rows, indices_are_sorted=True)

    @jax.custom_vjp
    def prop(rows, cols, vals, x, n_rows_arr):
        return spmm(rows, cols, vals, x, n_rows_arr.shape[0])

    def fwd(rows, cols, vals, x, n_rows_arr):
        return prop(rows, cols, vals, x, n_rows_arr), (rows, cols, vals, x.shape[0], n_rows_arr)

    def bwd(res, g):
        rows, cols, vals, n_cols, n_rows_arr = res
        order = jnp.argsort(cols, stable=True)
        gx = spmm(cols[order], rows[order], vals[order], g, n_cols)
        return None, None, None, gx, None

    prop.defvjp(fwd, bwd)

    def propagate(matrix, x, kernel="segment_sum"):
        if kernel != "segment_sum":
            return original(matrix, x, kernel)
        rows, cols = matrix.indices[:, 0], matrix.indices[:, 1]
        return prop(rows, cols, jax.lax.stop_gradient(matrix.data), x,
                    jnp.zeros((matrix.shape[0], 0), x.dtype))

    _set(graph_lib, "propagate", propagate)
    _set(model_lib, "propagate", propagate)


def _patch_batched_propagation():
    """One propagation per graph matrix and layer instead of one per embedding block.

    The forward multiplies the same matrices by several independent blocks: R by the projected items
    of each modality and by the hyperedge logits of each modality (2 * (64 + H) columns), and A_hat,
    layer by layer, by the CGE block and each modality's MGE block (3 x 64 columns). Concatenating
    the blocks along the columns gives one gather + segment_sum (and one transposed product in the
    backward) per matrix and layer: the sparse indices are read once and the rows are wider. Same
    arithmetic per column. Applies when CGE, MGE and GHE are all on, cf_model is lightgcn and
    n_ui_layers == n_mm_layers (the paper's configs); otherwise the model's own forward runs.
    Patches the class that step.make_model builds.
    """
    import jax.numpy as jnp
    import numpy as np

    import lgmrec_jax.model as model_lib
    from lgmrec_jax import step as step_lib

    base = model_lib.LGMRec

    class BatchedPropagationLGMRec(base):
        def __call__(self, graph, feats, noise):
            mods = self.modalities
            if not (mods and self.use_cge and self.use_mge and self.use_ghe and self.cf_model == "lightgcn"
                    and self.n_ui_layers == self.n_mm_layers):
                return super().__call__(graph, feats, noise)
            ops, n_users, n_items, d = self.products, self.n_users, self.n_items, self.embedding_size
            proj = [ops.feature_matmul(feats[m], self.proj[m], n_items) for m in mods]
            logits = [ops.feature_matmul(feats[m], self.hyper[m], n_items) for m in mods]
            widths = [d] * len(mods) + [self.hyper_num] * len(mods)
            user_side = ops.propagate(graph.interactions, jnp.concatenate(proj + logits, axis=1), n_users)
            parts = jnp.split(user_side, np.cumsum(widths)[:-1].tolist(), axis=1)
            user_proj, user_logits = parts[:len(mods)], parts[len(mods):]
            x0 = jnp.concatenate([self.user_emb, self.item_emb], axis=0)
            y0 = [jnp.concatenate([u * graph.user_inv_deg, p], axis=0) for u, p in zip(user_proj, proj)]
            layers = [jnp.concatenate([x0] + y0, axis=1)]
            for _ in range(self.n_ui_layers):
                layers.append(ops.propagate(graph.norm_adj, layers[-1], n_users + n_items))
            c = jnp.mean(jnp.stack([layer[:, :d] for layer in layers]), axis=0)
            fused = c
            for i in range(len(mods)):
                fused = fused + model_lib.l2_normalize(layers[-1][:, d * (i + 1): d * (i + 2)])
            assign = {}
            for m, item_logits, u_logits in zip(mods, logits, user_logits):
                assign[f"{m}_item"] = model_lib.gumbel_softmax(item_logits, noise.gumbel[f"{m}_item"], self.tau)
                assign[f"{m}_user"] = model_lib.gumbel_softmax(u_logits, noise.gumbel[f"{m}_user"], self.tau)
                if m == "t" and self.legacy_text_user_hyper:
                    assign["v_user"] = assign["t_user"]
                    assign["t_user"] = u_logits
            keep = noise.keep or {}
            hyper, ghe = {}, 0.0
            for m in mods:
                item_h = self.dropout(assign[f"{m}_item"], keep.get(f"{m}_item"))
                user_h = self.dropout(assign[f"{m}_user"], keep.get(f"{m}_user"))
                hyper[f"{m}_user"], hyper[f"{m}_item"] = model_lib.hgnn(item_h, user_h, c[n_users:],
                                                                        self.n_hyper_layer, ops)
                ghe = ghe + jnp.concatenate([hyper[f"{m}_user"], hyper[f"{m}_item"]], axis=0)
            fused = fused + self.alpha * model_lib.l2_normalize(ghe)
            return model_lib.Outputs(fused[:n_users], fused[n_users:], hyper)

    _set(step_lib, "LGMRec", BatchedPropagationLGMRec)


def _patch_feature_matmul_autodiff():
    """model.LocalOps.feature_matmul as plain ``feat @ weight`` differentiated by JAX, as before
    commit c118d5b (which adopted feature_matmul_vjp). Kept to measure that change in one run."""
    import lgmrec_jax.model as model_lib

    _set(model_lib.LocalOps, "feature_matmul", lambda self, feat, weight, n_items: (feat @ weight)[:n_items])


def _patch_unpruned_top_k():
    """evaluation.grouped_top_k without the pruned selections on CPUs:
    the group maxima in total order and two plain top-ks. Kept to measure that change in one run."""
    import functools

    from lgmrec_jax import evaluation

    _set(evaluation, "grouped_top_k", functools.partial(evaluation.grouped_top_k, prune=False))


def _patch_wait_each_split():
    """evaluation.map_splits waiting for each sequential split before dispatching the next
    (accelerators only: CPUs evaluate the splits from threads)."""
    import jax

    from lgmrec_jax import evaluation

    threaded = evaluation.map_splits

    def map_splits(fn, n_splits, concurrent):
        if concurrent:
            yield from threaded(fn, n_splits, concurrent)
            return
        for i in range(n_splits):
            yield jax.block_until_ready(fn(i))

    _set(evaluation, "map_splits", map_splits)


# Candidates measured and adopted since (now the library's code; their A/B runs are in
# experiments/results/bench_cpu_patches.md): infonce_matmul (losses.log_sum_exp_scores) and
# feature_matmul_vjp (model.frozen_feature_matmul). The patches below measure the alternatives.
# batched_propagation was the library's code for a while (WORKSPACE.md: 1% faster per epoch on an
# H100, bench_gpu.md run 7 against run 6, and about 10% slower on this project's CPU), and went back to
# being a patch.
PATCHES = {"infonce_vmap": _patch_infonce_vmap, "feature_matmul_autodiff": _patch_feature_matmul_autodiff,
           "batched_propagation": _patch_batched_propagation,
           "propagate_transpose": _patch_propagate_transpose, "unpruned_top_k": _patch_unpruned_top_k,
           "wait_each_split": _patch_wait_each_split}


# ----------------------------------------------------------------------------------- memory


def rss_mb() -> float:
    """Current resident set size of this process."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def memory() -> dict:
    import jax

    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    stats = None
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory statistics
        stats = None
    if stats:
        for key in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit"):
            if key in stats:
                out[f"device_{key}_mb"] = round(stats[key] / 2**20, 1)
    return out


# ----------------------------------------------------------------------------------- one configuration


def sync(tree):
    import jax

    return jax.block_until_ready(tree)


def run_config(spec: dict) -> dict:
    """Measures one (dataset, kernel, precision, patches) configuration in this process."""
    try:
        return _run_config(spec)
    finally:
        undo_patches()


def _run_config(spec: dict) -> dict:
    import jax

    if spec.get("compile_cache_dir"):
        jax.config.update("jax_compilation_cache_dir", spec["compile_cache_dir"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    else:  # compile times are measured cold, whatever the environment configures
        jax.config.update("jax_enable_compilation_cache", False)
    for name in spec.get("patches", ()):
        PATCHES[name]()
    from lgmrec_jax import configs, engine as engine_lib, step as step_lib
    from lgmrec_jax.run import make_engine

    result = {"dataset": spec["dataset"], "kernel": spec["kernel"], "matmul_precision": spec["precision"],
              "patches": list(spec.get("patches", ())), "loadavg_start": list(os.getloadavg()),
              "xla_flags": os.environ.get("XLA_FLAGS", ""),
              "code": {"commit": git_state()["commit"], "lgmrec_jax_sha256_12": code_fingerprint()}}
    tick = time.perf_counter()
    ds, cfg = load(spec["dataset"], spec["data_dir"])
    result["load_s"] = round(time.perf_counter() - tick, 3)
    cfg.kernel, cfg.matmul_precision = spec["kernel"], spec["precision"]
    cfg.feature_dtype = result["feature_dtype"] = spec.get("feature_dtype", "float32")
    cfg.eval_topk = result["eval_topk"] = spec["eval_topk"]
    configs.validate(cfg)  # a bad --kernel, --matmul_precision, --feature_dtype or --eval_topk fails here
    result.update(n_users=ds.n_users, n_items=ds.n_items, n_train=int(len(ds.train)),
                  n_valid=int(len(ds.valid)), n_test=int(len(ds.test)),
                  feature_dims={m: int(f.shape[1]) for m, f in (("v", ds.v_feat), ("t", ds.t_feat)) if f is not None},
                  config={k: cfg[k] for k in ("train_batch_size", "eval_batch_size", "n_ui_layers", "n_mm_layers",
                                              "n_hyper_layer", "hyper_num", "eval_noise")})
    with jax.default_matmul_precision(cfg.matmul_precision):
        tick = time.perf_counter()
        exp = make_engine(cfg, ds)
        state = exp.put(exp.init_state())
        sync(state)
        result["setup_s"] = round(time.perf_counter() - tick, 3)
        result["n_batches"] = int(exp.sampler.n_batches)
        result["rss_after_setup_mb"] = round(rss_mb(), 1)

        compile_info, epoch_op_names = {}, None
        run_fn = exp._epoch if type(exp) is engine_lib.SingleEngine else None  # pmap: its own arguments
        if run_fn is not None:
            batches = step_lib.to_batch(tuple(exp.sampler.epoch(0)))
            key = step_lib.stream_key(cfg.seed, step_lib.TRAIN_STREAM, 0)
            tick = time.perf_counter()
            lowered = run_fn.lower(state, exp.graph, exp.feats, batches, key, 0)
            compile_info["trace_lower_s"] = round(time.perf_counter() - tick, 3)
            tick = time.perf_counter()
            compiled = lowered.compile()
            compile_info["compile_s"] = round(time.perf_counter() - tick, 3)
            compile_info["method"] = "aot: SingleEngine._epoch.lower(...).compile()"
            result["program_memory"] = {"train_epoch": program_memory(compiled)}
            if spec.get("trace"):  # to name the traced operations by model scope
                epoch_op_names = trace_summary.hlo_op_names(compiled.as_text())
            if exp.plans:
                name = next(iter(exp.plans))
                params = exp.get(state).params
                base = exp.noise_free(params, exp.graph, exp.feats)  # as SingleEngine.evaluate_params passes it
                evaluator = exp.evaluate_split.lower(params, exp.graph, exp.feats, *exp.eval_arrays[name], key,
                                                     base=base).compile()
                result["program_memory"]["evaluate_split"] = program_memory(evaluator)
            del batches
        if spec.get("compile_only"):
            result.update(compile=compile_info, compile_only=True)
            result["memory"] = memory()
            return result

        times, cpu, others, losses = [], [], [], []
        for epoch in range(spec["epochs_to_time"] + 1):
            meter, tick = CpuMeter(), time.perf_counter()
            state, parts = exp.train_epoch(state, epoch)
            sync(state)
            times.append(time.perf_counter() - tick)
            usage = meter.stop()
            cpu.append(usage["cpu_s"])
            others.append(usage.get("others_share"))
            losses.append(float(parts[:, 0].sum()))
            logging.info("%s %s: epoch %d %.3fs loss %.4f", spec["dataset"], spec["kernel"], epoch, times[-1],
                         losses[-1])
        steady = times[1:]
        result["first_epoch_s"] = round(times[0], 4)
        result["epoch_times_s"] = [round(t, 4) for t in steady]
        result["epoch_s"] = round(median(steady), 4)
        result["epoch_min_s"] = round(min(steady), 4)
        result["epoch_cpu_s"] = round(median(cpu[1:]), 3)
        result["epoch_others_share"] = [None if o is None else round(o, 3) for o in others[1:]]
        result["steps_per_s"] = round(result["n_batches"] / result["epoch_s"], 3)
        result["epoch_losses"] = losses
        if "compile_s" not in compile_info:
            compile_info["compile_s"] = round(max(times[0] - result["epoch_s"], 0.0), 3)
            compile_info["method"] = "first epoch - median steady epoch"
        result["compile"] = compile_info
        tick = time.perf_counter()
        exp.sampler.epoch(spec["epochs_to_time"] + 1)
        result["sampler_s"] = round(time.perf_counter() - tick, 4)

        if spec["eval_repeats"] > 0 and exp.plans:
            host_state = exp.get(state)
            eval_times, eval_cpu, eval_others, metrics = [], [], [], None
            for i in range(spec["eval_repeats"] + 1):
                meter, tick = CpuMeter(), time.perf_counter()
                metrics = exp.evaluate_params(host_state.params, i)
                eval_times.append(time.perf_counter() - tick)
                usage = meter.stop()
                eval_cpu.append(usage["cpu_s"])
                eval_others.append(usage.get("others_share"))
            result["eval_first_s"] = round(eval_times[0], 4)
            result["eval_times_s"] = [round(t, 4) for t in eval_times[1:]]
            result["eval_s"] = round(median(eval_times[1:]), 4)
            result["eval_compile_s"] = round(max(eval_times[0] - result["eval_s"], 0.0), 3)
            result["eval_cpu_s"] = round(median(eval_cpu[1:]), 3)
            result["eval_others_share"] = [None if o is None else round(o, 3) for o in eval_others[1:]]
            result["eval_blocks"] = {name: int(p.block_users.shape[0]) for name, p in exp.plans.items()}
            result["valid_recall@20"] = metrics["valid"].get("recall@20")
        result["memory"] = memory()

        if spec.get("trace"):
            try:  # a profiler that fails (no CUPTI, no trace file) must not cost the timings above
                result["trace"], state = trace_epoch_and_eval(exp, state, spec["epochs_to_time"] + 1,
                                                              epoch_op_names)
            except Exception as err:  # noqa: BLE001 - recorded in the result instead
                result["trace"] = {"error": f"{type(err).__name__}: {err}"[:500]}
                state = exp.put(exp.init_state())  # the traced epoch may have consumed the donated state
        if spec.get("profile"):
            result["profile"] = profile_epoch(exp, state, spec["epochs_to_time"] + 2, spec.get("profile_steps", 0))
            if exp.plans:
                result["profile"]["eval"] = profile_eval(exp, exp.get(state).params)
            result["memory_after_profile"] = memory()

    if spec.get("full_run"):
        result["full_run"] = full_run(cfg, ds, spec.get("max_epochs", 0))
        result["memory_after_full_run"] = memory()
    result["loadavg_end"] = list(os.getloadavg())
    return result


def total(program: Optional[dict]) -> Optional[float]:
    """A program_memory record's total (records written before it existed: computed)."""
    if not program:
        return None
    return program.get("total", program["argument"] + program["output"] + program["temp"] - program["alias"])


def program_memory(compiled) -> Optional[dict]:
    """XLA's buffer assignment of a compiled program (MB): its arguments, outputs, temporaries, the
    donated bytes reused for outputs, and their total (arguments + outputs + temporaries - aliased:
    what one call needs at once). The same on every backend up to the backend's own fusion choices,
    so a CPU compile sizes a GPU run before one is lent."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return None
    if stats is None:
        return None
    mb = lambda name: round(getattr(stats, name, 0) / 2 ** 20, 1)
    out = {k: mb(f"{k}_size_in_bytes") for k in ("argument", "output", "temp", "alias")}
    peak = getattr(stats, "peak_memory_in_bytes", None)
    out["total"] = round(out["argument"] + out["output"] + out["temp"] - out["alias"], 1)
    if peak:
        out["xla_peak"] = round(peak / 2 ** 20, 1)  # backend-specific; on CPU it leaves temporaries out
    return out


def full_run(cfg, ds, max_epochs: int) -> dict:
    from lgmrec_jax.run import train_and_evaluate

    if max_epochs:
        cfg.epochs = max_epochs
    workdir = tempfile.mkdtemp(prefix="lgmrec-bench-")
    try:
        tick = time.perf_counter()
        summary = train_and_evaluate(cfg, ds, workdir, restart=True)
        wall = time.perf_counter() - tick
        with open(os.path.join(workdir, "metrics.jsonl")) as handle:
            rows = [json.loads(line) for line in handle]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {"wall_s": round(wall, 2), "status": summary.get("status"), "epochs_run": summary.get("epochs_run"),
            "best_epoch": summary.get("best_epoch"),
            "best_valid_recall@20": (summary.get("best_valid") or {}).get("recall@20"),
            "median_train_s": median([r["train_s"] for r in rows]),
            "median_eval_s": median([r["eval_s"] for r in rows if "eval_s" in r]),
            **run_timeline(rows)}


def run_timeline(rows: list[dict]) -> dict:
    """Where a run's wall time went, from its metrics rows' ``time_s`` (the run's clock at the end of
    each epoch's evaluation): the start (setup, restore; the first epoch's compile is in its
    train_s), the first epoch, and the host's median cost between two epochs beyond their train_s
    and eval_s (checkpoint hand-off, logging, early stopping)."""
    if not rows or any("time_s" not in r for r in rows):
        return {}
    spent = [r["train_s"] + r.get("eval_s", 0.0) for r in rows]
    gaps = [b["time_s"] - a["time_s"] - s for a, b, s in zip(rows, rows[1:], spent[1:])]
    return {"before_first_epoch_s": round(rows[0]["time_s"] - spent[0], 3),
            "first_epoch_train_s": rows[0]["train_s"],
            "host_between_epochs_s": round(median(gaps), 4) if gaps else None}


# ----------------------------------------------------------------------------------- profile


def trace_epoch_and_eval(exp, state, epoch: int, epoch_op_names: dict | None = None):
    """Device time of one steady epoch and one evaluation by operation (experiments.trace_summary),
    from JAX profiler traces; returns (summaries, the state after the traced epoch). With the epoch
    program's op names (trace_summary.hlo_op_names), the epoch's time also by model scope."""
    import jax

    out, tmp = {}, tempfile.mkdtemp(prefix="lgmrec-trace-")
    try:
        with jax.profiler.trace(os.path.join(tmp, "epoch"), create_perfetto_trace=True):
            state, _ = exp.train_epoch(state, epoch)
            sync(state)
        events = trace_summary.load_events(trace_summary.newest_trace(os.path.join(tmp, "epoch")))
        out["epoch"] = trace_summary.summarize(events, per=int(exp.sampler.n_batches), op_names=epoch_op_names)
        if exp.plans:
            params = exp.get(state).params
            with jax.profiler.trace(os.path.join(tmp, "eval"), create_perfetto_trace=True):
                exp.evaluate_params(params, epoch)
            events = trace_summary.load_events(trace_summary.newest_trace(os.path.join(tmp, "eval")))
            out["eval"] = trace_summary.summarize(events)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out, state


def profile_epoch(exp, state, epoch: int, max_steps: int = 0) -> dict:
    """A steady epoch broken down by timing ablations.

    Every variant runs the same epoch's batches as one compiled ``lax.scan`` (as the engine does, so
    per-call overheads and temporary-buffer allocation are amortised the same way) and is timed as
    the median of two runs after a compile run. Variants:
      step_full         the training step as the engine builds it (device part of an epoch)
      forward_loss      model forward in training mode + the loss, no gradient
      forward_model     model forward only (outputs reduced to a scalar)
      grad_no_hcl       value-and-grad of BPR + reg only (the InfoNCE term dropped)
      grad_hcl_only     value-and-grad of the InfoNCE term only (+ the forward it needs)
      grad_projections  value-and-grad of sum(tanh(F_m W_m)) + sum(tanh(F_m H_m)): the feature
                        projections' matmuls, forward and backward, alone
      grad_cge          value-and-grad of the collaborative part alone (LightGCN over A_hat)
      adam_update       the optimiser update alone (zero gradients)
    plus the host part: sampler_s (negative sampling) and transfer_s (one epoch of batches to the device).
    """
    import jax
    import jax.numpy as jnp
    import optax

    from lgmrec_jax import losses, step as step_lib
    from lgmrec_jax.model import sample_noise

    model, cfg, optimizer = exp.model, exp.cfg, exp.optimizer
    shapes = model.noise_shapes()
    tick = time.perf_counter()
    host_batches = exp.sampler.epoch(epoch)
    sampler_s = time.perf_counter() - tick
    tick = time.perf_counter()
    batches = sync(step_lib.to_batch(tuple(host_batches)))
    transfer_s = time.perf_counter() - tick
    n_batches = int(batches.users.shape[0])
    steps = min(n_batches, max_steps) if max_steps else n_batches
    batches = type(batches)(*(x[:steps] for x in batches))
    per_epoch = n_batches / steps  # variants run ``steps`` steps; times are scaled to a whole epoch
    key = step_lib.stream_key(cfg.seed, step_lib.TRAIN_STREAM, epoch)
    params = exp.get(state).params
    state = step_lib.TrainState(params, optimizer.init(params))

    def forward(p, graph, feats, k):
        return model.apply(p, graph, feats, sample_noise(k, shapes, train=True, keep_rate=model.keep_rate))

    def total(p, graph, feats, batch, k):
        return losses.loss_parts(forward(p, graph, feats, k), batch, cfg.cl_weight, cfg.reg_weight, cfg.tau).total

    def no_hcl(p, graph, feats, batch, k):
        out = forward(p, graph, feats, k)
        e_u, e_p, e_n = out.user[batch.users], out.item[batch.pos], out.item[batch.neg]
        n = jnp.sum(batch.mask)
        bpr = jnp.sum(jax.vmap(losses.bpr_row)(e_u, e_p, e_n) * batch.mask) / n
        frob = lambda x: jnp.sqrt(jnp.sum(jnp.square(x) * batch.mask[:, None]))
        return bpr + cfg.reg_weight * (frob(e_u) + frob(e_p) + frob(e_n)) / n

    def hcl_only(p, graph, feats, batch, k):
        h = forward(p, graph, feats, k).hyper
        if "t_user" not in h or "v_user" not in h:
            return jnp.zeros(())
        return cfg.cl_weight * (
            losses.infonce(h["v_user"][batch.users], h["t_user"][batch.users], h["t_user"], batch.mask, cfg.tau)
            + losses.infonce(h["v_item"][batch.pos], h["t_item"][batch.pos], h["t_item"], batch.mask, cfg.tau))

    ops = getattr(model, "products", None)  # the model's matmul provider, where it has one
    project = (lambda f, w: ops.feature_matmul(f, w, model.n_items)) if ops is not None else (lambda f, w: f @ w)

    def projections(p, graph, feats, batch, k):
        inner = p["params"]
        return sum(jnp.sum(jnp.tanh(project(feats[m], inner[f"{m}_proj"])))
                   + jnp.sum(jnp.tanh(project(feats[m], inner[f"{m}_hyper"]))) for m in model.modalities)

    def cge(p, graph, feats, batch, k):
        c = model.apply(p, graph, method=model.cge)
        return jnp.sum(c[batch.users] * c[model.n_users + batch.pos])

    def grad_variant(objective):
        def step(st, graph, feats, batch, k):
            loss, grads = jax.value_and_grad(objective)(st.params, graph, feats, batch, k)
            updates, opt_state = optimizer.update(grads, st.opt_state, st.params)
            return step_lib.TrainState(optax.apply_updates(st.params, updates), opt_state), loss
        return step

    def touch(st, value):
        # The next step's parameters depend on this step's value (numerically a no-op: 1e-30 is below
        # float32 resolution of the parameters), so XLA cannot hoist the forward out of the scan as
        # loop-invariant code, as it would with unchanged parameters.
        return step_lib.TrainState(jax.tree_util.tree_map(lambda x: x + 1e-30 * value, st.params), st.opt_state)

    def forward_loss(st, graph, feats, batch, k):
        value = total(st.params, graph, feats, batch, k)
        return touch(st, value), value

    def forward_model(st, graph, feats, batch, k):
        out = forward(st.params, graph, feats, k)
        value = jnp.sum(out.user[batch.users]) + jnp.sum(out.item[batch.pos]) + sum(
            jnp.sum(v) for v in out.hyper.values())
        return touch(st, value), value

    def adam_update(st, graph, feats, batch, k):
        grads = jax.tree_util.tree_map(jnp.zeros_like, st.params)
        updates, opt_state = optimizer.update(grads, st.opt_state, st.params)
        return step_lib.TrainState(optax.apply_updates(st.params, updates), opt_state), jnp.zeros(())

    variants = {
        "step_full": step_lib.make_train_step(model, optimizer, step_lib.config_objective(cfg)),
        "forward_loss": forward_loss,
        "forward_model": forward_model,
        "grad_no_hcl": grad_variant(no_hcl),
        "grad_hcl_only": grad_variant(hcl_only),
        "grad_projections": grad_variant(projections),
        "grad_cge": grad_variant(cge),
        "adam_update": adam_update,
    }
    if not model.modalities:
        for name in ("grad_hcl_only", "grad_projections"):
            variants.pop(name)
    out = {"sampler_s": round(sampler_s, 4), "transfer_s": round(transfer_s, 4), "n_batches": n_batches,
           "steps_timed": steps}
    for name, step in variants.items():
        epoch_fn = jax.jit(lambda state, graph, feats, batches, key, first, step=step: step_lib.epoch_scan(
            lambda s, b, i: step(s, graph, feats, b, jax.random.fold_in(key, i)), state, batches, first))
        tick = time.perf_counter()
        sync(epoch_fn(state, exp.graph, exp.feats, batches, key, 0))
        first = time.perf_counter() - tick
        runs, cpu, others = [], [], []
        for _ in range(2):
            meter, tick = CpuMeter(), time.perf_counter()
            sync(epoch_fn(state, exp.graph, exp.feats, batches, key, 0))
            runs.append(time.perf_counter() - tick)
            usage = meter.stop()
            cpu.append(usage["cpu_s"])
            others.append(usage.get("others_share") or 0.0)
        out[name] = {"epoch_s": round(per_epoch * median(runs), 4), "epoch_min_s": round(per_epoch * min(runs), 4),
                     "cpu_s": round(per_epoch * median(cpu), 3), "others_share": round(max(others), 3),
                     "compile_s": round(max(first - median(runs), 0.0), 3)}
        logging.info("profile %s: %.3fs per epoch", name, out[name]["epoch_s"])
    return out


def profile_eval(exp, params) -> dict:
    """Valid+test evaluation split into device time (per_block noise: one forward per block, as the
    run does), device time with one forward per split (eval_noise=per_eval; the difference is the
    extra forwards), and the host metrics."""
    import jax

    from lgmrec_jax import evaluation, step as step_lib

    key = step_lib.stream_key(exp.cfg.seed, step_lib.EVAL_STREAM, 0)
    one_forward = jax.jit(evaluation.make_split_evaluator(exp.model, "per_eval", exp.cfg.eval_topk))
    out = {"blocks": sum(int(p.block_users.shape[0]) for p in exp.plans.values())}
    tops = {}
    for label, fn in (("device_per_block_s", exp.evaluate_split), ("device_one_forward_per_split_s", one_forward)):
        runs = []
        for i in range(3):  # the first call compiles (or warms up)
            tick = time.perf_counter()
            for j, name in enumerate(exp.plans):
                tops[name] = sync(fn(params, exp.graph, exp.feats, *exp.eval_arrays[name], jax.random.fold_in(key, j)).hits)
            runs.append(time.perf_counter() - tick)
        out[label] = round(median(runs[1:]), 4)
    tick = time.perf_counter()
    for name, plan in exp.plans.items():
        evaluation.metrics_from_hits(plan, tops[name])
    out["host_metrics_s"] = round(time.perf_counter() - tick, 4)
    return out


# ----------------------------------------------------------------------------------- driver


# The environment of the isolated workers: the caller's. main() keeps the coordinating process off the
# GPU's memory pool (it only asks the device's kind), so a worker can preallocate as a user's run does.
WORKER_ENV: dict = {}
PREALLOCATE = "XLA_PYTHON_CLIENT_PREALLOCATE"


def keep_coordinator_off_the_pool() -> None:
    """Before this process makes a GPU client: allocate on demand here, and keep the caller's setting
    for the workers (by default a GPU client reserves 75% of the card at start, which would leave a
    worker started beside it short)."""
    WORKER_ENV.update(os.environ)
    os.environ[PREALLOCATE] = "false"


def worker_command(spec: dict, result_path: str) -> list[str]:
    return [sys.executable, "-m", "experiments.bench", f"--worker={json.dumps(spec)}",
            f"--worker_out={result_path}"]


def run_isolated(spec: dict) -> dict:
    handle, result_path = tempfile.mkstemp(prefix="lgmrec-bench-", suffix=".json")
    os.close(handle)
    try:
        proc = subprocess.run(worker_command(spec, result_path), cwd=REPO, env=WORKER_ENV or None)
        if proc.returncode != 0:
            error = f"worker exited with {proc.returncode}"
            try:
                with open(result_path) as handle:
                    error += f": {json.load(handle)['error']}"  # the worker's exception, where it got to write it
            except (OSError, ValueError, KeyError, TypeError):
                pass
            return {"dataset": spec["dataset"], "kernel": spec["kernel"], "matmul_precision": spec["precision"],
                    "feature_dtype": spec.get("feature_dtype", "float32"),
                    "eval_topk": spec["eval_topk"], "patches": list(spec.get("patches", ())), "error": error}
        with open(result_path) as handle:
            return json.load(handle)
    finally:
        os.remove(result_path)


def specs(settings: Settings) -> list[dict]:
    patch_sets = ([()] if settings.baseline or not settings.patch_sets else []) + [tuple(p) for p in settings.patch_sets]
    out = []
    full_names = set(dataset_names(dataclasses.replace(settings, presets=settings.full_run_presets, scales=(),
                                                       scaled=())))
    for name in dataset_names(settings):
        full = settings.full_run and (not settings.full_run_presets or name in full_names)
        for kernel, precision, feature_dtype, eval_topk, patches in itertools.product(
                settings.kernels, settings.precisions, settings.feature_dtypes, settings.eval_topks, patch_sets):
            out.append({"dataset": name, "kernel": kernel, "precision": precision, "feature_dtype": feature_dtype,
                        "eval_topk": eval_topk,
                        "patches": list(patches), "data_dir": os.path.abspath(settings.data_dir),
                        "epochs_to_time": settings.epochs_to_time, "eval_repeats": settings.eval_repeats,
                        "profile": settings.profile, "profile_steps": settings.profile_steps, "full_run": full,
                        "trace": settings.trace,
                        "max_epochs": settings.max_epochs, "compile_only": settings.compile_only})
    return out


def compile_cache_runs(spec: dict, isolate: bool) -> dict:
    """Cold then warm process start against one fresh persistent cache directory."""
    cache_dir = tempfile.mkdtemp(prefix="lgmrec-jax-cache-")
    base = dict(spec, epochs_to_time=1, eval_repeats=1, profile=False, trace=False, full_run=False,
                compile_cache_dir=cache_dir)
    out = {"dataset": spec["dataset"], "kernel": spec["kernel"], "matmul_precision": spec["precision"],
           "feature_dtype": spec.get("feature_dtype", "float32"), "eval_topk": spec["eval_topk"]}
    try:
        for phase in ("cold", "warm"):
            res = run_isolated(base) if isolate else run_config(base)
            if "error" in res:
                out[phase] = {"error": res["error"]}
                continue
            out[phase] = {"trace_lower_s": res["compile"].get("trace_lower_s"),
                          "compile_s": res["compile"]["compile_s"], "first_epoch_s": res["first_epoch_s"],
                          "epoch_s": res["epoch_s"], "eval_first_s": res.get("eval_first_s"),
                          "eval_compile_s": res.get("eval_compile_s")}
        out["cache_mb"] = round(sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(cache_dir)
                                    for f in fs) / 2**20, 2)
        if not isolate:
            out["note"] = "in one process: the warm run also hits jit's in-memory cache"
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    return out


def run_benchmark(settings: Settings, argv: Optional[list] = None) -> dict:
    """Runs every configuration, writes bench_<tag>.json and .md under settings.out; returns the report.

    With ``settings.append`` the results are added to the existing report of the same tag (one
    report built by several commands; each result names the command that produced it).
    """
    now = lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    current = machine()
    report = None
    json_path = paths(settings, current["backend"])[0]
    if settings.append and os.path.exists(json_path):
        report = load_report(json_path)
    elif os.path.exists(json_path):  # a report holds every earlier command's runs: never replaced silently
        raise BenchError(f"{json_path} exists: --append adds this command's results to it; for a new report "
                         f"pass another --tag or --out, or move it away")
    if report is None:
        report = {"machine": current, "runs": [], "results": [], "compile_cache": [],
                  "reference": {"cpu": REFERENCE_CPU, "gpu_h100": REFERENCE_GPU}}
    run = {"command": " ".join(argv) if argv else None, "started": now(), "settings": dataclasses.asdict(settings),
           "device": current["device_kind"], "versions": current["versions"],
           "git": current["git"]}
    report["runs"].append(run)
    index = len(report["runs"]) - 1
    for spec in specs(settings):
        logging.info("benchmark %s kernel=%s precision=%s patches=%s", spec["dataset"], spec["kernel"],
                     spec["precision"], spec["patches"] or "-")
        before = wait_idle(settings.wait_idle_s) if settings.wait_idle_s > 0 else None
        res = run_isolated(spec) if settings.isolate else run_config(spec)
        res.update(others_share_before=before, run=index)
        report["results"].append(res)
        write_report(report, settings)  # partial results survive an interrupted benchmark
    if settings.compile_cache and specs(settings):
        if settings.wait_idle_s > 0:
            wait_idle(settings.wait_idle_s)
        entry = compile_cache_runs(specs(settings)[0], settings.isolate)
        entry["run"] = index
        report["compile_cache"].append(entry)
    run["finished"] = now()
    write_report(report, settings)
    return report


def load_report(path: str) -> dict:
    """An earlier bench_<tag>.json for --append; BenchError (one line) if it is not one."""
    try:
        report = read_json(path)
    except ReportError as err:
        raise BenchError(f"{err}; --append adds to it: repair or move it") from None
    if not isinstance(report, dict) or not all(isinstance(report.get(k), list) for k in ("runs", "results")):
        raise BenchError(f"{path}: not a benchmark report (no runs and results lists); --append adds to it: "
                         f"repair or move it")
    report.setdefault("compile_cache", [])
    return report


def paths(settings: Settings, backend: str) -> tuple[str, str]:
    tag = settings.tag or backend
    return (os.path.join(settings.out, f"bench_{tag}.json"), os.path.join(settings.out, f"bench_{tag}.md"))


def write_report(report: dict, settings: Settings) -> None:
    json_path, md_path = paths(settings, report["machine"]["backend"])
    write_texts({json_path: json_text(report),
                 md_path: markdown(report, load_proxy(settings.out, report["machine"]["backend"]))})


def load_proxy(out: str, backend: str) -> Optional[dict]:
    """experiments/torch_proxy.py's report for this backend (torch_proxy_cpu.json or _gpu.json), if any."""
    path = os.path.join(out, f"torch_proxy_{'cpu' if backend == 'cpu' else 'gpu'}.json")
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def proxy_markdown(report: dict, proxy: dict) -> list[str]:
    """Our latest default-configuration row per dataset against the PyTorch proxy's figures."""
    ours = {}
    for r in report["results"]:
        default = (r.get("kernel") == "segment_sum" and r.get("matmul_precision") == "highest"
                   and r.get("feature_dtype", "float32") == "float32" and not r.get("patches")
                   and r.get("eval_topk", "direct") == "grouped")
        if default and "error" not in r and r.get("epoch_s") and not r.get("compile_only"):
            ours[r["dataset"]] = r
    rows = []
    for p in proxy["results"]:
        r = ours.get(p["dataset"])
        if r is None:
            continue
        ratio = lambda a, b: f"{a / b:.1f}x" if a and b else "-"
        rows.append(f"| {p['dataset']} | {_f(p['epoch_s'])} | {_f(r['epoch_s'])} | {ratio(p['epoch_s'], r['epoch_s'])} | "
                    f"{_f(p['eval_s'])} | {_f(r.get('eval_s'))} | {ratio(p['eval_s'], r.get('eval_s'))} | {r.get('run', 0)} |")
    if not rows:
        return []
    where = proxy["machine"].get("gpu") or proxy["machine"].get("cpu")
    return ["", "## Against the PyTorch proxy of the reference", "",
            f"`experiments/torch_proxy.py` (SPEC.md's model run the reference's way, checked against the goldens; "
            f"`{proxy['command']}`, {proxy['started']}, {where}) against this file's latest default-configuration "
            "row per dataset (segment_sum, highest, float32 features, grouped top-k).", "",
            "| dataset | proxy epoch | ours | speed-up | proxy eval | ours | speed-up | our run |",
            "|---|---|---|---|---|---|---|---|"] + rows


# ----------------------------------------------------------------------------------- markdown


def numerics(result: dict) -> str:
    """The precision column: the matmul precision, and bf16 features where used."""
    bf16 = result.get("feature_dtype", "float32") == "bfloat16"
    return result["matmul_precision"] + (", bf16 features" if bf16 else "")


def run_machine_note(run: dict, machine: dict) -> str:
    """A run appended on another device or with other versions than the report's header names."""
    versions = run.get("versions") or {}
    changed = {k: v for k, v in versions.items() if machine.get("versions", {}).get(k) != v}
    device = run.get("device")
    parts = ([f"on {device}"] if device and device != machine.get("device_kind") else []) + [
        f"{k} {v}" for k, v in sorted(changed.items())]
    return f" [{'; '.join(parts)}]" if parts else ""


def kernels(result: dict) -> str:
    """The kernel column: the propagation kernel, and the evaluation's top-k method where recorded
    (results from before config eval_topk existed ran "direct")."""
    flags = " ".join(f for f in result.get("xla_flags", "").split()
                     if not f.startswith("--xla_force_host_platform_device_count"))
    return (result["kernel"] + (f", {result['eval_topk']} top-k" if "eval_topk" in result else "")
            + (f", XLA_FLAGS={flags}" if flags else ""))


def _f(x, digits=None):
    """Fixed digits, or (default) three significant digits for times."""
    if x is None:
        return "-"
    if digits is not None:
        return f"{x:.{digits}f}"
    return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"


def markdown(report: dict, proxy: Optional[dict] = None) -> str:
    m = report["machine"]
    v = m["versions"]
    lines = [f"# lgmrec-jax benchmark ({m['backend']})", "",
             f"Machine: {m['device_kind']} x{m['device_count']} ({m['backend']}); host {m['cpu']}, "
             f"{m['cpu_count']} CPU cores, {m['host_memory_gib']} GiB RAM; {m['platform']}.  ",
             f"Versions: jax {v.get('jax')}, jaxlib {v.get('jaxlib')}, flax {v.get('flax')}, optax {v.get('optax')}, "
             f"numpy {v.get('numpy')}, python {v.get('python')}, lgmrec_jax {v.get('lgmrec_jax')}.", "",
             "Commands (each result's `run` column refers to this list):", ""] + [
                 f"{i}. `{r['command'] or 'run_benchmark(...)'}` ({r['started']} - {r.get('finished', 'unfinished')}, "
                 f"commit {r['git']['commit'][:10] or '?'}"
                 + (f" + uncommitted {', '.join(r['git']['lgmrec_jax_uncommitted'])}" if r['git']['lgmrec_jax_uncommitted'] else "")
                 + ")" + run_machine_note(r, report["machine"]) for i, r in enumerate(report["runs"])] + ["",
             "*code*: sha256 of lgmrec_jax/*.py when the configuration started (the working tree is shared "
             "and changes). Times in seconds, wall clock, device work synchronised. *compile*: the train-epoch program "
             "lowered + compiled ahead of time (trace+lower / XLA compile). *epoch*: median (and min) of the "
             "timed steady `SingleEngine.train_epoch` calls, count in *n* (host sampling, "
             "transfer and the compiled scan over all steps). *eval*: median valid+test `SingleEngine.evaluate_params` "
             "(compiled blocked top-k + host metrics); *eval compile*: first evaluation minus steady. "
             "*peak mem*: peak RSS of the process (MB) and, on accelerators, device peak_bytes_in_use (MB). "
             "*epoch CPU s*: CPU seconds of the process per steady epoch (all threads). *others' CPU share*: "
             "the largest share of the machine's CPU capacity that other processes used during a timed epoch "
             "or evaluation (0 = the machine was ours; wall times with a large share are inflated).", "",
             "| run | code | dataset | users | items | train rows | kernel | precision | patches | compile (trace+lower / XLA) | "
             "first epoch | n | epoch (min) | epoch CPU s | steps/s | sampler | eval | eval compile | peak RSS | device peak | "
             "others' CPU share | vs ref epoch |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    refs = report["reference"]["cpu" if m["backend"] == "cpu" else "gpu_h100"]
    for r in report["results"]:
        if r.get("compile_only"):
            continue  # in the program-memory table below
        if "error" in r:
            lines.append(f"| {r.get('run', 0)} | | {r['dataset']} | | | | {kernels(r)} | {numerics(r)} | "
                         f"{','.join(r['patches']) or '-'} | error: {r['error']} |" + " |" * 12)
            continue
        c = r["compile"]
        comp = (f"{_f(c.get('trace_lower_s'))} / {_f(c['compile_s'])}" if "trace_lower_s" in c else _f(c["compile_s"]))
        ref = refs.get(r["dataset"], {}).get("epoch_s")
        vs = f"{ref / r['epoch_s']:.1f}x faster" if ref else "-"
        mem = r["memory"]
        shares = [x for x in r.get("epoch_others_share", []) + r.get("eval_others_share", []) if x is not None]
        lines.append(
            f"| {r.get('run', 0)} | {r.get('code', {}).get('lgmrec_jax_sha256_12', '-')[:7]} | {r['dataset']} | {r['n_users']} | {r['n_items']} | {r['n_train']} | {kernels(r)} | "
            f"{numerics(r)} | {','.join(r['patches']) or '-'} | {comp} | {_f(r['first_epoch_s'])} | "
            f"{len(r['epoch_times_s'])} | {_f(r['epoch_s'])} ({_f(r.get('epoch_min_s'))}) | {_f(r.get('epoch_cpu_s'))} | {_f(r['steps_per_s'])} | "
            f"{_f(r['sampler_s'])} | {_f(r.get('eval_s'))} | {_f(r.get('eval_compile_s'))} | "
            f"{_f(mem['peak_rss_mb'], 0)} | {_f(mem.get('device_peak_bytes_in_use_mb'), 0)} | "
            f"{_f(max(shares), 2) if shares else '-'} | {vs} |")
    full = [r for r in report["results"] if r.get("full_run")]
    if full:
        lines += ["", "## Full early-stopped runs", "",
                  "| dataset | kernel | precision | wall | status | epochs | best epoch | best valid R@20 | "
                  "median train | median eval | before epoch 0 | epoch 0 train | host between epochs |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in full:
            f = r["full_run"]
            lines.append(f"| {r['dataset']} | {kernels(r)} | {numerics(r)} | {_f(f['wall_s'], 1)} | "
                         f"{f['status']} | {f['epochs_run']} | {f['best_epoch']} | {_f(f['best_valid_recall@20'], 4)} | "
                         f"{_f(f['median_train_s'])} | {_f(f['median_eval_s'])} | {_f(f.get('before_first_epoch_s'))} | "
                         f"{_f(f.get('first_epoch_train_s'))} | {_f(f.get('host_between_epochs_s'))} |")
        lines += ["", "*before epoch 0*: setup and restore (from the rows' `time_s`); *epoch 0 train* includes its "
                  "compilation; *host between epochs*: median seconds between two epochs' rows beyond their train "
                  "and eval time (checkpoint hand-off, logging); empty for results recorded before rows had `time_s`."]
    scaled = [r for r in report["results"] if "epoch_s" in r and parse_scaled(r["dataset"])]
    if len(scaled) > 1:
        lines += ["", "## Scaling (clothing with its catalogue and its interactions scaled)", "",
                  "*catalogue*: users and items x scale; *interactions*: x scale. Every step runs the reference's "
                  "full-graph forward (propagations over all edges, projections of all items' features) and the "
                  "contrastive denominators over all users and items, so a step costs a fixed part plus parts "
                  "proportional to the edges and to the catalogue; an epoch is (training rows / batch) such steps. "
                  "Hence, at fixed interactions, the epoch grows linearly with the catalogue; at a fixed "
                  "catalogue it grows as steps x step cost, both rising with the interactions (faster than "
                  "linear, as in the reference, which runs the same full-graph forward per batch). Memory "
                  "(the XLA column) grows linearly along both axes. *ms/step* = epoch / steps.", "",
                  "| dataset | catalogue | interactions | users | items | train rows | steps | epoch | ms/step | "
                  "eval | train program (XLA) | peak RSS | device peak |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(scaled, key=lambda r: (parse_scaled(r["dataset"])[:2])):
            sc = parse_scaled(r["dataset"])
            train_peak = total((r.get("program_memory") or {}).get("train_epoch"))
            lines.append(f"| {r['dataset']} | {sc.catalogue:g} | {sc.interactions:g} | {r['n_users']} | "
                         f"{r['n_items']} | {r['n_train']} | {r['n_batches']} | {_f(r['epoch_s'])} | "
                         f"{_f(1000 * r['epoch_s'] / r['n_batches'])} | {_f(r.get('eval_s'))} | "
                         f"{_f(train_peak, 0)} | {_f(r['memory']['peak_rss_mb'], 0)} | "
                         f"{_f(r['memory'].get('device_peak_bytes_in_use_mb'), 0)} |")
    sized = [r for r in report["results"] if (r.get("program_memory") or {}).get("train_epoch")]
    if sized:
        lines += ["", "## Program memory (XLA buffer assignment)", "",
                  "What XLA plans for the compiled programs (`compiled.memory_analysis()`, MB): the train epoch's "
                  "arguments (state, graph, features, the epoch's batches) and temporaries, and the total one call "
                  "needs at once (arguments + outputs + temporaries - donated); the same total for the evaluation "
                  "program (one split). A CPU compile sizes a run before a GPU is at hand; the GPU's own fusion "
                  "choices move it somewhat.", "",
                  "| dataset | users | items | train rows | features | train args | train temp | train total | "
                  "eval total | peak RSS |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(sized, key=lambda r: r["n_train"]):
            t, e = r["program_memory"]["train_epoch"], r["program_memory"].get("evaluate_split") or {}
            fd = r.get("feature_dims", {})
            dims = f"{fd.get('v', '-')}/{fd.get('t', '-')}"
            lines.append(f"| {r['dataset']} | {r['n_users']} | {r['n_items']} | {r['n_train']} | {dims} | "
                         f"{_f(t['argument'], 0)} | {_f(t['temp'], 0)} | {_f(total(t), 0)} | {_f(total(e), 0)} | "
                         f"{_f(r['memory']['peak_rss_mb'], 0)} |")
    for cache in report.get("compile_cache") or []:
        lines += ["", f"## Persistent compilation cache ({cache['dataset']}, {cache['kernel']}, run {cache.get('run', 0)})", "",
                  "Two fresh processes against one empty `jax_compilation_cache_dir` "
                  "(`jax_persistent_cache_min_compile_time_secs=0`).", "",
                  "| start | trace+lower | XLA compile (train epoch) | first eval - steady eval |", "|---|---|---|---|"]
        for phase in ("cold", "warm"):
            p = cache.get(phase, {})
            lines.append(f"| {phase} | {_f(p.get('trace_lower_s'))} | {_f(p.get('compile_s'))} | "
                         f"{_f(p.get('eval_compile_s'))} |")
        lines.append(f"\nCache size: {cache.get('cache_mb')} MB.")
    for r in (r for r in report["results"] if r.get("trace") and "error" in r["trace"]):
        lines += ["", f"The trace of {r['dataset']}, {kernels(r)}, {numerics(r)} failed: {r['trace']['error']}"]
    for r in (r for r in report["results"] if r.get("trace") and "error" not in r["trace"]):
        head = f"{r['dataset']}, {kernels(r)}, {numerics(r)}"
        lines += ["", f"## Device time by operation: {head}", "",
                  "From JAX profiler traces of one steady epoch (per unit: per training step) and one valid+test "
                  "evaluation (`--trace`, experiments/trace_summary.py).", ""]
        for part in ("epoch", "eval"):
            if part in r["trace"]:
                lines.append(trace_summary.markdown(r["trace"][part], title=f"{part}: {head}"))
    profiled = [r for r in report["results"] if r.get("profile")]
    for r in profiled:
        p = r["profile"]
        lines += ["", f"## Epoch breakdown: {r['dataset']}, {r['kernel']}, {','.join(r['patches']) or 'no patches'}",
                  "", f"Each row is a variant step compiled as a `lax.scan` over the first {p.get('steps_timed')} of "
                  f"the epoch's {p['n_batches']} batches, scaled to the whole epoch; see `profile_epoch` in "
                  "experiments/bench.py.", "", "| part | seconds per epoch (median of 2) | min | CPU s | others' CPU share |", "|---|---|---|---|---|",
                  f"| host: negative sampling | {_f(p['sampler_s'])} | | | |",
                  f"| host: transfer of batches | {_f(p['transfer_s'])} | | | |"]
        for name, val in p.items():
            if isinstance(val, dict) and "epoch_s" in val:
                lines.append(f"| {name} | {_f(val['epoch_s'])} | {_f(val.get('epoch_min_s'))} | {_f(val.get('cpu_s'))} | "
                             f"{_f(val.get('others_share'), 2)} |")
        if "eval" in p:
            e = p["eval"]
            lines += ["", f"Evaluation (valid+test, {e['blocks']} blocks): device {_f(e['device_per_block_s'])} s with one "
                      f"forward per block (the run's eval_noise=per_block), {_f(e['device_one_forward_per_split_s'])} s "
                      f"with one forward per split; host metrics {_f(e['host_metrics_s'])} s."]
    if proxy:
        lines += proxy_markdown(report, proxy)
    lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- main


def define_flags() -> None:
    """The command line; defined only when run as a program, so importing this module (tests,
    notebooks) never clashes with other modules' absl flags such as --data_dir or --kernel."""
    flags.DEFINE_list("presets", ["baby"], f"Synthetic presets to run, from {PRESET_NAMES} (default baby, none "
                      "when only --scales is given).")
    flags.DEFINE_list("scales", [], "Scale factors of clothing (users, items, interactions), e.g. 0.25,0.5,1,2.")
    flags.DEFINE_list("scaled", [], "CATALOGUE:INTERACTIONS scale pairs of clothing, e.g. 0.2:0.2,0.2:0.4,0.2:0.8 "
                      "(the interactions axis) or 0.1:0.4,0.2:0.4,0.4:0.4 (the catalogue axis).")
    flags.DEFINE_string("feature_dims", "", "IMAGE,TEXT feature widths for the scaled presets (default: "
                        "clothing's 4096,384).")
    flags.DEFINE_integer("epochs_to_time", 3, "Steady epochs timed per configuration (median reported).")
    flags.DEFINE_integer("eval_repeats", 3, "Steady valid+test evaluations timed (median); 0 skips evaluation.")
    flags.DEFINE_bool("compile_only", False, "Set up and compile only: XLA's program memory, no timed epochs "
                      "(sizes scales too large to train here).")
    flags.DEFINE_bool("full_run", False, "Also time a full early-stopped run (slow on CPU).")
    flags.DEFINE_list("full_run_presets", [], "With --full_run: only these presets (e.g. default); empty = all.")
    flags.DEFINE_integer("max_epochs", 0, "Epoch cap of the full run (0: the config's).")
    flags.DEFINE_list("kernel", ["segment_sum"], "Propagation kernels to compare: segment_sum, bcoo, ell.")
    flags.DEFINE_list("matmul_precision", ["highest"], "Matmul precisions to compare: highest, high, default, "
                      "TF32_TF32_F32_X3 (GPUs), BF16_BF16_F32_X6 (configs.PRECISIONS).")
    flags.DEFINE_list("feature_dtype", ["float32"], "Feature storage types to compare: float32, bfloat16 "
                      "(config feature_dtype).")
    flags.DEFINE_list("eval_topk", [default_config.get_config().eval_topk], "Evaluation top-k methods to "
                      "compare: grouped, direct, approx (config eval_topk).")
    flags.DEFINE_multi_string("patch", [], "A comma-separated set of experimental monkeypatches (names in "
                              "experiments.bench.PATCHES), measured as one more configuration next to the "
                              "unpatched one; repeat the flag for several sets.")
    flags.DEFINE_bool("baseline", True, "With --patch: also run the unpatched configuration.")
    flags.DEFINE_bool("profile", False, "Also break a steady epoch down by timing ablations.")
    flags.DEFINE_integer("profile_steps", 16, "Steps per profiled variant (the first of an epoch; times are "
                         "scaled to the whole epoch); 0 = the whole epoch.")
    flags.DEFINE_bool("trace", False, "Also trace one steady epoch and one evaluation with the JAX profiler "
                      "and sum the device time by operation (experiments/trace_summary.py).")
    flags.DEFINE_bool("compile_cache", False, "Also measure cold vs warm persistent compilation cache.")
    flags.DEFINE_integer("wait_idle_s", 0, "Before each configuration wait up to this long for other processes "
                         "to leave the CPUs (under 20% use); 0 does not wait. The share seen is recorded.")
    flags.DEFINE_bool("isolate", True, "Run each configuration in its own process (per-configuration memory).")
    flags.DEFINE_string("out", os.path.join(REPO, "experiments", "results"), "Results directory.")
    flags.DEFINE_string("tag", "", "Result file suffix: bench_<tag>.json/md (default: the backend).")
    flags.DEFINE_bool("append", False, "Add the results to the existing bench_<tag>.json (without it, an "
                      "existing one is refused, never replaced).")
    flags.DEFINE_string("data_dir", "./data", "Directory of the (generated) datasets.")
    flags.DEFINE_string("worker", "", "(internal) JSON spec of one configuration to run in this process.")
    flags.DEFINE_string("worker_out", "", "(internal) where the worker writes its JSON result.")


class BenchError(ValueError):
    """A benchmark that cannot start as asked; the message is one line."""


def settings_from_flags() -> Settings:
    """The flags as Settings, after checking everything that can be checked before the first configuration."""
    dims = None
    if FLAGS.feature_dims:
        try:
            dims = tuple(int(x) for x in FLAGS.feature_dims.split(","))
        except ValueError:
            dims = ()
        if len(dims) != 2 or min(dims) < 1:
            raise BenchError(f"--feature_dims={FLAGS.feature_dims}: expected IMAGE,TEXT positive widths")
    patch_sets = [tuple(n for n in group.split(",") if n) for group in FLAGS.patch]
    for name in (n for group in patch_sets for n in group):
        if name not in PATCHES:
            raise BenchError(f"--patch={name}: unknown; expected one of {sorted(PATCHES)}")
    from lgmrec_jax import configs

    for flag, allowed in (("kernel", configs.KERNELS), ("matmul_precision", configs.PRECISIONS),
                          ("feature_dtype", configs.FEATURE_DTYPES), ("eval_topk", configs.EVAL_TOPK_METHODS),
                          ("presets", PRESET_NAMES), ("full_run_presets", PRESET_NAMES)):
        for value in FLAGS[flag].value:
            if value not in allowed:
                raise BenchError(f"--{flag}={value}: unknown; expected one of {list(allowed)}")
    presets = tuple(FLAGS.presets)
    try:
        scaled = tuple(tuple(float(x) for x in pair.split(":")) for pair in FLAGS.scaled)
    except ValueError:
        scaled = ((),)
    if any(len(pair) != 2 or not min(pair) > 0 for pair in scaled):
        raise BenchError(f"--scaled={','.join(FLAGS.scaled)}: expected CATALOGUE:INTERACTIONS positive pairs")
    try:
        scales = tuple(float(x) for x in FLAGS.scales)
    except ValueError:
        raise BenchError(f"--scales={','.join(FLAGS.scales)}: expected float values") from None
    if any(not scale > 0 for scale in scales):
        raise BenchError(f"--scales={','.join(FLAGS.scales)}: expected positive values")
    if FLAGS.eval_repeats < 0 or FLAGS.epochs_to_time < 1 or FLAGS.max_epochs < 0:
        raise BenchError("--eval_repeats must be >= 0 (0 skips evaluation), --epochs_to_time >= 1 and "
                         "--max_epochs >= 0")
    problem = cli.out_dir_problem(FLAGS.out)
    if problem:  # before the minutes of measuring
        raise BenchError(f"--out={FLAGS.out}: {problem}")
    if (FLAGS.scales or scaled) and not FLAGS["presets"].present:
        presets = ()  # --scales / --scaled alone run only the scaled presets
    return Settings(presets=presets, scales=scales, scaled=scaled, feature_dims=dims,
                    epochs_to_time=FLAGS.epochs_to_time, eval_repeats=FLAGS.eval_repeats,
                    compile_only=FLAGS.compile_only, full_run=FLAGS.full_run, full_run_presets=tuple(FLAGS.full_run_presets), max_epochs=FLAGS.max_epochs, kernels=tuple(FLAGS.kernel),
                    precisions=tuple(FLAGS.matmul_precision), feature_dtypes=tuple(FLAGS.feature_dtype), eval_topks=tuple(FLAGS.eval_topk), patch_sets=tuple(patch_sets), baseline=FLAGS.baseline, profile=FLAGS.profile, profile_steps=FLAGS.profile_steps, trace=FLAGS.trace,
                    compile_cache=FLAGS.compile_cache, isolate=FLAGS.isolate, wait_idle_s=FLAGS.wait_idle_s, out=FLAGS.out, tag=FLAGS.tag, append=FLAGS.append,
                    data_dir=FLAGS.data_dir)


def check_backend(settings: Settings) -> None:
    """Each precision compiled once on this backend (TF32_TF32_F32_X3 is GPU-only), before any configuration."""
    from lgmrec_jax import configs, engine as engine_lib

    for precision in settings.precisions:
        try:
            engine_lib.check_matmul_precision(precision)
        except configs.ConfigError as err:
            raise BenchError(str(err)) from None


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}; every input is a --flag")
    logging.set_verbosity(logging.INFO)
    if FLAGS.worker:
        try:
            result = run_config(json.loads(FLAGS.worker))
        except Exception as err:  # noqa: BLE001  recorded for the parent's report, then raised as ever
            with open(FLAGS.worker_out, "w") as handle:
                json.dump({"error": f"{type(err).__name__}: {err}"}, handle)
            raise
        with open(FLAGS.worker_out, "w") as handle:
            json.dump(result, handle)
        return
    try:
        settings = settings_from_flags()
        if settings.isolate:
            keep_coordinator_off_the_pool()  # before check_backend makes this process's client
        check_backend(settings)
        report = run_benchmark(settings, argv=["python -m experiments.bench"] + sys.argv[1:])
    except BenchError as err:
        cli.fail(str(err))
    json_path, md_path = paths(settings, report["machine"]["backend"])
    print(f"wrote {json_path} and {md_path}")
    index = len(report["runs"]) - 1
    mine = [r for r in report["results"] if r.get("run") == index]
    failed = [r for r in mine if r.get("error")]
    for r in failed:
        print(f"error: {r.get('dataset')} ({r.get('kernel')}, {r.get('matmul_precision')}): {r['error']}",
              file=sys.stderr)
    if mine and len(failed) == len(mine):
        sys.exit(1)  # nothing was measured


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
