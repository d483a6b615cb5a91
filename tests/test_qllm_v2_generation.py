"""qllm_v2 generation: UTF-8 byte round trip, the original's and the sane logit filters,
the batched "quantum-aware" bonus against one-candidate-at-a-time forwards."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qpf.generation import qllm_v2 as gen
from qpf.models.qllm_v2 import QLLMv2, QLLMv2Config


def test_utf8_bytes_round_trip() -> None:
    text = "Zoë's café — 量子 🙂"
    ids = gen.encode_bytes(text)
    assert all(0 <= i < 256 for i in ids)
    assert len(ids) == len(text.encode("utf-8")) > len(text)
    assert gen.decode_bytes([*ids, 256, 258]) == text


def test_repetition_penalties_original_raises_negative_sane_lowers() -> None:
    logits = jnp.array([2.0, -2.0, 0.5, -0.5])
    seen = jnp.array([True, True, False, False])
    kw = {"temperature": 1.0, "repetition": 2.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0}
    orig = gen.original_logit_filter(logits, seen, **kw)
    sane = gen.sane_logit_filter(logits, seen, **kw)
    np.testing.assert_allclose(orig, [1.0, -1.0, 0.5, -0.5])  # -2 raised to -1
    np.testing.assert_allclose(sane, [1.0, -4.0, 0.5, -0.5])


def test_top_k_top_p_min_p() -> None:
    logits = jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05]))
    none = jnp.zeros(4, bool)
    kept = lambda out: (np.asarray(out) > -1e29).tolist()  # noqa: E731
    base = {"temperature": 1.0, "repetition": 1.0}
    assert kept(gen.sane_logit_filter(logits, none, top_k=2, top_p=1.0, min_p=0.0, **base)) == [
        True,
        True,
        False,
        False,
    ]
    assert kept(gen.sane_logit_filter(logits, none, top_k=0, top_p=0.7, min_p=0.0, **base)) == [
        True,
        True,
        False,
        False,
    ]
    assert kept(gen.sane_logit_filter(logits, none, top_k=0, top_p=1.0, min_p=0.2, **base)) == [
        True,
        True,
        True,
        False,
    ]


@pytest.fixture(scope="module")
def small_model():
    cfg = QLLMv2Config(
        vocab_size=256,
        dim=8,
        num_layers=1,
        num_heads=1,
        phase_dim=4,
        concept_dim=8,
        concept_heads=2,
        num_concepts=5,
        max_seq_len=16,
        processor_max_dim=8,
        mode="faithful",
    )
    model = QLLMv2(cfg)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    return model, params


def test_faithful_bonus_equals_per_candidate_forwards(small_model) -> None:
    model, params = small_model
    seq = jnp.array([72, 105, 33, 10], jnp.int32)
    bonus = jax.jit(lambda p, s: gen.faithful_filter_bonus(model, p, s))(params, seq)
    phase = jax.jit(lambda p, x: model.apply(p, x, method=QLLMv2.phase_representation)[0])
    scores = []
    for v in (0, 65, 255):
        amp = phase(params, jnp.append(seq, v)[None])
        scores.append(float(jnp.mean(jnp.abs(amp[0, -3:]))))
    all_scores = np.log(np.asarray(bonus) / (0.5 - np.asarray(bonus)))  # logit of σ·0.5
    np.testing.assert_allclose(
        all_scores[[0, 65, 255]] - all_scores[0], np.array(scores) - scores[0], atol=1e-4
    )


def test_faithful_generate_returns_prompt_plus_bytes(small_model) -> None:
    model, params = small_model
    out = gen.faithful_generate(model, params, "ab", 3, jax.random.key(1), top_k=0)
    assert out.startswith("ab")
    assert 2 <= len(out.encode("utf-8", errors="replace")) <= 2 + 3 * 3
