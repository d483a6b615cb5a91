"""Helpers for the LLM Lightwave parity tests: fixture loading and key-by-key comparison.

Every comparison records (max abs error, max rel error) per key, and a list of failures, so
a test can report every failing key at once.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from parity_log import record

from qpf.models import lightwave_weights as lww

# README tolerances: float32 end to end (rtol 1e-4, atol 1e-4 on states and logits, rtol 1e-5
# on losses, atol 1e-4 on generation scores); float64 against the f64/ reruns (1e-7, 1e-9).
F32 = {"state": (1e-4, 1e-4), "loss": (1e-5, 0.0), "score": (1e-4, 1e-4)}
F64 = {"state": (1e-7, 1e-9), "loss": (1e-7, 1e-9), "score": (1e-7, 1e-9)}


def load(path: Path) -> dict[str, Any]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def config_json(z: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(str(z["config_json"]))


def pairs(a: np.ndarray) -> np.ndarray:
    """Complex arrays -> real pairs ``[..., 2]``; real arrays unchanged."""
    a = np.asarray(a)
    return np.stack([a.real, a.imag], axis=-1) if np.iscomplexobj(a) else a


class Report:
    """Collects per-key errors and failures of one fixture file and dtype."""

    def __init__(self, name: str) -> None:
        """``name``: "<fixture file> <dtype>"."""
        self.name = name
        self.fixture = name.split(" ", 1)[0]
        self.stats: dict[str, tuple[float, float]] = {}
        self.scaled: dict[str, tuple[float, float]] = {}
        self.failures: list[str] = []

    def close(self, key: str, got: Any, want: Any, tol: tuple[float, float]) -> None:
        got = np.asarray(got, np.float64)
        record(key, got, pairs(want), fixture=self.fixture)
        want = np.asarray(pairs(want), np.float64)
        if got.shape != want.shape:
            self.failures.append(f"{key}: shape {got.shape} != {want.shape}")
            return
        rtol, atol = tol
        err = np.abs(got - want)
        rel = err / np.maximum(np.abs(want), 1e-30)
        self.stats[key] = (float(err.max(initial=0.0)), float(rel.max(initial=0.0)))
        scale = max(float(np.abs(want).max(initial=0.0)), 1e-30)
        self.scaled[key] = (self.stats[key][0], self.stats[key][0] / scale)
        if not np.all(np.isfinite(got)) or np.any(err > atol + rtol * np.abs(want)):
            worst = float((err - rtol * np.abs(want)).max(initial=0.0))
            self.failures.append(
                f"{key}: max abs {self.stats[key][0]:.3g}, rel {self.stats[key][1]:.3g} "
                f"(rtol {rtol}, atol {atol}; excess {worst:.3g})"
            )

    def equal(self, key: str, got: Any, want: Any) -> None:
        got, want = np.asarray(got), np.asarray(want)
        record(key, got, want, fixture=self.fixture)
        if got.shape != want.shape or not np.array_equal(got, want):
            self.failures.append(f"{key}: differs (got {got.tolist()}, want {want.tolist()})")
        else:
            self.stats[key] = (0.0, 0.0)

    def close_scaled(self) -> dict[str, tuple[float, float]]:
        """Per group (states/logits, losses, generation and beam scores): max abs error
        and max error relative to the key's largest magnitude."""
        groups: dict[str, tuple[float, float]] = {}
        for key, (err, scaled) in self.scaled.items():
            group = (
                "loss"
                if "/loss/" in key
                else "gen/beam"
                if "beam" in key or "gen" in key
                else "state"
            )
            if "float64" in self.name and not key.startswith("f64/"):
                group += " (no f64/ copy: vs float32)"
            a, r = groups.get(group, (0.0, 0.0))
            groups[group] = (max(a, err), max(r, scaled))
        return groups

    def summary(self) -> str:
        parts = [
            f"{g}: abs {a:.2g} rel {r:.2g}" for g, (a, r) in sorted(self.close_scaled().items())
        ]
        return f"{self.name}: {len(self.stats)} keys; " + "; ".join(parts)

    def check(self) -> None:
        print(self.summary())
        assert not self.failures, f"{self.name}: {len(self.failures)} failing keys:\n" + "\n".join(
            self.failures
        )


def model_params(z: Mapping[str, Any], dtype: str) -> tuple[Any, Any]:
    """(config, variables) of a model fixture in ``dtype`` ('float32' | 'float64')."""
    cfg = lww.config_from_torch(config_json(z), dtype=dtype, param_dtype=dtype)
    params = lww.params_from_torch(lww.load_fixture_params(z), cfg, dtype=np.dtype(dtype))
    return cfg, params
