"""DiagRNN baseline: causality, gradients, streaming, scan backends, numpy reference, presets."""

from __future__ import annotations

import family_checks as checks
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from family_checks import mismatch, piecewise_logits

from qpf import config as cfgs
from qpf.models.diagrnn import DIAGRNN_FAMILY, PRESETS, DiagRNNLayer, decay, init_state
from qpf.zoo import resolve_model

# .config(**changes) -> config; .build(config, batch=2, t=13, seed=0) -> (module, params,
# tokens, jitted apply), compiled once per config
SMALL = checks.small_model(DIAGRNN_FAMILY, vocab_size=29, dim=12, num_layers=2,
                           state_dim=14, chunk_size=5, dropout=0.0)  # fmt: skip


# Causality, gradients, decode == forward and bf16 of the default config are checked for
# every family by tests/test_families.py (preset diagrnn:test); here the variant switches
# (untied head, LayerNorm, default state width) get the same checks.
VARIANT = {"tie_embeddings": False, "norm": "layernorm", "state_dim": None, "dropout": 0.1}


def test_variant_is_causal_and_trains_every_parameter_and_table_row():
    assert not (failures := SMALL.variant_failures((0, 6, 11), **VARIANT)), "\n".join(failures)


@pytest.mark.parametrize(
    ("scan_type", "cuts"),
    [
        ("sequential", tuple(range(14))),  # k = 0: token by token
        ("associative", (0, 3, *range(4, 14))),  # prefill 3, then one at a time
        ("chunked", (0, 7, 8, 13)),  # chunked prefill (7 > chunk 5), then chunks
    ],
)
def test_streaming_with_state_equals_full_forward(scan_type, cuts):
    config = SMALL.config(scan_type=scan_type)
    _, params, tokens, run = SMALL.build(config, seed=4)
    full = run(params, tokens, None)
    step = lambda x, s: run(params, x, s)  # noqa: E731
    state0 = init_state(config, tokens.shape[0], 999)
    pieces, state = piecewise_logits(step, tokens, state0, cuts)
    assert not (err := mismatch(pieces, full.logits, rtol=1e-4, atol=1e-5)), err
    assert not (err := mismatch(state["h"], full.state["h"], rtol=1e-4, atol=1e-6)), err
    dropped, _ = piecewise_logits(step, tokens, state0, cuts, carry=False)  # negative control
    assert mismatch(dropped, full.logits, rtol=1e-4, atol=1e-5)
    assert int(state["pos"]) == 13
    assert state["h"].shape == (2, 2, 14)


def _numpy_layer(params, x: np.ndarray, h0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    u = x @ p["in_proj"]["kernel"] + p["in_proj"]["bias"]
    g = x @ p["gate_proj"]["kernel"] + p["gate_proj"]["bias"]
    lam = np.exp(-np.log1p(np.exp(p["decay"])))
    a = lam / (1.0 + np.exp(-g))
    h, hs = h0, []
    for t in range(x.shape[1]):
        h = a[:, t] * h + (1.0 - a[:, t]) * u[:, t]
        hs.append(h)
    return np.stack(hs, 1) @ p["out_proj"]["kernel"], h


def test_scan_backends_agree_and_match_numpy_reference():
    x = jax.random.normal(jax.random.key(0), (2, 13, 12))
    h0 = jax.random.normal(jax.random.key(1), (2, 14))
    layer = DiagRNNLayer(SMALL.config())
    params = jax.jit(layer.init)(jax.random.key(2), x, h0)["params"]
    # Spread the gates so the decays differ per step (the init gives near-constant ones).
    params["gate_proj"]["bias"] = jnp.linspace(-3.0, 3.0, 14)
    ref_y, ref_h = _numpy_layer(params, np.asarray(x, np.float64), np.asarray(h0, np.float64))
    for scan_type in ("sequential", "associative", "chunked"):
        layer = DiagRNNLayer(SMALL.config(scan_type=scan_type))
        y, h = jax.jit(lambda x, h0, layer=layer: layer.apply({"params": params}, x, h0))(x, h0)
        np.testing.assert_allclose(y, ref_y, rtol=1e-4, atol=1e-6, err_msg=scan_type)
        np.testing.assert_allclose(h, ref_h, rtol=1e-4, atol=1e-6, err_msg=scan_type)
        assert h.dtype == jnp.float32


def test_decay_init_spans_the_configured_range():
    config = SMALL.config(lambda_min=0.5, lambda_max=0.99)
    layer = DiagRNNLayer(config)
    shapes = (jnp.zeros((1, 3, 12)), jnp.zeros((1, 14)))
    params = jax.jit(layer.init)(jax.random.key(0), *shapes)["params"]
    lam = np.asarray(decay(params["decay"]))
    np.testing.assert_allclose(lam, np.linspace(0.5, 0.99, 14), rtol=1e-5)


def test_bfloat16_compute_keeps_the_recurrent_state_float32():
    config = SMALL.config()
    _, params, tokens, _ = SMALL.build(config)
    bf16_model = SMALL.family.build(config.replace(dtype="bfloat16"))
    out = jax.jit(lambda x: bf16_model.apply({"params": params}, x))(tokens)
    assert out.logits.dtype == jnp.bfloat16
    assert out.state["h"].dtype == jnp.float32


def test_spec_presets_match_qpf_parameter_counts_within_ten_percent():
    failures = checks.preset_count_failures(DIAGRNN_FAMILY, PRESETS)  # not "test"
    assert not failures, "\n".join(failures)
    assert all(p.model.state_width == 2 * p.model.dim for p in PRESETS.values())


def test_registered_family_and_config_round_trip():
    assert resolve_model("diagrnn:tiny-byte") == (DIAGRNN_FAMILY, PRESETS["tiny-byte"])
    assert PRESETS["tiny-byte"].model.vocab_size == 259
    failures = SMALL.round_trip_failures(scan_type="chunked", state_dim=None)
    assert not failures, failures
    assert cfgs.apply_overrides(SMALL.config(), {"state_dim": "20"}).state_width == 20


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"scan_type": "pallas"}, "scan_type"),
        ({"state_dim": 0}, "state_dim"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"lambda_min": 0.0}, "lambda_min"),
        ({"lambda_max": 1.0}, "lambda_max"),
        ({"lambda_min": 0.9, "lambda_max": 0.8}, "lambda_max"),
        ({"norm": "none"}, "norm"),
        ({"dropout": -0.1}, "dropout"),
        ({"num_layers": 0}, "num_layers"),
    ],
)
def test_config_validation_names_the_field(kw, field):
    with pytest.raises(cfgs.ConfigError, match=rf"DiagRNNConfig\.{field} = "):
        SMALL.config(**kw)
