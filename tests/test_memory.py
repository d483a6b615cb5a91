"""Global phase-associative memory and episodic memory."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import parity
import pytest
from conftest import load_fixture

from qpf import config as cfgs
from qpf.layers.memory import EpisodicMemory, PhaseAssociativeMemory
from qpf.models import torch_weights as tw
from qpf.ops import phase2d as p2d


@pytest.mark.parametrize("chunk", [2048, 16])
def test_parity_memory_read_fixture(chunk):
    z = load_fixture("memory_read.npz")
    sd = tw.StateDict(tw.state_dict_from_npz(z))
    params = tw.memory(sd, "")
    sd.check_all_used()
    mem = PhaseAssociativeMemory(
        cfg=cfgs.MemoryConfig(num_slots=100, top_k=32, key_chunk_size=chunk)
    )
    x = p2d.from_torch_layout(jnp.asarray(z["input"]))
    with parity.float32_matmuls():
        out, read = mem.apply({"params": params}, x)
    out = p2d.to_torch_layout(out)
    failures = parity.topk(
        "topk", read["indices"], z["topk_indices"], read["weights"], z["topk_weights"], 1e-4, 1e-6
    )
    failures += parity.close("output", out, z["output"], 1e-4, 1e-5)
    # The original's dense debugging path computes the same values.
    failures += parity.close("output_dense_path", out, z["output_dense_path"], 1e-4, 1e-5)
    parity.report(failures)


def episodic_reference(s: np.ndarray, wq, wk, wv, window: int, regime: str) -> np.ndarray:
    """The original's episodic rules in numpy on the concat layout [B, T, 2d]."""
    x = s.reshape(*s.shape[:2], -1).astype(np.float64)
    q, k, v = x @ wq, x @ wk, x @ wv
    t, d2 = x.shape[1], x.shape[2]
    out = np.zeros_like(x)
    for i in range(t):
        if regime == "original" and t <= 2 * window:
            keys = list(range(i + 1))  # causal SDPA including self
        elif regime == "sliding":
            keys = list(range(max(0, i - window), i))
        else:  # chunked (the original's long path)
            keys = list(range(max(0, (i // window - 1) * window), i))
        if keys:
            sc = np.einsum("bd,bkd->bk", q[:, i], k[:, keys]) / np.sqrt(d2)
            w = np.exp(sc - sc.max(-1, keepdims=True))
            out[:, i] = np.einsum("bk,bkd->bd", w / w.sum(-1, keepdims=True), v[:, keys])
    out[:, 0] = 0.0
    return out.reshape(s.shape)


@pytest.mark.parametrize(
    ("regime", "t"),
    [
        ("original", 7),
        ("original", 8),
        ("original", 19),
        ("chunked", 19),
        ("sliding", 19),
        ("chunked", 3),
    ],
)
def test_episodic_regimes_match_the_reference(regime, t):
    window = 4
    mem = EpisodicMemory(cfg=cfgs.EpisodicConfig(window=window, regime=regime))
    s = jax.random.normal(jax.random.key(0), (2, t, 2, 5))
    params = mem.init(jax.random.key(1), s, None, 0)["params"]
    out, _ = mem.apply({"params": params}, s, None, 0)
    w = [np.asarray(params[f"{n}_proj"]["kernel"]) for n in ("query", "key", "value")]
    np.testing.assert_allclose(
        out, episodic_reference(np.asarray(s), *w, window, regime), rtol=1e-5, atol=1e-6
    )


def test_original_regime_refuses_to_stream():
    mem = EpisodicMemory(cfg=cfgs.EpisodicConfig(window=4, regime="original"))
    s = jnp.ones((1, 3, 2, 5))
    params = mem.init(jax.random.key(1), s, None, 0)["params"]
    state = EpisodicMemory.init_state(mem.cfg, 1, 5, jnp.float32)
    with pytest.raises(ValueError, match="cannot be streamed"):
        mem.apply({"params": params}, s, state, 0)
