"""Model families: one registry entry per architecture, so trainer, sampler and CLIs are shared.

A family bundles a frozen config dataclass, a constructor for its Flax module, its decoding
state and its named presets. Every family's module has the same call contract::

    out = module.apply(params, inputs [B, T] int, state=None | State, deterministic=True)
    out.logits  [B, T, V]   (logits[t] scores token t+1)
    out.state   the decoding state after the input (feed it back to continue)

and returns a ``qpf.models.qpf.ModelOutput`` (``phase_states`` and ``coupling_loss`` are
empty / zero for non-phase models, so the phase objectives contribute nothing).

Models are named ``family:preset`` (``qpf:tiny``, ``transformer:small``); a bare preset
name means the qpf family.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any

from flax import linen as nn

from qpf.config import ConfigError
from qpf.registry import Registry

State = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named model configuration with its default batch size and learning rate."""

    name: str
    model: Any
    batch_size: int
    learning_rate: float

    @property
    def tokenizer(self) -> str:
        """Default tokenizer: 'byte' for byte-vocabulary presets (259), else 'gpt2'."""
        return "byte" if self.model.vocab_size == 259 else "gpt2"


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """One architecture.

    config_cls: frozen config dataclass (``qpf.config.to_dict/from_dict`` round-trip it;
      it has a ``vocab_size`` field).
    build: config -> Flax module following the call contract above.
    init_state: (config, batch_size, max_len) -> zero decoding state at position 0;
      ``max_len`` bounds the positions a cache must hold (ignored by recurrent models).
    presets: name -> Preset.
    """

    name: str
    config_cls: type
    build: Callable[[Any], nn.Module]
    init_state: Callable[[Any, int, int], State]
    presets: Mapping[str, Preset]

    def preset(self, name: str) -> Preset:
        if name not in self.presets:
            raise ConfigError(
                f"unknown {self.name} preset {name!r}; choose one of {', '.join(self.presets)}"
            )
        return self.presets[name]


MODELS: Registry[ModelFamily] = Registry("model family")


def register_family(family: ModelFamily) -> ModelFamily:
    MODELS.register(family.name)(family)
    return family


def _ensure_registered() -> None:
    # Importing the modules registers their families (qpf first, then the baselines).
    for module in (
        "qpf.presets",
        "qpf.models.transformer",
        "qpf.models.diagrnn",
        "qpf.models.qllm_v2",
    ):
        importlib.import_module(module)


def get_family(name: str) -> ModelFamily:
    _ensure_registered()
    try:
        return MODELS.get(name)
    except KeyError as err:
        raise ConfigError(str(err.args[0])) from None


def resolve_model(spec: str) -> tuple[ModelFamily, Preset]:
    """``'family:preset'`` (or a bare qpf preset name) -> (family, preset)."""
    family_name, _, preset_name = spec.rpartition(":")
    family = get_family(family_name or "qpf")
    if not preset_name:
        raise ConfigError(f"model {spec!r}: give a preset, e.g. {family.name}:tiny")
    return family, family.preset(preset_name)
