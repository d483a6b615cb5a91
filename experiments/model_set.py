"""Shared by the side-by-side experiments: the ``--models`` list and scoped ``--set`` overrides.

``--set`` takes ``[SCOPE:]SECTION.FIELD=VALUE``. Without a scope the override applies to
every model of ``--models``; ``SCOPE`` is a family name (``qpf``, ``transformer``,
``diagrnn``) or a whole model spec (``transformer:tiny``) and limits it to those models::

    --set model.dim=16                    # every model
    --set qpf:model.backbone.num_layers=1 # qpf models only
    --set transformer:tiny:model.num_heads=2

SECTION.FIELD is the ``RunConfig.with_overrides`` syntax (``model.dim``, ``optim.lr``,
``loss.coherence``, ...). A scope that matches none of the models, or a field a model does
not have, is an error rather than silently ignored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from qpf.config import ConfigError
from qpf.models.family import ModelFamily, Preset
from qpf.zoo import resolve_model


@dataclasses.dataclass(frozen=True)
class ScopedOverride:
    """One ``--set``: ``scope`` is '' (all models), a family name or a model spec."""

    scope: str
    key: str
    value: str

    def applies_to(self, spec: str) -> bool:
        family = spec.rpartition(":")[0] or "qpf"
        return self.scope in ("", family, spec)


def parse_models(text: str) -> list[tuple[str, ModelFamily, Preset]]:
    """``'qpf:tiny,transformer:tiny'`` -> [(spec, family, preset)]; bad names raise ConfigError."""
    specs = [s.strip() for s in text.split(",") if s.strip()]
    if not specs:
        raise ConfigError("--models: give at least one FAMILY:PRESET")
    if len(set(specs)) != len(specs):
        raise ConfigError(f"--models {text!r}: a model is listed twice")
    return [(spec, *resolve_model(spec)) for spec in specs]


def parse_overrides(pairs: Sequence[str], specs: Sequence[str]) -> list[ScopedOverride]:
    """Parse ``[SCOPE:]SECTION.FIELD=VALUE`` strings; every scope must match some model."""
    out = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        scope, _, field = key.strip().rpartition(":")
        if not sep or not field:
            raise ConfigError(f"--set {pair!r}: expected [SCOPE:]SECTION.FIELD=VALUE")
        item = ScopedOverride(scope, field, value.strip())
        if not any(item.applies_to(spec) for spec in specs):
            raise ConfigError(
                f"--set {pair!r}: scope {scope!r} matches none of the models {', '.join(specs)}"
            )
        out.append(item)
    return out


def overrides_for(spec: str, overrides: Sequence[ScopedOverride]) -> dict[str, str]:
    """The ``SECTION.FIELD -> VALUE`` overrides that apply to ``spec`` (later ones win)."""
    return {o.key: o.value for o in overrides if o.applies_to(spec)}
