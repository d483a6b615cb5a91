"""Phase2D algebra against numpy complex arithmetic."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qpf.ops import phase2d as p2d

RNG = np.random.default_rng(0)
SHAPE = (3, 5, 7)  # [..., d] with prime sizes


def rand_phase(shape=SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """A random Phase2D array [..., 2, d] and the same values as numpy complex [..., d]."""
    re, im = RNG.normal(size=shape), RNG.normal(size=shape)
    return np.stack([re, im], axis=-2).astype(np.float32), (re + 1j * im)


def as_complex(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x[..., 0, :] + 1j * x[..., 1, :]


def test_layout_round_trips():
    x, _ = rand_phase()
    torch_layout = np.swapaxes(x, -1, -2)
    np.testing.assert_array_equal(p2d.from_torch_layout(torch_layout), x)
    np.testing.assert_array_equal(p2d.to_torch_layout(x), torch_layout)
    concat = p2d.to_concat(x)
    np.testing.assert_array_equal(concat, np.concatenate([x[..., 0, :], x[..., 1, :]], -1))
    np.testing.assert_array_equal(p2d.from_concat(concat), x)
    np.testing.assert_array_equal(p2d.from_real(concat, "split"), x)
    zi = p2d.from_real(x[..., 0, :], "zero_imag")
    np.testing.assert_array_equal(as_complex(zi), x[..., 0, :])
    with pytest.raises(ValueError, match="mode"):
        p2d.from_real(concat, "bogus")


def test_elementwise_ops_match_numpy_complex():
    a, ac = rand_phase()
    b, bc = rand_phase()
    np.testing.assert_allclose(as_complex(p2d.multiply(a, b)), ac * bc, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(as_complex(p2d.conjugate(a)), np.conj(ac), rtol=1e-6)
    np.testing.assert_allclose(p2d.modulus_sq(a), np.abs(ac) ** 2, rtol=1e-5)
    np.testing.assert_allclose(p2d.modulus(a), np.sqrt(np.abs(ac) ** 2 + 1e-8), rtol=1e-6)
    unit = ac / np.sqrt(np.abs(ac) ** 2 + 1e-8)
    np.testing.assert_allclose(as_complex(p2d.normalize(a)), unit, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(as_complex(p2d.apply_iota(a)), 1j * ac, rtol=1e-6)
    theta = RNG.uniform(-np.pi, np.pi, size=SHAPE[-1])
    rotated = p2d.rotate(a, np.cos(theta), np.sin(theta))
    np.testing.assert_allclose(as_complex(rotated), ac * np.exp(1j * theta), rtol=1e-5, atol=1e-6)


def test_modulus_epsilon_is_inside_the_root():
    zero = np.zeros((1, 2, 4), np.float32)
    np.testing.assert_allclose(p2d.modulus(zero), np.full((1, 4), 1e-4), rtol=1e-6)
    np.testing.assert_array_equal(p2d.normalize(zero), zero)


def test_cayley_is_an_exact_unit_rotation_by_twice_atan():
    a = RNG.normal(size=11) * 3
    c, s = p2d.cayley(jnp.asarray(a))
    np.testing.assert_allclose(np.asarray(c) ** 2 + np.asarray(s) ** 2, 1.0, rtol=1e-6)
    theta = 2 * np.arctan(a)
    np.testing.assert_allclose(c, np.cos(theta), atol=1e-6)
    np.testing.assert_allclose(s, np.sin(theta), atol=1e-6)


def test_coherence_l2_is_a_cosine_and_l1_reproduces_the_original_bug():
    a, ac = rand_phase((4, 64))
    b, bc = rand_phase((4, 64))
    inner = np.real(np.sum(ac * np.conj(bc), -1))
    na = np.sqrt(np.sum(np.abs(ac) ** 2, -1) + 1e-8)
    nb = np.sqrt(np.sum(np.abs(bc) ** 2, -1) + 1e-8)
    np.testing.assert_allclose(p2d.coherence(a, b), inner / (na * nb + 1e-8), rtol=1e-5)
    np.testing.assert_allclose(p2d.coherence(a, a), 1.0, rtol=1e-5)
    l1a = np.sum(np.sqrt(np.abs(ac) ** 2 + 1e-8), -1)
    l1b = np.sum(np.sqrt(np.abs(bc) ** 2 + 1e-8), -1)
    np.testing.assert_allclose(p2d.coherence_l1(a, b), inner / (l1a * l1b + 1e-8), rtol=1e-5)
    # The bug: coh(a, a) ≈ 1.27/d for Gaussian vectors (spec §2.1), never near 1.
    self_coh = np.asarray(p2d.coherence_l1(a, a))
    assert np.all((self_coh > 0.8 / 64) & (self_coh < 1.8 / 64))


def test_dot_matches_numpy_vdot():
    a, ac = rand_phase((2, 9))
    b, bc = rand_phase((2, 9))
    got = np.asarray(p2d.dot(a, b))
    want = np.sum(ac * np.conj(bc), -1)
    np.testing.assert_allclose(got[..., 0] + 1j * got[..., 1], want, rtol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_complex_linear_is_one_gemm_equal_to_complex_matmul(bias):
    x, xc = rand_phase((3, 5, 7))
    w_re, w_im = RNG.normal(size=(7, 11)), RNG.normal(size=(7, 11))
    b_re, b_im = RNG.normal(size=11), RNG.normal(size=11)
    args = (w_re, w_im, b_re, b_im) if bias else (w_re, w_im)
    y = p2d.complex_linear(x, *map(lambda t: jnp.asarray(t, jnp.float32), args))
    want = xc @ (w_re + 1j * w_im) + ((b_re + 1j * b_im) if bias else 0)
    np.testing.assert_allclose(as_complex(y), want, rtol=1e-4, atol=1e-4)
    # ONE dot_general in the lowered computation.
    jaxpr = jax.make_jaxpr(lambda x, *w: p2d.complex_linear(x, *w))(x, *args)
    assert sum(e.primitive.name == "dot_general" for e in jaxpr.eqns) == 1


def test_complex_linear_bf16_compute_dtype():
    x, xc = rand_phase((4, 16))
    w_re, w_im = (RNG.normal(size=(16, 8)).astype(np.float32) * 0.1 for _ in range(2))
    y = p2d.complex_linear(x, w_re, w_im, dtype=jnp.bfloat16)
    assert y.dtype == jnp.bfloat16
    want = xc @ (w_re + 1j * w_im)
    np.testing.assert_allclose(as_complex(y.astype(jnp.float32)), want, rtol=5e-2, atol=5e-2)
