"""Phase2DLayerNorm and the original's activations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import parity
from conftest import load_fixture

from qpf.layers.core import Phase2DLayerNorm
from qpf.ops import norms
from qpf.ops import phase2d as p2d


def numpy_layer_norm(x: np.ndarray, scale: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """The spec §2.5 formula in float64 numpy, on planar [..., 2, d]."""
    m = np.sqrt(x[..., 0, :] ** 2 + x[..., 1, :] ** 2 + 1e-8)
    mu = m.mean(-1, keepdims=True)
    var = ((m - mu) ** 2).mean(-1, keepdims=True)
    n = (m - mu) / np.sqrt(var + eps)
    return x / m[..., None, :] * (n * scale)[..., None, :]


def test_layer_norm_matches_the_formula_and_flips_phase_of_below_mean_elements():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 5, 2, 7))
    scale = rng.uniform(0.5, 1.5, size=7)
    got = np.asarray(norms.phase_layer_norm(jnp.asarray(x, jnp.float32), jnp.asarray(scale)))
    np.testing.assert_allclose(got, numpy_layer_norm(x, scale), rtol=1e-4, atol=1e-5)
    # Elements with below-mean modulus come out rotated by π (the original's quirk).
    m = np.sqrt((x**2).sum(-2))
    below = m < m.mean(-1, keepdims=True)
    cos = (got * x).sum(-2) / (np.sqrt((got**2).sum(-2)) * m)
    assert np.all(cos[below] < -0.999)
    assert np.all(cos[~below] > 0.999)


def test_parity_phase2d_layernorm_fixture():
    z = load_fixture("phase2d_layernorm.npz")
    x = p2d.from_torch_layout(jnp.asarray(z["input"]))
    got = Phase2DLayerNorm().apply({"params": {"scale": z["param/scale"]}}, x)
    parity.assert_allclose("output", p2d.to_torch_layout(got), z["output"], rtol=1e-4, atol=1e-5)


def test_layer_norm_bfloat16_input_computes_in_float32():
    x = jax.random.normal(jax.random.key(0), (4, 2, 16))
    ref = norms.phase_layer_norm(x, jnp.ones(16))
    got = norms.phase_layer_norm(x.astype(jnp.bfloat16), jnp.ones(16))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), ref, rtol=2e-2, atol=2e-2)


def test_activations_match_their_definitions():
    rng = np.random.default_rng(2)
    u = rng.normal(size=(4, 2, 9)).astype(np.float32)
    re, im = u[:, 0], u[:, 1]
    from math import erf, sqrt

    gelu = np.vectorize(lambda v: 0.5 * v * (1 + erf(v / sqrt(2))))(re)
    np.testing.assert_allclose(norms.real_gelu_scale(u), u * gelu[:, None], rtol=1e-5, atol=1e-6)
    split = np.stack([gelu, im / (1 + np.exp(-re))], 1)
    np.testing.assert_allclose(norms.split_gelu(u), split, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        norms.real_part_dropout(u, 0.1, None), u * (1 + re[:, None]), rtol=1e-5, atol=1e-6
    )
    # With an rng: u + u·(mask·Re u / (1 - rate)), one mask shared by both planes.
    dropped = np.asarray(norms.real_part_dropout(jnp.asarray(u), 0.5, jax.random.key(3)))
    ratio = (dropped - u) / u  # = 2·Re u where kept, 0 where dropped
    kept = np.abs(ratio[:, 0] - 2 * re) < 1e-3
    assert np.all(kept | (np.abs(ratio[:, 0]) < 1e-5))
    assert 0 < kept.mean() < 1
    np.testing.assert_allclose(ratio[:, 0], ratio[:, 1], rtol=1e-3, atol=1e-4)
