"""The model zoo: every model family, registered explicitly by name.

Importing this module imports each family's module and builds the registry from the explicit
tuple ``FAMILIES`` below (no import side effects, no module-name strings). Models are named
``family:preset`` (``qpf:tiny``, ``transformer:small``); a bare preset name means the qpf
family. A built model finds its family by its config's ``family_name``.

To add a family: define its ``ModelFamily`` in its module (``qpf.models.<name>``) and list it
in ``FAMILIES``.
"""

from __future__ import annotations

from typing import Any

from qpf.config import ConfigError
from qpf.models.diagrnn import DIAGRNN_FAMILY
from qpf.models.family import ModelFamily, Preset
from qpf.models.lightwave import LIGHTWAVE_FAMILY
from qpf.models.qllm import QLLM_FAMILY
from qpf.models.qllm_v2 import QLLM_V2_FAMILY
from qpf.models.qllm_v3 import QLLM_V3_FAMILY
from qpf.models.transformer import TRANSFORMER_FAMILY
from qpf.models.wavegpt import WAVEGPT_FAMILY
from qpf.presets import QPF_FAMILY
from qpf.registry import Registry

# qpf first, then the baselines and the re-implemented originals.
FAMILIES: tuple[ModelFamily, ...] = (
    QPF_FAMILY,
    TRANSFORMER_FAMILY,
    DIAGRNN_FAMILY,
    LIGHTWAVE_FAMILY,
    WAVEGPT_FAMILY,
    QLLM_FAMILY,
    QLLM_V3_FAMILY,
    QLLM_V2_FAMILY,
)

MODELS: Registry[ModelFamily] = Registry.of("model family", {f.name: f for f in FAMILIES})


def family_names() -> tuple[str, ...]:
    """Names of every registered family, sorted."""
    return MODELS.names()


def get_family(name: str) -> ModelFamily:
    """The family registered as ``name``; a ``ConfigError`` listing the names otherwise."""
    try:
        return MODELS.get(name)
    except KeyError as err:
        raise ConfigError(str(err.args[0])) from None


def family_of(config: Any) -> ModelFamily:
    """The family of a model config, by the config class's ``family_name``."""
    name = getattr(config, "family_name", None)
    if name is None:
        raise ConfigError(
            f"{type(config).__name__} names no model family (no `family_name`); a model "
            f"config belongs to one of: {', '.join(MODELS.names())}"
        )
    return get_family(name)


def resolve_model(spec: str) -> tuple[ModelFamily, Preset]:
    """``'family:preset'`` (or a bare qpf preset name) -> (family, preset)."""
    family_name, _, preset_name = spec.rpartition(":")
    family = get_family(family_name or "qpf")
    if not preset_name:
        raise ConfigError(f"model {spec!r}: give a preset, e.g. {family.name}:tiny")
    return family, family.preset(preset_name)
