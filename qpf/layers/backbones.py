"""The backbone registry: the temporal-mixer stacks of a phase-field model, by config ``type``.

Each entry is a Flax module built as ``Module(cfg=backbone_config, ...)`` with a static
``init_state(cfg, batch, dtype, dim)`` giving its zero decoding state.
"""

from __future__ import annotations

from qpf.layers.matrix_state import MatrixStateBackbone
from qpf.layers.ssm import OscillatorySSM
from qpf.registry import Registry

BACKBONES: Registry = Registry.of(
    "backbone", {"oscillatory_ssm": OscillatorySSM, "phase_matrix": MatrixStateBackbone}
)
