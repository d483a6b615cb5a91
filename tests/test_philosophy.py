"""The philosophy metrics against numpy computations on hand-made inputs."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qpf.diagnostics import philosophy as ph

RNG = np.random.default_rng(7)


def planar(z: np.ndarray) -> np.ndarray:
    """complex ``[..., d]`` -> planar ``[..., 2, d]``."""
    return np.stack([z.real, z.imag], axis=-2).astype(np.float32)


def crandn(*shape: int) -> np.ndarray:
    return RNG.normal(size=shape) + 1j * RNG.normal(size=shape)


def close(got, want, tol=1e-5):
    np.testing.assert_allclose(np.asarray(got), want, rtol=tol, atol=tol)


# ---------------------------------------------------------------------------- Manas


def test_manas_matches_numpy():
    z = crandn(3, 5, 7) * np.array([0.01, 0.05, 0.2, 1.0, 3.0, 0.5, 0.02])
    m = np.sqrt(np.abs(z) ** 2 + 1e-8).ravel()
    p = m**2 / np.sum(m**2)
    got = ph.manas(jnp.asarray(planar(z)))
    close(got["magnitude"], m.mean())
    close(got["activity"], np.mean(m > 0.1 * m.max()))
    close(got["entropy"], -np.sum(p * np.log(p)) / np.log(m.size))
    # faithful: softmax over all m, H/10 clipped at 1
    q = np.exp(m - m.max()) / np.sum(np.exp(m - m.max()))
    faithful = ph.manas(jnp.asarray(planar(z)), faithful=True)
    close(faithful["entropy"], min(-np.sum(q * np.log(q + 1e-8)) / 10.0, 1.0))
    close(faithful["activity"], np.mean(m > 0.1))


def test_manas_entropy_moves_with_concentration():
    spread = ph.manas(jnp.asarray(planar(np.ones((4, 11), complex))))["entropy"]
    peaked = np.full((4, 11), 1e-3, complex)
    peaked[0, 0] = 10.0
    focused = ph.manas(jnp.asarray(planar(peaked)))["entropy"]
    close(spread, 1.0)
    assert float(focused) < 0.1
    # The original's definition cannot tell them apart at realistic sizes.
    big = planar(crandn(4, 2, 4096))
    assert float(ph.manas(jnp.asarray(big), faithful=True)["entropy"]) == 1.0


# ---------------------------------------------------------------------------- Buddhi


def _np_buddhi(logits: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    x = logits - logits.max(-1, keepdims=True)
    p = np.exp(x) / np.exp(x).sum(-1, keepdims=True)
    srt = np.sort(logits, -1)
    w = mask.astype(float)
    mean = lambda v: float((v * w).sum() / w.sum())  # noqa: E731
    return {
        "confidence": mean(p.max(-1)),
        "margin": mean(srt[..., -1] - srt[..., -2]),
        "entropy": mean(-(p * np.log(p)).sum(-1) / np.log(logits.shape[-1])),
    }


def test_buddhi_matches_numpy_token_weighted():
    logits = RNG.normal(size=(3, 7, 13)).astype(np.float32) * 3
    mask = RNG.random((3, 7)) > 0.3
    got = ph.buddhi(jnp.asarray(logits), jnp.asarray(mask))
    for k, v in _np_buddhi(logits, mask).items():
        close(got[k], v)
    faithful = ph.buddhi(jnp.asarray(logits), jnp.asarray(mask), faithful=True)
    want = _np_buddhi(logits, np.ones_like(mask))
    close(faithful["margin"], want["margin"] / 10.0)
    close(faithful["confidence"], want["confidence"])


def test_top2_gap_equals_the_sorted_gap_and_is_zero_on_ties():
    x = RNG.normal(size=(4, 3, 17)).astype(np.float32)
    x[0, 0, [2, 9]] = 5.0  # a tied maximum
    srt = np.sort(x, -1)
    np.testing.assert_array_equal(ph.top2_gap(jnp.asarray(x)), srt[..., -1] - srt[..., -2])
    assert float(ph.top2_gap(jnp.asarray(x))[0, 0]) == 0.0


def test_buddhi_masked_positions_do_not_count():
    logits = RNG.normal(size=(2, 5, 11)).astype(np.float32)
    mask = np.ones((2, 5), bool)
    mask[1, 3:] = False
    poisoned = logits.copy()
    poisoned[1, 3:] = 1e3 * RNG.normal(size=(2, 11))
    a = ph.buddhi(jnp.asarray(logits), jnp.asarray(mask))
    b = ph.buddhi(jnp.asarray(poisoned), jnp.asarray(mask))
    for k in a:
        close(a[k], b[k])


# ---------------------------------------------------------------------------- Viveka


def test_viveka_matches_numpy():
    a, b = crandn(2, 5, 7), crandn(2, 5, 7)
    prev = RNG.normal(size=(2, 2, 7)).astype(np.float32)
    got = ph.viveka([jnp.asarray(planar(a)), jnp.asarray(planar(b))], jnp.asarray(prev))
    r = [np.abs((z / np.abs(z)).sum(-1)).mean() / 7 for z in (a, b)]
    close(got["coherence"], np.mean(r))
    close(got["energy"], np.mean([np.mean(np.abs(z) ** 2) for z in (a, b)]), 1e-4)
    summary = np.stack([planar(z.mean(axis=(0, 1))) for z in (a, b)])
    rel = np.sum((summary - prev) ** 2) / (np.sum(prev**2) + 1e-8)
    close(got["stability"], 1.0 / (1.0 + rel))
    close(ph.bank_summary([jnp.asarray(planar(a)), jnp.asarray(planar(b))]), summary)


def test_viveka_faithful_matches_spec():
    a, b = crandn(2, 5, 7), crandn(2, 5, 7)
    got = ph.viveka([jnp.asarray(planar(a)), jnp.asarray(planar(b))], faithful=True)
    ma, mb = np.sqrt(np.abs(a) ** 2 + 1e-8), np.sqrt(np.abs(b) ** 2 + 1e-8)
    c = np.mean(a.real * b.real + a.imag * b.imag) / (ma.mean() * mb.mean() + 1e-8)
    close(got["coherence"], (c + 1) / 2)
    dev = np.mean([np.mean((m - 1) ** 2) for m in (ma, mb)])
    close(got["energy"], max(0.0, 1 - dev))
    close(got["stability"], 1.0)
    single = ph.viveka([jnp.asarray(planar(a))], faithful=True)
    close(single["coherence"], 0.5)  # the original's one-bank constant


def test_viveka_coherence_one_for_aligned_phases():
    aligned = np.exp(1j * 0.7) * (1 + RNG.random((2, 3, 9)))
    got = ph.viveka([jnp.asarray(planar(aligned))])
    close(got["coherence"], 1.0)
    close(got["stability"], 1.0)  # no previous summary yet


# ---------------------------------------------------------------------------- Smriti


def test_smriti_matches_numpy():
    k, m = 5, 17
    w = RNG.random((2, 3, k)) ** 3
    w = (w / w.sum(-1, keepdims=True)).astype(np.float32)
    idx = RNG.integers(0, m, size=(2, 3, k))
    mask = np.array([[1, 1, 0], [1, 1, 1]], bool)
    got = ph.smriti(jnp.asarray(w), jnp.asarray(idx), m, jnp.asarray(mask))
    h = -(w * np.log(w)).sum(-1)
    wm = mask.astype(float)
    close(got["sharpness"], ((1 - h / np.log(k)) * wm).sum() / wm.sum())
    logw = np.log(w)
    top = logw.max(-1)
    rest = np.sort(logw, -1)[..., :-1]
    hit = top - rest.mean(-1) > 2 * rest.std(-1) + 1e-6
    close(got["hit_rate"], (hit * wm).sum() / wm.sum())
    close(got["coverage"], len(set(idx[mask].ravel())) / m)
    zeros = ph.smriti(jnp.asarray(w), jnp.asarray(idx), m, faithful=True)
    assert all(float(v) == 0.0 for v in zeros.values())


def test_metrics_jit_and_bf16():
    z = jnp.asarray(planar(crandn(2, 3, 7)), jnp.bfloat16)
    logits = jnp.asarray(RNG.normal(size=(2, 3, 11)), jnp.bfloat16)
    mask = jnp.ones((2, 3), bool)
    fn = jax.jit(
        lambda lg, zz: ph.philosophy_metrics(
            logits=lg, mask=mask, ssm_state=zz, banks={"semantic": zz}
        )
    )
    out = fn(logits, z)
    ref = ph.philosophy_metrics(
        logits=logits.astype(jnp.float32),
        mask=mask,
        ssm_state=z.astype(jnp.float32),
        banks={"semantic": z.astype(jnp.float32)},
    )
    assert set(out) == {f"{g}/{k}" for g, ks in _GROUPS.items() for k in ks}
    for k in out:
        assert out[k].dtype == jnp.float32
        close(out[k], np.asarray(ref[k]), 1e-5)


_GROUPS = {
    "manas": ("magnitude", "activity", "entropy"),
    "buddhi": ("confidence", "margin", "entropy"),
    "viveka": ("coherence", "energy", "stability"),
}


@pytest.mark.parametrize("k", [1, 4])
def test_smriti_sharpness_extremes(k):
    one_hot = np.zeros((1, 2, k), np.float32)
    one_hot[..., 0] = 1.0
    idx = np.zeros((1, 2, k), np.int32)
    got = ph.smriti(jnp.asarray(one_hot), jnp.asarray(idx), 3)
    close(got["sharpness"], 1.0)
    close(got["coverage"], 1 / 3)
    if k > 1:
        uniform = np.full((1, 2, k), 1 / k, np.float32)
        close(ph.smriti(jnp.asarray(uniform), jnp.asarray(idx), 3)["sharpness"], 0.0)
        assert math.isclose(float(ph.smriti(jnp.asarray(uniform), idx, 3)["hit_rate"]), 0.0)
        peaked = np.full((1, 2, k), 0.1 / (k - 1), np.float32)
        peaked[..., 1] = 0.9
        assert math.isclose(float(ph.smriti(jnp.asarray(peaked), idx, 3)["hit_rate"]), 1.0)
