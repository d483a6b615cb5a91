"""qpf: phase-field (complex-valued) language models in JAX/Flax.

Layout (data flows top-down): ``qpf.ops`` (pure math: Phase2D algebra, scans, attention,
retrieval) -> ``qpf.layers`` (Flax modules) -> ``qpf.models`` (full models) -> training,
sampling and data utilities -> ``experiments/`` (runnable modules).
"""

from qpf.config import ConfigError, ModelConfig

__all__ = ["ConfigError", "ModelConfig"]
__version__ = "0.1.0"
