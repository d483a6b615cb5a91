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

from qpf.config import ConfigError
from qpf.ops import losses
from qpf.training import qfe

Array = jax.Array

CE_IMPLS = ("fused", "plain")
HEAD_DTYPES = (None, "float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Objective weights (the original's defaults: CE 1.0, coherence 0.01, coupling 0.1).

    energy: weight of mean(|z| - energy_target)² over phase states (off by default, as
    upstream). affix: weight of the prefix + suffix CE in morphological mode (0.3 upstream).
    qfe: weight λ of the Wave-Native GPT's spectral coherence (``qpf.training.qfe``; its
    benchmark used 0.05, off by default); qfe_threshold: its amplitude gate τ_A.
    ce_impl: how the token CE is computed when the model returns pre-head features:
    'fused' (``losses.head_cross_entropy``: head and CE in chunks of ``head_chunk``
    positions, no full logits; null: ``losses.auto_head_chunk`` of the vocabulary) or
    'plain' (full logits, then log-softmax: the reference).
    Models that return logits always take the plain path.
    head_dtype: the dtype of the LM head's matmuls when the model returns pre-head
    features (null: the model's compute dtype; 'bfloat16': bf16 operands with float32
    accumulation, logsumexp and gradients, on a float32 model too).
    """

    ce: float = 1.0
    coherence: float = 0.01
    coupling: float = 0.1
    energy: float = 0.0
    energy_target: float = 1.0
    affix: float = 0.3
    qfe: float = 0.0
    qfe_threshold: float = 0.01
    ce_impl: str = "fused"
    head_chunk: int | None = None
    head_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.ce_impl not in CE_IMPLS:
            raise ConfigError(
                f"LossConfig.ce_impl = {self.ce_impl!r} is invalid: allowed " + ", ".join(CE_IMPLS)
            )
        chunk = self.head_chunk
        if chunk is not None and not (isinstance(chunk, int) and chunk >= 1):
            raise ConfigError(
                f"LossConfig.head_chunk = {chunk!r} is invalid: allowed an int >= 1, or null "
                "(chunks of about 4M logits)"
            )
        if self.head_dtype not in HEAD_DTYPES:
            raise ConfigError(
                f"LossConfig.head_dtype = {self.head_dtype!r} is invalid: allowed null (the "
                "model's compute dtype), " + ", ".join(d for d in HEAD_DTYPES if d)
            )
        for f in dataclasses.fields(self):
            if f.name in ("ce_impl", "head_chunk", "head_dtype"):
                continue
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
    ce_sum, count = token_ce(out, targets, tmask, cfg)
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
    terms["qfe"] = qfe_term(out, targets, tmask, cfg)
    return terms


def token_ce(out: Any, targets: Array, tmask: Array, cfg: LossConfig) -> tuple[Array, Array]:
    """Summed next-token CE and count: targets/tmask ``[B, T-1]`` against positions ``:-1``.

    Fused head + CE when the output carries ``features`` (the last position, which scores
    no target, is sliced off before the head), else log-softmax over ``out.logits``.
    """
    if getattr(out, "features", None) is None:
        return losses.token_cross_entropy(out.logits[:, :-1], targets, tmask)
    if cfg.ce_impl == "plain":
        if cfg.head_dtype is None:  # exactly the model's own head
            logits = losses.head_logits(out.features, out.head_weight)
        else:  # operands in head_dtype, float32 accumulation and logits (as the fused path)
            d = jnp.dtype(cfg.head_dtype)
            f, w = out.features.astype(d), out.head_weight.astype(d)
            logits = jnp.dot(f, w, preferred_element_type=jnp.promote_types(d, jnp.float32))
        return losses.token_cross_entropy(logits[:, :-1], targets, tmask)
    return losses.head_cross_entropy(
        out.features[:, :-1],
        out.head_weight,
        targets,
        tmask,
        chunk_size=cfg.head_chunk,
        dtype=cfg.head_dtype,
    )


def qfe_term(out: Any, targets: Array, tmask: Array, cfg: LossConfig) -> Array:
    """The QFE coherence of the next-token logits ``[B, T-1, V]`` (0 when its weight is 0).

    It needs the full logits: a model that returned pre-head features gets them built
    from the head here (only when the term is on). V > 256 uses the fixed random
    projection, as the original does.
    """
    if cfg.qfe == 0:
        return jnp.zeros((), jnp.float32)
    if getattr(out, "features", None) is None:
        logits = out.logits[:, :-1]
    else:
        logits = losses.head_logits(out.features[:, :-1], out.head_weight)
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
