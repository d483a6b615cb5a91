"""Models: the v4 phase-field LM (and, registered beside it, baselines)."""

from qpf.models.qpf import ModelOutput, QPFModel, init_state

__all__ = ["ModelOutput", "QPFModel", "init_state"]
