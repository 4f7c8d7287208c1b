"""Model paths beyond the goldens: no modality (LightGCN), one modality, noise handling, init."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lgmrec_jax import data, graph as graph_lib, losses, step as step_lib
from lgmrec_jax.configs import default
from lgmrec_jax.model import LGMRec, l2_normalize, sample_noise


def toy_dataset(v=True, t=True, seed=0):
    rng = np.random.default_rng(seed)
    n_users, n_items = 12, 9
    train = np.stack([np.repeat(np.arange(n_users), 3), rng.integers(0, n_items - 1, 3 * n_users)], axis=1)
    feats = {"v_feat": rng.random((n_items, 7)) if v else None, "t_feat": rng.random((n_items, 5)) if t else None}
    return data.from_arrays(train, train[:4], train[4:8], n_users, n_items, **feats)


def small_config():
    cfg = default.get_config()
    cfg.embedding_size = cfg.feat_embed_dim = 8
    return cfg


def forward(ds, cfg=None, train=True, key=0):
    cfg = cfg or small_config()
    model = step_lib.make_model(cfg, ds)
    g = graph_lib.build_graph(ds.train, ds.n_users, ds.n_items)
    feats = step_lib.device_features(ds)
    state = step_lib.init_state(model, step_lib.make_optimizer(cfg.learning_rate), g, feats, seed=1)
    noise = sample_noise(jax.random.PRNGKey(key), model.noise_shapes(), train, model.keep_rate)
    return model, g, feats, state.params, model.apply(state.params, g, feats, noise)


def test_no_modality_is_lightgcn():
    ds = toy_dataset(v=False, t=False)
    _, g, _, params, out = forward(ds)
    x0 = np.concatenate([params["params"]["user_emb"], params["params"]["item_emb"]])
    adj = np.asarray(g.norm_adj.todense())
    expected = (x0 + adj @ x0 + adj @ adj @ x0) / 3  # mean over layers 0..2, layer 0 included
    np.testing.assert_allclose(np.concatenate([out.user, out.item]), expected, rtol=1e-5, atol=1e-6)
    assert out.hyper == {} and set(params["params"]) == {"user_emb", "item_emb"}


def test_mf_uses_raw_embeddings():
    cfg = small_config()
    cfg.cf_model = "mf"
    ds = toy_dataset(v=False, t=False)
    _, _, _, params, out = forward(ds, cfg)
    np.testing.assert_allclose(out.user, params["params"]["user_emb"])


@pytest.mark.parametrize("modality", ["v", "t"])
def test_one_modality_trains_without_contrastive_loss(modality):
    ds = toy_dataset(v=modality == "v", t=modality == "t")
    model, g, feats, params, out = forward(ds)
    assert set(out.hyper) == {f"{modality}_user", f"{modality}_item"}
    batch = losses.Batch(jnp.arange(4), jnp.arange(4), jnp.arange(4, 8), jnp.ones(4))
    parts = losses.loss_parts(out, batch, 1e-4, 1e-6)
    assert float(parts.hcl) == 0.0 and np.isfinite(float(parts.total))
    # The modality still shapes the embeddings: zeroing its features changes the output.
    zeroed = {modality: jnp.zeros_like(feats[modality])}
    noise = sample_noise(jax.random.PRNGKey(0), model.noise_shapes(), True, model.keep_rate)
    assert not np.allclose(model.apply(params, g, zeroed, noise).user, out.user)


def test_eval_noise_off_is_deterministic_and_on_is_not():
    ds = toy_dataset()
    model, g, feats, params, _ = forward(ds)
    apply = lambda key, gumbel: model.apply(params, g, feats, sample_noise(
        jax.random.PRNGKey(key), model.noise_shapes(), False, model.keep_rate, gumbel=gumbel)).user
    np.testing.assert_array_equal(apply(1, False), apply(2, False))
    assert not np.allclose(apply(1, True), apply(2, True))


def test_xavier_bounds():
    ds = toy_dataset()
    _, _, _, params, _ = forward(ds)
    p = params["params"]
    for name, (rows, cols) in {k: v.shape for k, v in p.items()}.items():
        bound = np.sqrt(6 / (rows + cols))
        assert np.abs(p[name]).max() <= bound
        assert np.abs(p[name]).max() > 0.8 * bound  # uniform over the whole range, not N(0, 1)


def test_normalize_has_finite_gradient_at_zero_rows():
    x = jnp.array([[0.0, 0.0], [3.0, 4.0]])
    np.testing.assert_allclose(l2_normalize(x), [[0, 0], [0.6, 0.8]], rtol=1e-6)
    grad = jax.grad(lambda v: jnp.sum(l2_normalize(v) * jnp.array([[1.0, 2.0], [1.0, 1.0]])))(x)
    assert np.isfinite(np.asarray(grad)).all()


def test_cold_items_give_finite_gradients():
    ds = toy_dataset()  # the last item never occurs in training: an isolated node
    cfg = small_config()
    model = step_lib.make_model(cfg, ds)
    g = graph_lib.build_graph(ds.train, ds.n_users, ds.n_items)
    feats = step_lib.device_features(ds)
    state = step_lib.init_state(model, step_lib.make_optimizer(cfg.learning_rate), g, feats, 1)
    step = step_lib.make_train_step(model, step_lib.make_optimizer(cfg.learning_rate), step_lib.config_objective(cfg))
    batch = losses.Batch(jnp.arange(4), jnp.arange(4), jnp.full(4, ds.n_items - 1), jnp.ones(4))
    new_state, parts = step(state, g, feats, batch, jax.random.PRNGKey(3))
    assert step_lib.finite_state(new_state) and np.isfinite(float(parts.total))


def mge_terms(model, params, g, feats):
    """nrm(M_v) + nrm(M_t) of the full model, from its own feature products."""
    d = model.embedding_size

    def terms(module, g, feats):
        return sum(l2_normalize(module.mge(g, item[:, :d], user[:, :d]))
                   for item, user in module.feature_products(g, feats).values())

    return model.apply(params, g, feats, method=terms)


@pytest.mark.parametrize("switch", ["use_cge", "use_mge", "use_ghe"])
def test_ablation_switches_remove_their_term(switch):
    ds = toy_dataset()
    cfg = small_config()
    model, g, feats, params, full = forward(ds, cfg, train=False)
    cfg[switch] = False
    ablated = step_lib.make_model(cfg, ds)
    noise = sample_noise(jax.random.PRNGKey(0), ablated.noise_shapes(), False, ablated.keep_rate)
    out = ablated.apply(params, g, feats, noise)
    c = model.apply(params, g, method=LGMRec.cge)
    both = jnp.concatenate([full.user, full.item])
    got = jnp.concatenate([out.user, out.item])
    if switch == "use_cge":
        # C leaves the output and the hypergraph reads the raw item ID embeddings instead.
        np.testing.assert_allclose(ablated.apply(params, g, method=LGMRec.cge),
                                   jnp.concatenate([params["params"]["user_emb"], params["params"]["item_emb"]]))
        cfg.alpha = 0.0  # without the hypergraph term the output is exactly the MGE part
        no_ghe = step_lib.make_model(cfg, ds).apply(params, g, feats, noise)
        mge = mge_terms(model, params, g, feats)
        np.testing.assert_allclose(jnp.concatenate([no_ghe.user, no_ghe.item]), mge, rtol=1e-5, atol=1e-6)
    elif switch == "use_mge":
        mge = mge_terms(model, params, g, feats)
        np.testing.assert_allclose(got, both - mge, rtol=1e-5, atol=1e-6)
    else:
        assert out.hyper == {}
        ghe = both - c - mge_terms(model, params, g, feats)
        np.testing.assert_allclose(got, both - ghe, rtol=1e-5, atol=1e-6)


def test_infonce_matches_a_hand_computed_softmax_at_any_tau():
    rng = np.random.default_rng(4)
    a, p, z = rng.normal(size=(3, 4)), rng.normal(size=(3, 4)), rng.normal(size=(6, 4))
    mask = np.array([1.0, 1.0, 0.0])  # the padded third row counts for nothing
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    for tau in (0.2, 0.7):
        logits = unit(a) @ unit(z).T / tau
        expected = sum(np.log(np.exp(logits[b]).sum()) - unit(a)[b] @ unit(p)[b] / tau for b in range(2))
        got = losses.infonce(jnp.asarray(a, jnp.float32), jnp.asarray(p, jnp.float32),
                             jnp.asarray(z, jnp.float32), jnp.asarray(mask, jnp.float32), tau)
        np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_tau_config_sets_the_gumbel_and_contrastive_temperature():
    ds = toy_dataset()
    cfg = small_config()
    assert cfg.tau == 0.2 and step_lib.make_model(cfg, ds).tau == 0.2  # the reference's hard-coded value
    model, g, feats, params, _ = forward(ds, cfg)
    noise = sample_noise(jax.random.PRNGKey(0), model.noise_shapes(), True, model.keep_rate)
    cfg.tau = 1.0
    warm = step_lib.make_model(cfg, ds)
    logits = warm.apply(params, g, feats, method=LGMRec.noise_free).logits
    assign = warm.apply(params, logits, noise, method=LGMRec.assignments)
    item_logits = np.asarray(feats["v"])[: ds.n_items] @ np.asarray(params["params"]["v_hyper"])
    expected = jax.nn.softmax(item_logits + np.asarray(noise.gumbel["v_item"]), axis=1)  # softmax at tau = 1
    np.testing.assert_allclose(np.asarray(assign["v_item"]), np.asarray(expected), rtol=1e-5, atol=1e-7)
    batch = losses.Batch(jnp.arange(4), jnp.arange(4), jnp.arange(1, 5), jnp.ones(4))
    out = warm.apply(params, g, feats, noise)
    parts = losses.loss_parts(out, batch, cfg.cl_weight, cfg.reg_weight, cfg.tau)
    h = out.hyper
    by_hand = (losses.infonce(h["v_user"][:4], h["t_user"][:4], h["t_user"], jnp.ones(4), 1.0)
               + losses.infonce(h["v_item"][:4], h["t_item"][:4], h["t_item"], jnp.ones(4), 1.0))
    np.testing.assert_allclose(float(parts.hcl), float(by_hand), rtol=1e-6)
    assert abs(float(parts.hcl) - float(losses.loss_parts(out, batch, 1e-4, 1e-6).hcl)) > 1e-3


def test_bfloat16_features_project_in_bf16_with_float32_accumulation():
    from lgmrec_jax.model import frozen_feature_matmul

    rng = np.random.default_rng(5)
    feat = jnp.asarray(rng.random((40, 300)), jnp.bfloat16)
    weight = jnp.asarray(rng.normal(size=(300, 6)), jnp.float32)
    cot = jnp.asarray(rng.normal(size=(40, 6)), jnp.float32)
    y, pullback = jax.vjp(lambda w: frozen_feature_matmul(feat, w), weight)
    # By hand in float64: both operands rounded to bfloat16, products summed exactly.
    f64, w64 = np.asarray(feat, np.float64), np.asarray(weight.astype(jnp.bfloat16), np.float64)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), f64 @ w64, rtol=1e-5, atol=1e-5)
    (grad,) = pullback(cot)
    c64 = np.asarray(cot.astype(jnp.bfloat16), np.float64)
    np.testing.assert_allclose(np.asarray(grad), f64.T @ c64, rtol=1e-5, atol=1e-5)
    # float32 features stay the plain float32 product (the reference's arithmetic).
    f32 = jnp.asarray(rng.random((40, 300)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(frozen_feature_matmul(f32, weight)), np.asarray(f32 @ weight))


def test_feature_dtype_config_reaches_the_device_features():
    ds = toy_dataset()
    cfg = small_config()
    cfg.feature_dtype = "bfloat16"
    from lgmrec_jax import configs, engine as engine_lib

    exp = engine_lib.SingleEngine(cfg, ds)
    assert {f.dtype for f in exp.feats.values()} == {jnp.dtype(jnp.bfloat16)}
    state, parts = exp.train_epoch(exp.put(exp.init_state()), 0)
    assert np.isfinite(parts).all() and step_lib.finite_state(exp.get(state))
    cfg.feature_dtype = "float16"
    with pytest.raises(configs.ConfigError, match="feature_dtype is 'float16', expected one of"):
        configs.validate(cfg)


def test_ell_kernel_gives_the_segment_sum_training_step():
    """The whole training step (forward, both losses, gradient through every propagation, Adam) with
    the ELL graph equals the segment_sum step up to float32 summation order."""
    ds = toy_dataset()
    batch = losses.Batch(jnp.arange(6), jnp.arange(6) % ds.n_items, jnp.full(6, 2), jnp.ones(6))
    results = {}
    for kernel in ("segment_sum", "ell"):
        cfg = small_config()
        cfg.kernel = kernel
        model = step_lib.make_model(cfg, ds)
        g = graph_lib.build_graph(ds.train, ds.n_users, ds.n_items, kernel)
        feats = step_lib.device_features(ds)
        optimizer = step_lib.make_optimizer(cfg.learning_rate)
        state = step_lib.init_state(model, optimizer, g, feats, seed=1)
        step = jax.jit(step_lib.make_train_step(model, optimizer, step_lib.config_objective(cfg)))
        results[kernel] = step(state, g, feats, batch, jax.random.PRNGKey(5))
    (s_state, s_parts), (e_state, e_parts) = results["segment_sum"], results["ell"]
    np.testing.assert_allclose(np.array(e_parts), np.array(s_parts), rtol=1e-6)
    assert float(s_parts.hcl) > 0
    for a, b in zip(jax.tree_util.tree_leaves(e_state.params), jax.tree_util.tree_leaves(s_state.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_features_are_padded_to_whole_gemm_tiles_and_the_padding_changes_nothing():
    from lgmrec_jax.model import GEMM_ROW_MULTIPLE

    ds = toy_dataset()
    model, g, feats, params, _ = forward(ds, small_config(), train=True)
    for m, f in (("v", ds.v_feat), ("t", ds.t_feat)):
        assert feats[m].shape[0] % GEMM_ROW_MULTIPLE == 0 and feats[m].shape[0] >= ds.n_items
        np.testing.assert_array_equal(np.asarray(feats[m])[: ds.n_items], f)
        assert not np.asarray(feats[m])[ds.n_items:].any()
    bare = {m: jnp.asarray(f) for m, f in (("v", ds.v_feat), ("t", ds.t_feat))}
    noise = sample_noise(jax.random.PRNGKey(2), model.noise_shapes(), True, model.keep_rate)
    batch = losses.Batch(jnp.arange(4), jnp.arange(4), jnp.arange(1, 5), jnp.ones(4))

    def loss(p, f):
        return losses.loss_parts(model.apply(p, g, f, noise), batch, 1e-2, 1e-4).total

    padded_value, padded_grads = jax.value_and_grad(loss)(params, feats)
    bare_value, bare_grads = jax.value_and_grad(loss)(params, bare)
    np.testing.assert_allclose(float(padded_value), float(bare_value), rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(padded_grads), jax.tree_util.tree_leaves(bare_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_infonce_padding_of_the_candidates_gives_the_plain_value_and_gradients():
    rng = np.random.default_rng(7)
    a, p, z = (jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in ((5, 8), (5, 8), (37, 8)))
    mask = jnp.asarray([1.0, 1.0, 1.0, 1.0, 0.0])

    def plain(a, p, z, tau=0.2):  # autodiff of the textbook form, no padding, no custom VJP
        a, p, z = l2_normalize(a), l2_normalize(p), l2_normalize(z)
        rows = jnp.log(jnp.sum(jnp.exp(a @ z.T / tau), axis=1)) - jnp.sum(a * p, axis=1) / tau
        return jnp.sum(rows * mask)

    got = jax.value_and_grad(lambda *x: losses.infonce(*x[:3], mask), argnums=(0, 1, 2))(a, p, z)
    want = jax.value_and_grad(plain, argnums=(0, 1, 2))(a, p, z)
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-6)
    for x, y in zip(got[1], want[1]):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
