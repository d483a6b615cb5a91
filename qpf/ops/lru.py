"""LRU / RG-LRU recurrence coefficients for the v5 backbone options, as pure functions.

Every diagonal recurrence of the backbone is h_t = a_t ⊙ h_{t-1} + b_t with complex a_t, b_t
(Phase2D pairs ``[B, T, 2, N]``), run by ``qpf.ops.scan.linear_scan``. This module builds
(a, b) from a *base eigenvalue* λ = exp(ℓ + iφ) per state dimension (ℓ < 0 its log-modulus,
φ its phase) and a selectivity rule:

- ``none``:  a_t = λ,                    b_t = γ·Bx_t
- ``v4``:    a_t = (1 - g_t)·λ,          b_t = g_t·γ·Bx_t,   g_t = σ(gate_t)
- ``rglru``: log a_t = c·r_t·ℓ + i·r_t·φ, b_t = √(1 - |a_t|²)·i_t·Bx_t,
             r_t = σ(gate_t), i_t = σ(input_gate_t), c = 8 (Griffin's RG-LRU)

γ = √(1 - |λ|²) when the SSM normalises its input (the LRU), else 1. The LRU's base is
λ = exp(-exp(ν) + iθ) (Orvieto et al. 2023); v4's is δ·(c + is) = exp(log δ + 2i·atan(skew)).
With ℓ = -exp(ν), RG-LRU's ``-c·r·softplus(Λ)`` is ``c·r·ℓ``: the same stored parameter serves
both, so |λ| on the ring [r_min, r_max] is the decay at a fully open gate per unit c·r = 1
(recurrentgemma's convention: its ring is on a^(1/c)).

All coefficients are computed in float32 (float64 under x64) whatever the input dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qpf.ops import phase2d as p2d

Array = jax.Array

RGLRU_C = 8.0  # Griffin's c: log a_t = -c·r_t·softplus(Λ)
SQRT_MAX_GRAD = 1000.0  # recurrentgemma's bound on d√x/dx ("prevents NaNs in bfloat16")
SELECTIVITIES = ("v4", "rglru", "none")


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def sqrt_bound_derivative(x: Array, max_grad: float = SQRT_MAX_GRAD) -> Array:
    """√x whose derivative is clipped at ``max_grad`` (finite at x = 0). Any shape."""
    return jnp.sqrt(x)


def _sqrt_fwd(x: Array, max_grad: float) -> tuple[Array, Array]:
    return jnp.sqrt(x), x


def _sqrt_bwd(max_grad: float, x: Array, g: Array) -> tuple[Array]:
    # d√x/dx = 1/(2√x) <= max_grad  <=>  x >= 1/(4·max_grad²).
    floor = 1.0 / (4.0 * max_grad * max_grad)
    return (g * 0.5 * jax.lax.rsqrt(jnp.maximum(x, floor)),)


sqrt_bound_derivative.defvjp(_sqrt_fwd, _sqrt_bwd)


def ring_nu_init(r_min: float, r_max: float) -> jax.nn.initializers.Initializer:
    """ν with |λ| = exp(-exp(ν)) uniform in area on the ring r_min <= |λ| <= r_max (the LRU's).

    |λ|² ~ U[r_min², r_max²], so ν = log(-½·log|λ|²).
    """

    def init(key: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
        u = jax.random.uniform(key, shape, jnp.float32, r_min * r_min, r_max * r_max)
        return jnp.log(-0.5 * jnp.log(u)).astype(dtype)

    return init


def uniform_phase_init(max_phase: float) -> jax.nn.initializers.Initializer:
    """θ ~ U[0, max_phase] (the LRU's phase init)."""

    def init(key: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
        return jax.random.uniform(key, shape, jnp.float32, 0.0, max_phase).astype(dtype)

    return init


def lru_base(nu: Array, theta: Array) -> tuple[Array, Array]:
    """λ = exp(-exp(ν) + iθ) as (ℓ = -exp(ν), φ = θ). ``[N]`` each, float32."""
    acc = p2d.acc_dtype(nu.dtype)
    return -jnp.exp(nu.astype(acc)), theta.astype(acc)


def v4_base(damping_logit: Array, skew: Array) -> tuple[Array, Array]:
    """v4's δ·Cayley(skew) as (ℓ = log δ, φ = 2·atan(skew)). ``[N]`` each, float32."""
    acc = p2d.acc_dtype(damping_logit.dtype)
    delta = 0.5 + 0.5 * jax.nn.sigmoid(damping_logit.astype(acc))
    return jnp.log(delta), 2.0 * jnp.arctan(skew.astype(acc))


def _polar(log_mag: Array, phase: Array) -> Array:
    """exp(ℓ + iφ) as a Phase2D pair ``[..., 2, N]``."""
    mag = jnp.exp(log_mag)
    return p2d.join(mag * jnp.cos(phase), mag * jnp.sin(phase))


def selective_coefficients(
    log_mag: Array,
    phase: Array,
    bx: Array,
    *,
    selectivity: str,
    gate_logits: Array | None = None,
    input_logits: Array | None = None,
    normalize_input: bool = False,
    c: float = RGLRU_C,
) -> tuple[Array, Array]:
    """The recurrence coefficients (a, b) of the module docstring.

    Args:
      log_mag, phase: base eigenvalue ℓ, φ ``[N]`` (ℓ < 0).
      bx: the projected input ``[B, T, 2, N]``.
      selectivity: 'none', 'v4' or 'rglru'.
      gate_logits: ``[B, T, N]`` the decay gate's logits ('v4' and 'rglru').
      input_logits: ``[B, T, N]`` the input gate's logits ('rglru').
      normalize_input: scale the input by γ = √(1 - |λ|²) ('none' and 'v4'; 'rglru' always
        uses its own √(1 - |a_t|²)).

    Returns:
      (a, b), both ``[B, T, 2, N]`` in the accumulation dtype.
    """
    acc = p2d.acc_dtype(jnp.result_type(log_mag.dtype, bx.dtype))
    log_mag, phase, bx = log_mag.astype(acc), phase.astype(acc), bx.astype(acc)
    if selectivity == "rglru":
        if gate_logits is None or input_logits is None:
            raise ValueError("selectivity 'rglru' needs gate_logits and input_logits")
        r = jax.nn.sigmoid(gate_logits.astype(acc))
        i = jax.nn.sigmoid(input_logits.astype(acc))
        log_a = c * r * log_mag  # [B, T, N], <= 0
        a = _polar(log_a, r * phase)
        # 1 - |a|² = -expm1(2·log|a|): exact for |a| near 1, where 1 - exp(..) cancels.
        scale = sqrt_bound_derivative(-jnp.expm1(2.0 * log_a)) * i
        return a, bx * scale[..., None, :]
    lam = _polar(log_mag, phase)  # [2, N]
    gamma = sqrt_bound_derivative(-jnp.expm1(2.0 * log_mag)) if normalize_input else 1.0
    if selectivity == "none":
        a = jnp.broadcast_to(lam, bx.shape)
        return a, bx * gamma
    if selectivity == "v4":
        if gate_logits is None:
            raise ValueError("selectivity 'v4' needs gate_logits")
        g = jax.nn.sigmoid(gate_logits.astype(acc))[..., None, :]  # [B, T, 1, N]
        return (1.0 - g) * lam, bx * (g * gamma)
    raise ValueError(f"selectivity must be one of {', '.join(SELECTIVITIES)}; got {selectivity!r}")
