"""The LGMRec model in Flax (SPEC §3), exact to the authors' forward pass.

One call computes the embeddings of all users and items:

  C    = CGE: LightGCN mean over layers 0..n_ui_layers of A_hat (or the raw ID tables for "mf")
  M_m  = MGE: last layer of A_hat propagation from [mean of the user's projected items; F_m W_m]
  G    = GHE: hypergraph propagation of C's item rows through Gumbel-softmax assignments
  out  = C + nrm(M_v) + nrm(M_t) + alpha * nrm(G_v + G_t)

All randomness (four Gumbel draws, four dropout keep-masks) enters through a :class:`Noise` value,
made by :func:`sample_noise` from a key or loaded from recorded goldens. With one modality the
model uses that modality's MGE and GHE alone; with none it is its collaborative part (LightGCN).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from lgmrec_jax.graph import Graph, propagate

HYPER_KEYS = ("v_item", "v_user", "t_item", "t_user")  # the reference's order of use
TAU = 0.2  # hard-coded in the reference, shared by the Gumbel softmax and the InfoNCE (config key tau)
# Matrix products that contract over items or contrastive candidates get that dimension padded with zero
# rows to a multiple of this, at the source: the feature matrices once (step.device_features), the
# InfoNCE candidates per step (losses.infonce, the pads masked out). Why: on an H100 at Clothing the
# trace of a step showed three pad fusions without a JAX op name, 0.59 ms of 5.4 ms, the sizes of a
# copy of the two InfoNCE score matrices (2048 x 39,387 and 2048 x 23,033) and of the image features.
# XLA's GPU split-K rewrite pads a long contraction to a multiple of its split count (a power of two,
# at most 128) by copying the whole operand; a multiple of 128 leaves it nothing to pad. The zero rows
# change no value and cost 0.03-0.09% more work at Clothing's sizes (1.7% at Baby's 7,050 items).
GEMM_ROW_MULTIPLE = 128


class Noise(NamedTuple):
    """Gumbel draws per assignment matrix; keep-masks in training mode (None in evaluation)."""

    gumbel: dict
    keep: Optional[dict]


class NoiseFree(NamedTuple):
    """The part of one forward that does not depend on the noise (see LGMRec.noise_free)."""

    c: jax.Array  # (U + I, d) CGE output (the raw ID tables for "mf")
    fused: jax.Array  # (U + I, d) C plus the normalised MGE terms
    logits: dict  # hyperedge logits per key of HYPER_KEYS present; empty without GHE


class Outputs(NamedTuple):
    user: jax.Array  # (U, d) final user embeddings
    item: jax.Array  # (I, d) final item embeddings
    hyper: dict  # raw GHE outputs per modality and side, e.g. "v_user"; empty without features


def l2_normalize(x: jax.Array) -> jax.Array:
    """Row-wise F.normalize(x, eps=1e-12), with a finite gradient at all-zero rows."""
    return x / jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))


def gumbel_softmax(logits: jax.Array, gumbel: jax.Array, tau: float = TAU) -> jax.Array:
    """Soft Gumbel-softmax over the hyperedge axis: softmax((logits + g) / tau)."""
    return jax.nn.softmax((logits + gumbel) / tau, axis=1)


def noise_shapes(n_users: int, n_items: int, hyper_num: int, modalities) -> dict:
    shapes = {"item": (n_items, hyper_num), "user": (n_users, hyper_num)}
    return {k: shapes[k[2:]] for k in HYPER_KEYS if k[0] in modalities}


def sample_noise(key: jax.Array, shapes: dict, train: bool, keep_rate: float,
                 gumbel: bool = True) -> Noise:
    """Fresh noise for one forward pass; ``gumbel=False`` gives zero noise (deterministic)."""
    g_keys = jax.random.split(key, 2 * len(HYPER_KEYS))
    draws = {}
    keep = {} if train else None
    for i, name in enumerate(HYPER_KEYS):
        if name not in shapes:
            continue
        shape = shapes[name]
        draws[name] = jax.random.gumbel(g_keys[i], shape) if gumbel else jnp.zeros(shape, jnp.float32)
        if train:
            keep[name] = jax.random.bernoulli(g_keys[len(HYPER_KEYS) + i], keep_rate, shape)
    return Noise(draws, keep)


def pad_rows(x, multiple: int = GEMM_ROW_MULTIPLE):
    """x with zero rows appended up to a multiple of ``multiple`` rows (x itself if it has one)."""
    pad = -x.shape[0] % multiple
    return jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1)) if pad else x


def _matmul_like(a, b, dtype):
    """a @ b with both operands in ``dtype`` (the features' storage type) and float32 results: with
    bfloat16 features (config feature_dtype) the products run as bf16 x bf16 with f32 accumulation."""
    if dtype == jnp.float32:
        return a @ b
    return jnp.matmul(a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


@jax.custom_vjp
def frozen_feature_matmul(feat, weight):
    """feat @ weight for frozen features: the backward returns only dW = (dY^T F)^T.

    Autodiff's dW = F^T dY made XLA:CPU transpose the whole (I x D) feature matrix every step;
    reading F as stored and transposing the small (k x D) result measured 1.3x faster per baby epoch
    on CPU (experiments/results/bench_cpu_patches.md, patch "feature_matmul_vjp"). Same values.
    """
    return _matmul_like(feat, weight, feat.dtype)


def _ffm_fwd(feat, weight):
    return _matmul_like(feat, weight, feat.dtype), feat


def _ffm_bwd(feat, g):
    # The barrier keeps XLA from refolding the transpose into the big product.
    return None, jax.lax.optimization_barrier(_matmul_like(g.T, feat, feat.dtype)).T


frozen_feature_matmul.defvjp(_ffm_fwd, _ffm_bwd)


@dataclasses.dataclass(frozen=True)
class LocalOps:
    """The model's big products on one device. lgmrec_jax.pmap_engine.ShardedOps splits each across
    devices by rows; both return full, replicated results, so the model code is shared."""

    kernel: str = "segment_sum"

    def propagate(self, matrix, x, n_rows: int):
        """matrix @ x for a sparse (n_rows, cols) matrix."""
        return propagate(matrix, x, self.kernel)

    def feature_matmul(self, feat, weight, n_items: int):
        """features @ weight, (n_items, k); features are constants (no gradient), and may carry zero
        rows beyond n_items (GEMM_ROW_MULTIPLE)."""
        return frozen_feature_matmul(feat, weight)[:n_items]

    def matmul(self, a, b):
        """a @ b for a dense a with many rows."""
        return a @ b

    def tmatmul(self, a, b):
        """a.T @ b, contracting over many rows."""
        return a.T @ b


def hgnn(item_hyper, user_hyper, item_emb, n_layers: int, ops: Any = LocalOps()):
    """Parameter-free hypergraph propagation; returns the last iteration's (user, item) rows."""
    z, z_user = item_emb, None
    for _ in range(n_layers):
        latent = ops.tmatmul(item_hyper, z)  # (H, d) hyperedge embeddings
        z = ops.matmul(item_hyper, latent)
        z_user = ops.matmul(user_hyper, latent)
    return z_user, z


class LGMRec(nn.Module):
    """LGMRec; ``feat_dims`` maps each present modality ("v", "t") to its feature width."""

    n_users: int
    n_items: int
    feat_dims: tuple = ()  # e.g. (("v", 4096), ("t", 384))
    embedding_size: int = 64
    hyper_num: int = 4
    n_ui_layers: int = 2
    n_mm_layers: int = 2
    n_hyper_layer: int = 1
    keep_rate: float = 0.5
    alpha: float = 0.3
    tau: float = TAU  # Gumbel-softmax temperature (the reference's hard-coded 0.2)
    cf_model: str = "lightgcn"
    legacy_text_user_hyper: bool = False
    kernel: str = "segment_sum"
    ops: Any = None  # None: LocalOps(kernel); the pmap and group engines pass theirs
    # Ablations of the paper (all True is LGMRec). Without CGE the fused output omits C and the
    # hypergraph takes the unpropagated item ID embeddings; without GHE there is no hypergraph
    # term and hence no contrastive loss.
    use_cge: bool = True
    use_mge: bool = True
    use_ghe: bool = True

    @property
    def products(self):
        """The provider of the big products (LocalOps, or an engine's: ShardedOps, ColumnOps)."""
        return self.ops if self.ops is not None else LocalOps(self.kernel)

    @property
    def modalities(self) -> tuple:
        return tuple(m for m, _ in self.feat_dims)

    def noise_shapes(self) -> dict:
        return noise_shapes(self.n_users, self.n_items, self.hyper_num, self.modalities)

    def setup(self):
        if self.cf_model not in ("lightgcn", "mf"):
            raise ValueError(f"cf_model is {self.cf_model!r}, expected 'lightgcn' or 'mf'")
        if self.modalities and self.n_hyper_layer < 1:
            raise ValueError(f"n_hyper_layer is {self.n_hyper_layer}, expected at least 1")
        init = nn.initializers.glorot_uniform()  # = torch xavier_uniform_: U(+-sqrt(6/(rows+cols)))
        d = self.embedding_size
        self.user_emb = self.param("user_emb", init, (self.n_users, d))
        self.item_emb = self.param("item_emb", init, (self.n_items, d))
        self.proj = {m: self.param(f"{m}_proj", init, (dim, d)) for m, dim in self.feat_dims}
        self.hyper = {m: self.param(f"{m}_hyper", init, (dim, self.hyper_num)) for m, dim in self.feat_dims}

    @jax.named_scope("cge")
    def cge(self, graph: Graph) -> jax.Array:
        x = jnp.concatenate([self.user_emb, self.item_emb], axis=0)
        if self.cf_model == "mf" or not self.use_cge:
            return x
        layers = [x]
        n_nodes = self.n_users + self.n_items
        for _ in range(self.n_ui_layers):
            layers.append(self.products.propagate(graph.norm_adj, layers[-1], n_nodes))
        return jnp.mean(jnp.stack(layers), axis=0)

    @jax.named_scope("features")
    def feature_products(self, graph: Graph, feats: dict) -> dict:
        """Per modality, ``item = F_m [W_m | H_m]`` and ``user = R item``: the MGE's projected items
        and the hyperedge logits (SPEC §3.4 steps 1 and 3) in one product with the features and one
        sparse product with R, so each step reads the (I x 4096) image features once forward and
        once backward instead of twice each. Columns [:d] are the projection, [d:] the logits."""
        out = {}
        for m in self.modalities:
            weights = ([self.proj[m]] if self.use_mge else []) + ([self.hyper[m]] if self.use_ghe else [])
            if weights:
                item = self.products.feature_matmul(feats[m], jnp.concatenate(weights, axis=1), self.n_items)
                out[m] = (item, self.products.propagate(graph.interactions, item, self.n_users))
        return out

    @jax.named_scope("mge")
    def mge(self, graph: Graph, item: jax.Array, user_sum: jax.Array) -> jax.Array:
        """Last layer of A_hat propagation from [mean of the user's projected items; projected items]."""
        y = jnp.concatenate([user_sum * graph.user_inv_deg, item], axis=0)
        for _ in range(self.n_mm_layers):
            y = self.products.propagate(graph.norm_adj, y, self.n_users + self.n_items)
        return y

    def mge_outputs(self, graph: Graph, feats: dict) -> dict:
        """Each modality's MGE output M_m, (U + I, d), before the normalisation with which
        :meth:`noise_free` adds it; empty without the MGE. For inspecting the parts of the forward."""
        if not self.use_mge:
            return {}
        d = self.embedding_size
        return {m: self.mge(graph, item[:, :d], user[:, :d]) for m, (item, user) in
                self.feature_products(graph, feats).items()}

    def assignments(self, logits: dict, noise: Noise) -> dict:
        """Item and user hyperedge assignment matrices per modality: Gumbel-softmax of the logits."""
        out = {k: gumbel_softmax(logits[k], noise.gumbel[k], self.tau) for k in HYPER_KEYS if k in logits}
        if "t_user" in logits and self.legacy_text_user_hyper:
            # SPEC §3.8 Q1: the logged revision overwrote the visual user assignment with the
            # text one and left the text user assignment as raw logits.
            out["v_user"], out["t_user"] = out["t_user"], logits["t_user"]
        return out

    def dropout(self, x: jax.Array, keep: Optional[jax.Array]) -> jax.Array:
        if keep is None:
            return x
        return jnp.where(keep, x / self.keep_rate, 0.0)

    def noise_free(self, graph: Graph, feats: dict) -> NoiseFree:
        """Everything of the forward that no Gumbel draw or dropout mask touches: the CGE, the MGE
        terms and the hyperedge logits. Evaluation computes it once and reruns only
        :meth:`with_noise` for each block's fresh noise (SPEC §3.6), which gives the same numbers as
        the reference's full forward per block."""
        c = self.cge(graph)
        fused = c if self.use_cge else jnp.zeros_like(c)
        d, logits = self.embedding_size, {}
        for m, (item, user) in self.feature_products(graph, feats).items():
            if self.use_mge:
                fused = fused + l2_normalize(self.mge(graph, item[:, :d], user[:, :d]))
            if self.use_ghe:  # user logits: sums of the raw item logits over the user's items
                start = d if self.use_mge else 0
                logits[f"{m}_item"], logits[f"{m}_user"] = item[:, start:], user[:, start:]
        return NoiseFree(c, fused, logits)

    @jax.named_scope("hypergraph")
    def with_noise(self, base: NoiseFree, noise: Noise) -> Outputs:
        """The rest of the forward for one draw of noise: assignments, hypergraph, fusion."""
        n_users, fused = self.n_users, base.fused
        if not self.modalities or not self.use_ghe:
            return Outputs(fused[:n_users], fused[n_users:], {})
        assign = self.assignments(base.logits, noise)
        keep = noise.keep or {}
        hyper, ghe = {}, 0.0
        for m in self.modalities:
            item_h = self.dropout(assign[f"{m}_item"], keep.get(f"{m}_item"))
            user_h = self.dropout(assign[f"{m}_user"], keep.get(f"{m}_user"))
            hyper[f"{m}_user"], hyper[f"{m}_item"] = hgnn(item_h, user_h, base.c[n_users:], self.n_hyper_layer,
                                                          self.products)
            ghe = ghe + jnp.concatenate([hyper[f"{m}_user"], hyper[f"{m}_item"]], axis=0)
        fused = fused + self.alpha * l2_normalize(ghe)
        return Outputs(fused[:n_users], fused[n_users:], hyper)

    def __call__(self, graph: Graph, feats: dict, noise: Noise) -> Outputs:
        """Full-graph forward; training mode iff ``noise.keep`` is given."""
        return self.with_noise(self.noise_free(graph, feats), noise)
