"""The v2 trainer's auxiliary losses as pure functions (spec v2_v3.md §A4).

Phases come from ``QLLMv2.phase_representation`` as (amplitude, phase) ``[B, T, D]``.
``energy_sign`` is explicit: the original computes ``energy_loss = −mean E`` (sign −1),
which *maximises* the energy E = −Σcos… that the paper (QLLM_CORE_IDEA §5.3) minimises
(sign +1). Constant phases give E = −1.8, the minimum of E: the paper's loss is −1.8 there,
the original's +1.8 (pinned by tests). ``wrap`` picks the phase-difference treatment:
False clamps Δθ to [−π, π] as the original; True wraps it (correct for e^{iΔθ}).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from qpf.config import require

Array = jax.Array

# Bytes whose mean probability the original's semantic loss adds (space, e, t, a, o, i, n,
# s, r, h): it penalises the commonest bytes although its comment says "encourage".
COMMON_BYTES = (32, 101, 116, 97, 111, 105, 110, 115, 114, 104)
ENERGY_PAIRS = 20
COHERENCE_SUBSET = 50


@dataclasses.dataclass(frozen=True)
class V2LossConfig:
    """Weights of the original objective (CLI defaults) and the two explicit choices.

    energy_sign: −1 the original (maximises E), +1 the paper (minimises E).
    wrap: wrap phase differences (True) or clamp them as the original (False).
    concept: include the concept term (the original's AMP path) or not (its fp32 path).
    """

    energy_weight: float = 0.001
    coherence_weight: float = 0.0005
    semantic_weight: float = 0.001
    concept_weight: float = 0.001
    energy_sign: int = -1
    wrap: bool = False
    concept: bool = True
    max_nan_events: int = 10

    def __post_init__(self) -> None:
        for f in ("energy_weight", "coherence_weight", "semantic_weight", "concept_weight"):
            v = getattr(self, f)
            require(isinstance(v, int | float) and v >= 0, self, f, "a float >= 0")
        require(self.energy_sign in (-1, 1), self, "energy_sign", "-1 (original) or +1 (paper)")
        require(isinstance(self.wrap, bool), self, "wrap", "a bool")
        require(isinstance(self.concept, bool), self, "concept", "a bool")
        require(
            isinstance(self.max_nan_events, int) and self.max_nan_events > 0,
            self,
            "max_nan_events",
            "an int > 0",
        )


PAPER = V2LossConfig(energy_sign=1, wrap=True)


def _finite_or(x: Array, fallback: float) -> Array:
    return jnp.where(jnp.all(jnp.isfinite(x)), x, fallback)


def phase_angles(amplitude: Array, phase: Array, wrap: bool) -> Array:
    """θ = angle(a·e^{iφ}) ``[B, T, D]``.

    Original (wrap=False): atan2 of the complex product, NaN -> 0 (``torch.angle`` +
    nan_to_num). Sane (wrap=True): φ + π·[a < 0] wrapped to (−π, π], which has a gradient
    at a = 0 where atan2(0, 0) does not.
    """
    if wrap:
        return wrap_angle(phase + math.pi * (amplitude < 0))
    theta = jnp.arctan2(amplitude * jnp.sin(phase), amplitude * jnp.cos(phase))
    return jnp.nan_to_num(theta, nan=0.0, posinf=math.pi, neginf=-math.pi)


def wrap_angle(x: Array) -> Array:
    """x wrapped to (−π, π] via atan2(sin x, cos x)."""
    return jnp.arctan2(jnp.sin(x), jnp.cos(x))


def energy_per_sample(theta: Array, pairs: Array) -> Array:
    """E per sample ``[B]`` of θ ``[B, T, D]`` (the trainer's formula, spec §A4).

    pairs int ``[n]``: the random positions of the entanglement term (n < 2 gives 0).
    E = E_local + 0.5·E_global + 0.3·E_ent + 0.2·E_stab, each a negative mean cosine (or
    minus the biased variance over T); non-finite results become 0 as upstream.
    """
    e_local = -jnp.mean(jnp.cos(theta[:, 1:] - theta[:, :-1]), axis=(1, 2))
    e_global = -jnp.mean(jnp.cos(theta - jnp.mean(theta, 1, keepdims=True)), axis=(1, 2))
    if pairs.shape[0] >= 2:
        sel = theta[:, pairs]
        e_ent = -jnp.mean(jnp.cos(sel[:, 1:] - sel[:, :-1]), axis=(1, 2))
    else:
        e_ent = jnp.zeros_like(e_local)
    e_stab = -jnp.mean(jnp.nan_to_num(jnp.var(theta, axis=1)), axis=-1)
    e = e_local + 0.5 * e_global + 0.3 * e_ent + 0.2 * e_stab
    e = jnp.nan_to_num(e, nan=0.0, posinf=10.0, neginf=-10.0)
    return _finite_or(e, 0.0)


def energy_loss(theta: Array, pairs: Array, sign: int) -> Array:
    """sign·mean_b E: sign −1 is the original's (maximises E), +1 the paper's."""
    return sign * jnp.mean(energy_per_sample(theta, pairs))


def _mean_phasor(x: Array, axes: tuple[int, ...]) -> Array:
    """|mean e^{ix}| over ``axes``."""
    return jnp.hypot(jnp.mean(jnp.cos(x), axes), jnp.mean(jnp.sin(x), axes))


def coherence_per_sample(theta: Array, subset: Array, wrap: bool) -> Array:
    """Coh per sample ``[B]``: 0.4·|⟨e^{iΔθ}⟩| + 0.3·|⟨e^{iθ}⟩| + 0.2·|⟨e^{iθ}⟩_S| +
    0.1·|⟨e^{iΔθ}⟩| (the "temporal" term equals the "local" one upstream).

    Δθ is clamped to [−π, π] (original) or wrapped. subset int ``[n]``: random positions S.
    """
    diff = theta[:, 1:] - theta[:, :-1]
    diff = wrap_angle(diff) if wrap else jnp.clip(diff, -math.pi, math.pi)
    local = _mean_phasor(diff, (1, 2))
    glob = _mean_phasor(theta, (1, 2))
    sub = _mean_phasor(theta[:, subset], (1, 2))
    coh = 0.4 * local + 0.3 * glob + 0.2 * sub + 0.1 * local
    coh = jnp.nan_to_num(coh, nan=0.0, posinf=1.0)
    return _finite_or(coh, 1.0)


def coherence_loss(theta: Array, subset: Array, wrap: bool) -> Array:
    """−mean_b Coh."""
    return -jnp.mean(coherence_per_sample(theta, subset, wrap))


def semantic_loss(logits: Array, targets: Array) -> Array:
    """The original's "semantic" term of logits ``[B, T, V]`` and targets ``[B, T]``.

    0.3·rep + 0.3·(−entropy) + 0.2·mean‖p_{t+1} − p_t‖ (T > 2) + 0.2·Σ_common mean p_v
    (V = 256 only); rep = 0.1·(#distinct ids among the last min(10, T−1) target columns of
    the batch)/count is a constant. 0 when logits or p hold NaN, as upstream.
    """
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    _, t, v = logits.shape
    p = jax.nn.softmax(logits, axis=-1)
    window = min(10, t - 1)
    recent = targets[:, t - window :] if window > 0 else targets[:, :0]
    seen = jnp.zeros((v,), bool).at[recent.reshape(-1)].set(True)
    rep = 0.1 * jnp.sum(seen) / max(recent.size, 1) if window > 0 else 0.0
    div = jnp.mean(jnp.sum(p * jnp.log(p + 1e-8), axis=-1))
    ctx = jnp.mean(jnp.linalg.norm(p[:, 1:] - p[:, :-1], axis=-1)) if t > 2 else 0.0
    byte = jnp.sum(jnp.mean(p[..., jnp.array(COMMON_BYTES)], axis=(0, 1))) if v == 256 else 0.0
    total = jnp.nan_to_num(0.3 * rep + 0.3 * div + 0.2 * ctx + 0.2 * byte)
    bad = jnp.any(jnp.isnan(logits)) | jnp.any(jnp.isnan(p))
    return jnp.where(bad, 0.0, total)


def concept_loss(concepts: Array) -> Array:
    """c₀ = word_concept_map[x]·concept_embeddings ``[B, T, C]`` -> 0.4·mean‖Δc₀‖ −
    0.3·mean_c var_{b,t} c₀ + 0.3·mean_{b,c} var_t c₀ (unbiased variances)."""
    c = concepts.astype(jnp.promote_types(concepts.dtype, jnp.float32))
    coh = jnp.mean(jnp.linalg.norm(c[:, 1:] - c[:, :-1], axis=-1))
    div = -jnp.mean(jnp.var(c.reshape(-1, c.shape[-1]), axis=0, ddof=1))
    stab = jnp.mean(jnp.var(c, axis=1, ddof=1))
    return 0.4 * coh + 0.3 * div + 0.3 * stab


def random_positions(key: Array, length: int, count: int) -> Array:
    """The first ``count`` entries of a random permutation of ``range(length)`` (int32)."""
    return jax.random.permutation(key, length)[:count].astype(jnp.int32)


def energy_positions(key: Array, length: int) -> Array:
    return random_positions(key, length, min(ENERGY_PAIRS, length // 2))


def coherence_positions(key: Array, length: int) -> Array:
    return random_positions(key, length, min(COHERENCE_SUBSET, length // 2))


def concept_codes(params: dict, tokens: Array) -> Array:
    """c₀ = word_concept_map[x]·concept_embeddings ``[B, T, C]`` from ``QLLMv2`` params
    (the ConceptLayer input before the language gate; the concept loss reads it)."""
    layer = params["params"]["concept_layer"] if "params" in params else params["concept_layer"]
    return jnp.take(layer["word_concept_map"], tokens, axis=0) @ layer["concept_embeddings"]
