"""The configured weighted sum of training objectives over a model output.

Every term is returned separately (unweighted) so the trainer can log it; the total is
Σ weight·term. CE is token-weighted over real target positions (``mask``), identically in
training and evaluation (the original's validation dropped terms and averaged per batch).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from qpf import losses
from qpf.config import ConfigError
from qpf.training import qfe

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Objective weights (the original's defaults: CE 1.0, coherence 0.01, coupling 0.1).

    energy: weight of mean(|z| - energy_target)² over phase states (off by default, as
    upstream). affix: weight of the prefix + suffix CE in morphological mode (0.3 upstream).
    qfe: weight λ of the Wave-Native GPT's spectral coherence (``qpf.training.qfe``; its
    benchmark used 0.05, off by default); qfe_threshold: its amplitude gate τ_A.
    """

    ce: float = 1.0
    coherence: float = 0.01
    coupling: float = 0.1
    energy: float = 0.0
    energy_target: float = 1.0
    affix: float = 0.3
    qfe: float = 0.0
    qfe_threshold: float = 0.01

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int | float) or (f.name != "energy_target" and value < 0):
                raise ConfigError(
                    f"LossConfig.{f.name} = {value!r} is invalid: allowed a float >= 0"
                )


def state_mask(mask: Array, num_states: int) -> Array:
    """Token mask ``[B, T]`` -> mask of the phase states ``[B, S]``.

    S = T for token models; for byte patches (S = T // P) a patch is real if any byte is.
    """
    b, t = mask.shape
    if num_states == t:
        return mask
    p = t // num_states
    return mask[:, : num_states * p].reshape(b, num_states, p).any(-1)


def objective_terms(out: Any, tokens: Array, mask: Array, cfg: LossConfig) -> dict[str, Array]:
    """Unweighted objective terms of a ``ModelOutput`` for a batch.

    tokens ``[B, T]`` (``[B, T, 3]`` morphological), mask ``[B, T]`` bool (real tokens).
    Returns ce (mean over counted targets), ce_sum, tokens (count), coherence, coupling,
    energy and, in morphological mode, affix (mean prefix + suffix CE).
    """
    roots = tokens[..., 0] if tokens.ndim == 3 else tokens
    targets = roots[:, 1:]
    tmask = mask[:, 1:]  # logits[t] scores token t+1 when that token is real
    ce_sum, count = losses.token_cross_entropy(out.logits[:, :-1], targets, tmask)
    terms = {
        "ce_sum": ce_sum,
        "tokens": count,
        "ce": ce_sum / jnp.maximum(count, 1.0),
        "coupling": jnp.asarray(out.coupling_loss, ce_sum.dtype),
    }
    if out.phase_states is None:  # non-phase models (baselines) have no phase objectives
        terms["coherence"] = terms["energy"] = jnp.zeros((), ce_sum.dtype)
    else:
        smask = state_mask(mask, out.phase_states.shape[1])
        terms["coherence"] = losses.coherence_loss(out.phase_states, smask)
        terms["energy"] = losses.energy_loss(out.phase_states, cfg.energy_target, smask)
    if out.prefix_logits is not None:
        pre, _ = losses.token_cross_entropy(out.prefix_logits[:, :-1], tokens[:, 1:, 1], tmask)
        suf, _ = losses.token_cross_entropy(out.suffix_logits[:, :-1], tokens[:, 1:, 2], tmask)
        terms["affix"] = (pre + suf) / jnp.maximum(count, 1.0)
    terms["qfe"] = qfe_term(out.logits[:, :-1], targets, tmask, cfg)
    return terms


def qfe_term(logits: Array, targets: Array, tmask: Array, cfg: LossConfig) -> Array:
    """The QFE coherence of next-token logits ``[B, T-1, V]`` (0 when its weight is 0).

    V > 256 uses the fixed random projection, as the original does.
    """
    if cfg.qfe == 0:
        return jnp.zeros((), jnp.float32)
    v = logits.shape[-1]
    proj = qfe.qfe_projection(v) if v > qfe.PROJECTION_DIM else None
    return qfe.spectral_coherence(
        logits, targets, threshold=cfg.qfe_threshold, projection=proj, mask=tmask
    )


def total_loss(terms: dict[str, Array], cfg: LossConfig) -> Array:
    """Σ weight·term over the configured objectives."""
    total = cfg.ce * terms["ce"] + cfg.coherence * terms["coherence"]
    total = total + cfg.coupling * terms["coupling"] + cfg.energy * terms["energy"]
    total = total + cfg.qfe * terms.get("qfe", 0.0)
    if "affix" in terms:
        total = total + cfg.affix * terms["affix"]
    return total
