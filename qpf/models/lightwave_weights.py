"""Load the original LLM Lightwave PyTorch weights (torch state_dict names) into qpf params.

The golden fixtures in ``shared/fixtures/lightwave`` store ``param/<torch name>`` arrays,
``config_json`` (``MultiLayerPhotonicNN`` kwargs and the module constants it reads) and the
inputs/outputs. Conversions: torch ``[out, in]`` weights become ``[in, out]`` kernels
(``lora_A [r, in]`` -> ``lora_a [in, r]``, ``lora_B [out, r]`` -> ``lora_b [r, out]``);
complex bias tables ``[2R+1, D]`` become real pairs ``[R+1, D, 2]`` holding rows R..2R, the
only rows the original's absolute-index lookup can reach (rows 0..R−1 are checked by name
and dropped). Any other leftover or missing name is an error.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from qpf.models.lightwave import LightwaveConfig

Params = dict[str, Any]


class TorchState:
    """Reads torch-named arrays, remembering which ones were used."""

    def __init__(self, arrays: Mapping[str, np.ndarray], dtype: Any) -> None:
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        self.dtype = np.dtype(dtype)
        self.used: set[str] = set()

    def has(self, key: str) -> bool:
        return key in self.arrays

    def __call__(self, key: str) -> np.ndarray:
        if key not in self.arrays:
            raise KeyError(f"torch state_dict has no parameter {key!r}")
        self.used.add(key)
        return self.arrays[key]

    def real(self, key: str, transpose: bool = False) -> np.ndarray:
        a = self(key)
        return np.asarray(a.T if transpose else a, self.dtype)

    def table(self, key: str, rel_max_dist: int) -> np.ndarray:
        """Complex ``[2R+1, D]`` -> reachable rows R..2R as real pairs ``[R+1, D, 2]``."""
        z = self(key)
        if z.shape[0] != 2 * rel_max_dist + 1:
            raise ValueError(f"{key}: expected {2 * rel_max_dist + 1} rows, got {z.shape[0]}")
        z = z[rel_max_dist:]
        return np.stack([z.real, z.imag], axis=-1).astype(self.dtype)

    def check_all_used(self) -> None:
        left = sorted(set(self.arrays) - self.used)
        if left:
            raise ValueError(f"unused torch parameters: {left}")


def config_from_torch(config_json: Mapping[str, Any], **overrides: Any) -> LightwaveConfig:
    """``MultiLayerPhotonicNN`` kwargs + module constants -> ``LightwaveConfig``."""
    kw = config_json["kwargs"]
    const = config_json.get("upstream_constants", {})
    fields = {
        "vocab_size": const.get("VOCAB_SIZE", 50257),
        "dim": kw["dim"],
        "num_steps": kw["num_steps"],
        "mode": kw.get("mode", "wave"),
        "num_heads": const.get("H", 4),
        "rel_max_dist": const.get("REL_MAX_DIST", 64),
        "initial_coupling": const.get("INITIAL_COUPLING", 0.5),
        "use_lora": bool(kw.get("use_lora", False)),
        "lora_rank": kw.get("lora_rank", 4),
        "quant_bits": kw.get("quant_bits"),
    }
    if "num_layers" in kw:
        fields["num_layers"] = kw["num_layers"]
    fields.update(overrides)
    return LightwaveConfig(**fields)


def lora_linear_from_torch(weights: TorchState, prefix: str) -> Params:
    """``<prefix>.weight/bias[/lora_A/lora_B]`` (prefix may be '') -> kernel/bias[/lora_a/b]."""
    pre = f"{prefix}." if prefix else ""
    p = {"kernel": weights.real(pre + "weight", True), "bias": weights.real(pre + "bias")}
    if weights.has(pre + "lora_A"):
        p["lora_a"] = weights.real(pre + "lora_A", True)
        p["lora_b"] = weights.real(pre + "lora_B", True)
    return p


def layer_from_torch(weights: TorchState, prefix: str, config: LightwaveConfig) -> Params:
    """One ``PhotonicInterferenceLayer`` (``prefix`` '' or 'layers.3.')."""
    p: Params = {
        "coupling": weights.real(f"{prefix}coupling"),
        "norm_scale": weights.real(f"{prefix}norm_scale"),
    }
    mp = f"{prefix}modulator."
    if config.mode == "wave":
        p["modulator"] = {
            "phase_u": weights.real(mp + "phase_u"),
            "phase_v": weights.real(mp + "phase_v"),
        }
    else:
        mod = {
            n: lora_linear_from_torch(weights, mp + n)
            for n in ("q_proj", "k_proj", "v_proj", "out_proj")
        }
        mod["rel_bias"] = {"table": weights.table(mp + "rel_bias.bias", config.rel_max_dist)}
        p["modulator"] = mod
    return p


def params_from_torch(
    arrays: Mapping[str, np.ndarray], config: LightwaveConfig, dtype: Any = np.float32
) -> Params:
    """A full ``MultiLayerPhotonicNN`` state_dict -> the ``Lightwave`` params tree."""
    weights = TorchState(arrays, dtype)
    p: Params = {
        "embed": weights.real("token_embed.embed.weight"),
        "imag_embed": weights.real("token_embed.imag_embed.weight"),
        "pos_bias": {"table": weights.table("pos_bias.bias", config.rel_max_dist)},
        "readout": lora_linear_from_torch(weights, "readout.proj"),
    }
    for i in range(config.num_layers):
        p[f"layers_{i}"] = layer_from_torch(weights, f"layers.{i}.", config)
    weights.check_all_used()
    return {"params": p}


def load_fixture_params(z: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The ``param/<name>`` entries of a fixture file, keyed by torch name."""
    return {k[len("param/") :]: z[k] for k in z if k.startswith("param/")}
