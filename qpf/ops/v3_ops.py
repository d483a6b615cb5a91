"""Pure functions of the v3 "Brain-Inspired LM" (spec v2_v3.md part B), on arrays and
parameter dicts, so the Flax module (``qpf.models.qllm_v3``), the parity tests and the
local learning rules share one definition.

Conventions: a linear layer is a dict ``{"kernel": [in, out], "bias": [out]}`` (torch's
``weight [out, in]`` transposed); activations are ``[B, T, D]``. Statistics (LayerNorm,
softmax, variances, spiking state) are computed in float32 (float64 under x64), whatever the
compute dtype, and cast back.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
Params = dict[str, Any]

LN_EPS = 1e-5  # torch nn.LayerNorm default
BASE_BRANCH = 3  # index of base_transform in the DP switch (the fixtures' convention)


def acc_dtype(x: Array) -> Any:
    """Accumulation dtype: at least float32."""
    return jnp.promote_types(x.dtype, jnp.float32)


def linear(p: Params, x: Array) -> Array:
    """y = x W + b in x's dtype: ``[..., in]`` -> ``[..., out]``."""
    y = x @ p["kernel"].astype(x.dtype)
    if "bias" in p:
        y = y + p["bias"].astype(x.dtype)
    return y


def layer_norm(x: Array, scale: Array, bias: Array | None, eps: float = LN_EPS) -> Array:
    """LayerNorm over the last axis with float32 statistics (torch eps 1e-5)."""
    acc = acc_dtype(x)
    xf = x.astype(acc)
    mu = jnp.mean(xf, -1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mu), -1, keepdims=True)
    y = (xf - mu) * jax.lax.rsqrt(var + eps) * scale.astype(acc)
    if bias is not None:
        y = y + bias.astype(acc)
    return y.astype(x.dtype)


# ------------------------------------------------------------------------ consciousness


def consciousness_states(p: Params, h0: Array) -> Array:
    """[tanh(awareness); σ(attention); tanh(memory); σ(intention)]: ``[B,T,D]`` -> ``[B,T,4D]``."""
    return jnp.concatenate(
        [
            jnp.tanh(linear(p["awareness_proj"], h0)),
            jax.nn.sigmoid(linear(p["attention_proj"], h0)),
            jnp.tanh(linear(p["memory_proj"], h0)),
            jax.nn.sigmoid(linear(p["intention_proj"], h0)),
        ],
        -1,
    )


def consciousness_logits(p: Params, states: Array) -> Array:
    """LN(fusion(states)) ``[B, T, D]`` (the softmax input before the global offset)."""
    norm = p["consciousness_norm"]
    return layer_norm(linear(p["consciousness_fusion"], states), norm["scale"], norm.get("bias"))


def softmax_over_time(c: Array) -> Array:
    """The original's weights: softmax over the sequence axis, per (batch, feature).
    Every position's weight depends on every position (non-causal)."""
    return jax.nn.softmax(c.astype(acc_dtype(c)), axis=1)


def causal_softmax_over_time(c: Array, lse_prev: Array) -> tuple[Array, Array]:
    """Causal version: w_t = exp(c_t - logsumexp_{s<=t} c_s), continuing a running
    logsumexp ``lse_prev [B, D]`` (-inf at the start). Returns (w ``[B,T,D]``, lse_T)."""
    cf = c.astype(acc_dtype(c))
    lse = jnp.logaddexp(lse_prev[:, None, :].astype(cf.dtype), jax.lax.cumlogsumexp(cf, axis=1))
    return jnp.exp(cf - lse), lse[:, -1]


# ----------------------------------------------------------------------------- memories


def stm_read(p: Params, h: Array, slots: Array) -> tuple[Array, Array, Array]:
    """Short-term memory read: G = σ(gate(h)), r = G·S, out = LN(update([h; r])) (no
    residual, G unnormalised). h ``[B,T,D]``, slots ``[M,D]`` -> (out, G, gate logits)."""
    logits = linear(p["memory_gate"], h)
    g = jax.nn.sigmoid(logits)
    r = g @ slots.astype(h.dtype)
    norm = p["memory_norm"]
    out = layer_norm(linear(p["memory_update"], jnp.concatenate([h, r], -1)), **norm)
    return out, g, logits


def stm_ema(slots: Array, gates: Array, x: Array, decay: Array) -> Array:
    """The original's slot write: S_j <- d·S_j + (1-d)·mean_{b,t}(G_j)·mean_{b,t}(x).

    slots ``[M, D]``, gates ``[B, T, M]``, x ``[B, T, D]`` (the STM input), decay scalar.
    Vectorised over slots (each slot's update is independent of the others).
    """
    acc = acc_dtype(slots)
    g_bar = jnp.mean(gates.astype(acc), (0, 1))
    x_bar = jnp.mean(x.astype(acc), (0, 1))
    d = decay.astype(acc)
    return d * slots.astype(acc) + (1.0 - d) * g_bar[:, None] * x_bar[None, :]


def ltm_read(p: Params, h: Array, episodic: Array) -> Array:
    """Long-term memory: concept read plus half the episodic read, ``[B,T,D]`` -> ``[B,T,D]``
    (the caller adds 0.3 times it as a residual). Per-token, so causal."""
    concepts = p["concept_memory"].astype(h.dtype)
    q = linear(p["concept_embeddings"], h)
    alpha = jax.nn.softmax((q @ concepts.T).astype(acc_dtype(h)), -1).astype(h.dtype)
    r_c = linear(p["concept_retrieval"], alpha @ concepts)
    ep = episodic.astype(h.dtype)
    beta = jax.nn.softmax((h @ ep.T).astype(acc_dtype(h)), -1).astype(h.dtype)
    r_e = linear(p["episodic_retrieval"], beta @ ep)
    return r_c + 0.5 * r_e


def consolidate(
    gate: Params, x: Array, importance: Array, episodic: Array, weights: Array
) -> tuple[Array, Array]:
    """``consolidate_memory``: write mean_{b,t}(x·σ(gate(x))·importance) into the slot
    argmin(weights) and set that weight to 1. x ``[B,T,D]``, importance ``[B,T]``,
    episodic ``[E,D]``, weights ``[E]``."""
    acc = acc_dtype(episodic)
    xf = x.astype(acc)
    g = jax.nn.sigmoid(linear(jax.tree.map(lambda a: a.astype(acc), gate), xf))
    write = jnp.mean(xf * g * importance.astype(acc)[..., None], (0, 1))
    idx = jnp.argmin(weights)
    return episodic.astype(acc).at[idx].set(write), weights.at[idx].set(1.0)


# ------------------------------------------------------------------------------ spiking


def global_spike_step(
    s: Array, v: Array, hist: Array, *, decay: float, threshold: float, refractory: float
) -> tuple[Array, Array, Array, Array, Array]:
    """The original SpikingNeuron: one global membrane ``[D]`` per layer, updated once per
    call from the batch-and-time mean of s ``[B,T,D]``; output s·(1 - 1[hist > refractory])
    with the history already updated in this call. Returns (out, v, hist, spikes, mask)."""
    acc = acc_dtype(v)
    v = decay * v.astype(acc) + jnp.mean(s.astype(acc), (0, 1))
    spikes = (v > threshold).astype(acc)
    v = v * (1.0 - spikes)
    hist = decay * hist.astype(acc) + spikes
    mask = (hist > refractory).astype(acc)
    out = s * (1.0 - mask).astype(s.dtype)
    return out, v, hist, spikes, mask


@jax.custom_vjp
def spike_fn(x: Array, slope: float) -> Array:
    """Heaviside 1[x > 0] forward; fast-sigmoid surrogate 1/(1 + slope·|x|)² backward."""
    return (x > 0).astype(x.dtype)


def _spike_fwd(x: Array, slope: float) -> tuple[Array, tuple[Array, float]]:
    return spike_fn(x, slope), (x, slope)


def _spike_bwd(res: tuple[Array, float], g: Array) -> tuple[Array, None]:
    x, slope = res
    return g / jnp.square(1.0 + slope * jnp.abs(x)), None


spike_fn.defvjp(_spike_fwd, _spike_bwd)


def lif_scan(
    s: Array,
    v0: Array,
    h0: Array,
    *,
    decay: float,
    threshold: float,
    refractory: float,
    slope: float,
) -> tuple[Array, Array, Array]:
    """Per-token leaky integrate-and-fire, per sequence (the sane replacement).

    For each t: v = decay·v + s_t; z = H(v - threshold) (surrogate gradient); v -= v·z
    (reset, detached); hist = decay·hist + z; output s_t·(1 - H(hist - refractory)).
    s ``[B,T,D]``, v0/h0 ``[B,D]`` float32 -> (out ``[B,T,D]``, v_T, hist_T).
    """
    acc = v0.dtype

    def step(carry, s_t):
        v, hist = carry
        v = decay * v + s_t.astype(acc)
        z = spike_fn(v - threshold, slope)
        v = v * (1.0 - jax.lax.stop_gradient(z))
        hist = decay * hist + z
        not_refractory = 1.0 - spike_fn(hist - refractory, slope)
        return (v, hist), not_refractory

    (v, hist), not_refractory = jax.lax.scan(step, (v0, h0), jnp.swapaxes(s, 0, 1))
    return s * jnp.swapaxes(not_refractory, 0, 1).astype(s.dtype), v, hist


# --------------------------------------------------------------- developmental plasticity


def dp_complexity(x: Array) -> Array:
    """κ = mean over batch of the unbiased (ddof=1) variance over (T, D): ``[B,T,D]`` -> []."""
    xf = x.astype(acc_dtype(x)).reshape(x.shape[0], -1)
    return jnp.mean(jnp.var(xf, axis=1, ddof=1))


def dp_branch(kappa: Array) -> Array:
    """Branch index: 3 (base) if κ < 0.1, else int(10κ) mod 3 (int32 scalar)."""
    k = jnp.floor(kappa * 10.0).astype(jnp.int32) % 3
    return jnp.where(kappa < 0.1, BASE_BRANCH, k).astype(jnp.int32)


def dp_apply(p: Params, x: Array, branch: Array) -> Array:
    """contraction_k(expansion_k(x)) for branch k < 3, else base_transform(x), chosen by
    ``lax.switch`` on the device (no host round trip). No activation, no residual."""

    def pair(k: int):
        return lambda y: linear(p[f"contraction_layers_{k}"], linear(p[f"expansion_layers_{k}"], y))

    branches = [pair(0), pair(1), pair(2), lambda y: linear(p["base_transform"], y)]
    return jax.lax.switch(branch, branches, x)


def dp_counters(
    usage: Array, importance: Array, branch: Array, kappa: Array
) -> tuple[Array, Array]:
    """Train-mode statistics: usage[k] += 1, importance[k] = 0.9·old + 0.1·κ, for k < 3 only."""
    k = jnp.minimum(branch, 2)
    active = branch < BASE_BRANCH
    new_usage = usage.at[k].add(jnp.where(active, 1.0, 0.0).astype(usage.dtype))
    blended = 0.9 * importance[k] + 0.1 * kappa.astype(importance.dtype)
    new_imp = importance.at[k].set(jnp.where(active, blended, importance[k]))
    return new_usage, new_imp


# ------------------------------------------------------------------------------ losses


def cross_entropy(logits: Array, targets: Array, ignore_index: int | None = None) -> Array:
    """Mean token CE (torch F.cross_entropy), optionally ignoring one target id."""
    logp = jax.nn.log_softmax(logits.astype(acc_dtype(logits)), -1)
    nll = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
    if ignore_index is None:
        return jnp.mean(nll)
    counted = (targets != ignore_index).astype(nll.dtype)
    return jnp.sum(nll * counted) / jnp.maximum(jnp.sum(counted), 1.0)


def consciousness_loss(ce: Array, consciousness_weights: Array, weight: float = 0.1) -> Array:
    """``ConsciousnessTrainer``'s loss: ce·(1 + weight·mean(mean_T h₁))."""
    return ce * (1.0 + weight * jnp.mean(consciousness_weights))


def local_errors(logits: Array, targets: Array) -> Array:
    """``_compute_local_errors``: 1[argmax ≠ target] ``[B, T]`` (float32)."""
    return (jnp.argmax(logits, -1) != targets).astype(jnp.float32)


def hybrid_loss(consciousness: Array, errors: Array) -> Array:
    """``_hybrid_training_step``: consciousness loss + the float32 mean of local errors
    (upstream casts the errors with ``.float()``, so the mean is rounded to float32)."""
    errors = errors.astype(jnp.float32)
    # sum / n, correctly rounded as torch's mean (jnp.mean multiplies by 1/n).
    return consciousness + jnp.sum(errors) / jnp.float32(errors.size)
