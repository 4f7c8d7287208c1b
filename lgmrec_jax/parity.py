"""Replays a golden file recorded from the authors' PyTorch LGMRec and compares every quantity.

    python -m lgmrec_jax.parity --golden ../shared/golden/lgmrec_fixed.npz

Each stage is replayed from the golden's own inputs (initial parameters and recorded noise for the
training pass, the golden's post-Adam parameters for the evaluation pass), so one stage's rounding
does not leak into the next. Runs at the highest matmul precision on every backend unless
``--matmul_precision`` names another (to measure how far that precision lands from the reference).
Prints one row per quantity and exits 0 only when every row passes.
"""

from __future__ import annotations

import sys
import zipfile
import zlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import errors as flax_errors

from lgmrec_jax import data as data_lib
from lgmrec_jax import evaluation, graph as graph_lib, losses, step as step_lib
from lgmrec_jax.cli import parse_flags, setup_logging
from lgmrec_jax.configs import PRECISIONS, ConfigError
from lgmrec_jax.model import HYPER_KEYS, LGMRec, Noise
from lgmrec_jax.engine import check_matmul_precision

PARAMS = ("user_emb", "item_emb", "v_proj", "v_hyper", "t_proj", "t_hyper")
# Tolerances from the golden README: float32 replay of the same arithmetic.
TOL_VALUE = 2e-6  # embeddings, losses, scores: relative to the largest magnitude
TOL_GRAD = 2e-5  # gradients: relative to each gradient's largest entry
TOL_ADAM = 5e-5  # parameters after one Adam step: absolute (5% of the learning rate)
EXACT_TOPK = ("direct", "grouped")  # config eval_topk methods that must reproduce the recorded top-50


class Row(NamedTuple):
    name: str
    error: float
    tolerance: float
    kind: str  # "rel", "abs" or "exact"

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.error)) and self.error <= self.tolerance


def rel_error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(float(np.max(np.abs(want))), 1e-30)
    return float(np.max(np.abs(got - want))) / scale


CONFIG_INTS = ("n_users", "n_items", "embedding_size", "hyper_num", "n_ui_layers", "n_mm_layers",
               "n_hyper_layer", "legacy_text_user_hyper")
CONFIG_FLOATS = ("keep_rate", "alpha", "tau", "cl_weight", "reg_weight")
SIZES = ("n_users", "n_items", "embedding_size", "hyper_num")  # config integers that must be positive
LOSS_PARTS = ("bpr", "hcl", "reg", "total")
TOP_K = 50


class GoldenError(data_lib.DatasetError):
    """A golden file that cannot be replayed; the message is one line naming the file."""


def load_golden(path: str) -> dict:
    """The golden's arrays, checked to hold every key the replay reads, in the shapes its config
    implies; GoldenError (one line naming ``path``) for an unreadable, truncated or incomplete file."""
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
        if magic.startswith(b"PK"):  # otherwise np.load would read a .npy header or try a pickle
            with np.load(path, allow_pickle=False) as z:
                g = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        # A truncated archive: BadZipFile (no central directory), EOFError or zlib.error (a cut member)
        text = str(err).strip()
        reason = getattr(err, "strerror", None) or (text.splitlines()[0] if text else type(err).__name__)
        raise GoldenError(f"{path}: cannot read golden file ({reason})") from None
    if not magic.startswith(b"PK"):
        raise GoldenError(f"{path}: not a golden file (expected an .npz archive)")
    check_golden(g, path)
    return g


def expected_shapes(g: dict, path: str) -> dict:
    """{key: shape} for every array the replay reads; None stands for any length."""
    missing = [f"config/{k}" for k in CONFIG_INTS + CONFIG_FLOATS if f"config/{k}" not in g]
    if missing:
        raise GoldenError(f"{path}: not a complete golden file: missing {', '.join(missing)}")
    for k in CONFIG_INTS + CONFIG_FLOATS:
        v = g[f"config/{k}"]
        real = any(np.issubdtype(v.dtype, t) for t in (np.integer, np.floating, np.bool_))
        if v.shape != () or not real or not np.isfinite(v):
            raise GoldenError(f"{path}: config/{k} is {v!r}, expected one finite number")
        least = 1 if k in SIZES else 0
        if k in CONFIG_INTS and (float(v) != round(float(v)) or float(v) < least):
            raise GoldenError(f"{path}: config/{k} is {v.item()!r}, expected an integer >= {least}")
    c = lambda k: int(g[f"config/{k}"])
    users, items, dim, hyper = c("n_users"), c("n_items"), c("embedding_size"), c("hyper_num")
    shapes = {f"data/{s}": (None, 2) for s in ("train", "valid", "test")}
    modalities = []
    for m in ("v", "t"):
        feat = g.get(f"data/{m}_feat")
        if feat is not None:
            if feat.ndim != 2:
                raise GoldenError(f"{path}: data/{m}_feat has shape {feat.shape}, expected ({items}, feature dim)")
            modalities.append((m, feat.shape[1]))
            shapes[f"data/{m}_feat"] = (items, feat.shape[1])
    params = {"user_emb": (users, dim), "item_emb": (items, dim)}
    for m, feat_dim in modalities:
        params[f"{m}_proj"], params[f"{m}_hyper"] = (feat_dim, dim), (feat_dim, hyper)
    for prefix in ("param", "grad", "adam1"):
        shapes.update({f"{prefix}/{k}": shape for k, shape in params.items()})
    batch = len(g["batch/users"]) if getattr(g.get("batch/users"), "ndim", 0) == 1 else None
    shapes.update({f"batch/{k}": (batch,) for k in ("users", "pos", "neg")})
    shapes.update({"train/user_out": (users, dim), "train/item_out": (items, dim),
                   "eval/user_out": (users, dim), "eval/item_out": (items, dim), "eval/scores": (users, items)})
    shapes.update({f"loss/{k}": () for k in LOSS_PARTS})
    rows = {"user": users, "item": items}
    for m, _ in modalities:
        for side, n in rows.items():
            shapes[f"train/hyper_{m}_{side}"] = (n, dim)
            for noise in ("train/gumbel", "train/keep", "eval/gumbel"):
                shapes[f"{noise}/{m}_{side}"] = (n, hyper)
    for split in ("valid", "test"):
        evaluated = g.get(f"metrics_{split}/users")
        shapes[f"metrics_{split}/users"] = (None,)
        shapes[f"metrics_{split}/top50"] = (len(evaluated) if getattr(evaluated, "ndim", 0) == 1 else None, TOP_K)
    return shapes


INDICES = {"data/train": ("n_users", "n_items"), "data/valid": ("n_users", "n_items"),
           "data/test": ("n_users", "n_items"), "batch/users": ("n_users",), "batch/pos": ("n_items",),
           "batch/neg": ("n_items",), "metrics_valid/users": ("n_users",), "metrics_test/users": ("n_users",)}


def check_golden(g: dict, path: str) -> None:
    """Raises GoldenError naming ``path`` and the first problem: a missing key, a wrong shape, a
    non-numeric array, or an id out of the config's range."""
    shapes = expected_shapes(g, path)
    missing = [k for k in shapes if k not in g]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise GoldenError(f"{path}: not a complete golden file: missing {', '.join(missing[:5])}{more}")
    for key, shape in shapes.items():
        a = g[key]
        if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
            raise GoldenError(f"{path}: {key} holds {a.dtype} values, expected numbers")
        if len(a.shape) != len(shape) or any(want is not None and got != want for got, want in zip(a.shape, shape)):
            want = "(" + ", ".join("any" if n is None else str(n) for n in shape) + ("," if len(shape) == 1 else "") + ")"
            raise GoldenError(f"{path}: {key} has shape {a.shape}, expected {want} (from the golden's config and data)")
    for key, bounds in INDICES.items():
        a = g[key]
        if a.size and not np.issubdtype(a.dtype, np.integer):
            raise GoldenError(f"{path}: {key} holds {a.dtype} values, expected integer ids")
        for column, bound in enumerate(bounds):
            ids = a[:, column] if a.ndim == 2 else a
            limit = int(g[f"config/{bound}"])
            if ids.size and (ids.min() < 0 or ids.max() >= limit):
                raise GoldenError(f"{path}: {key} holds ids outside [0, {limit}) (config/{bound} is {limit})")


def golden_model(g: dict, kernel: str = "segment_sum") -> LGMRec:
    c = lambda k: g[f"config/{k}"].item()
    feat_dims = tuple((m, g[f"data/{m}_feat"].shape[1]) for m in ("v", "t") if f"data/{m}_feat" in g)
    return LGMRec(n_users=int(c("n_users")), n_items=int(c("n_items")), feat_dims=feat_dims,
                  embedding_size=int(c("embedding_size")), hyper_num=int(c("hyper_num")),
                  n_ui_layers=int(c("n_ui_layers")), n_mm_layers=int(c("n_mm_layers")),
                  n_hyper_layer=int(c("n_hyper_layer")), keep_rate=float(c("keep_rate")),
                  alpha=float(c("alpha")), tau=float(c("tau")),
                  legacy_text_user_hyper=bool(c("legacy_text_user_hyper")), kernel=kernel)


def golden_noise(g: dict, mode: str, model: LGMRec) -> Noise:
    keys = [k for k in HYPER_KEYS if k[0] in model.modalities]
    gumbel = {k: jnp.asarray(g[f"{mode}/gumbel/{k}"]) for k in keys}
    keep = {k: jnp.asarray(g[f"{mode}/keep/{k}"]) for k in keys} if mode == "train" else None
    return Noise(gumbel, keep)


def golden_params(g: dict, prefix: str, model: LGMRec) -> dict:
    return {"params": {k: jnp.asarray(g[f"{prefix}/{k}"]) for k in PARAMS if f"{prefix}/{k}" in g}}


def replay(g: dict, kernel: str = "segment_sum") -> list[Row]:
    model = golden_model(g, kernel)
    ds = data_lib.from_arrays(g["data/train"], g["data/valid"], g["data/test"], model.n_users,
                              model.n_items, g.get("data/v_feat"), g.get("data/t_feat"))
    graph = graph_lib.build_graph(ds.train, ds.n_users, ds.n_items, kernel)
    feats = {m: jnp.asarray(f) for m, f in (("v", ds.v_feat), ("t", ds.t_feat)) if f is not None}
    cl_weight, reg_weight, tau = (float(g[f"config/{k}"]) for k in ("cl_weight", "reg_weight", "tau"))
    rows: list[Row] = []
    value = lambda name, got, want: rows.append(Row(name, rel_error(got, want), TOL_VALUE, "rel"))

    params = golden_params(g, "param", model)
    train_noise = golden_noise(g, "train", model)
    n = len(g["batch/users"])
    batch = losses.Batch(*(jnp.asarray(g[f"batch/{k}"], jnp.int32) for k in ("users", "pos", "neg")),
                         jnp.ones((n,), jnp.float32))

    def objective(p):
        out = model.apply(p, graph, feats, train_noise)
        return losses.loss_parts(out, batch, cl_weight, reg_weight, tau).total, out

    (total, out), grads = jax.value_and_grad(objective, has_aux=True)(params)
    parts = losses.loss_parts(out, batch, cl_weight, reg_weight, tau)
    value("train/user_out", out.user, g["train/user_out"])
    value("train/item_out", out.item, g["train/item_out"])
    for m in model.modalities:
        for side in ("user", "item"):
            value(f"train/hyper_{m}_{side}", out.hyper[f"{m}_{side}"], g[f"train/hyper_{m}_{side}"])
    for part in ("bpr", "hcl", "reg", "total"):
        value(f"loss/{part}", getattr(parts, part), g[f"loss/{part}"])
    for k, grad in grads["params"].items():
        rows.append(Row(f"grad/{k}", rel_error(grad, g[f"grad/{k}"]), TOL_GRAD, "rel"))

    optimizer = step_lib.make_optimizer(1e-3)  # the reference's learning rate in the goldens
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    stepped = optax.apply_updates(params, updates)
    for k, p in stepped["params"].items():
        err = float(np.max(np.abs(np.asarray(p, np.float64) - g[f"adam1/{k}"])))
        rows.append(Row(f"adam1/{k}", err, TOL_ADAM, "abs"))

    eval_params = golden_params(g, "adam1", model)
    eval_out = model.apply(eval_params, graph, feats, golden_noise(g, "eval", model))
    value("eval/user_out", eval_out.user, g["eval/user_out"])
    value("eval/item_out", eval_out.item, g["eval/item_out"])
    scores = eval_out.user @ eval_out.item.T
    value("eval/scores", scores, g["eval/scores"])
    for split, pairs in (("valid", ds.valid), ("test", ds.test)):
        users = g[f"metrics_{split}/users"]
        mask = evaluation.train_mask(ds, users)
        for method in EXACT_TOPK:  # every exact top-k method must give the recorded lists
            top = np.asarray(evaluation.masked_top_k(scores[users], *mask, 50, method=method))
            rows.append(Row(f"metrics_{split}/top50" + ("" if method == "direct" else f" ({method})"),
                            float(np.sum(top != g[f"metrics_{split}/top50"])), 0, "exact"))
        got = evaluation.split_metrics(users, top, pairs, ds.n_users, ds.n_items)
        for key, want in sorted((k, v) for k, v in g.items() if k.startswith(f"metrics_{split}/") and "@" in k):
            rows.append(Row(key, abs(got[key.split("/")[1]] - float(want)), 0, "exact"))
    return rows


def format_rows(rows: list[Row]) -> str:
    lines = [f"{'quantity':<28} {'max error':>12} {'tolerance':>10}  result"]
    for r in rows:
        lines.append(f"{r.name:<28} {r.error:>12.3e} {r.tolerance:>10.1e}  {'PASS' if r.passed else 'FAIL'}"
                     f"  ({r.kind})")
    n_fail = sum(not r.passed for r in rows)
    lines.append(f"{len(rows) - n_fail} passed, {n_fail} failed")
    return "\n".join(lines)


def run(path: str, kernel: str = "segment_sum", precision: str = "highest") -> tuple[bool, str]:
    g = load_golden(path)
    try:
        with jax.default_matmul_precision(precision):
            rows = replay(g, kernel)
    except flax_errors.ScopeParamShapeError as err:  # load_golden's checks should have caught it first
        reason = str(err).split(" (https://")[0]
        raise GoldenError(f"{path}: does not match the model its config describes ({reason})") from None
    return all(r.passed for r in rows), format_rows(rows)


FLAGS = flags.FLAGS
flags.DEFINE_string("golden", None, "Path of a golden .npz file (format: ../shared/golden/README.md).")
flags.DEFINE_enum("kernel", "segment_sum", list(graph_lib.KERNELS), "Sparse propagation kernel.")
flags.DEFINE_enum("matmul_precision", "highest", list(PRECISIONS),
                  "Matmul precision of the replay. The goldens' tolerances are float32's: 'highest' is the "
                  "faithful check; another value measures how far that precision lands from PyTorch.")


def main(argv):
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]!r}; the golden is given as --golden=PATH", file=sys.stderr)
        return 2
    setup_logging()  # keeps JAX's backend-probe INFO line ("Unable to initialize backend 'tpu'") out
    if not FLAGS.golden:
        print("error: --golden PATH is required", file=sys.stderr)
        return 2
    try:
        check_matmul_precision(FLAGS.matmul_precision)
        ok, table = run(FLAGS.golden, FLAGS.kernel, FLAGS.matmul_precision)
    except (data_lib.DatasetError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"# {FLAGS.golden}: kernel {FLAGS.kernel}, matmul precision {FLAGS.matmul_precision}")
    print(table)
    return 0 if ok else 1


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
