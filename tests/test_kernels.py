"""Fused Pallas oscillatory scan (interpret mode on CPU) against the lax.scan reference.

Each distinct shape or option set costs an interpret-mode compile of a few seconds, so the
tests reuse a handful of small prime shapes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import oscillatory_scan_pallas, oscillatory_scan_reference
from qpf import config as cfgs
from qpf.models import QPFModel
from qpf.ops.scan import oscillatory_scan


def inputs(b: int, t: int, n: int, dtype=jnp.float32, seed: int = 0) -> tuple[jax.Array, ...]:
    """(gate_logits, bx, damping_logit, skew, h0) with O(1) values and a non-zero h0."""
    k = jax.random.split(jax.random.key(seed), 5)
    return (
        jax.random.normal(k[0], (b, t, n), dtype),
        jax.random.normal(k[1], (b, t, 2, n), dtype),
        jax.random.normal(k[2], (n,), dtype),
        jax.random.normal(k[3], (n,), dtype),
        jax.random.normal(k[4], (b, 2, n), jnp.float32),
    )


def scalar_loss(scan):
    """A loss touching every h_t with distinct weights and h_last non-linearly."""

    def loss(*args):
        h, h_last = scan(*args)
        w = jnp.cos(jnp.arange(h.size, dtype=jnp.float32)).reshape(h.shape)
        return jnp.sum(w * h.astype(jnp.float32)) + jnp.sum(jnp.sin(h_last))

    return loss


@pytest.mark.parametrize(("t", "n", "block_n"), [(1, 11, None), (7, 16, 8), (37, 11, None)])
def test_forward_matches_reference_and_sequential_backend(t, n, block_n):
    args = inputs(2, t, n)
    h, h_last = oscillatory_scan_pallas(*args, block_n=block_n)
    h_ref, last_ref = oscillatory_scan_reference(*args)
    h_seq, last_seq = oscillatory_scan(*args, scan_type="sequential")
    assert (h.shape, h.dtype) == ((2, t, 2, n), jnp.float32)
    assert (h_last.shape, h_last.dtype) == ((2, 2, n), jnp.float32)
    for want, want_last in ((h_ref, last_ref), (h_seq, last_seq)):
        np.testing.assert_allclose(h, want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(h_last, want_last, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(h[:, -1], h_last)


def test_scan_type_pallas_dispatches_to_the_kernel_with_zero_h0():
    # Same shapes and options as the T=37 case above, so the kernel compile is reused.
    args = inputs(2, 37, 11)[:4]
    h, h_last = oscillatory_scan(*args, scan_type="pallas")
    h_ref, last_ref = oscillatory_scan_reference(*args)
    np.testing.assert_allclose(h, h_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h_last, last_ref, rtol=1e-5, atol=1e-6)


def test_carried_state_equals_one_call():
    args = inputs(2, 14, 11, seed=3)
    gate, bx, damping, skew, h0 = args
    full, full_last = oscillatory_scan_pallas(*args)
    a, a_last = oscillatory_scan_pallas(gate[:, :7], bx[:, :7], damping, skew, h0)
    b, b_last = oscillatory_scan_pallas(gate[:, 7:], bx[:, 7:], damping, skew, a_last)
    np.testing.assert_allclose(jnp.concatenate([a, b], 1), full, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b_last, full_last, rtol=1e-5, atol=1e-6)


def test_gradients_of_all_five_inputs_match_the_reference_under_jit():
    args = inputs(2, 13, 5, seed=1)
    # unroll=3 with T=13 runs both the unrolled loop and its remainder, in both kernels.
    kernel = lambda *a: oscillatory_scan_pallas(*a, unroll=3)  # noqa: E731
    grad = lambda f: jax.jit(jax.value_and_grad(scalar_loss(f), argnums=range(5)))  # noqa: E731
    value, grads = grad(kernel)(*args)
    value_ref, grads_ref = grad(oscillatory_scan_reference)(*args)
    np.testing.assert_allclose(value, value_ref, rtol=1e-5)
    names = ("gate_logits", "bx", "damping_logit", "skew", "h0")
    for name, g, g_ref, x in zip(names, grads, grads_ref, args):
        assert (g.shape, g.dtype) == (x.shape, x.dtype), name
        scale = float(jnp.max(jnp.abs(g_ref)))
        np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6 * scale, err_msg=name)


def test_bfloat16_inputs_accumulate_in_float32():
    args = inputs(2, 13, 11, dtype=jnp.bfloat16, seed=2)
    (h, h_last), vjp = jax.vjp(oscillatory_scan_pallas, *args)
    (h_ref, last_ref), vjp_ref = jax.vjp(oscillatory_scan_reference, *args)
    assert (h.dtype, h_last.dtype) == (jnp.bfloat16, jnp.float32)
    np.testing.assert_allclose(h.astype(jnp.float32), h_ref.astype(jnp.float32), atol=2e-2)
    np.testing.assert_allclose(h_last, last_ref, rtol=1e-5, atol=1e-5)
    cts = (jnp.cos(jnp.arange(h.size)).reshape(h.shape).astype(h.dtype), jnp.sin(h_last))
    for g, g_ref, x in zip(vjp(cts), vjp_ref(cts), args):
        assert g.dtype == x.dtype
        g, g_ref = g.astype(jnp.float32), g_ref.astype(jnp.float32)
        # Residual h is kept in bf16 (as the caller holds it): gradients are bf16-accurate.
        np.testing.assert_allclose(g, g_ref, atol=3e-2 * float(jnp.max(jnp.abs(g_ref))))


def test_empty_sequence_and_bad_shapes():
    gate, bx, damping, skew, h0 = inputs(2, 0, 5)
    h, h_last = oscillatory_scan_pallas(gate, bx, damping, skew, h0)
    assert h.shape == (2, 0, 2, 5)
    np.testing.assert_array_equal(h_last, h0)
    with pytest.raises(ValueError, match="block_n"):
        oscillatory_scan_pallas(*inputs(2, 3, 5), block_n=6)
    with pytest.raises(ValueError, match="bx"):
        oscillatory_scan_pallas(gate, bx[:, :, :1], damping, skew, h0)


def test_tiny_model_with_pallas_backend_matches_sequential():
    """ModelConfig -> BackboneConfig.scan_type -> SSM layer -> oscillatory_scan -> kernel."""

    def config(scan_type: str) -> cfgs.ModelConfig:
        return cfgs.ModelConfig(
            vocab_size=31,
            dim=6,
            banks=(cfgs.SemanticBankConfig(num_concepts=5, num_layers=1),),
            backbone=cfgs.BackboneConfig(state_dim=7, num_layers=1, scan_type=scan_type),
            memory=None,
            episodic=None,
        )

    tokens = jax.random.randint(jax.random.key(0), (2, 7), 0, 31)
    params = QPFModel(config("sequential")).init(jax.random.key(1), tokens)["params"]
    logits = lambda s: jax.jit(lambda p: QPFModel(config(s)).apply({"params": p}, tokens).logits)  # noqa: E731
    np.testing.assert_allclose(
        logits("pallas")(params), logits("sequential")(params), rtol=1e-5, atol=1e-5
    )
