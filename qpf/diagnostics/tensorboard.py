"""Model diagnostics for TensorBoard at an interval: spectra, routing and memory usage.

Run by the trainer every ``train.diagnostics_every`` steps on the current params and a
few rows of the current batch: one extra forward pass (jitted once), outside the step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import linen as nn

from qpf.diagnostics import model_stats
from qpf.diagnostics.in_step import wants_intermediates

PROBE_ROWS = 4


def make_probe(module: nn.Module) -> Callable[[Any, jax.Array], tuple[Any, Any]]:
    """Jitted ``probe(params, tokens) -> (ModelOutput, sown intermediates)``."""
    extra = wants_intermediates(module)

    def probe(params: Any, tokens: jax.Array) -> tuple[Any, Any]:
        out, sown = module.apply({"params": params}, tokens, mutable=["intermediates"], **extra)
        return out, sown.get("intermediates", {})

    return jax.jit(probe)


def model_diagnostics(
    family: str, module: nn.Module, params: Any, probe_out: tuple[Any, Any] | None
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """(scalars, histograms) of the spectrum, routing and memory slot usage."""
    scalars: dict[str, float] = {}
    hists: dict[str, np.ndarray] = {}
    spec = model_stats.recurrence_spectrum(family, params)
    if spec is not None:
        for i in range(spec["abs"].shape[0]):
            hists[f"spectrum/layer{i}/abs"] = spec["abs"][i]
            hists[f"spectrum/layer{i}/angle"] = spec["angle"][i]
            hists[f"spectrum/layer{i}/memory_length"] = spec["memory_length"][i]
        scalars["spectrum/median_memory_length"] = float(np.median(spec["memory_length"]))
        scalars["spectrum/max_abs"] = float(spec["abs"].max())
    if probe_out is None:
        return scalars, hists
    out, sown = probe_out
    routing = model_stats.find_sown(sown, "routing")
    if routing is not None:
        stats = jax.device_get(model_stats.routing_stats(routing))
        scalars["routing/entropy"] = float(stats["entropy"])
        names = getattr(module.config, "bank_names", ())
        for name, usage in zip(names, stats["usage"]):
            scalars[f"routing/usage/{name}"] = float(usage)
    inter = getattr(out, "intermediates", None) or {}
    if "memory_topk_indices" in inter:
        num_slots = module.config.memory.num_slots
        counts = np.asarray(model_stats.slot_usage(inter["memory_topk_indices"], num_slots))
        hists["memory/slot_reads"] = np.repeat(np.arange(num_slots), counts)
        scalars["memory/slots_used"] = float((counts > 0).mean())
    return scalars, hists
