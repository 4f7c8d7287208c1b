"""The pmap engine: one config's training step data-parallel over devices (``jax.pmap``), by rows.

Every step recomputes the whole graph forward, so each device holds a row block of every big operand
and the model's products go through :class:`ShardedOps`: sparse propagations and feature projections
by row blocks then ``all_gather``, ``H^T Z`` as a ``psum`` of partial products, and the loss over
B/n batch rows. Noise is drawn in full from the same key on every device, so a step is the
single-device step up to float32 reassociation; the gradient is the ``psum`` of the devices' shares
(the regulariser linearised around the global norm, which has the same gradient).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse

from lgmrec_jax import distributed, engine as engine_lib, losses, step as step_lib
from lgmrec_jax.graph import Graph, propagate
from lgmrec_jax.model import frozen_feature_matmul, pad_rows

AXIS = "devices"


def rows_per_device(n_rows: int, n_devices: int) -> int:
    return -(-n_rows // n_devices)


@dataclasses.dataclass(frozen=True)
class ShardedOps:
    """Row-split versions of the model's big products (see model.LocalOps); call inside pmap."""

    n_devices: int
    kernel: str = "segment_sum"

    def gather(self, local, n_rows: int):
        return jax.lax.all_gather(local, AXIS, tiled=True)[:n_rows]

    def local_rows(self, x):
        per = rows_per_device(x.shape[0], self.n_devices)
        x = pad_rows(x, self.n_devices)  # per * n_devices rows
        return jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index(AXIS) * per, per)

    def propagate(self, matrix, x, n_rows: int):
        return self.gather(propagate(matrix, x, self.kernel), n_rows)  # matrix: this device's row block

    def feature_matmul(self, feat, weight, n_items: int):
        return self.gather(frozen_feature_matmul(feat, weight), n_items)  # feat: this device's item rows

    def matmul(self, a, b):
        return self.gather(self.local_rows(a) @ b, a.shape[0])

    def tmatmul(self, a, b):
        return jax.lax.psum(self.local_rows(a).T @ self.local_rows(b), AXIS)


def shard_rows(rows, cols, vals, n_rows: int, n_devices: int):
    """Row blocks of a row-sorted COO matrix as stacked (n_devices, nnz_max) arrays, local row ids.

    Padding entries have value 0 on the block's last row, which keeps the rows sorted.
    """
    per = rows_per_device(n_rows, n_devices)
    bounds = np.searchsorted(rows, np.arange(n_devices + 1) * per)
    width = max(1, int(np.max(np.diff(bounds))))
    out_rows = np.full((n_devices, width), per - 1, np.int32)
    out_cols = np.zeros((n_devices, width), np.int32)
    out_vals = np.zeros((n_devices, width), np.float32)
    for d in range(n_devices):
        lo, hi = bounds[d], bounds[d + 1]
        out_rows[d, : hi - lo] = rows[lo:hi] - d * per
        out_cols[d, : hi - lo] = cols[lo:hi]
        out_vals[d, : hi - lo] = vals[lo:hi]
    return out_rows, out_cols, out_vals


def shard_matrix(matrix: sparse.BCOO, n_devices: int):
    indices = np.asarray(matrix.indices)
    return shard_rows(indices[:, 0], indices[:, 1], np.asarray(matrix.data), matrix.shape[0], n_devices)


def shard_features(feat, n_devices: int):
    feat = np.asarray(feat)
    per = rows_per_device(feat.shape[0], n_devices)
    padded = np.zeros((per * n_devices, feat.shape[1]), feat.dtype)  # float32, or bfloat16 (feature_dtype)
    padded[: feat.shape[0]] = feat
    return padded.reshape(n_devices, per, feat.shape[1])


def local_graph(shards: dict, shapes: dict, user_inv_deg) -> Graph:
    """The Graph of one device (inside pmap): BCOO row blocks with local row indices."""
    def bcoo(name):
        rows, cols, vals = shards[name]
        return sparse.BCOO((vals, jnp.stack([rows, cols], axis=1)), shape=shapes[name], indices_sorted=True)

    return Graph(norm_adj=bcoo("norm_adj"), interactions=bcoo("interactions"), user_inv_deg=user_inv_deg)


def sharded_objective(cl_weight, reg_weight, tau):
    """A device's share of the loss over its B/n batch rows (inside pmap): fn(outputs, batch) ->
    (share, the whole batch's LossParts); the shares' gradients sum to the single-device gradient."""
    def objective(out, batch):
        local = losses.loss_sums(out, batch, tau)
        total = jax.lax.psum(jax.lax.stop_gradient(local), AXIS)
        norms = [jnp.maximum(jnp.sqrt(s), 1e-30) for s in (total.sq_user, total.sq_pos, total.sq_neg)]
        # d||x|| = <x, dx> / ||x||: each device's share of the norm has the exact gradient.
        reg_share = sum(sq / (2.0 * n) for sq, n in zip((local.sq_user, local.sq_pos, local.sq_neg), norms))
        share = local.bpr / total.rows + cl_weight * local.hcl + reg_weight * reg_share / total.rows
        return share, losses.combine(total, cl_weight, reg_weight)
    return objective


def step_devices(per_process: int) -> list:
    """The first ``per_process`` local devices of every process taking part, process 0's first: the
    devices of the step (every process's when a run spans processes, lgmrec_jax/distributed.py)."""
    by_process: dict = {}
    for device in (jax.devices() if distributed.spans_processes() else jax.local_devices()):
        by_process.setdefault(device.process_index, []).append(device)
    return [d for p in sorted(by_process) for d in sorted(by_process[p], key=lambda d: d.id)[:per_process]]


class PmapEngine(engine_lib.SingleEngine):
    """One config data-parallel over ``n_local`` devices of each process; the state is replicated.

    Every array with a leading device axis is built in full on the host and each process passes its
    own devices' block of it (pmap's multi-process contract), so one code path serves one process
    and many. Evaluation runs on process 0 from the first replica, with the single-device model.
    """

    def __init__(self, cfg, ds, n_local: int):
        self.devices = step_devices(n_local)
        self.n_devices = len(self.devices)  # across all processes
        local = [i for i, d in enumerate(self.devices) if d.process_index == jax.process_index()]
        self.local_slice = slice(local[0], local[-1] + 1)
        self.local_devices = self.devices[self.local_slice]
        super().__init__(cfg, ds)

    def compile_epoch(self):
        n = self.n_devices
        graph, cfg = self.graph, self.cfg
        shards = {name: tuple(shard_matrix(getattr(graph, name), n)) for name in ("norm_adj", "interactions")}
        shapes = {name: (rows_per_device(getattr(graph, name).shape[0], n), getattr(graph, name).shape[1])
                  for name in shards}
        self._shards = self.local(shards)
        self._local_feats = self.local({m: shard_features(f, n) for m, f in self.feats.items()})
        model = self.model.clone(ops=ShardedOps(n, self.model.kernel))
        step = step_lib.make_train_step(model, self.optimizer, sharded_objective(cfg.cl_weight, cfg.reg_weight, cfg.tau),
                                        grad_reduce=lambda grads: jax.lax.psum(grads, AXIS))

        def run_epoch(state, shards, feats, user_inv_deg, batches, epoch_key, first_step):
            graph = local_graph(shards, shapes, user_inv_deg)
            return step_lib.epoch_scan(lambda s, batch, i: step(s, graph, feats, batch, jax.random.fold_in(epoch_key, i)),
                                       state, batches, first_step)

        return jax.pmap(run_epoch, axis_name=AXIS, in_axes=(0, 0, 0, None, 0, None, None),
                        devices=self.devices, donate_argnums=(0,))

    def put(self, state):
        """One replica per device of this process, laid out as pmap expects (leading device axis)."""
        return engine_lib.replicate(state, self.local_devices, AXIS)

    def get(self, state):
        """This process's first replica (every replica is the same)."""
        return jax.tree_util.tree_map(lambda x: x.addressable_data(0)[0], state)

    def local(self, tree):
        """This process's block of a tree of (n_devices, ...) host arrays."""
        return jax.tree_util.tree_map(lambda x: x[self.local_slice], tree)

    def split_batches(self, batches: losses.Batch) -> losses.Batch:
        """(n_batches, B) -> (n_devices, n_batches, B / n_devices), padding B with masked rows."""
        n = self.n_devices

        def split(x):
            x = np.asarray(x)
            pad = (-x.shape[1]) % n
            if pad:
                x = np.concatenate([x, np.zeros((x.shape[0], pad), x.dtype)], axis=1)
            return np.ascontiguousarray(x.reshape(x.shape[0], n, -1).transpose(1, 0, 2))

        return self.local(losses.Batch(*(split(x) for x in batches)))

    def run_chunk(self, state, batch, epoch_key, first_step):
        state, parts = self._epoch(state, self._shards, self._local_feats, self.graph.user_inv_deg,
                                   self.split_batches(batch), epoch_key, first_step)
        return state, self.get(parts)
