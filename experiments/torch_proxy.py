"""A PyTorch cost proxy for the authors' code: SPEC.md §2-§5 run the reference's way, timed here.

    python -m experiments.torch_proxy --golden=../shared/golden/lgmrec_fixed.npz     # does it compute LGMRec?
    python -m experiments.torch_proxy --datasets=synthetic_baby --epochs_to_time=2 --eval_repeats=3

Where no figure of the authors' code exists for a machine, this second implementation (written from
the spec, not from their code) runs as the spec says the reference does: eager PyTorch with
``torch.sparse`` products; a full-graph forward per 2,048-row batch; negatives drawn in a Python loop;
evaluation per 4,096-user block with ``torch.topk`` and a Python hit loop. ``--golden`` checks that it
computes the reference's numbers. ``--device=cuda`` runs it on a GPU. Results:
``<out>/torch_proxy_<tag>.{json,md}``. torch is the optional extra ``proxy``.
"""

from __future__ import annotations

import datetime
import os
import platform
import random
import sys
import time
from typing import NamedTuple

import numpy as np
from absl import app, flags

from experiments import benchmarking
from lgmrec_jax import cli
from lgmrec_jax import data as data_lib
from lgmrec_jax import metrics as metrics_lib
from lgmrec_jax import parity
from lgmrec_jax.graph import build_host_graph

HYPER_KEYS = ("v_item", "v_user", "t_item", "t_user")  # the reference's order of use
PARAMS = ("user_emb", "item_emb", "v_proj", "v_hyper", "t_proj", "t_hyper")
EVAL_BLOCK = 4096
TOP_K = 50
MASK_VALUE = -1e10


def _torch():
    try:
        import torch
    except ImportError:
        raise data_lib.DatasetError("torch is not installed: pip install -e '.[proxy]' (or the CPU torch wheel)") \
            from None
    return torch


class Hyper(NamedTuple):
    n_users: int
    n_items: int
    n_ui_layers: int
    n_mm_layers: int
    n_hyper_layer: int
    hyper_num: int
    keep_rate: float
    alpha: float
    cl_weight: float
    reg_weight: float
    tau: float
    legacy: bool


class TorchGraph(NamedTuple):
    norm_adj: object  # (N, N) sparse COO, symmetric normalised
    interactions: object  # R, (U, I) sparse COO, duplicates summed
    user_inv_deg: object  # (U, 1)


def build_graph(train: np.ndarray, n_users: int, n_items: int, device) -> TorchGraph:
    torch = _torch()
    host = build_host_graph(train, n_users, n_items)
    n = n_users + n_items

    def coo(rows, cols, vals, shape):
        indices = np.stack([rows, cols]).astype(np.int64)
        return torch.sparse_coo_tensor(indices, vals, shape, check_invariants=False).coalesce().to(device)

    adj = coo(host.adj_rows, host.adj_cols, torch.from_numpy(host.adj_vals), (n, n))
    r = coo(host.r_rows, host.r_cols, torch.ones(len(host.r_rows)), (n_users, n_items))  # duplicates summed
    return TorchGraph(adj, r, torch.from_numpy(host.user_inv_deg).to(device))


def training_sets(train: np.ndarray, n_users: int) -> list:
    """Each user's set of training items (negative rejection and evaluation masking)."""
    sets = [set() for _ in range(n_users)]
    for u, i in np.asarray(train).tolist():
        sets[u].add(i)
    return sets


def init_params(hp: Hyper, feats: dict, seed: int, device) -> dict:
    """Xavier-uniform on every trainable matrix (SPEC §3.2)."""
    torch = _torch()
    gen = torch.Generator().manual_seed(seed)
    shapes = {"user_emb": (hp.n_users, 64), "item_emb": (hp.n_items, 64)}
    for m, f in feats.items():
        shapes[f"{m}_proj"] = (f.shape[1], 64)
        shapes[f"{m}_hyper"] = (f.shape[1], hp.hyper_num)
    out = {}
    for name, shape in shapes.items():
        bound = (6.0 / sum(shape)) ** 0.5
        out[name] = ((torch.rand(shape, generator=gen) * 2 - 1) * bound).to(device).requires_grad_()
    return out


def fresh_noise(hp: Hyper, feats: dict, train: bool, device) -> dict:
    """Standard Gumbel draws (and keep-masks in training) for the four assignment matrices."""
    torch = _torch()
    rows = {"item": hp.n_items, "user": hp.n_users}
    noise = {"gumbel": {}, "keep": {} if train else None}
    for k in HYPER_KEYS:
        if k[0] in feats:
            shape = (rows[k[2:]], hp.hyper_num)
            noise["gumbel"][k] = -torch.empty(shape, device=device).exponential_().log()
            if train:
                noise["keep"][k] = torch.rand(shape, device=device) < hp.keep_rate
    return noise


def forward(params: dict, graph: TorchGraph, feats: dict, hp: Hyper, noise: dict):
    """Full-graph forward (SPEC §3.4); returns (user, item, raw hypergraph embeddings)."""
    torch = _torch()
    import torch.nn.functional as F

    spmm = torch.sparse.mm
    x = torch.cat([params["user_emb"], params["item_emb"]])
    layers = [x]
    for _ in range(hp.n_ui_layers):
        layers.append(spmm(graph.norm_adj, layers[-1]))
    c = torch.stack(layers).mean(0)
    fused = c
    for m, f in feats.items():  # MGE: last layer of the propagated projected features
        item = f @ params[f"{m}_proj"]
        y = torch.cat([spmm(graph.interactions, item) * graph.user_inv_deg, item])
        for _ in range(hp.n_mm_layers):
            y = spmm(graph.norm_adj, y)
        fused = fused + F.normalize(y, dim=1)
    logits = {}
    for m, f in feats.items():
        logits[f"{m}_item"] = f @ params[f"{m}_hyper"]
        logits[f"{m}_user"] = spmm(graph.interactions, logits[f"{m}_item"])
    assign = {k: torch.softmax((logits[k] + noise["gumbel"][k]) / hp.tau, dim=1) for k in logits}
    if hp.legacy and "t_user" in logits:  # SPEC §3.8 Q1
        assign["v_user"], assign["t_user"] = assign["t_user"], logits["t_user"]
    if noise["keep"] is not None:
        assign = {k: a * noise["keep"][k] / hp.keep_rate for k, a in assign.items()}
    hyper, ghe = {}, 0.0
    for m in feats:
        z, z_user = c[hp.n_users:], None
        for _ in range(hp.n_hyper_layer):
            latent = assign[f"{m}_item"].T @ z
            z = assign[f"{m}_item"] @ latent
            z_user = assign[f"{m}_user"] @ latent
        hyper[f"{m}_user"], hyper[f"{m}_item"] = z_user, z
        ghe = ghe + torch.cat([z_user, z])
    if feats:
        fused = fused + hp.alpha * F.normalize(ghe, dim=1)
    return fused[:hp.n_users], fused[hp.n_users:], hyper


def loss_parts(user, item, hyper, users, pos, neg, hp: Hyper) -> dict:
    """BPR + cl_weight * InfoNCE (summed over rows) + reg_weight * Frobenius norms / B (SPEC §4)."""
    torch = _torch()
    import torch.nn.functional as F

    e_u, e_p, e_n = user[users], item[pos], item[neg]
    bpr = -F.logsigmoid((e_u * e_p).sum(1) - (e_u * e_n).sum(1)).mean()

    def infonce(anchor, positive, every):
        a, p, z = F.normalize(anchor, dim=1), F.normalize(positive, dim=1), F.normalize(every, dim=1)
        pos_score = torch.exp((a * p).sum(1) / hp.tau)
        total = torch.exp(a @ z.T / hp.tau).sum(1)
        return -torch.log(pos_score / total).sum()

    hcl = torch.zeros(())
    if hyper:
        hcl = (infonce(hyper["v_user"][users], hyper["t_user"][users], hyper["t_user"])
               + infonce(hyper["v_item"][pos], hyper["t_item"][pos], hyper["t_item"]))
    reg = (e_u.norm(2) + e_p.norm(2) + e_n.norm(2)) / len(users)
    total = bpr + hp.cl_weight * hcl + hp.reg_weight * reg
    return {"bpr": bpr, "hcl": hcl, "reg": reg, "total": total}


def masked_top(scores, block: np.ndarray, history: list) -> np.ndarray:
    """Top-50 item ids per row of a block's scores, the rows' training items set to -1e10 first (-1 pads)."""
    rows, cols = [], []
    for r, u in enumerate(block.tolist()):
        rows.extend([r] * len(history[u]))
        cols.extend(history[u])
    scores[rows, cols] = MASK_VALUE
    top = _torch().topk(scores, min(TOP_K, scores.shape[1]), dim=1).indices.cpu().numpy()
    return np.pad(top, ((0, 0), (0, TOP_K - top.shape[1])), constant_values=-1)  # catalogues under 50 items


def split_metrics(users: np.ndarray, top: np.ndarray, split_pairs: np.ndarray, n_users: int) -> dict:
    """Hits marked in a Python loop over users, then the metrics (SPEC §5)."""
    split_items = [[] for _ in range(n_users)]
    for u, i in split_pairs.tolist():
        split_items[u].append(i)
    rel = np.zeros(top.shape, bool)
    for r, u in enumerate(users.tolist()):
        rel[r] = np.isin(top[r], split_items[u])
    n_pos = np.array([len(split_items[u]) for u in users.tolist()])
    return metrics_lib.metrics_from_relevance(rel, n_pos)


# ----------------------------------------------------------------------------------- training and evaluation


class Trainer:
    """The reference's loop over one dataset (SPEC §2, §4.6, §5)."""

    def __init__(self, ds: data_lib.Dataset, hp: Hyper, batch_size: int, seed: int, device: str):
        torch = _torch()
        self.torch, self.ds, self.hp, self.batch_size, self.device = torch, ds, hp, batch_size, device
        torch.manual_seed(seed)
        random.seed(seed)
        self.np_rng = np.random.RandomState(seed)
        self.graph = build_graph(ds.train, ds.n_users, ds.n_items, device)
        self.feats = {m: torch.from_numpy(np.asarray(f, np.float32)).to(device)
                      for m, f in (("v", ds.v_feat), ("t", ds.t_feat)) if f is not None}
        self.params = init_params(hp, self.feats, seed, device)
        self.optimizer = torch.optim.Adam(list(self.params.values()), lr=1e-3)
        self.rows = np.asarray(ds.train, np.int64)
        self.all_items = sorted(set(self.rows[:, 1].tolist()))
        random.shuffle(self.all_items)
        self.history = training_sets(self.rows, ds.n_users)

    def sync(self):
        if self.device != "cpu":
            self.torch.cuda.synchronize()

    def negatives(self, users: np.ndarray) -> list:
        out = []
        for u in users.tolist():  # one Python draw per row, redrawn while it is a training positive
            item = random.sample(self.all_items, 1)[0]
            while item in self.history[u]:
                item = random.sample(self.all_items, 1)[0]
            out.append(item)
        return out

    def train_epoch(self) -> float:
        """One epoch; returns the summed loss (the reference's logged train loss)."""
        torch = self.torch
        self.rows = self.rows[self.np_rng.permutation(len(self.rows))]
        total = 0.0
        for start in range(0, len(self.rows), self.batch_size):
            batch = self.rows[start:start + self.batch_size]
            users = torch.as_tensor(batch[:, 0], device=self.device)
            pos = torch.as_tensor(batch[:, 1], device=self.device)
            neg = torch.as_tensor(self.negatives(batch[:, 0]), device=self.device)
            self.optimizer.zero_grad()
            noise = fresh_noise(self.hp, self.feats, True, self.device)
            user, item, hyper = forward(self.params, self.graph, self.feats, self.hp, noise)
            loss = loss_parts(user, item, hyper, users, pos, neg, self.hp)["total"]
            loss.backward()
            self.optimizer.step()
            total += loss.item()
        self.sync()
        return total

    def evaluate_split(self, split_pairs: np.ndarray) -> dict:
        torch = self.torch
        users = metrics_lib.evaluation_users(split_pairs)
        tops = []
        with torch.no_grad():
            for start in range(0, len(users), EVAL_BLOCK):
                block = users[start:start + EVAL_BLOCK]
                noise = fresh_noise(self.hp, self.feats, False, self.device)
                user, item, _ = forward(self.params, self.graph, self.feats, self.hp, noise)
                tops.append(masked_top(user[torch.as_tensor(block, device=self.device)] @ item.T, block,
                                       self.history))
        return split_metrics(users, np.concatenate(tops), split_pairs, self.ds.n_users)

    def evaluate(self) -> dict:
        out = {"valid": self.evaluate_split(self.ds.valid), "test": self.evaluate_split(self.ds.test)}
        self.sync()
        return out


# ----------------------------------------------------------------------------------- golden replay


def golden_hyper(g: dict) -> Hyper:
    c = lambda k: g[f"config/{k}"].item()
    return Hyper(int(c("n_users")), int(c("n_items")), int(c("n_ui_layers")), int(c("n_mm_layers")),
                 int(c("n_hyper_layer")), int(c("hyper_num")), float(c("keep_rate")), float(c("alpha")),
                 float(c("cl_weight")), float(c("reg_weight")), float(c("tau")), bool(c("legacy_text_user_hyper")))


def replay_golden(path: str) -> list:
    """Every golden quantity recomputed by this implementation, as lgmrec_jax.parity rows."""
    torch = _torch()
    g = parity.load_golden(path)
    hp = golden_hyper(g)
    graph = build_graph(g["data/train"], hp.n_users, hp.n_items, "cpu")
    feats = {m: torch.from_numpy(g[f"data/{m}_feat"]) for m in ("v", "t") if f"data/{m}_feat" in g}
    keys = [k for k in HYPER_KEYS if k[0] in feats]
    rows = []
    value = lambda name, got, want: rows.append(
        parity.Row(name, parity.rel_error(got.detach().numpy(), want), parity.TOL_VALUE, "rel"))

    params = {k: torch.from_numpy(g[f"param/{k}"].copy()).requires_grad_() for k in PARAMS if f"param/{k}" in g}
    noise = {"gumbel": {k: torch.from_numpy(g[f"train/gumbel/{k}"]) for k in keys},
             "keep": {k: torch.from_numpy(g[f"train/keep/{k}"]) for k in keys}}
    user, item, hyper = forward(params, graph, feats, hp, noise)
    batch = [torch.from_numpy(g[f"batch/{k}"].astype(np.int64)) for k in ("users", "pos", "neg")]
    parts = loss_parts(user, item, hyper, *batch, hp)
    parts["total"].backward()
    value("train/user_out", user, g["train/user_out"])
    value("train/item_out", item, g["train/item_out"])
    for k, h in hyper.items():
        value(f"train/hyper_{k}", h, g[f"train/hyper_{k}"])
    for name, v in parts.items():
        value(f"loss/{name}", v, g[f"loss/{name}"])
    for k, p in params.items():
        rows.append(parity.Row(f"grad/{k}", parity.rel_error(p.grad.numpy(), g[f"grad/{k}"]), parity.TOL_GRAD, "rel"))
    optimizer = torch.optim.Adam(list(params.values()), lr=1e-3)
    optimizer.step()
    for k, p in params.items():
        err = float(np.max(np.abs(p.detach().numpy().astype(np.float64) - g[f"adam1/{k}"])))
        rows.append(parity.Row(f"adam1/{k}", err, parity.TOL_ADAM, "abs"))

    eval_params = {k: torch.from_numpy(g[f"adam1/{k}"]) for k in params}
    with torch.no_grad():
        user, item, _ = forward(eval_params, graph, feats, hp,
                                {"gumbel": {k: torch.from_numpy(g[f"eval/gumbel/{k}"]) for k in keys}, "keep": None})
    value("eval/user_out", user, g["eval/user_out"])
    value("eval/item_out", item, g["eval/item_out"])
    scores = user @ item.T
    value("eval/scores", scores, g["eval/scores"])
    history = training_sets(g["data/train"], hp.n_users)
    for split in ("valid", "test"):
        users = g[f"metrics_{split}/users"]
        top = masked_top(scores[torch.as_tensor(users)], users, history)
        rows.append(parity.Row(f"metrics_{split}/top50", float(np.sum(top != g[f"metrics_{split}/top50"])), 0,
                               "exact"))
        got = split_metrics(users, top, g[f"data/{split}"], hp.n_users)
        for key in sorted(k for k in g if k.startswith(f"metrics_{split}/") and "@" in k):
            rows.append(parity.Row(key, abs(got[key.split("/")[1]] - float(g[key])), 0, "exact"))
    return rows


# ----------------------------------------------------------------------------------- timing


def hyper_for(ds: data_lib.Dataset, name: str, legacy: bool = False) -> tuple[Hyper, int]:
    from lgmrec_jax import configs

    cfg = configs.for_dataset(name)
    hp = Hyper(ds.n_users, ds.n_items, cfg.n_ui_layers, cfg.n_mm_layers, cfg.n_hyper_layer, cfg.hyper_num,
               cfg.keep_rate, cfg.alpha, cfg.cl_weight, cfg.reg_weight, cfg.tau, legacy)
    return hp, cfg.train_batch_size


def time_dataset(ds: data_lib.Dataset, name: str, device: str, epochs_to_time: int, eval_repeats: int,
                 seed: int = 999, progress=print) -> dict:
    """Steady train epochs and valid+test evaluations (one warm-up of each first)."""
    torch = _torch()
    hp, batch_size = hyper_for(ds, name)
    start = time.perf_counter()
    trainer = Trainer(ds, hp, batch_size, seed, device)
    setup_s = time.perf_counter() - start
    epochs, losses, evals, results = [], [], [], []
    for e in range(epochs_to_time + 1):
        t0 = time.perf_counter()
        losses.append(trainer.train_epoch())
        epochs.append(time.perf_counter() - t0)
        progress(f"torch_proxy {name}: epoch {e} {epochs[-1]:.2f} s, loss {losses[-1]:.2f}")
    for r in range(eval_repeats + 1):
        t0 = time.perf_counter()
        results.append(trainer.evaluate())
        evals.append(time.perf_counter() - t0)
        progress(f"torch_proxy {name}: evaluation {r} {evals[-1]:.2f} s, "
                 f"valid recall@20 {results[-1]['valid']['recall@20']}")
    n_batches = -(-len(ds.train) // batch_size)
    return {"dataset": name, "device": device, "n_users": ds.n_users, "n_items": ds.n_items,
            "n_train": int(len(ds.train)), "n_batches": n_batches, "torch_threads": torch.get_num_threads(),
            "setup_s": round(setup_s, 3), "epoch_times_s": [round(t, 3) for t in epochs],
            "epoch_s": round(float(np.median(epochs[1:])), 3), "epoch_losses": [round(x, 4) for x in losses],
            "eval_times_s": [round(t, 3) for t in evals], "eval_s": round(float(np.median(evals[1:])), 3),
            "last_metrics": results[-1]}


def machine(device: str) -> dict:
    torch = _torch()
    info = {"cpu": benchmarking.cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "versions": {"torch": torch.__version__, "numpy": np.__version__,
                         "python": platform.python_version()}, "git": benchmarking.git_state()}
    if device != "cpu":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def markdown(report: dict) -> str:
    m = report["machine"]
    where = m.get("gpu") or f"{m['cpu']}, {m['cpu_count']} CPU cores"
    lines = [f"# PyTorch cost proxy of the reference ({report['device']})", "",
             f"Machine: {where}; {m['platform']}.  ", "Versions: " + ", ".join(
                 f"{k} {v}" for k, v in m["versions"].items()) + ".  ",
             f"Command: `{report['command']}` ({report['started']} - {report['finished']}, "
             f"commit {m['git'].get('commit', '')[:10]}).", "",
             "`experiments/torch_proxy.py`: SPEC.md's model and protocol in eager PyTorch, run the way the spec "
             "says the authors' code runs (a full-graph forward per batch and per 4,096-user evaluation block, "
             "Python negative sampling, torch.topk, a Python hit loop). It replays the goldens "
             "(`--golden`); it is not the authors' code. *reference* is the measured figure for the authors' code "
             "on this machine type, where one is given.", "",
             "| dataset | users | items | train rows | batches | torch threads | epoch (median) | epochs | "
             "eval valid+test (median) | evals | reference epoch | reference eval |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    refs = benchmarking.REFERENCE_CPU if report["device"] == "cpu" else benchmarking.REFERENCE_GPU
    for r in report["results"]:
        ref = refs.get(r["dataset"], {})
        lines.append(f"| {r['dataset']} | {r['n_users']} | {r['n_items']} | {r['n_train']} | {r['n_batches']} | "
                     f"{r['torch_threads']} | {r['epoch_s']} | {r['epoch_times_s']} | {r['eval_s']} | "
                     f"{r['eval_times_s']} | {ref.get('epoch_s', '-')} | {ref.get('eval_s', '-')} |")
    return "\n".join(lines) + "\n"


FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags, defined when it runs (importing this module defines none of its own)."""
    # --golden (replay that file, exit 1 on any failure) is lgmrec_jax.parity's flag, defined on its import.
    flags.DEFINE_list("datasets", ["synthetic_baby"], "Datasets to time (loaded or generated under --data_dir).")
    flags.DEFINE_string("data_dir", "./data", "Where datasets live; synthetic ones are generated on first use.")
    flags.DEFINE_enum("device", "cpu", ["cpu", "cuda"], "Where PyTorch runs.")
    flags.DEFINE_integer("epochs_to_time", 2, "Steady train epochs timed after one warm-up epoch.")
    flags.DEFINE_integer("eval_repeats", 3, "Steady valid+test evaluations timed after one warm-up.")
    flags.DEFINE_string("out", "experiments/results", "Directory of torch_proxy_<tag>.{json,md}.")
    flags.DEFINE_string("tag", None, "File tag (default: the device).")


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}; every input is a --flag")
    if FLAGS.epochs_to_time < 1 or FLAGS.eval_repeats < 1:
        cli.fail("--epochs_to_time and --eval_repeats must be at least 1 (the medians of the timed calls)")
    cli.require_out_dir(FLAGS.out)  # before the minutes of timing
    try:
        if FLAGS.golden:
            rows = replay_golden(FLAGS.golden)
            print(parity.format_rows(rows))
            return 0 if all(r.passed for r in rows) else 1
        torch = _torch()
        if FLAGS.device == "cuda" and not torch.cuda.is_available():
            raise data_lib.DatasetError("--device=cuda but torch sees no GPU")
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        results = []
        for name in FLAGS.datasets:
            ds = data_lib.load_dataset(FLAGS.data_dir, name)
            results.append(time_dataset(ds, name, FLAGS.device, FLAGS.epochs_to_time, FLAGS.eval_repeats,
                                        progress=lambda s: print(s, file=sys.stderr, flush=True)))
    except data_lib.DatasetError as err:
        cli.fail(str(err))
    report = {"device": FLAGS.device, "command": "python -m experiments.torch_proxy " + " ".join(sys.argv[1:]),
              "started": started,
              "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(FLAGS.device), "results": results}
    base = os.path.join(FLAGS.out, f"torch_proxy_{FLAGS.tag or FLAGS.device}")
    benchmarking.write_texts({base + ".json": benchmarking.json_text(report, indent=1, sort_keys=False),
                              base + ".md": markdown(report)})
    print(markdown(report))
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
