"""Tiny model settings shared by several test modules (small prime-ish sizes: compile time
dominates on CPU, so every test that only needs *a* model uses these)."""

from __future__ import annotations

from qpf import config as cfgs

# One tiny config of every bank type, in the order of the original's bank list.
ALL_BANKS = (
    cfgs.SemanticBankConfig(num_concepts=5, num_layers=1),
    cfgs.ContextBankConfig(window_size=3, num_layers=1),
    cfgs.LanguageBankConfig(num_languages=3, num_layers=1),
    cfgs.EmotionBankConfig(num_emotions=3),
    cfgs.MorphologyBankConfig(num_patterns=5, num_layers=1),
    cfgs.OrthographyBankConfig(num_shape_patterns=5, num_script_classes=3, num_layers=1),
)

# The comparison/benchmark CLIs' model list and scoped overrides that make each family tiny.
CLI_MODELS = "qpf:tiny,transformer:tiny,diagrnn:tiny"
CLI_TINY_OVERRIDES = [
    "qpf:model.dim=8",
    "qpf:model.backbone.state_dim=8",
    "qpf:model.backbone.num_layers=1",
    "qpf:model.memory.num_slots=7",
    "qpf:model.memory.top_k=3",
    "qpf:model.episodic.window=8",
    "transformer:model.dim=16",
    "transformer:model.num_layers=1",
    "transformer:model.num_heads=2",
    "diagrnn:model.dim=16",
    "diagrnn:model.num_layers=1",
]


def deterministic_qpf(
    vocab_size: int,
    *,
    concepts: int,
    state_dim: int,
    num_layers: int,
    memory: cfgs.MemoryConfig | None = None,
    episodic: cfgs.EpisodicConfig | None = None,
) -> cfgs.ModelConfig:
    """A tiny token-input qpf config with every dropout off (one semantic bank), for tests
    that compare a model's training or loss paths exactly."""
    return cfgs.ModelConfig(
        vocab_size=vocab_size,
        dim=6,
        banks=(cfgs.SemanticBankConfig(num_concepts=concepts, dropout=0.0),),
        backbone=cfgs.BackboneConfig(state_dim=state_dim, num_layers=num_layers, dropout=0.0),
        coupler=cfgs.CouplerConfig(dropout=0.0),
        memory=memory,
        episodic=episodic,
    )
