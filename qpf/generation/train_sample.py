"""The short text sample printed at each evaluation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from qpf.generation import generate
from qpf.ops.sampling import SamplingConfig


def make_sample_fn() -> Callable[[Any, Any], str]:
    """``fn(trainer, params) -> text``: continue the configured prompt (or EOS) for a few
    tokens with temperature sampling, through the same decoding path as generation."""

    def sample(trainer: Any, params: Any) -> str:
        cfg = trainer.config.train
        tok = trainer.tokenizer
        prompt = tok.encode(cfg.sample_prompt) if cfg.sample_prompt else [tok.eos_id]
        tokens = jnp.asarray([prompt], jnp.int32)
        out = generate(
            trainer.module,
            {"params": params},
            tokens,
            jax.random.key(cfg.seed),
            max_new_tokens=cfg.sample_tokens,
            config=SamplingConfig(temperature=cfg.sample_temperature, top_k=40),
            eos_id=tok.eos_id,
            pad_id=tok.pad_id,
        )
        n = int(out.lengths[0])
        new = [int(t) for t in jax.device_get(out.tokens)[0, :n]]
        return (cfg.sample_prompt or "") + tok.decode(new)

    return sample
