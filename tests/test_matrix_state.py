"""The matrix-state phase-associative recurrence (qpf.ops.matrix_state) and its backbone.

The two forms of the op must equal a numpy complex loop of S_t = γ_t S_{t-1} + v_t k_t^H,
y_t = S_t q_t at prime sizes (T not a multiple of the chunk), in float32 and bfloat16; the
backbone must carry its state exactly (prefill + steps == one pass) with and without the
interleaved local-attention layers, and its config must reject bad values clearly.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qpf import config as cfgs
from qpf.layers.backbones import BACKBONES
from qpf.layers.matrix_state import LocalAttentionLayer, MatrixStateBackbone, MatrixStateLayer
from qpf.ops.matrix_state import matrix_state_chunked, matrix_state_recurrent

B, T, H, DK, DV = 2, 13, 3, 5, 7


def _inputs(seed: int = 0, t: int = T):
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (B, t, H, 2, DK))
    k = jax.random.normal(ks[1], (B, t, H, 2, DK)) / np.sqrt(DK)
    v = jax.random.normal(ks[2], (B, t, H, 2, DV))
    # Decays spread over (0.3, 1): strong enough that a wrong exponent shows.
    log_gamma = -jax.nn.softplus(jax.random.normal(ks[3], (B, t, H)) - 1.0)
    s0 = jax.random.normal(ks[4], (B, H, 2, DV, DK))
    return q, k, v, log_gamma, s0


def numpy_reference(q, k, v, log_gamma, s0, resets=None):
    """The recurrence written with numpy complex128 numbers, one step at a time; ``resets``
    [B, T] zero the state carried into their step."""
    c = lambda x: np.asarray(x[..., 0, :], np.float64) + 1j * np.asarray(x[..., 1, :])  # noqa: E731
    qc, kc, vc = c(q), c(k), c(v)
    s = np.asarray(s0[..., 0, :, :], np.float64) + 1j * np.asarray(s0[..., 1, :, :], np.float64)
    g = np.exp(np.asarray(log_gamma, np.float64))
    ys = np.zeros(vc.shape, np.complex128)
    if resets is not None:
        g = np.where(np.asarray(resets)[:, :, None], 0.0, g)
    for t in range(qc.shape[1]):
        s = g[:, t, :, None, None] * s + vc[:, t, :, :, None] * np.conj(kc[:, t, :, None, :])
        ys[:, t] = np.einsum("bhij,bhj->bhi", s, qc[:, t])
    pair = lambda z: np.stack([z.real, z.imag], axis=-2)  # noqa: E731
    return pair(ys), np.stack([s.real, s.imag], axis=-3)


@pytest.mark.parametrize("chunk", [1, 5, 17])
def test_chunked_and_recurrent_equal_the_numpy_complex_loop(chunk):
    q, k, v, lg, s0 = _inputs()
    y_ref, s_ref = numpy_reference(q, k, v, lg, s0)
    with jax.default_matmul_precision("float32"):
        y_rec, s_rec = jax.jit(matrix_state_recurrent)(q, k, v, lg, s0)
        y_chk, s_chk = jax.jit(matrix_state_chunked, static_argnames="chunk_size")(
            q, k, v, lg, s0, chunk_size=chunk
        )
    for got, want in ((y_rec, y_ref), (s_rec, s_ref), (y_chk, y_ref), (s_chk, s_ref)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-4)
    # The references differ from zero-state runs: the initial state is really used.
    y0, _ = matrix_state_chunked(q, k, v, lg, None, chunk_size=chunk)
    assert np.abs(np.asarray(y0) - y_ref).max() > 1e-2


def test_chunked_in_bfloat16_accumulates_in_float32():
    q, k, v, lg, s0 = _inputs(seed=1, t=29)
    bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    # Reference: the same bf16-rounded inputs in exact arithmetic.
    y_ref, s_ref = numpy_reference(*[x.astype(jnp.float32) for x in bf], lg, s0)
    y, s = jax.jit(matrix_state_chunked, static_argnames="chunk_size")(*bf, lg, s0, chunk_size=7)
    assert y.dtype == jnp.bfloat16
    assert s.dtype == jnp.float32
    scale = np.abs(y_ref).max()
    err = np.abs(np.asarray(y, np.float64) - y_ref).max() / scale
    # bf16 rounding of the outputs and of the within-chunk weights alone is ~2^-8 relative;
    # a float16/bf16 accumulator over 29 steps would be several times worse.
    assert err < 2e-2, err
    np.testing.assert_allclose(np.asarray(s), s_ref, rtol=2e-2, atol=2e-2 * np.abs(s_ref).max())


def test_splitting_the_sequence_carries_the_state_exactly():
    q, k, v, lg, s0 = _inputs(seed=2)
    full, s_full = matrix_state_chunked(q, k, v, lg, s0, chunk_size=4)
    cut = 6
    head = [x[:, :cut] for x in (q, k, v, lg)]
    a, s_mid = matrix_state_chunked(*head, s0, chunk_size=4)
    b, s_end = matrix_state_recurrent(q[:, cut:], k[:, cut:], v[:, cut:], lg[:, cut:], s_mid)
    np.testing.assert_allclose(jnp.concatenate([a, b], 1), full, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(s_end, s_full, rtol=1e-4, atol=1e-4)


def test_gradients_of_the_two_forms_agree():
    q, k, v, lg, s0 = _inputs(seed=3)
    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)[0]))  # noqa: E731
    chunked = lambda *a: matrix_state_chunked(*a, chunk_size=5)  # noqa: E731
    with jax.default_matmul_precision("float32"):
        g_rec = jax.grad(loss(matrix_state_recurrent), argnums=(0, 1, 2, 3, 4))(q, k, v, lg, s0)
        g_chk = jax.grad(loss(chunked), argnums=(0, 1, 2, 3, 4))(q, k, v, lg, s0)
    for a, b in zip(g_rec, g_chk, strict=True):
        assert np.abs(np.asarray(a)).max() > 0
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)


def test_shape_errors_name_the_problem():
    q, k, v, lg, s0 = _inputs()
    with pytest.raises(ValueError, match=r"log_gamma must be \[B, T, H\]"):
        matrix_state_chunked(q, k, v, lg[:, :-1], s0)
    with pytest.raises(ValueError, match="initial state"):
        matrix_state_recurrent(q, k, v, lg, s0[:, :1])
    with pytest.raises(ValueError, match="chunk_size"):
        matrix_state_chunked(q, k, v, lg, s0, chunk_size=0)


# --------------------------------------------------------------------------- config


def test_config_validation_and_round_trip():
    c = cfgs.MatrixStateConfig(num_heads=2, head_dim=3, local_attention_every=2)
    assert c.type == "phase_matrix"
    assert "phase_matrix" in BACKBONES
    model = cfgs.ModelConfig(dim=6, backbone=c)
    assert cfgs.from_dict(cfgs.ModelConfig, cfgs.to_dict(model)) == model
    assert cfgs.apply_overrides(model, {"backbone.chunk_size": "7"}).backbone.chunk_size == 7
    # A whole backbone is switched from the command line as JSON (--set model.backbone=...).
    switched = cfgs.apply_overrides(cfgs.ModelConfig(), {"backbone": '{"type": "phase_matrix"}'})
    assert switched.backbone == cfgs.MatrixStateConfig()
    with pytest.raises(cfgs.ConfigError, match=r"backbone\.type = 'lstm' is unknown"):
        cfgs.apply_overrides(cfgs.ModelConfig(), {"backbone": '{"type": "lstm"}'})
    bad = {
        "num_heads": 0,
        "head_dim": -1,
        "chunk_size": 0,
        "form": "parallel",
        "local_attention_every": -1,
        "local_attention_window": 0,
        "dropout": 1.0,
        "gate_bias_init": "x",
    }
    for field, value in bad.items():
        with pytest.raises(cfgs.ConfigError, match=f"MatrixStateConfig.{field}"):
            dataclasses.replace(c, **{field: value})
    with pytest.raises(cfgs.ConfigError, match="local_attention_every"):
        cfgs.MatrixStateConfig(num_layers=2, local_attention_every=3)  # no attention layer


# ------------------------------------------------------------------------- backbone


@pytest.mark.parametrize("chunk", [1, 4, 17])
def test_document_resets_in_both_forms_equal_the_numpy_loop(chunk):
    """Resets at 0-based steps 3, 4 (adjacent), 9 (row 0) and 12 (row 1, the last step):
    within a chunk, on its first step and across chunks."""
    q, k, v, lg, s0 = _inputs(seed=3)
    resets = jnp.zeros((B, T), bool).at[0, jnp.array([3, 4, 9])].set(True).at[1, 12].set(True)
    y_ref, s_ref = numpy_reference(q, k, v, lg, s0, resets)
    with jax.default_matmul_precision("float32"):
        y_rec, s_rec = jax.jit(matrix_state_recurrent)(q, k, v, lg, s0, resets=resets)
        y_chk, s_chk = jax.jit(matrix_state_chunked, static_argnames="chunk_size")(
            q, k, v, lg, s0, chunk_size=chunk, resets=resets
        )
    for got, want in ((y_rec, y_ref), (s_rec, s_ref), (y_chk, y_ref), (s_chk, s_ref)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-4)


def test_backbone_segments_give_the_second_document_what_it_gets_alone():
    """Hybrid stack (matrix layers and local attention): a document packed after another
    equals it alone; all-zero ids equal none."""
    _, mod = _backbone(local_attention_every=2, local_attention_window=3)
    x = jax.random.normal(jax.random.key(0), (2, 11, 2, 6))
    params = jax.jit(mod.init)(jax.random.key(1), x)["params"]
    params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(2), p.shape), params)
    run = jax.jit(lambda x, g: mod.apply({"params": params}, x, segment_ids=g)[0])
    plain = jax.jit(lambda x: mod.apply({"params": params}, x)[0])
    seg = jnp.broadcast_to(jnp.arange(11) >= 5, (2, 11)).astype(jnp.int32)
    alone = plain(jnp.concatenate([x[:, 5:], x[:, :5]], 1))[:, :6]  # causal: padding after
    np.testing.assert_allclose(run(x, seg)[:, 5:], alone, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(run(x, 0 * seg), plain(x), rtol=1e-5, atol=1e-6)


def _backbone(**kw):
    c = cfgs.MatrixStateConfig(num_heads=2, head_dim=3, chunk_size=4, num_layers=3, **kw)
    return c, MatrixStateBackbone(cfg=c)


@pytest.mark.parametrize("every", [0, 2])
def test_backbone_prefill_and_steps_equal_one_pass(every):
    c, mod = _backbone(local_attention_every=every, local_attention_window=3)
    x = jax.random.normal(jax.random.key(0), (2, 11, 2, 6))
    params = mod.init(jax.random.key(1), x)["params"]
    # Move gates and scales off their init so every branch matters.
    params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(2), p.shape), params)
    run = jax.jit(lambda x, s: mod.apply({"params": params}, x, s))
    full, s_full = run(x, None)
    state, outs = mod.init_state(c, 2), []
    for a, b in ((0, 5), (5, 6), (6, 7), (7, 11)):
        y, state = run(x[:, a:b], state)
        outs.append(y)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=1e-4, atol=1e-5)
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(s_full), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # Negative control: the last piece from a fresh state differs.
    y, _ = run(x[:, 7:11], mod.init_state(c, 2))
    assert np.abs(np.asarray(y - full[:, 7:11])).max() > 1e-3


def test_hybrid_places_attention_layers_and_decays_start_near_0_98():
    _, mod = _backbone(local_attention_every=3, local_attention_window=3)
    x = jnp.ones((1, 2, 2, 6))
    params = mod.init(jax.random.key(0), x)["params"]
    kinds = {name: ("matrix" if "decay_proj" in p else "attention") for name, p in params.items()
             if name.startswith("layers_")}  # fmt: skip
    assert kinds == {"layers_0": "matrix", "layers_1": "matrix", "layers_2": "attention"}
    gamma = np.exp(-jax.nn.softplus(params["layers_0"]["decay_proj"]["bias"]))
    np.testing.assert_allclose(gamma, np.exp(-np.log1p(np.exp(-4.0))), rtol=1e-6)
    assert 0.98 < gamma.min() < 0.99


def test_local_attention_sees_only_its_window():
    c = cfgs.MatrixStateConfig(num_heads=2, head_dim=3, num_layers=1, local_attention_every=1,
                               local_attention_window=3)  # fmt: skip
    layer = LocalAttentionLayer(cfg=c)
    x = jax.random.normal(jax.random.key(0), (1, 9, 2, 6))
    params = layer.init(jax.random.key(1), x, None, True)["params"]
    run = jax.jit(lambda x: layer.apply({"params": params}, x, None, True)[0])
    y = run(x)
    y2 = run(x.at[:, 2].add(1.0))
    moved = np.abs(np.asarray(y2 - y)).max(axis=(0, 2, 3)) > 1e-6
    # Position 2 is seen by queries 2, 3, 4 (window 3, self included) and no others.
    assert moved.tolist() == [False, False, True, True, True, False, False, False, False]


@pytest.mark.parametrize("kind", ["matrix", "attention"])
def test_layers_in_bfloat16_stay_close_to_float32(kind):
    # Per layer, on the same bf16-rounded input: the stack's v4 Phase2DLayerNorms amplify
    # input rounding alone to ~0.13 of the spread at d = 6 (measured), which would hide
    # the layers' own error (measured max 0.013-0.015, mean 0.003 of the spread).
    c, _ = _backbone(local_attention_every=3, local_attention_window=3)
    cls, extra = {
        "matrix": (MatrixStateLayer, (jnp.zeros((2, 2, 2, 3, 3)),)),
        "attention": (LocalAttentionLayer, (None,)),
    }[kind]
    x = jax.random.normal(jax.random.key(0), (2, 11, 2, 6)).astype(jnp.bfloat16)
    f32, bf16 = cls(cfg=c), cls(cfg=c, dtype=jnp.bfloat16)
    params = f32.init(jax.random.key(1), x.astype(jnp.float32), *extra)["params"]
    params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(2), p.shape), params)
    ref, _ = f32.apply({"params": params}, x.astype(jnp.float32), *extra)
    y, _ = bf16.apply({"params": params}, x, *extra)
    assert y.dtype == jnp.bfloat16
    err = np.abs(np.asarray(y, np.float32) - np.asarray(ref))
    scale = float(np.std(np.asarray(ref)))
    assert err.max() < 0.05 * scale, (err.max(), scale)
    assert err.mean() < 0.01 * scale, (err.mean(), scale)


def test_backbone_in_bfloat16_carries_float32_state():
    c, _ = _backbone(local_attention_every=3, local_attention_window=3)
    bf16 = MatrixStateBackbone(cfg=c, dtype=jnp.bfloat16)
    x = jnp.ones((2, 3, 2, 6), jnp.bfloat16)
    params = bf16.init(jax.random.key(1), x)["params"]
    y, state = bf16.apply({"params": params}, x, bf16.init_state(c, 2))
    assert y.dtype == jnp.bfloat16
    assert state["matrix"].dtype == jnp.float32
    # The cache keeps the state's dtype, so a while_loop carry does not change type.
    assert state["attention"]["keys"].dtype == jnp.float32


def test_recurrent_form_and_remat_match_the_chunked_form():
    c, mod = _backbone(local_attention_every=3, local_attention_window=3)
    x = jax.random.normal(jax.random.key(0), (2, 11, 2, 6))
    params = mod.init(jax.random.key(1), x)["params"]
    params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.key(2), p.shape), params)

    def run(cfg):
        m = MatrixStateBackbone(cfg=cfg)
        loss = lambda p: jnp.sum(jnp.sin(m.apply({"params": p}, x)[0]))  # noqa: E731
        return jax.jit(jax.value_and_grad(loss))(params)

    with jax.default_matmul_precision("float32"):
        ref = run(c)
        for changes in ({"form": "recurrent"}, {"remat": True}):
            got = run(dataclasses.replace(c, **changes))
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4, err_msg=str(changes))


@pytest.mark.slow
def test_in_step_diagnostics_read_the_matrix_memories():
    from qpf.diagnostics.in_step import step_metrics
    from qpf.presets import QPF_FAMILY

    module = QPF_FAMILY.build(QPF_FAMILY.presets["test-matrix-hybrid"].model)
    tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, 256)
    params = module.init(jax.random.key(1), tokens)["params"]

    @jax.jit
    def metrics_of(p, x):
        out = module.apply({"params": p}, x, return_intermediates=True)
        return step_metrics(module, out, jnp.ones(x.shape, bool), None, "on")[0]

    metrics = metrics_of(params, tokens)
    manas = {k: float(v) for k, v in metrics.items() if "manas" in k}
    assert manas, sorted(metrics)
    assert all(np.isfinite(v) for v in manas.values())
    assert manas[next(k for k in manas if "magnitude" in k)] > 0


def test_every_state_leaf_has_one_row_axis():
    # Beam search and row gathers find each leaf's row axis by comparing the states for 1
    # and 2 rows (qpf.generation.core.batch_axes); gathering rows along it must equal
    # running the gathered rows.
    c, mod = _backbone(local_attention_every=3, local_attention_window=3)
    x = jax.random.normal(jax.random.key(0), (2, 7, 2, 6))
    params = mod.init(jax.random.key(1), x)["params"]
    one, two = mod.init_state(c, 1), mod.init_state(c, 2)
    axes = jax.tree.map(
        lambda a, b: ([i for i, (m, n) in enumerate(zip(a.shape, b.shape)) if m != n] or [-1])[0],
        one,
        two,
    )
    _, state = mod.apply({"params": params}, x, two)
    _, flipped = mod.apply({"params": params}, x[::-1], two)
    for leaf, ref, ax in zip(*(jax.tree.leaves(t) for t in (state, flipped, axes)), strict=True):
        want = leaf if ax < 0 else jnp.flip(leaf, axis=ax)
        np.testing.assert_allclose(want, ref, rtol=1e-5, atol=1e-6)
