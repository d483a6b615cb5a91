"""The short text sample printed at each evaluation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from qpf.generation import generate_tokens
from qpf.sampling import SamplingConfig


def make_sample_fn() -> Callable[[Any, Any], str]:
    """``fn(trainer, params) -> text``: continue the configured prompt (or EOS) for a few
    tokens with temperature sampling, through the same decoding path as generation."""

    def sample(trainer: Any, params: Any) -> str:
        cfg = trainer.run.train
        tok = trainer.tokenizer
        prompt = tok.encode(cfg.sample_prompt) if cfg.sample_prompt else [tok.eos_id]
        tokens = jnp.asarray([prompt], jnp.int32)
        out = generate_tokens(
            trainer.module,
            params,
            tokens,
            max_new_tokens=cfg.sample_tokens,
            sampling=SamplingConfig(temperature=cfg.sample_temperature, top_k=40),
            key=jax.random.key(cfg.seed),
        )
        new = [int(t) for t in jax.device_get(out)[0]]
        return (cfg.sample_prompt or "") + tok.decode(new)

    return sample
