"""Interference coupler (spec §7) and its coupling ("diversity") loss."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from qpf import config as cfgs
from qpf.layers.core import PhaseModule
from qpf.ops import norms
from qpf.ops import phase2d as p2d
from qpf.registry import Registry

Array = jax.Array

COUPLING_POSITIONS = 32  # the original looks at the first 32 positions only


def unit_phase_init(key, shape, dtype):
    """1 + 0i per dimension: ``[2, d]`` with the real plane set to one."""
    return jnp.zeros(shape, dtype).at[0].set(1.0)


class InterferenceCoupler(PhaseModule):
    """Fuse bank outputs: project, rotate by a learned unit phase, route, norm, fuse.

    combined = Σ_b w_b · (P_b(x_b) ⊙ φ_b/|φ_b|), out = fusion(LN(combined)), where w is a
    softmax over banks from a tiny router MLP on per-bank mean energies (dynamic) or from
    learned static logits. With a single bank w ≡ 1, so no router or static weights exist
    (in the original they were dead parameters). Inputs: ``[B, T, 2, d]`` per bank, in
    ``bank_names`` order; output ``[B, T, 2, d]``.
    """

    cfg: cfgs.CouplerConfig = cfgs.CouplerConfig()
    bank_names: tuple[str, ...] = ()

    @nn.compact
    def __call__(self, bank_outputs: dict[str, Array], *, deterministic: bool = True) -> Array:
        names = self.bank_names
        d = bank_outputs[names[0]].shape[-1]
        projected = [self.linear(d, f"bank_projs_{n}")(bank_outputs[n]) for n in names]
        weights = self._routing(projected)  # [B, T, nb] or None
        if weights is not None:  # kept only when 'intermediates' is mutable (diagnostics)
            self.sow("intermediates", "routing", weights)
        combined = 0.0
        for i, (name, p) in enumerate(zip(names, projected)):
            phase = self.param(
                f"interference_phases_{name}", unit_phase_init, (2, d), self.param_dtype
            )
            rotated = p2d.multiply(p, p2d.normalize(phase).astype(p.dtype))
            w = 1.0 if weights is None else weights[..., i, None, None].astype(p.dtype)
            combined = combined + w * rotated
        out = self.linear(d, "fusion")(self.norm("norm")(combined))
        rng = self.dropout_rng(deterministic, self.cfg.dropout)
        if rng is not None:  # the original applies this pattern in training only
            out = norms.real_part_dropout(out, self.cfg.dropout, rng)
        return out

    def _routing(self, projected: Sequence[Array]) -> Array | None:
        nb = len(projected)
        if nb == 1:
            return None
        if not self.cfg.dynamic_routing:
            logits = self.param(
                "static_weights", nn.initializers.constant(1.0 / nb), (nb,), self.param_dtype
            )
            return jax.nn.softmax(logits.astype(p2d.acc_dtype(logits.dtype)))
        acc = p2d.acc_dtype(projected[0].dtype)
        feats = jnp.stack([jnp.mean(p2d.modulus_sq(p.astype(acc)), -1) for p in projected], -1)
        hidden = norms.gelu(self.real_linear(4 * nb, "router_0")(feats))
        logits = self.real_linear(nb, "router_2")(hidden)
        return jax.nn.softmax(logits.astype(acc), axis=-1)


def coupling_loss(bank_outputs: Sequence[Array]) -> Array:
    """The original's coupling loss on raw bank outputs (spec §7), L1-coherence bug included.

    For each bank pair (i < j): mean over the first 32 positions -> ``[B, 2, d]``, the
    L1-denominator coherence per row, averaged over the batch -> c_ij. One pair:
    0.1·||c| - 0.5|; more: -Var(c) (unbiased) + 0.1·|mean|c| - 0.5|. Needs >= 2 banks.
    Because of the L1 denominator it is ≈ 0.05 whatever the banks do (EXPERIMENTS bug 1).
    """
    if len(bank_outputs) < 2:
        raise ValueError("coupling_loss needs at least two banks")
    means = [
        jnp.mean(b[:, :COUPLING_POSITIONS].astype(p2d.acc_dtype(b.dtype)), axis=1)
        for b in bank_outputs
    ]
    pairs = [
        jnp.mean(p2d.coherence_l1(means[i], means[j]))
        for i in range(len(means))
        for j in range(i + 1, len(means))
    ]
    c = jnp.stack(pairs)
    if c.shape[0] == 1:
        return 0.1 * jnp.abs(jnp.abs(c[0]) - 0.5)
    return -jnp.var(c, ddof=1) + 0.1 * jnp.abs(jnp.mean(jnp.abs(c)) - 0.5)


# The model looks the coupler up by its config's ``type``.
COUPLERS: Registry = Registry.of("coupler", {"interference": InterferenceCoupler})
