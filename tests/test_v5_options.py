"""The v5 backbone options (issue 10): recurrences against numpy complex references, the norm
and activations, the causal convolution, streaming, causality, gradients, init, bf16, config.

The whole-model properties (prefill + decode, resume, leak) of every option together are
covered by the ``qpf:test-v5`` preset in tests/test_families.py.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qpf import config as cfgs
from qpf.layers.blocks import CausalComplexConv, xavier_orthogonal
from qpf.layers.ssm import OscillatorySSM, OscillatorySSMLayer
from qpf.ops import lru, norms
from qpf.ops import phase2d as p2d
from qpf.training.optim import decay_mask

B, T, D, N = 2, 11, 5, 7


def _c(x: np.ndarray) -> np.ndarray:
    """Phase2D ``[..., 2, d]`` -> numpy complex128 ``[..., d]``."""
    x = np.asarray(x, np.float64)
    return x[..., 0, :] + 1j * x[..., 1, :]


def _np_linear(x: np.ndarray, p: dict) -> np.ndarray:
    w = np.asarray(p["kernel_re"], np.float64) + 1j * np.asarray(p["kernel_im"], np.float64)
    b = np.asarray(p["bias_re"], np.float64) + 1j * np.asarray(p["bias_im"], np.float64)
    return x @ w + b


def _np_dense(u: np.ndarray, p: dict) -> np.ndarray:
    return u @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"], np.float64)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _np_layer(
    cfg: cfgs.BackboneConfig, p: dict, x: np.ndarray, h0: np.ndarray, resets: Any = None
) -> tuple:
    """The SSM layer as a plain complex loop over time (no conv, no activation); ``resets``
    [B, T] (document starts) zero the state carried into their step."""
    xc, h = _c(x), _c(h0)
    u = np.concatenate(
        [np.asarray(x, np.float64)[..., 0, :], np.asarray(x, np.float64)[..., 1, :]], -1
    )
    bx = _np_linear(xc, p["B"])
    if cfg.ssm == "lru":
        log_mag = -np.exp(np.asarray(p["nu"], np.float64))
        phase = np.asarray(p["theta"], np.float64)
    else:
        delta = 0.5 + 0.5 * _sigmoid(np.asarray(p["damping"], np.float64))
        log_mag, phase = np.log(delta), 2 * np.arctan(np.asarray(p["skew"], np.float64))
    lam = np.exp(log_mag + 1j * phase)
    gamma = np.sqrt(1 - np.abs(lam) ** 2) if cfg.ssm == "lru" else 1.0
    hs = []
    for t in range(x.shape[1]):
        if cfg.selectivity == "none":
            a, b = lam, gamma * bx[:, t]
        elif cfg.selectivity == "v4":
            g = _sigmoid(_np_dense(u[:, t], p["gate_proj"]))
            a, b = (1 - g) * lam, g * gamma * bx[:, t]
        else:
            r = _sigmoid(_np_dense(u[:, t], p["gate_proj"]))
            i = _sigmoid(_np_dense(u[:, t], p["input_gate"]))
            a = np.exp(lru.RGLRU_C * r * log_mag + 1j * r * phase)
            b = np.sqrt(1 - np.abs(a) ** 2) * i * bx[:, t]
        if resets is not None:
            h = np.where(np.asarray(resets)[:, t, None], 0.0, h)
        h = a * h + b
        hs.append(h)
    y = _np_linear(np.stack(hs, 1), p["C"]) + _np_linear(xc, p["D"])
    return y, h


def _perturb(params, scale: float = 0.3, seed: int = 7):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        tree, [x + scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    )


# Every combination on the sequential backend; the parallel backends on two of them (their
# agreement with sequential for any coefficients is tests/test_scan.py's job).
RECURRENCE_CASES = [
    *[(ssm, sel, "sequential") for ssm, sel in
      (("lru", "none"), ("lru", "v4"), ("lru", "rglru"), ("v4", "rglru"), ("v4", "none"))],
    ("lru", "rglru", "associative"), ("lru", "rglru", "chunked"), ("v4", "none", "chunked"),
]  # fmt: skip


def _ssm_case(ssm: str, selectivity: str, scan_type: str):
    """One SSM layer with perturbed parameters, its input x [B, T, 2, D] and h0 [B, 2, N]."""
    cfg = cfgs.BackboneConfig(
        state_dim=N, num_layers=1, ssm=ssm, selectivity=selectivity, scan_type=scan_type,
        chunk_size=4, dropout=0.0,
    )  # fmt: skip
    layer = OscillatorySSMLayer(cfg=cfg)
    x = jax.random.normal(jax.random.key(0), (B, T, 2, D))
    h0 = 0.5 * jax.random.normal(jax.random.key(2), (B, 2, N))
    return cfg, layer, x, h0, _perturb(layer.init(jax.random.key(1), x, h0)["params"], 0.1)


@pytest.mark.parametrize(("ssm", "selectivity", "scan_type"), RECURRENCE_CASES)
def test_recurrences_match_a_numpy_complex_loop(ssm, selectivity, scan_type):
    cfg, layer, x, h0, params = _ssm_case(ssm, selectivity, scan_type)
    y, h_last = jax.jit(layer.apply)({"params": params}, x, h0)
    y_ref, h_ref = _np_layer(cfg, params, x, h0)
    np.testing.assert_allclose(_c(y), y_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(_c(h_last), h_ref, rtol=1e-4, atol=1e-5)


def test_lru_ring_and_phase_init():
    cfg = cfgs.BackboneConfig(state_dim=4099, ssm="lru", r_min=0.5, r_max=0.8, max_phase=1.0)
    layer = OscillatorySSMLayer(cfg=cfg)
    x = jnp.zeros((1, 1, 2, 3))
    p = layer.init(jax.random.key(0), x, jnp.zeros((1, 2, cfg.state_dim)))["params"]
    r = np.exp(-np.exp(np.asarray(p["nu"], np.float64)))
    assert r.min() >= 0.5
    assert r.max() <= 0.8
    # Uniform in area: |λ|² ~ U[r_min², r_max²], whose mean is (0.25 + 0.64)/2.
    assert abs(np.mean(r**2) - 0.445) < 0.005
    theta = np.asarray(p["theta"])
    assert theta.min() >= 0.0
    assert theta.max() <= 1.0
    assert abs(theta.mean() - 0.5) < 0.02


def test_nu_and_theta_get_no_weight_decay_but_matrices_do():
    cfg = cfgs.BackboneConfig(
        state_dim=N, num_layers=1, ssm="lru", selectivity="rglru", conv_width=3,
        channel_mixer="complex_glu", activation="modrelu",
    )  # fmt: skip
    model = OscillatorySSM(cfg=cfg)
    params = model.init(jax.random.key(0), jnp.zeros((1, 3, 2, D)))["params"]
    mask = decay_mask(params)["layers_0"]
    assert not mask["nu"]
    assert not mask["theta"]
    assert not mask["act"]["bias"]
    assert mask["B"]["kernel_re"]
    assert mask["gate_proj"]["kernel"]
    assert mask["conv"]["kernel_re"]


def test_sqrt_bound_derivative_is_sqrt_with_a_clipped_gradient():
    x = jnp.array([0.0, 1e-9, 0.25, 4.0])
    np.testing.assert_allclose(lru.sqrt_bound_derivative(x), jnp.sqrt(x))
    g = jax.grad(lambda v: jnp.sum(lru.sqrt_bound_derivative(v)))(x)
    np.testing.assert_allclose(g, [1000.0, 1000.0, 1.0, 0.25], rtol=1e-6)


# ------------------------------------------------------------------ norm and activations


def test_complex_rms_norm_matches_numpy_and_keeps_phases():
    x = jax.random.normal(jax.random.key(0), (3, 4, 2, D)) * 3.0 + 1.0
    scale = jnp.linspace(0.5, 1.5, D)
    y = norms.complex_rms_norm(x, scale)
    z = _c(x)
    ref = z / np.sqrt(np.mean(np.abs(z) ** 2, -1, keepdims=True) + norms.RMS_NORM_EPS)
    np.testing.assert_allclose(_c(y), ref * np.asarray(scale), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.angle(_c(y)), np.angle(z), atol=1e-5)
    # bf16 input: accumulated in float32, so only the final rounding differs.
    yb = norms.complex_rms_norm(x.astype(jnp.bfloat16), scale)
    assert yb.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(yb, np.float32), y, rtol=2e-2, atol=2e-2)


def test_modrelu_and_modswish_match_numpy_keep_phase_and_are_safe_at_zero():
    x = jax.random.normal(jax.random.key(0), (3, 2, D)).at[0].set(0.0)  # row 0: z = 0
    b = jnp.array([-0.5, 0.0, 0.3, -2.0, 1.0])
    beta = jnp.array([1.0, 2.0, -1.0, 0.5, 0.0])
    z = _c(x)
    m = np.sqrt(np.abs(z) ** 2 + p2d.MODULUS_EPS)
    relu_ref = np.maximum(m + np.asarray(b), 0) * z / m
    swish_ref = z * _sigmoid(np.asarray(beta) * m + np.asarray(b))
    np.testing.assert_allclose(_c(norms.modrelu(x, b)), relu_ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(_c(norms.modswish(x, beta, b)), swish_ref, rtol=1e-5, atol=1e-7)
    kept = np.abs(relu_ref) > 0
    np.testing.assert_allclose(
        np.angle(_c(norms.modrelu(x, b)))[kept], np.angle(z)[kept], atol=1e-5
    )
    for f, args in ((norms.modrelu, (b,)), (norms.modswish, (beta, b))):
        grads = jax.grad(lambda *a, f=f: jnp.sum(f(*a) ** 2 + f(*a)), argnums=(0, 1))(x, *args)
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
        np.testing.assert_array_equal(f(x, *args)[0], 0.0)


# ------------------------------------------------------------------ causal convolution


RESET_CASES = [
    *[("lru", "rglru", s) for s in ("sequential", "associative", "chunked")],
    *[("v4", "v4", s) for s in ("sequential", "chunked")],
]


@pytest.mark.parametrize(("ssm", "selectivity", "scan_type"), RESET_CASES)
def test_recurrences_with_document_resets_match_the_numpy_loop(ssm, selectivity, scan_type):
    """segment_ids: the state carried into each document start is zero (v4 recurrence via
    oscillatory_scan, the LRU/RG-LRU via linear_scan), on every backend."""
    cfg, layer, x, h0, params = _ssm_case(ssm, selectivity, scan_type)
    seg = (jnp.arange(T)[None, :] >= jnp.array([[3], [6]])).astype(jnp.int32)  # [B, T]
    y, h_last = jax.jit(layer.apply)({"params": params}, x, h0, True, seg)
    resets = np.asarray(seg[:, 1:] != seg[:, :-1])
    resets = np.concatenate([np.zeros((B, 1), bool), resets], 1)
    y_ref, h_ref = _np_layer(cfg, params, x, h0, resets)
    np.testing.assert_allclose(_c(y), y_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(_c(h_last), h_ref, rtol=1e-4, atol=1e-5)


def test_causal_conv_takes_no_tap_across_a_document_start():
    conv = CausalComplexConv(width=4)
    x = jax.random.normal(jax.random.key(0), (B, T, 2, D))
    tail0 = jax.random.normal(jax.random.key(3), (B, 3, 2, D))  # belongs to document 0
    p = _perturb(conv.init(jax.random.key(1), x, tail0)["params"])
    seg = np.zeros((B, T), np.int32)
    seg[:, 2:] = 1
    seg[-1, 5:] = 2
    y, _ = conv.apply({"params": p}, x, tail0, jnp.asarray(seg))
    w = np.asarray(p["kernel_re"], np.float64) + 1j * np.asarray(p["kernel_im"], np.float64)
    bias = np.asarray(p["bias_re"], np.float64) + 1j * np.asarray(p["bias_im"], np.float64)
    xc = np.concatenate([_c(tail0), _c(x)], 1)  # stream index t + 3
    segp = np.concatenate([np.repeat(seg[:, :1], 3, 1), seg], 1)
    ref = np.zeros((B, T, D), complex)
    for r in range(B):
        for t in range(T):
            ref[r, t] = bias + sum(
                w[k] * xc[r, t + 3 - k] for k in range(4) if segp[r, t + 3 - k] == seg[r, t]
            )
    np.testing.assert_allclose(_c(y), ref, rtol=1e-5, atol=1e-6)


def test_causal_conv_matches_numpy_and_streams_with_its_tail():
    conv = CausalComplexConv(width=4)
    x = jax.random.normal(jax.random.key(0), (B, T, 2, D))
    tail0 = jnp.zeros((B, 3, 2, D))
    p = _perturb(conv.init(jax.random.key(1), x, tail0)["params"])
    y, tail = conv.apply({"params": p}, x, tail0)
    w = np.asarray(p["kernel_re"], np.float64) + 1j * np.asarray(p["kernel_im"], np.float64)
    bias = np.asarray(p["bias_re"], np.float64) + 1j * np.asarray(p["bias_im"], np.float64)
    xc = _c(x)
    ref = np.stack(
        [bias + sum(w[k] * xc[:, t - k] for k in range(4) if t - k >= 0) for t in range(T)], 1
    )
    np.testing.assert_allclose(_c(y), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tail, x[:, -3:])
    # In pieces of 1, 2 and 8 tokens (shorter and longer than the tail) with the carried tail.
    outs, s = [], tail0
    for a, b in ((0, 1), (1, 3), (3, T)):
        out, s = conv.apply({"params": p}, x[:, a:b], s)
        outs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), y, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ the stack, per option

V5_OPTIONS = {
    "lru": dict(ssm="lru"),
    "rglru": dict(selectivity="rglru"),
    "none": dict(selectivity="none", ssm="lru"),
    "rms": dict(norm="rms"),
    "modrelu": dict(activation="modrelu"),
    "modswish+glu": dict(activation="modswish", channel_mixer="complex_glu"),
    "geglu": dict(channel_mixer="geglu", mlp_expansion=3),
    "conv": dict(conv_width=3),
    "griffin": dict(block="griffin", channel_mixer="complex_glu"),
    "orthogonal": dict(init="orthogonal", channel_mixer="geglu"),
    "all": dict(
        ssm="lru", selectivity="rglru", norm="rms", activation="modswish",
        channel_mixer="complex_glu", conv_width=4, block="griffin", init="orthogonal",
        num_layers=2, scan_type="chunked", chunk_size=4,
    ),
}  # fmt: skip


@functools.cache
def stack(option: str):
    kw = {"state_dim": N, "num_layers": 1, "dropout": 0.0, **V5_OPTIONS[option]}
    model = OscillatorySSM(cfg=cfgs.BackboneConfig(**kw))
    x = jax.random.normal(jax.random.key(0), (B, T, 2, D))
    params = _perturb(model.init(jax.random.key(1), x)["params"], 0.2)
    return model, params, x, jax.jit(lambda p, x, s: model.apply({"params": p}, x, s))


# Each option alone is compiled twice (streaming, gradients); in the default run only the
# combined preset and the options it leaves out, the rest under ``slow``.
FAST_OPTIONS = ("all", "geglu", "modrelu")
OPTION_CASES = [
    o if o in FAST_OPTIONS else pytest.param(o, marks=pytest.mark.slow) for o in V5_OPTIONS
]


@pytest.mark.parametrize("option", OPTION_CASES)
def test_stack_streams_in_pieces_and_is_causal(option):
    model, params, x, apply = stack(option)
    full, full_state = apply(params, x, None)
    state = OscillatorySSM.init_state(model.cfg, B, jnp.float32, D)
    outs = []
    for a, b in ((0, 1), (1, 4), (4, T)):
        out, state = apply(params, x[:, a:b], state)
        outs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=1e-4, atol=1e-5)
    jax.tree.map(
        lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-5), state, full_state
    )
    # Changing x at position 6 moves nothing before it, and something at 6.
    moved, _ = apply(params, x.at[:, 6].add(1.0), None)
    np.testing.assert_array_equal(moved[:, :6], full[:, :6])
    assert np.abs(moved[:, 6] - full[:, 6]).max() > 1e-4


@pytest.mark.parametrize("option", OPTION_CASES)
def test_stack_gives_every_parameter_a_gradient(option):
    model, params, x, _ = stack(option)

    def loss(p):
        y, s = model.apply({"params": p}, x)
        return jnp.sum(jnp.sin(3.0 * y)) + sum(jnp.sum(v**2) for v in jax.tree.leaves(s))

    grads = jax.jit(jax.grad(loss))(params)
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    dead = [jax.tree_util.keystr(k) for k, g in flat if not np.any(np.asarray(g) != 0)]
    assert not dead, dead


def test_all_options_in_bfloat16_stay_close_to_float32():
    model, params, x, apply = stack("all")
    f32, _ = apply(params, x, None)
    bf = OscillatorySSM(cfg=model.cfg, dtype=jnp.bfloat16)
    y, s = jax.jit(lambda p, x: bf.apply({"params": p}, x))(params, x.astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    assert s["h"].dtype == jnp.float32
    err = np.abs(np.asarray(y, np.float32) - np.asarray(f32))
    assert err.max() < 0.1 * float(jnp.std(f32)), (err.max(), float(jnp.std(f32)))


def test_griffin_block_has_no_layer_scales_and_v4_block_keeps_them():
    assert "layer_scales" not in stack("all")[1]  # griffin
    assert {"mixers_1", "mixer_norms_1"} <= set(stack("all")[1])
    assert {"layer_scales", "mixers_0", "mixer_norms_0"} <= set(stack("geglu")[1])


def test_default_config_builds_exactly_the_v4_parameter_tree():
    model = OscillatorySSM(cfg=cfgs.BackboneConfig(state_dim=N, num_layers=1))
    p = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 2, 2, D)))["params"]
    assert set(p) == {"layer_scales", "layers_0", "norms_0", "output_norm"}
    assert set(p["layers_0"]) == {"B", "C", "D", "damping", "gate_proj", "skew"}


def test_xavier_orthogonal_init():
    w = np.asarray(xavier_orthogonal(1)(jax.random.key(0), (64, 64)), np.float64)
    np.testing.assert_allclose(w.T @ w, np.eye(64), atol=1e-5)  # square: gain 1
    w = np.asarray(xavier_orthogonal(2)(jax.random.key(0), (96, 32)), np.float64)
    np.testing.assert_allclose(w.T @ w, np.eye(32) * (2 * 96 / 128 / 2), atol=1e-5)
    assert abs(w.var() - 1.0 / 128) < 2e-4  # half of Xavier's 2/(in + out) per part


# ------------------------------------------------------------------ config


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("ssm", "s4"), ("selectivity", "mamba"), ("norm", "layer"), ("activation", "gelu"),
        ("channel_mixer", "mlp"), ("block", "llama"), ("init", "xavier"), ("conv_width", -1),
        ("mlp_expansion", 0), ("r_min", 1.0), ("r_max", 0.0), ("max_phase", 7.0),
    ],
)  # fmt: skip
def test_bad_v5_values_raise_a_config_error_naming_the_field(field, value):
    with pytest.raises(cfgs.ConfigError, match=f"BackboneConfig.{field} = "):
        cfgs.BackboneConfig(**{field: value})


def test_config_cross_checks_and_replace():
    with pytest.raises(cfgs.ConfigError, match=r"r_min .* <= r_max"):
        cfgs.BackboneConfig(r_min=0.99, r_max=0.9)
    with pytest.raises(cfgs.ConfigError, match="pallas"):
        cfgs.BackboneConfig(ssm="lru", scan_type="pallas")
    base = cfgs.BackboneConfig()
    changed = dataclasses.replace(base, ssm="lru", conv_width=4, block="griffin")
    assert (changed.ssm, changed.conv_width, changed.block) == ("lru", 4, "griffin")
    model = cfgs.ModelConfig(backbone=changed)
    assert cfgs.from_dict(cfgs.ModelConfig, cfgs.to_dict(model)) == model
    over = cfgs.apply_overrides(cfgs.ModelConfig(), {"backbone.selectivity": "rglru"})
    assert over.backbone.selectivity == "rglru"


def test_recurrence_spectrum_covers_the_v5_recurrences():
    from qpf.diagnostics.model_stats import qpf_spectrum

    params = stack("all")[1]  # LRU + RG-LRU, two layers
    spec = qpf_spectrum({"backbone": params})
    layer = params["layers_1"]
    g = _sigmoid(np.asarray(layer["gate_proj"]["bias"], np.float64))
    log_mag = -np.exp(np.asarray(layer["nu"], np.float64))
    assert spec["abs"].shape == (2, N)
    np.testing.assert_allclose(spec["abs"][1], np.exp(lru.RGLRU_C * g * log_mag), rtol=1e-6)
    np.testing.assert_allclose(spec["angle"][1], g * np.asarray(layer["theta"]), rtol=1e-6)
    params = stack("geglu")[1]["layers_0"]  # v4's gated δ·Cayley
    delta = 0.5 + 0.5 * _sigmoid(np.asarray(params["damping"], np.float64))
    keep = (1 - _sigmoid(np.asarray(params["gate_proj"]["bias"], np.float64))) * delta
    np.testing.assert_allclose(qpf_spectrum({"backbone": {"layers_0": params}})["abs"][0], keep)
