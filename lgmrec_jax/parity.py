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
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from lgmrec_jax import data as data_lib
from lgmrec_jax import evaluation, graph as graph_lib, losses, trainer
from lgmrec_jax.configs import PRECISIONS, ConfigError
from lgmrec_jax.model import HYPER_KEYS, LGMRec, Noise
from lgmrec_jax.parallel import check_matmul_precision

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


def load_golden(path: str) -> dict:
    try:
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError) as err:
        raise data_lib.DatasetError(f"{path}: cannot read golden file ({err})") from None


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

    optimizer = trainer.make_optimizer(1e-3)  # the reference's learning rate in the goldens
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
    with jax.default_matmul_precision(precision):
        rows = replay(load_golden(path), kernel)
    return all(r.passed for r in rows), format_rows(rows)


FLAGS = flags.FLAGS
flags.DEFINE_string("golden", None, "Path of a golden .npz file (format: ../shared/golden/README.md).")
flags.DEFINE_enum("kernel", "segment_sum", list(graph_lib.KERNELS), "Sparse propagation kernel.")
flags.DEFINE_enum("matmul_precision", "highest", list(PRECISIONS),
                  "Matmul precision of the replay. The goldens' tolerances are float32's: 'highest' is the "
                  "faithful check; another value measures how far that precision lands from PyTorch.")


def main(argv):
    del argv
    if not FLAGS.golden:
        print("parity: --golden PATH is required", file=sys.stderr)
        return 2
    try:
        check_matmul_precision(FLAGS.matmul_precision)
        ok, table = run(FLAGS.golden, FLAGS.kernel, FLAGS.matmul_precision)
    except (data_lib.DatasetError, ConfigError) as err:
        print(f"parity: {err}", file=sys.stderr)
        return 2
    print(f"# {FLAGS.golden}: kernel {FLAGS.kernel}, matmul precision {FLAGS.matmul_precision}")
    print(table)
    return 0 if ok else 1


if __name__ == "__main__":
    app.run(main)
