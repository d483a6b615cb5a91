"""Model families: one registry entry per architecture, so trainer, sampler and CLIs are shared.

A family bundles a frozen config dataclass, a constructor for its Flax module, its decoding
state and its named presets. Every family's module follows the call contract of
``qpf.models.contract`` and returns its ``ModelOutput``.

Optional, for speed: a family whose ``__call__`` takes a keyword ``return_features`` (default
False) may, when it is True, return ``logits=None`` with ``out.features [B, T, F]`` (the LM
head's input) and ``out.head_weight [F, V]`` such that the logits are
``qpf.ops.losses.head_logits(features, head_weight)``. The training/evaluation loss then fuses
the head with the cross-entropy (``qpf.ops.losses.head_cross_entropy``: no ``[B, T, V]`` logits)
and generation computes only the positions it needs. A family without the keyword, or one
that still returns logits (features None, e.g. a non-linear head), gets the full-logits
path automatically: ``apply_for_features`` decides, so no family has to opt in.

Families are registered explicitly, by name, in ``qpf.zoo`` (which imports every family
module); look one up there: ``get_family(name)``, ``resolve_model('family:preset')``, or
``family_of(config)`` via the config's ``family_name``.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from flax import linen as nn

from qpf.config import ConfigError, NumericsConfig
from qpf.models.contract import State

# Properties every family has unless it declares an exemption (checked by tests/test_families.py):
# causal logits, gradient to every parameter and used table row, decoding in pieces equal to
# one pass, bfloat16 compute close to float32, exact resume of training, no future leak.
PROPERTIES = ("causal", "gradients", "decode", "bf16", "resume", "no_leak")


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named model configuration with its default batch size and learning rate."""

    name: str
    model: Any
    batch_size: int
    learning_rate: float

    @property
    def tokenizer(self) -> str:
        """Default tokenizer: 'byte' for byte-vocabulary presets (259, or 256 raw bytes as
        an original's preset records it; the trainer then fits the vocabulary to 259), else
        'gpt2'."""
        return "byte" if self.model.vocab_size in (256, 259) else "gpt2"


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """One architecture.

    config_cls: frozen config dataclass inheriting ``qpf.config.NumericsConfig`` (dtypes,
      matmul precision and ``replace``; ``qpf.config.to_dict/from_dict`` round-trip it);
      it has a ``vocab_size`` field, and a class attribute ``family_name`` equal to
      ``name``, by which a built model finds its family.
    build: config -> Flax module following the call contract above.
    init_state: (config, batch_size, max_len) -> zero decoding state at position 0;
      ``max_len`` bounds the positions a cache must hold (ignored by recurrent models).
    presets: name -> Preset. A preset named ``test`` (and ``test-*`` variants) is a tiny
      config the family-generic tests (``tests/test_families.py``) build and check.
    exempt: property -> reason, for each generic property (``PROPERTIES``) the family does
      not have by design (e.g. ``{"decode": "no incremental decoding"}``); the generic test
      of that property is then skipped with the reason. Nothing is exempt by default.
    expected_leak: config -> reason the model sees future tokens by design ("" when it is
      causal, the default). The generic leak test then asserts the leak is there.
    piece_alignment: config -> A; a call with a state must start at a position that is a
      multiple of A (1, the default: any split works). qpf's byte_patch mode has A = P,
      the patch size; ``qpf.generation`` keeps a partial patch's bytes pending for it.
    trainable: optional config -> (params -> bool pytree, True where the optimizer
      updates) or None when everything trains; frozen parameters get no optimizer state.
    segment_resets: config -> "" when the module's ``__call__`` takes ``segment_ids``
      (int ``[B, T]``, document index inside the window; ``None`` = one document) and resets
      every recurrence, memory and attention at a change of id, so a document packed after
      another gets the logits it would get alone; otherwise the reason it does not (a
      component not wired, or the whole family). ``check_segment_resets`` turns a reason
      into a ``ConfigError``. No family resets unless it declares it.
    """

    name: str
    config_cls: type
    build: Callable[[Any], nn.Module]
    init_state: Callable[[Any, int, int], State]
    presets: Mapping[str, Preset]
    exempt: Mapping[str, str] = dataclasses.field(default_factory=dict)
    expected_leak: Callable[[Any], str] = lambda config: ""
    piece_alignment: Callable[[Any], int] = lambda config: 1

    trainable: Callable[[Any], Callable[[Any], Any] | None] | None = None
    segment_resets: Callable[[Any], str] = lambda config: "it does not implement document resets"

    def __post_init__(self) -> None:
        if not (isinstance(self.config_cls, type) and issubclass(self.config_cls, NumericsConfig)):
            raise ConfigError(
                f"ModelFamily {self.name!r}: config_cls {self.config_cls!r} does not inherit "
                "qpf.config.NumericsConfig; declare it as `@dataclasses.dataclass(frozen=True) "
                "class ...Config(NumericsConfig)` (no own dtype/param_dtype/matmul_precision "
                "fields) and call `super().__post_init__()` first in its __post_init__"
            )
        declared = getattr(self.config_cls, "family_name", None)
        if declared != self.name:
            raise ConfigError(
                f"ModelFamily {self.name!r}: {self.config_cls.__name__}.family_name is "
                f"{declared!r}; declare `family_name: ClassVar[str] = {self.name!r}` on the "
                "config class (a model finds its family by that name)"
            )
        for prop, reason in self.exempt.items():
            if prop not in PROPERTIES:
                raise ConfigError(
                    f"ModelFamily.exempt[{prop!r}] is invalid: allowed keys {', '.join(PROPERTIES)}"
                )
            if not isinstance(reason, str) or not reason.strip():
                raise ConfigError(f"ModelFamily.exempt[{prop!r}] needs a reason (a non-empty str)")

    def preset(self, name: str) -> Preset:
        if name not in self.presets:
            raise ConfigError(
                f"unknown {self.name} preset {name!r}; choose one of {', '.join(self.presets)}"
            )
        return self.presets[name]

    def test_presets(self) -> list[str]:
        """Names of the presets built for tests (``test``, ``test-*``), in order."""
        return [n for n in self.presets if n == "test" or n.startswith("test-")]


def presets_from_table(
    config_cls: type, table: Mapping[str, tuple[Mapping[str, Any], int, float]]
) -> dict[str, Preset]:
    """Presets from a table ``name -> (config field changes, batch size, learning rate)``:
    each preset's model is ``config_cls(**changes)`` (validated), in the table's order."""
    return {
        name: Preset(name=name, model=config_cls(**changes), batch_size=batch, learning_rate=lr)
        for name, (changes, batch, lr) in table.items()
    }


def check_segment_resets(family: ModelFamily, config: Any) -> None:
    """Raise ``ConfigError`` when ``family`` cannot reset at document starts for ``config``
    (``ModelFamily.segment_resets``); the message names the family and the fix."""
    reason = family.segment_resets(config)
    if reason:
        raise ConfigError(
            f"model family {family.name!r} does not support document segment ids "
            f"(data.segment_ids=true): {reason}. Turn data.segment_ids off "
            "(--set data.segment_ids=false) or use a family that resets at document starts"
        )


def accepts_return_features(module: nn.Module) -> bool:
    """Whether the module's ``__call__`` takes the ``return_features`` keyword."""
    return "return_features" in inspect.signature(type(module).__call__).parameters


def apply_for_features(module: nn.Module, variables: Any, inputs: Any, *args: Any, **kw: Any):
    """``module.apply`` asking for pre-head features when the family offers them.

    Returns the ``ModelOutput``: with ``features``/``head_weight`` set (logits None) for
    families that take ``return_features``, else the ordinary full-logits output.
    """
    if accepts_return_features(module):
        kw["return_features"] = True
    return module.apply(variables, inputs, *args, **kw)
