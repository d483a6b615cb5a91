"""The v4 "philosophy" metrics (spec §16), as pure jittable functions that can move.

The original computed four groups with ~20 host syncs per step, and most were constants:
Manas entropy ≈ 1 (a softmax over 10⁵ magnitudes, divided by 10 and clipped), Viveka
stability 1 (its previous-state input was never supplied), Smriti 0 (it needed a dense
attention the sparse memory read never produced). Here each metric is defined so that it
varies with what it claims to measure, and computed on device from the forward pass; the
original definitions are kept under ``faithful=True`` so those constants can be shown.

Inputs use qpf's planar Phase2D layout ``[..., 2, d]`` (real plane, imaginary plane).
Everything is computed in float32 whatever the compute dtype.

* Manas (state of the SSM): ``magnitude`` mean |h|; ``activity`` fraction of elements
  with |h| above a tenth of the largest (the original's absolute |h| > 0.1 is 0 for any
  model whose states are small);
  ``entropy`` of the energy distribution p = |h|²/Σ|h|² normalised by log(element count)
  (1 = energy spread evenly over every state element, 0 = all in one).
* Buddhi (the output distribution): ``confidence`` mean max probability, ``margin`` mean
  top-1 minus top-2 logit, ``entropy`` mean predictive entropy over log V; token-weighted.
* Viveka (the phase banks): ``coherence`` mean resultant length of the phases of each bank
  state (1 = all channels share one phase, ≈ 1/√d for random phases); ``energy`` mean |z|²;
  ``stability`` 1 / (1 + relative squared change of the banks' mean state since the
  previous train step, ‖s − s'‖² / ‖s'‖²), the previous summary carried in the train state.
* Smriti (the global memory's top-k read): ``sharpness`` 1 − H(w)/log k of the read
  weights; ``hit_rate`` fraction of positions whose best slot stands out from the other
  selected slots: its score exceeds their mean by more than two standard deviations of
  their scores (scores are the log-weights up to a constant; the original's rule, a
  weight above twice the uniform share, is never met by a temperature-free softmax over
  cosines, so it would stay 0);
  ``coverage`` fraction of all slots read by at least one position of the batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

Array = jax.Array
Scalars = dict[str, Array]

ACTIVITY_THRESHOLD = 0.1  # the original's threshold on |h|
_EPS = 1e-8  # the original's epsilon inside roots and logs


def _f32(x: Array) -> Array:
    return x.astype(jnp.float32)


def _modulus(z: Array) -> Array:
    """|z| of planar ``[..., 2, d]`` -> ``[..., d]`` with the original's 1e-8 in the root."""
    z = _f32(z)
    return jnp.sqrt(z[..., 0, :] ** 2 + z[..., 1, :] ** 2 + _EPS)


def _weighted_mean(x: Array, weights: Array | None) -> Array:
    """Mean of ``x [...]`` with optional broadcastable 0/1 ``weights`` (token mask)."""
    if weights is None:
        return jnp.mean(x)
    w = jnp.broadcast_to(_f32(weights), x.shape)
    return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0)


# -------------------------------------------------------------------------------- Manas


def manas(states: Array, *, faithful: bool = False) -> Scalars:
    """Metrics of SSM states ``[..., 2, N]`` (the final backbone state ``[L, B, 2, N]``).

    faithful: the original's entropy min(H(softmax(m))/10, 1) over all flattened m.
    """
    m = _modulus(states).reshape(-1)
    threshold = ACTIVITY_THRESHOLD if faithful else 0.1 * jnp.max(m)
    out = {"magnitude": jnp.mean(m), "activity": jnp.mean(_f32(m > threshold))}
    if faithful:
        p = jax.nn.softmax(m)
        out["entropy"] = jnp.minimum(-jnp.sum(p * jnp.log(p + _EPS)) / 10.0, 1.0)
    else:
        energy = m * m
        p = energy / jnp.sum(energy)
        h = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
        out["entropy"] = h / math.log(max(m.size, 2))
    return out


# ------------------------------------------------------------------------------- Buddhi


def top2_gap(x: Array) -> Array:
    """Largest minus second-largest entry along the last axis: ``[..., V]`` -> ``[...]``
    (0 when the maximum is tied), as ``top_k(x, 2)`` gives it. Two max reductions: XLA:CPU
    turns a ``top_k`` that shares its input with other reductions into a sort (at
    [16, 32, 50257]: 4.1 s against 0.26 s for the whole Buddhi group this way)."""
    first = jnp.argmax(x, axis=-1)
    is_first = jnp.arange(x.shape[-1]) == first[..., None]
    return jnp.max(x, axis=-1) - jnp.max(jnp.where(is_first, -jnp.inf, x), axis=-1)


def buddhi(logits: Array, mask: Array | None = None, *, faithful: bool = False) -> Scalars:
    """Metrics of the predictive distribution: logits ``[..., V]``, mask ``[...]`` (0/1).

    faithful: unweighted means and the original's margin / 10.
    """
    x = _f32(logits)
    logp = jax.nn.log_softmax(x, axis=-1)
    p = jnp.exp(logp)
    entropy = -jnp.sum(p * logp, axis=-1) / math.log(x.shape[-1])
    margin = top2_gap(x)
    weights = None if faithful else mask
    if faithful:
        entropy = -jnp.sum(p * jnp.log(p + _EPS), axis=-1) / math.log(x.shape[-1])
        margin = margin / 10.0
    return {
        "confidence": _weighted_mean(jnp.max(p, axis=-1), weights),
        "margin": _weighted_mean(margin, weights),
        "entropy": _weighted_mean(entropy, weights),
    }


# ------------------------------------------------------------------------------- Viveka


def bank_summary(banks: Sequence[Array], mask: Array | None = None) -> Array:
    """Mean state of each bank over batch and time: ``[B, T, 2, d]`` each -> ``[n, 2, d]``.

    This is what Viveka's stability compares between consecutive train steps (the batches
    differ, so per-token states cannot be compared; their mean field can).
    """
    means = []
    for z in banks:
        w = jnp.ones(z.shape[:2], jnp.float32) if mask is None else _f32(mask)
        total = jnp.einsum("bt,btcd->cd", w, _f32(z))
        means.append(total / jnp.maximum(jnp.sum(w), 1.0))
    return jnp.stack(means)


def _pair_coherence_faithful(a: Array, b: Array) -> Array:
    """Spec §16: mean(a_r b_r + a_i b_i) / (mean|a|·mean|b| + 1e-8), global means."""
    a, b = _f32(a), _f32(b)
    dot = jnp.mean(a[..., 0, :] * b[..., 0, :] + a[..., 1, :] * b[..., 1, :])
    return dot / (jnp.mean(_modulus(a)) * jnp.mean(_modulus(b)) + _EPS)


def phase_concentration(z: Array, mask: Array | None = None) -> Array:
    """Mean resultant length of the channel phases of each state: ``[B, T, 2, d]`` -> scalar.

    R = |Σ_c z_c/|z_c|| / d per position, averaged over (masked) positions: 1 when every
    channel has the same phase, about 1/√d for independent random phases.
    """
    z = _f32(z)
    unit = z / _modulus(z)[..., None, :]
    resultant = jnp.sqrt(jnp.sum(unit, axis=-1) ** 2 @ jnp.ones(2)) / z.shape[-1]
    return _weighted_mean(resultant, mask)


def viveka(
    banks: Sequence[Array],
    prev_summary: Array | None = None,
    mask: Array | None = None,
    *,
    faithful: bool = False,
) -> Scalars:
    """Metrics of the bank outputs ``[B, T, 2, d]`` (one per bank).

    prev_summary: ``bank_summary`` of the previous train step (``[n, 2, d]``) or None at
    the first step (stability 1). faithful: the original's coherence over bank pairs (0.5
    with one bank), energy max(0, 1 − mean(|z| − 1)²) and stability ≡ 1 (never supplied).
    """
    if faithful:
        pairs = [
            _pair_coherence_faithful(banks[i], banks[j])
            for i in range(len(banks))
            for j in range(i + 1, len(banks))
        ]
        avg = jnp.mean(jnp.stack(pairs)) if pairs else jnp.zeros((), jnp.float32)
        dev = jnp.mean(jnp.stack([jnp.mean((_modulus(z) - 1.0) ** 2) for z in banks]))
        return {
            "coherence": (avg + 1.0) / 2.0,
            "energy": jnp.maximum(0.0, 1.0 - dev),
            "stability": jnp.ones((), jnp.float32),
        }
    coherence = jnp.mean(jnp.stack([phase_concentration(z, mask) for z in banks]))
    energy = jnp.mean(
        jnp.stack([_weighted_mean(jnp.sum(_f32(z) ** 2, axis=-2), _mask_d(mask)) for z in banks])
    )
    if prev_summary is None:
        stability = jnp.ones((), jnp.float32)
    else:
        prev = _f32(prev_summary)
        change = jnp.sum((bank_summary(banks, mask) - prev) ** 2) / (jnp.sum(prev**2) + _EPS)
        stability = 1.0 / (1.0 + change)
    return {"coherence": coherence, "energy": energy, "stability": stability}


def _mask_d(mask: Array | None) -> Array | None:
    return None if mask is None else mask[..., None]


# ------------------------------------------------------------------------------- Smriti


def smriti(
    weights: Array,
    indices: Array,
    num_slots: int,
    mask: Array | None = None,
    *,
    faithful: bool = False,
) -> Scalars:
    """Metrics of the top-k memory read: weights and indices ``[B, T, k]``, mask ``[B, T]``.

    faithful: the original needed a dense attention over the slots that its sparse read
    never produced, so all three were 0; reproduced as zeros.
    """
    if faithful:
        zero = jnp.zeros((), jnp.float32)
        return {"sharpness": zero, "hit_rate": zero, "coverage": zero}
    w = _f32(weights)
    k = w.shape[-1]
    entropy = -jnp.sum(jnp.where(w > 0, w * jnp.log(jnp.where(w > 0, w, 1.0)), 0.0), axis=-1)
    sharpness = 1.0 - entropy / math.log(k) if k > 1 else jnp.ones_like(entropy)
    hit = _standout(w) if k > 2 else _f32(jnp.any(w > 2.0 / k, axis=-1))
    valid = jnp.ones(indices.shape[:-1], bool) if mask is None else mask.astype(bool)
    read = jnp.where(valid[..., None], indices, num_slots).reshape(-1)
    used = jnp.zeros((num_slots + 1,), jnp.float32).at[read].max(1.0)[:num_slots]
    return {
        "sharpness": _weighted_mean(sharpness, mask),
        "hit_rate": _weighted_mean(hit, mask),
        "coverage": jnp.mean(used),
    }


def _standout(w: Array) -> Array:
    """1 where the best of the k read weights ``[..., k]`` is a > 2σ outlier in log-weight."""
    logw = jnp.log(jnp.maximum(w, 1e-30))
    top = jnp.max(logw, axis=-1)
    is_top = jnp.arange(w.shape[-1]) == jnp.argmax(logw, axis=-1)[..., None]
    rest = jnp.where(is_top, jnp.nan, logw)
    mean, std = jnp.nanmean(rest, axis=-1), jnp.nanstd(rest, axis=-1)
    return _f32(top - mean > 2.0 * std + 1e-6)


# ---------------------------------------------------------------------------- together


def philosophy_metrics(
    *,
    logits: Array | None,
    mask: Array,
    ssm_state: Array | None = None,
    banks: Mapping[str, Array] | None = None,
    prev_bank_summary: Array | None = None,
    memory_read: tuple[Array, Array] | None = None,
    num_slots: int = 0,
    faithful: bool = False,
) -> Scalars:
    """All groups that the available inputs allow, as ``{'manas/entropy': ..., ...}``.

    logits ``[B, T, V]`` with mask ``[B, T]`` (Buddhi), ``ssm_state`` ``[L, B, 2, N]``
    (Manas), ``banks`` name -> ``[B, T', 2, d]`` (Viveka; T' may be patches, the mask is
    then not applied), ``memory_read`` (weights, indices) ``[B, T', k]`` (Smriti).
    """
    out: Scalars = {}

    def add(group: str, values: Scalars) -> None:
        out.update({f"{group}/{k}": v for k, v in values.items()})

    if ssm_state is not None:
        add("manas", manas(ssm_state, faithful=faithful))
    if logits is not None:
        add("buddhi", buddhi(logits, mask[:, : logits.shape[1]], faithful=faithful))
    if banks:
        states = [banks[n] for n in sorted(banks)]
        bmask = mask if states[0].shape[1] == mask.shape[1] else None
        add("viveka", viveka(states, prev_bank_summary, bmask, faithful=faithful))
    if memory_read is not None:
        w, idx = memory_read
        rmask = mask if w.shape[1] == mask.shape[1] else None
        add("smriti", smriti(w, idx, num_slots, rmask, faithful=faithful))
    return out
