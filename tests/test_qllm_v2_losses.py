"""qllm_v2 auxiliary losses: the energy sign pinned, coherence on hand-made phases, the
clamp/wrap difference, semantic and concept terms against direct numpy references.
(Parity with the original's values is in tests/test_qllm_v2.py.)"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qpf.config import ConfigError
from qpf.models import qllm_v2_losses as L

B, T, D = 2, 11, 5


def _random_theta(seed: int = 0) -> jax.Array:
    return jax.random.uniform(jax.random.key(seed), (B, T, D), minval=-math.pi, maxval=math.pi)


def test_constant_phases_minimise_the_papers_energy() -> None:
    """E = −1.8 (its minimum) at constant phases: the paper's loss (+1) is minimal there,
    the original's (−1) is +1.8, i.e. it penalises coherence (spec §C2)."""
    pairs = jnp.arange(5)
    const = jnp.full((B, T, D), 0.7)
    np.testing.assert_allclose(L.energy_per_sample(const, pairs), -1.8, atol=1e-6)
    assert float(L.energy_loss(const, pairs, sign=1)) == pytest.approx(-1.8, abs=1e-6)
    assert float(L.energy_loss(const, pairs, sign=-1)) == pytest.approx(1.8, abs=1e-6)
    for seed in range(3):
        theta = _random_theta(seed)
        assert float(L.energy_loss(theta, pairs, 1)) > float(L.energy_loss(const, pairs, 1))
        assert float(L.energy_loss(theta, pairs, -1)) < float(L.energy_loss(const, pairs, -1))
    assert L.PAPER.energy_sign == 1
    assert L.V2LossConfig().energy_sign == -1


def test_energy_terms_match_numpy() -> None:
    theta = np.asarray(_random_theta(1), np.float64)
    pairs = np.array([3, 0, 7, 5])
    local = -np.mean(np.cos(np.diff(theta, axis=1)), axis=(1, 2))
    glob = -np.mean(np.cos(theta - theta.mean(1, keepdims=True)), axis=(1, 2))
    ent = -np.mean(np.cos(np.diff(theta[:, pairs], axis=1)), axis=(1, 2))
    stab = -np.mean(np.var(theta, axis=1), axis=-1)
    want = local + 0.5 * glob + 0.3 * ent + 0.2 * stab
    got = L.energy_per_sample(jnp.asarray(theta, jnp.float32), jnp.asarray(pairs))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    single = L.energy_per_sample(jnp.asarray(theta, jnp.float32), jnp.asarray(pairs[:1]))
    np.testing.assert_allclose(single, local + 0.5 * glob + 0.2 * stab, rtol=1e-5, atol=1e-6)


def test_coherence_is_one_for_constant_phases_and_clamp_differs_from_wrap() -> None:
    subset = jnp.arange(4)
    const = jnp.full((B, T, D), -2.0)
    np.testing.assert_allclose(L.coherence_per_sample(const, subset, wrap=False), 1.0, atol=1e-6)
    # Alternating ±2 rad: differences of ±4 rad. Wrapped, e^{iΔ} is the true phasor
    # e^{±4i} (mean |cos 4| = 0.65); clamped to ±π, it is −1 for both signs (mean 1).
    theta = jnp.tile(jnp.array([2.0, -2.0])[None, :, None], (1, 6, 1))[:, :T]
    theta = jnp.broadcast_to(theta, (1, T, 1))
    diffs = np.diff(np.asarray(theta)[0, :, 0])
    wrap_local = abs(np.mean(np.exp(1j * diffs)))
    clamp_local = abs(np.mean(np.exp(1j * np.clip(diffs, -math.pi, math.pi))))
    glob = abs(np.mean(np.exp(1j * np.asarray(theta)[0, :, 0])))
    sub = abs(np.mean(np.exp(1j * np.asarray(theta)[0, :4, 0])))
    for wrap, local in ((True, wrap_local), (False, clamp_local)):
        want = 0.5 * local + 0.3 * glob + 0.2 * sub
        got = L.coherence_per_sample(theta, subset, wrap)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert abs(wrap_local - clamp_local) > 0.1


def test_phase_angles_faithful_and_wrapped_agree_away_from_zero_amplitude() -> None:
    key = jax.random.key(2)
    amp = jax.random.uniform(key, (B, T, D), minval=-1.0, maxval=1.0)
    phase = jax.random.uniform(jax.random.fold_in(key, 1), (B, T, D), maxval=7.0)
    faithful = L.phase_angles(amp, phase, wrap=False)
    sane = L.phase_angles(amp, phase, wrap=True)
    np.testing.assert_allclose(
        np.cos(faithful), np.cos(sane), atol=1e-5
    )  # equal modulo 2π, branch cut aside
    grad = jax.grad(lambda a: jnp.sum(L.phase_angles(a, phase, wrap=True)))(jnp.zeros_like(amp))
    assert bool(jnp.all(jnp.isfinite(grad)))


def test_semantic_and_concept_match_numpy() -> None:
    key = jax.random.key(3)
    logits = jax.random.normal(key, (B, T, 256), jnp.float32) * 2.0
    targets = jax.random.randint(jax.random.fold_in(key, 1), (B, T), 0, 256)
    lg = np.asarray(logits, np.float64)
    p = np.exp(lg - lg.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    recent = np.asarray(targets)[:, -10:]
    rep = 0.1 * len(np.unique(recent)) / recent.size
    div = np.mean(np.sum(p * np.log(p + 1e-8), -1))
    ctx = np.mean(np.linalg.norm(np.diff(p, axis=1), axis=-1))
    byte = sum(p[..., v].mean() for v in L.COMMON_BYTES)
    want = 0.3 * rep + 0.3 * div + 0.2 * ctx + 0.2 * byte
    assert float(L.semantic_loss(logits, targets)) == pytest.approx(want, rel=1e-5)
    bad = logits.at[0, 0, 0].set(jnp.nan)
    assert float(L.semantic_loss(bad, targets)) == 0.0

    c = np.asarray(jax.random.normal(key, (B, T, 7)), np.float64)
    coh = np.mean(np.linalg.norm(np.diff(c, axis=1), axis=-1))
    div_c = -np.mean(np.var(c.reshape(-1, 7), axis=0, ddof=1))
    stab = np.mean(np.var(c, axis=1, ddof=1))
    got = L.concept_loss(jnp.asarray(c, jnp.float32))
    assert float(got) == pytest.approx(0.4 * coh + 0.3 * div_c + 0.3 * stab, rel=1e-5)


def test_loss_config_validation() -> None:
    with pytest.raises(ConfigError, match="energy_sign"):
        L.V2LossConfig(energy_sign=0)
    with pytest.raises(ConfigError, match="coherence_weight"):
        L.V2LossConfig(coherence_weight=-1.0)
