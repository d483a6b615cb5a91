"""Oscillatory SSM layer and stack: parity, exact final state, backends, streaming."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import parity
import pytest
from conftest import load_fixture
from parity_log import record

from qpf import config as cfgs
from qpf.layers.ssm import OscillatorySSM, OscillatorySSMLayer
from qpf.models import torch_weights as tw
from qpf.ops import phase2d as p2d


def fixture_layer(scan_type: str = "sequential", chunk_size: int = 128):
    z = load_fixture("ssm_layer_T130.npz")
    sd = tw.StateDict(tw.state_dict_from_npz(z))
    params = tw.ssm_layer(sd, "")
    sd.check_all_used(dead_ok=())
    cfg = cfgs.BackboneConfig(
        state_dim=64, num_layers=1, scan_type=scan_type, chunk_size=chunk_size
    )
    return z, OscillatorySSMLayer(cfg=cfg), params


@pytest.mark.parametrize(("scan_type", "chunk"), [("sequential", 128), ("chunked", 32)])
def test_parity_ssm_layer_T130_fixture(scan_type, chunk):
    z, layer, params = fixture_layer(scan_type, chunk)
    x = p2d.from_torch_layout(jnp.asarray(z["input"]))
    h0 = p2d.from_torch_layout(jnp.asarray(z["h0"]))
    y, state = layer.apply({"params": params}, x, h0)
    parity.assert_allclose("output", p2d.to_torch_layout(y), z["output"], rtol=1e-4, atol=1e-5)
    # Exact after 130 steps; the original's padded state is off by up to ~0.2 (bug 22.3).
    parity.assert_allclose(
        "state_exact", p2d.to_torch_layout(state), z["state_exact"], rtol=1e-4, atol=1e-5
    )
    record(
        "state_padded",
        p2d.to_torch_layout(state),
        z["state_padded"],
        note="the original's padded state (bug 22.3): meant to differ",
        deviation=True,
    )
    assert np.abs(p2d.to_torch_layout(state) - z["state_padded"]).max() > 1e-2
    y0, _ = layer.apply({"params": params}, x, jnp.zeros_like(h0))
    parity.assert_allclose(
        "output_h0_zero", p2d.to_torch_layout(y0), z["output_h0_zero"], rtol=1e-4, atol=1e-5
    )


def small_stack(**kw) -> tuple[OscillatorySSM, dict, jax.Array]:
    cfg = cfgs.BackboneConfig(state_dim=11, num_layers=2, **kw)
    model = OscillatorySSM(cfg=cfg)
    x = jax.random.normal(jax.random.key(0), (2, 23, 2, 7))
    return model, model.init(jax.random.key(1), x)["params"], x


@pytest.mark.parametrize(
    "kw", [{"scan_type": "associative"}, {"scan_type": "chunked", "chunk_size": 8}, {"remat": True}]
)
def test_stack_backends_and_remat_match_the_sequential_stack(kw):
    ref_model, params, x = small_stack()
    model, _, _ = small_stack(**kw)

    def loss(m, p):
        y, s = m.apply({"params": p}, x)
        return jnp.sum(y**2) + jnp.sum(s**2)

    value_and_grad = lambda m: jax.jit(jax.value_and_grad(lambda p: loss(m, p)))(params)  # noqa: E731
    (v_ref, g_ref), (v, g) = value_and_grad(ref_model), value_and_grad(model)
    np.testing.assert_allclose(v, v_ref, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g, g_ref)


def test_stack_streams_in_pieces_with_its_state():
    model, params, x = small_stack()
    full, full_state = model.apply({"params": params}, x)
    a, s = model.apply({"params": params}, x[:, :9])
    b, s = model.apply({"params": params}, x[:, 9:], s)
    np.testing.assert_allclose(jnp.concatenate([a, b], 1), full, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s, full_state, rtol=1e-5, atol=1e-6)


def test_dropout_mask_is_shared_by_real_and_imaginary_parts():
    cfg = cfgs.BackboneConfig(state_dim=5, num_layers=1, dropout=0.5)
    layer = OscillatorySSMLayer(cfg=cfg)
    x = jax.random.normal(jax.random.key(0), (2, 6, 2, 9))
    h0 = jnp.zeros((2, 2, 5))
    params = layer.init(jax.random.key(1), x, h0)["params"]
    clean, _ = layer.apply({"params": params}, x, h0)
    noisy, _ = layer.apply({"params": params}, x, h0, False, rngs={"dropout": jax.random.key(2)})
    dropped = np.asarray(noisy == 0)
    np.testing.assert_array_equal(dropped[:, :, 0], dropped[:, :, 1])
    kept = ~dropped
    np.testing.assert_allclose(np.asarray(noisy)[kept], 2 * np.asarray(clean)[kept], rtol=1e-5)
