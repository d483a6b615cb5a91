"""Model diagnostics: recurrence spectra, routing, memory slot usage, per-module norms.

Pure functions of parameters, gradients or forward-pass intermediates; the trainer logs
them as TensorBoard scalars and histograms at ``train.diagnostics_every`` steps, and the run
report plots them.

Spectra: a diagonal recurrence h_t = a_t ⊙ h_{t-1} + ... has per-channel eigenvalues a_t;
where a_t depends on the input through a gate, the spectrum reported is the one at zero
input (gate = σ(gate bias)), and the ceiling (gate fully closed) is reported beside it.
The effective memory length of a channel is -1 / ln|λ| steps (the e-folding time).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qpf.ops.lru import RGLRU_C

Array = jax.Array
Spectrum = dict[str, np.ndarray]


def _layers(tree: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """``layers_0, layers_1, ...`` children of a params subtree, in numeric order."""
    names = [k for k in tree if k.startswith("layers_") and k[7:].isdigit()]
    return [tree[k] for k in sorted(names, key=lambda k: int(k[7:]))]


def _spectrum(modulus: np.ndarray, ceiling: np.ndarray, angle: np.ndarray) -> Spectrum:
    mag = np.clip(modulus, 1e-12, 1.0 - 1e-12)
    return {
        "abs": modulus,
        "angle": angle,
        "abs_ceiling": ceiling,
        "memory_length": -1.0 / np.log(mag),
    }


def qpf_spectrum(params: Mapping[str, Any]) -> Spectrum | None:
    """The qpf backbone's eigenvalues at zero input, for every ``BackboneConfig`` recurrence.

    Base λ: v4 δ·e^{iθ} (δ = 0.5 + 0.5σ(damping), θ = 2·atan(skew)), LRU exp(−exp(ν) + iθ).
    Selectivity at zero input (g = σ(gate bias)): v4 (1 − g)·λ; RG-LRU |λ|^{8g}·e^{igθ}
    (``qpf.ops.lru``); none λ. Returns arrays ``[L, N]``: abs, angle (radians), abs_ceiling
    (|λ|, the gate's limit: fully closed for v4, fully open for RG-LRU) and memory_length.
    """
    layers = _layers(params.get("backbone", {}))
    if not layers or not ({"skew", "nu"} & set(layers[0])):
        return None
    f = lambda x: np.asarray(x, np.float64)  # noqa: E731
    sig = lambda x: 1.0 / (1.0 + np.exp(-f(x)))  # noqa: E731
    keeps, ceilings, angles = [], [], []
    for layer in layers:
        if "skew" in layer:
            log_mag, phase = (
                np.log(0.5 + 0.5 * sig(layer["damping"])),
                2.0 * np.arctan(f(layer["skew"])),
            )
        else:
            log_mag, phase = -np.exp(f(layer["nu"])), f(layer["theta"])
        ceilings.append(np.exp(log_mag))
        if "input_gate" in layer:  # RG-LRU: log a = c·g·ℓ + i·g·φ
            g = sig(layer["gate_proj"]["bias"])
            keeps.append(np.exp(RGLRU_C * g * log_mag))
            angles.append(g * phase)
        elif "gate_proj" in layer:  # v4 gate: a = (1 − g)·λ
            keeps.append((1.0 - sig(layer["gate_proj"]["bias"])) * np.exp(log_mag))
            angles.append(phase)
        else:
            keeps.append(np.exp(log_mag))
            angles.append(phase)
    return _spectrum(np.stack(keeps), np.stack(ceilings), np.stack(angles))


def diagrnn_spectrum(params: Mapping[str, Any]) -> Spectrum | None:
    """Real DiagRNN: a_t = σ(g_t)·λ, λ = exp(−softplus(ν)); at zero input g = b_gate."""
    layers = _layers(params)
    if not layers or "decay" not in layers[0]:
        return None
    f = lambda x: np.asarray(x, np.float64)  # noqa: E731
    lam = np.stack([np.exp(-np.logaddexp(0.0, f(l["decay"]))) for l in layers])
    gate = np.stack([1.0 / (1.0 + np.exp(-f(l["gate_proj"]["bias"]))) for l in layers])
    return _spectrum(gate * lam, lam, np.zeros_like(lam))


SPECTRA: dict[str, Callable[[Mapping[str, Any]], Spectrum | None]] = {
    "qpf": qpf_spectrum,
    "diagrnn": diagrnn_spectrum,
}


def recurrence_spectrum(family: str, params: Mapping[str, Any]) -> Spectrum | None:
    """The recurrence spectrum of a family's params, or None where it has no recurrence."""
    fn = SPECTRA.get(family)
    return None if fn is None else fn(jax.device_get(params))


# --------------------------------------------------------------------- routing, memory


def routing_stats(routing: Array) -> dict[str, Array]:
    """Coupler routing weights ``[..., n_banks]`` (rows sum to 1) -> entropy and usage.

    entropy: mean routing entropy / log n (1 = uniform mixing, 0 = one bank per token);
    usage: ``[n_banks]`` mean weight of each bank.
    """
    w = routing.astype(jnp.float32).reshape(-1, routing.shape[-1])
    n = w.shape[-1]
    h = -jnp.sum(jnp.where(w > 0, w * jnp.log(jnp.where(w > 0, w, 1.0)), 0.0), axis=-1)
    return {"entropy": jnp.mean(h) / math.log(max(n, 2)), "usage": jnp.mean(w, axis=0)}


def slot_usage(indices: Array, num_slots: int, mask: Array | None = None) -> Array:
    """How often each memory slot was read: indices ``[B, T, k]`` -> counts ``[num_slots]``."""
    idx = indices.reshape(*indices.shape[:2], -1)
    if mask is not None and mask.shape == idx.shape[:2]:
        idx = jnp.where(mask[..., None].astype(bool), idx, num_slots)
    counts = jnp.zeros((num_slots + 1,), jnp.int32).at[idx.reshape(-1)].add(1)
    return counts[:num_slots]


# ------------------------------------------------------------------ per-module norms


def module_norms(tree: Mapping[str, Any]) -> dict[str, Array]:
    """Global L2 norm of each top-level module's subtree: ``{module: norm}`` (float32)."""
    out = {}
    for name, sub in tree.items():
        leaves = jax.tree.leaves(sub)
        out[name] = jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))
    return out


def update_ratios(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Array]:
    """‖new − old‖ / ‖old‖ per top-level module (the size of one update, relatively)."""
    delta = jax.tree.map(lambda a, b: b.astype(jnp.float32) - a.astype(jnp.float32), old, new)
    dn, on = module_norms(delta), module_norms(old)
    return {k: dn[k] / jnp.maximum(on[k], 1e-12) for k in dn}


def embedding_phases(params: Mapping[str, Any], ids: np.ndarray) -> np.ndarray | None:
    """Per-channel phases of chosen token embeddings: ids ``[n]`` -> angles ``[n, d]``.

    Works for qpf's Phase2D tables (``embed`` or ``patcher/embed`` with ``embedding_re`` /
    ``embedding_im``, or a ``[V, 2, d]`` table) and Lightwave's (``embed`` real and
    ``imag_embed`` imaginary ``[V, d]`` arrays); None for families without a complex one.
    """
    emb = params.get("embed")
    if emb is None:
        emb = params.get("patcher", {}).get("embed", {})
    if not isinstance(emb, Mapping):  # a bare table: complex only with an imaginary twin
        if "imag_embed" not in params:
            return None
        emb = {"embedding_re": emb, "embedding_im": params["imag_embed"]}
    if "embedding_re" in emb and "embedding_im" in emb:
        re, im = np.asarray(emb["embedding_re"]), np.asarray(emb["embedding_im"])
    else:
        tables = [np.asarray(v) for v in jax.tree.leaves(emb) if np.ndim(v) == 3]
        if not tables or tables[0].shape[1] != 2:
            return None
        re, im = tables[0][:, 0], tables[0][:, 1]
    ids = np.clip(ids, 0, re.shape[0] - 1)
    return np.arctan2(im[ids], re[ids])


__all__ = [
    "SPECTRA",
    "diagrnn_spectrum",
    "embedding_phases",
    "module_norms",
    "qpf_spectrum",
    "recurrence_spectrum",
    "routing_stats",
    "slot_usage",
    "update_ratios",
]


def find_sown(tree: Any, key: str) -> Any | None:
    """First value stored under ``key`` in a nested dict of sown values (a tuple: first)."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k == key:
                return v[0] if isinstance(v, tuple) else v
            found = find_sown(v, key)
            if found is not None:
                return found
    return None
