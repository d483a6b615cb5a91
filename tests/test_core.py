"""Basic Phase2D modules: linear map, Cayley rotation, embedding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import parity
from conftest import load_fixture

from qpf.layers.core import CayleyRotation, Phase2DEmbed, Phase2DLinear
from qpf.ops import phase2d as p2d


def test_phase2d_linear_matches_the_original_four_gemm_form():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 2, 5)).astype(np.float32)
    layer = Phase2DLinear(features=7)
    params = layer.init(jax.random.key(0), x)["params"]
    params = jax.tree.map(lambda p: p + 0.1 * rng.normal(size=p.shape), params)
    y = layer.apply({"params": params}, x)
    xr, xi = x[..., 0, :], x[..., 1, :]
    wr, wi = params["kernel_re"], params["kernel_im"]
    yr = xr @ wr - xi @ wi + params["bias_re"]
    yi = xr @ wi + xi @ wr + params["bias_im"]
    np.testing.assert_allclose(y, np.stack([yr, yi], -2), rtol=1e-5, atol=1e-5)


def test_init_matches_the_original_effective_init():
    layer = Phase2DLinear(features=257)
    params = layer.init(jax.random.key(1), jnp.zeros((1, 2, 263)))["params"]
    assert abs(float(jnp.std(params["kernel_re"])) - 0.02) < 1e-3
    np.testing.assert_array_equal(params["bias_im"], 0.0)
    emb = Phase2DEmbed(vocab_size=101, dim=64).init(jax.random.key(2), jnp.zeros((1,), jnp.int32))
    assert abs(float(jnp.std(emb["params"]["embedding_im"])) - 0.02) < 2e-3


def test_parity_iota_block_fixture():
    z = load_fixture("iota_block.npz")
    x = p2d.from_torch_layout(jnp.asarray(z["input"]))
    y = CayleyRotation().apply({"params": {"skew": z["param/skew_params"]}}, x)
    parity.assert_allclose("output", p2d.to_torch_layout(y), z["output"], rtol=1e-4, atol=1e-5)
    c, s = p2d.cayley(jnp.asarray(z["param/skew_params"]))
    parity.assert_allclose("cos", c, z["cos"], rtol=1e-6, atol=1e-7)
    parity.assert_allclose("sin", s, z["sin"], rtol=1e-6, atol=1e-7)


def test_embedding_looks_up_both_planes():
    emb = Phase2DEmbed(vocab_size=11, dim=3)
    params = emb.init(jax.random.key(0), jnp.zeros((1,), jnp.int32))["params"]
    ids = jnp.array([[4, 0, 10]])
    x = emb.apply({"params": params}, ids)
    np.testing.assert_array_equal(x[0, 2, 0], params["embedding_re"][10])
    np.testing.assert_array_equal(x[0, 1, 1], params["embedding_im"][0])
