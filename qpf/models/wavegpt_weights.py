"""Load the original Wave-Native GPT PyTorch weights (torch state_dict names) into ``wavegpt``
parameters, and read the original's config.

Fixture files (``shared/fixtures/wavegpt``) store ``param/<torch name>`` arrays and
``config_json`` with the constructor's ``WaveGPTConfig`` fields. Conversions: ``nn.Linear``
``weight [out, in]`` becomes ``kernel [in, out]``; LayerNorm ``weight`` becomes ``scale``;
``nn.Embedding`` ``weight`` becomes ``embedding``; shaped parameters (``pos_freq [1, 1, W]``,
phase offsets ``[1, H, 1, W]``, ``temperature [1]``, ``interference_scale [H, 1, 1]``) keep
the original shapes, so Resonant Gradient Descent sees the same tensor ranks. The fixed
buffer ``embedding.harmonic_mults`` must equal 1..Hh (it is a constant here). Any state-dict
entry without a counterpart, or a missing one, is an error.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from qpf.models.wavegpt import WaveGPTConfig

Params = dict[str, Any]

_LAYER_NORMS = ("ln", "ln1", "ln2", "head_ln")
_EMBEDDINGS = ("simple_embed",)


def config_from_upstream(fields: Mapping[str, Any], **overrides: Any) -> WaveGPTConfig:
    """The original ``WaveGPTConfig`` fields -> ``WaveGPTConfig``.

    ``pure_wave_mode`` is read but not applied: the original's ``WaveBlock`` never passes it
    to the attention, so every original WaveGPT computes the quadratic form (spec §2.6).
    """
    pure = bool(fields.get("pure_wave_attention", False))
    return WaveGPTConfig(
        vocab_size=int(fields["vocab_size"]),
        dim=int(fields["d_model"]),
        num_layers=int(fields["num_layers"]),
        num_heads=int(fields["num_heads"]),
        num_waves=int(fields["num_waves"]),
        num_harmonics=int(fields["num_harmonics"]),
        max_len=int(fields["block_size"]),
        dropout=float(fields["dropout"]),
        attention="pure_wave" if pure else "interference",
        kernel=str(fields.get("pure_wave_kernel", "elu_plus_one")),
        wave_mode="quadratic",
        **overrides,
    )


def _flax_path(torch_name: str) -> list[str]:
    """``blocks.0.attn.q_proj.weight`` -> ``['blocks_0', 'attn', 'q_proj', 'kernel']``."""
    name = re.sub(r"^blocks\.(\d+)\.", r"blocks_\1.", torch_name)
    name = re.sub(r"^head\.(ln|proj)\.", r"head_\1.", name)
    parts = name.split(".")
    module, leaf = (parts[-2] if len(parts) > 1 else ""), parts[-1]
    if leaf == "weight":
        if module in _LAYER_NORMS:
            leaf = "scale"
        elif module in _EMBEDDINGS:
            leaf = "embedding"
        else:
            leaf = "kernel"
    return [*parts[:-1], leaf]


def params_from_state_dict(state_dict: Mapping[str, np.ndarray], dtype: Any = np.float32) -> Params:
    """torch-named arrays (without the ``param/`` prefix) -> the wavegpt params pytree."""
    params: Params = {}
    for name, value in state_dict.items():
        value = np.asarray(value)
        if name.endswith("harmonic_mults"):
            want = np.arange(1, value.shape[0] + 1, dtype=value.dtype)
            if not np.array_equal(value, want):
                raise ValueError(f"{name} = {value} differs from 1..{value.shape[0]}")
            continue
        path = _flax_path(name)
        if path[-1] == "kernel":
            value = value.T
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        if path[-1] in node:
            raise ValueError(f"two torch parameters map to {'/'.join(path)}")
        node[path[-1]] = value.astype(dtype)
    return params


def state_dict_of(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The ``param/<name>`` entries of a fixture as ``{name: array}``."""
    return {k[len("param/") :]: v for k, v in arrays.items() if k.startswith("param/")}


def drop_unused(config: WaveGPTConfig, params: Params) -> Params:
    """Remove parameters the original creates but the configured form never reads.

    The original's linear pure-wave mode keeps an ``interference_scale`` it does not use.
    """
    if not config.linear:
        return params
    out = {k: drop_unused(config, v) if isinstance(v, dict) else v for k, v in params.items()}
    out.pop("interference_scale", None)
    return out


def load_fixture_model(
    arrays: Mapping[str, np.ndarray], dtype: str = "float32"
) -> tuple[WaveGPTConfig, Params]:
    """A WaveGPT fixture (``config_json`` + ``param/*``) -> (config, params) in ``dtype``."""
    meta = json.loads(str(arrays["config_json"]))
    config = config_from_upstream(meta["kwargs"]["config"], dtype=dtype, param_dtype=dtype)
    return config, params_from_state_dict(state_dict_of(arrays), np.dtype(dtype))


# ------------------------------------------------------------------ classic baseline


def classic_config(fields: Mapping[str, Any], **overrides: Any) -> Any:
    """The benchmark's classic ``GPTConfig`` (attention, standard weights) ->
    ``TransformerConfig`` in the layout of the transformer preset ``classic``."""
    from qpf.models.transformer import TransformerConfig

    d = int(fields["d_model"])
    if (
        fields.get("layer_type", "attention") != "attention"
        or fields.get("weight_type", "standard") != "standard"
    ):
        raise ValueError("only the attention/standard SpectralGPT is the classic baseline")
    return TransformerConfig(
        vocab_size=int(fields["vocab_size"]),
        dim=d,
        num_layers=int(fields["num_layers"]),
        num_heads=int(fields["num_heads"]),
        mlp_ratio=int(fields["d_ff"]) // d,
        max_len=int(fields["block_size"]),
        positions="learned",
        tie_embeddings=False,
        norm="torch_layernorm",
        dropout=float(fields["dropout"]),
        use_bias=True,
        gelu_exact=True,
        init="torch",
        **overrides,
    )


def classic_params_from_state_dict(
    weights: Mapping[str, np.ndarray], num_heads: int, dtype: Any = np.float32
) -> Params:
    """SpectralGPT (``nn.MultiheadAttention`` blocks) state dict -> transformer params."""
    arr = {k: np.asarray(v).astype(dtype) for k, v in weights.items()}
    used: set[str] = set()

    def get(name: str) -> np.ndarray:
        used.add(name)
        return arr[name]

    d = arr["token_emb.weight"].shape[1]
    hd = d // num_heads

    def norm(prefix: str) -> Params:
        return {"scale": get(f"{prefix}.weight"), "bias": get(f"{prefix}.bias")}

    def dense(prefix: str) -> Params:
        return {"kernel": get(f"{prefix}.weight").T, "bias": get(f"{prefix}.bias")}

    params: Params = {
        "embed": {"embedding": get("token_emb.weight")},
        "pos_embed": get("pos_emb.weight"),
        "final_norm": norm("norm_f"),
        "lm_head": {"kernel": get("head.weight").T},
    }
    i = 0
    while f"blocks.{i}.norm1.weight" in arr:
        b = f"blocks.{i}"
        w_in = get(f"{b}.mixer.in_proj_weight")  # [3d, d]: q, k, v stacked, head-major
        params[f"blocks_{i}"] = {
            "attn_norm": norm(f"{b}.norm1"),
            "mlp_norm": norm(f"{b}.norm2"),
            "attn": {
                "qkv": {
                    "kernel": w_in.reshape(3, num_heads, hd, d).transpose(3, 0, 1, 2),
                    "bias": get(f"{b}.mixer.in_proj_bias").reshape(3, num_heads, hd),
                },
                "out": {
                    "kernel": get(f"{b}.mixer.out_proj.weight").T.reshape(num_heads, hd, d),
                    "bias": get(f"{b}.mixer.out_proj.bias"),
                },
            },
            "mlp": {"up": dense(f"{b}.mlp.0"), "down": dense(f"{b}.mlp.3")},
        }
        i += 1
    left = sorted(set(arr) - used)
    if left:
        raise ValueError(f"classic state-dict entries without a counterpart: {left}")
    return params


def load_classic_fixture(
    arrays: Mapping[str, np.ndarray], dtype: str = "float32"
) -> tuple[Any, Params]:
    """A classic-baseline fixture -> (TransformerConfig, params) in ``dtype``."""
    meta = json.loads(str(arrays["config_json"]))
    config = classic_config(meta["kwargs"]["config"], dtype=dtype, param_dtype=dtype)
    params = classic_params_from_state_dict(
        state_dict_of(arrays), config.num_heads, np.dtype(dtype)
    )
    return config, params
