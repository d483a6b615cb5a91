"""The v2 trainer's optimiser, schedule and objective (spec v2_v3.md §A4, §A5, §A11).

* ``original_schedule``: the original's two chained torch schedulers as one optax schedule:
  linear warm-up from 0 (the first update has lr 0), constant until the hard-coded step
  1000, then cosine to lr/10 over T_max = total − warmup, periodic with period 2·T_max
  (``periodic=False``: the cosine runs once and stays at lr/10).
* ``original_optimizer``: clip 1.0 + AdamW(0.9, 0.999, 1e-8, wd 0.01) decaying every
  parameter; ``accumulate > 1`` wraps it in ``optax.MultiSteps`` (real accumulation; the
  original's is broken and keeps only the last micro-batch).
* ``original_objective``: CE + w_E·energy + w_C·coherence + w_S·semantic (+ w_K·concept),
  with the NaN fallback to CE and the energy/coherence weights switched off after
  ``max_nan_events`` fallbacks, tracked in an int32 counter (no host sync).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from qpf.models import qllm_v2_losses as L
from qpf.models.qllm_v2 import QLLMv2

Array = jax.Array

COSINE_START = 1000  # hard-coded in the original trainer


def original_schedule(
    learning_rate: float, warmup_steps: int, total_steps: int, periodic: bool = True
) -> optax.Schedule:
    """lr(step) of the original trainer (see module docstring)."""
    t_max = max(1, total_steps - warmup_steps)
    floor = learning_rate / 10.0

    def warm(step: Array) -> Array:
        return learning_rate * jnp.minimum(1.0, step / max(1, warmup_steps))

    def cosine(step: Array) -> Array:
        k = step if periodic else jnp.minimum(step, t_max)
        return floor + (learning_rate - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * k / t_max))

    return optax.join_schedules([warm, cosine], [COSINE_START])


def original_optimizer(
    learning_rate: float,
    warmup_steps: int,
    total_steps: int,
    periodic: bool = True,
    accumulate: int = 1,
) -> optax.GradientTransformation:
    """Clip-by-global-norm 1.0, then AdamW with the original schedule (no decay mask)."""
    sched = original_schedule(learning_rate, warmup_steps, total_steps, periodic)
    opt = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(sched, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01),
    )
    return optax.MultiSteps(opt, accumulate) if accumulate > 1 else opt


def original_objective(
    model: QLLMv2,
    params: Any,
    tokens: Array,
    targets: Array,
    key: Array,
    step: Array,
    nan_count: Array,
    cfg: L.V2LossConfig | None = None,
    deterministic: bool = False,
) -> tuple[Array, tuple[dict[str, Array], Array]]:
    """The original training loss of one batch.

    tokens, targets int ``[B, T]``; key: PRNG key (dropout, evolve, random positions);
    step: the optimizer step (evolve schedule); nan_count int32 ``[]``.
    Returns (loss, (terms, new nan_count)); differentiate with ``has_aux=True``.
    """
    cfg = L.V2LossConfig() if cfg is None else cfg
    k_drop, k_phase, k_energy, k_coh = jax.random.split(key, 4)
    out = model.apply(
        params,
        tokens,
        deterministic=deterministic,
        training_step=step,
        rngs={"dropout": k_drop},
    )
    logits = out.logits.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, -1)
    ce = -jnp.mean(jnp.take_along_axis(logp, targets[..., None], -1))
    # The trainer takes the phase representation in train mode (dropout on), no evolve.
    amp, phase = model.apply(
        params,
        tokens,
        deterministic,
        method=QLLMv2.phase_representation,
        rngs={"dropout": k_phase},
    )
    theta = L.phase_angles(amp, phase, cfg.wrap)
    n = tokens.shape[1]
    energy = L.energy_loss(theta, L.energy_positions(k_energy, n), cfg.energy_sign)
    coherence = L.coherence_loss(theta, L.coherence_positions(k_coh, n), cfg.wrap)
    semantic = L.semantic_loss(logits, targets)
    concept = L.concept_loss(L.concept_codes(params, tokens)) if cfg.concept else 0.0
    on = (nan_count < cfg.max_nan_events).astype(jnp.float32)
    total = (
        ce
        + on * cfg.energy_weight * energy
        + on * cfg.coherence_weight * coherence
        + cfg.semantic_weight * semantic
        + cfg.concept_weight * concept
    )
    finite = jnp.isfinite(total)
    loss = jnp.where(finite, total, ce)
    terms = {
        "ce": ce,
        "energy": energy,
        "coherence": coherence,
        "semantic": semantic,
        "concept": jnp.asarray(concept, jnp.float32),
    }
    return loss, (terms, nan_count + (~finite).astype(jnp.int32))
