"""Models: the v4 phase-field LM (and, registered beside it, baselines)."""

from qpf.models.contract import ModelOutput
from qpf.models.phase_field import QPFModel, init_state

__all__ = ["ModelOutput", "QPFModel", "init_state"]
