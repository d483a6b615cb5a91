"""Fused LM head + CE against the plain path (values, gradients, ignored targets, dtypes),
the ``return_features`` model contract and its automatic fallback."""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from tiny_configs import deterministic_qpf

from qpf import config as cfgs
from qpf.models.contract import ModelOutput
from qpf.models.diagrnn import DiagRNN, DiagRNNConfig
from qpf.models.family import accepts_return_features, apply_for_features
from qpf.models.phase_field import QPFModel
from qpf.models.transformer import Transformer, TransformerConfig
from qpf.ops import losses
from qpf.training.objectives import LossConfig, objective_terms

N, F, V = (3, 23), 13, 61


def _inputs(seed: int = 0, dtype=jnp.float32):
    k = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(k[0], (*N, F), dtype)
    w = (0.4 * jax.random.normal(k[1], (F, V))).astype(dtype)
    t = jax.random.randint(k[2], N, 0, V)
    m = jax.random.bernoulli(k[3], 0.7, N)
    # Ignored positions carry out-of-range ids (padding), which must not matter.
    t = jnp.where(m, t, -1)
    return x, w, t, m


def _value_and_grads(fn, x, w, t, m):
    return jax.jit(jax.value_and_grad(lambda x, w: fn(x, w, t, m)[0], (0, 1)))(x, w)


def _plain(x, w, t, m):
    # The reference with valid ids at ignored positions (the plain gather needs them).
    return losses.head_cross_entropy_reference(x, w, jnp.where(m, t, 0), m)


@pytest.mark.parametrize("chunk", [1, 7, 23, 1000, None])
def test_fused_matches_plain_values_and_gradients(chunk):
    x, w, t, m = _inputs()
    fused = lambda *a: losses.head_cross_entropy(*a, chunk_size=chunk)  # noqa: E731
    (v1, (gx1, gw1)) = _value_and_grads(fused, x, w, t, m)
    (v0, (gx0, gw0)) = _value_and_grads(_plain, x, w, t, m)
    np.testing.assert_allclose(v1, v0, rtol=1e-5)
    np.testing.assert_allclose(gx1, gx0, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gw1, gw0, rtol=1e-4, atol=1e-6)
    # Ignored positions get no gradient and do not count.
    assert np.all(np.asarray(gx1)[~np.asarray(m)] == 0)
    assert float(losses.head_cross_entropy(x, w, t, m)[1]) == float(m.sum())


def test_auto_head_chunk_holds_about_4m_logits_in_multiples_of_8():
    assert losses.auto_head_chunk(50257) == 80  # 4,194,304 // 50257 = 83
    assert losses.auto_head_chunk(259) == losses.HEAD_CHUNK_MAX
    assert losses.auto_head_chunk(10**7) == 8
    assert losses.auto_head_chunk(50257) * 50257 <= losses.HEAD_CHUNK_LOGITS


def test_bfloat16_head_dtype_rounds_operands_only():
    """``LossConfig.head_dtype='bfloat16'`` on float32 features: the CE equals a float64
    numpy CE of the bf16-rounded operands (so only the operands are rounded: accumulation,
    logsumexp and the gradients stay float32), on both CE paths, and differs from float32."""
    x, w, t, m = _inputs(3)
    tokens = jnp.zeros((N[0], N[1] + 1), jnp.int32).at[:, 1:].set(jnp.where(m, t, 0))
    mask = jnp.ones(tokens.shape, bool).at[:, 1:].set(m)
    feats = jnp.concatenate([x, jnp.zeros((N[0], 1, F))], axis=1)
    out = ModelOutput(None, None, jnp.zeros(()), {}, features=feats, head_weight=w)
    r = lambda a: np.asarray(a.astype(jnp.bfloat16), np.float64)  # noqa: E731
    logits = r(x) @ r(w)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    tgt = np.take_along_axis(logits, np.asarray(jnp.where(m, t, 0))[..., None], -1)[..., 0]
    want = ((lse - tgt) * np.asarray(m)).sum() / np.asarray(m).sum()
    f32 = objective_terms(out, tokens, mask, LossConfig())["ce"]
    for impl in ("fused", "plain"):
        cfg = LossConfig(ce_impl=impl, head_dtype="bfloat16", head_chunk=7)
        got = jax.jit(lambda o, c=cfg: objective_terms(o, tokens, mask, c)["ce"])(out)
        np.testing.assert_allclose(got, want, rtol=2e-6, err_msg=impl)
        assert abs(float(got) - float(f32)) > 1e-4  # the rounding is real
        grad = jax.grad(
            lambda f, c=cfg: objective_terms(out.replace(features=f), tokens, mask, c)["ce"]
        )(feats)
        assert grad.dtype == jnp.float32
    with pytest.raises(cfgs.ConfigError, match=r"LossConfig\.head_dtype = 'fp8'.*bfloat16"):
        LossConfig(head_dtype="fp8")


def test_fused_without_differentiation_and_all_ignored():
    x, w, t, m = _inputs(1)
    total, count = jax.jit(losses.head_cross_entropy)(x, w, t, m)
    np.testing.assert_allclose(total, _plain(x, w, t, m)[0], rtol=1e-5)
    none = jnp.zeros_like(m)
    total, count = losses.head_cross_entropy(x, w, t, none)
    assert float(total) == 0.0
    assert float(count) == 0.0
    grads = jax.grad(lambda x, w: losses.head_cross_entropy(x, w, t, none)[0], (0, 1))(x, w)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in grads)


def test_fused_float64_is_exact(x64):
    x, w, t, m = (a.astype(jnp.float64) if a.dtype == jnp.float32 else a for a in _inputs(2))
    (v1, g1) = _value_and_grads(losses.head_cross_entropy, x, w, t, m)
    (v0, g0) = _value_and_grads(_plain, x, w, t, m)
    assert v1.dtype == jnp.float64
    np.testing.assert_allclose(v1, v0, rtol=1e-12)
    for a, b in zip(g1, g0):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


def test_fused_bfloat16_accumulates_in_float32():
    x, w, t, m = _inputs(3)
    xb = x.astype(jnp.bfloat16)  # bf16 activations, float32 master weight
    fused = lambda x, w, t, m: losses.head_cross_entropy(x, w, t, m, dtype=jnp.bfloat16)  # noqa: E731
    (v1, (gx1, gw1)) = _value_and_grads(fused, xb, w, t, m)
    assert v1.dtype == jnp.float32
    assert gx1.dtype == jnp.bfloat16
    assert gw1.dtype == jnp.float32
    # Against float32 math on the same bf16-rounded operands: only product rounding differs.
    wb = w.astype(jnp.bfloat16).astype(jnp.float32)
    (v0, (gx0, gw0)) = _value_and_grads(_plain, xb.astype(jnp.float32), wb, t, m)
    np.testing.assert_allclose(v1, v0, rtol=1e-3)
    np.testing.assert_allclose(np.asarray(gx1, np.float32), gx0, rtol=0.05, atol=2e-3)
    np.testing.assert_allclose(gw1, gw0, rtol=0.05, atol=2e-3)


def test_head_logits_equal_dense():
    x, w, _, _ = _inputs(4)
    dense = nn.Dense(V, use_bias=False, dtype=jnp.bfloat16)
    got = losses.head_logits(x, w, jnp.bfloat16)
    want = dense.apply({"params": {"kernel": w}}, x)
    assert got.dtype == want.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


# ------------------------------------------------------------------ model contract

QPF = deterministic_qpf(37, concepts=5, state_dim=6, num_layers=1)
FAMILIES = {
    "qpf": lambda: QPFModel(config=QPF),
    "transformer": lambda: Transformer(
        TransformerConfig(vocab_size=37, dim=12, num_layers=1, num_heads=2, dropout=0.0)
    ),
    "transformer-untied": lambda: Transformer(
        TransformerConfig(
            vocab_size=37, dim=12, num_layers=1, num_heads=2, dropout=0.0, tie_embeddings=False
        )
    ),
    "diagrnn": lambda: DiagRNN(
        DiagRNNConfig(vocab_size=37, dim=12, num_layers=1, state_dim=6, chunk_size=5, dropout=0.0)
    ),
}


def _tokens(seed=0):
    """Real text: UTF-8 bytes of a sentence folded into the test vocabulary, batch 2."""
    text = b"The quick brown fox jumps over the lazy dog; pack my box with five dozen jugs."
    ids = np.frombuffer(text, np.uint8).astype(np.int32) % 37
    return jnp.asarray(np.stack([ids[:29], ids[31:60]]))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_families_fused_loss_equals_plain_loss_and_gradients(name):
    module = FAMILIES[name]()
    tokens = _tokens()
    mask = jnp.ones(tokens.shape, bool).at[1, 20:].set(False)
    params = jax.jit(module.init)(jax.random.key(0), tokens)["params"]
    assert accepts_return_features(module)

    @partial(jax.jit, static_argnums=1)
    def ce_and_grad(params, impl: str):
        cfg = LossConfig(ce_impl=impl, head_chunk=11)

        def ce(p):
            out = apply_for_features(module, {"params": p}, tokens)
            return objective_terms(out, tokens, mask, cfg)["ce"]

        return jax.value_and_grad(ce)(params)

    fused, g_fused = ce_and_grad(params, "fused")
    plain, g_plain = ce_and_grad(params, "plain")
    # The ordinary logits path (no features) gives the same CE.
    out = jax.jit(module.apply)({"params": params}, tokens)
    assert out.features is None
    assert out.logits.shape == (*tokens.shape, 37)
    ref = objective_terms(out, tokens, mask, LossConfig())["ce"]
    np.testing.assert_allclose(fused, ref, rtol=1e-5)
    np.testing.assert_allclose(plain, ref, rtol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_fused), jax.tree.leaves(g_plain)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=str(path))
    # The features reproduce the logits through the head.
    feats = jax.jit(lambda p: apply_for_features(module, {"params": p}, tokens))(params)
    assert feats.logits is None
    np.testing.assert_allclose(
        losses.head_logits(feats.features, feats.head_weight), out.logits, rtol=1e-5, atol=1e-6
    )


class _LogitsOnly(nn.Module):
    """A family written against the plain contract (no ``return_features``)."""

    vocab_size: int = 11

    @nn.compact
    def __call__(self, inputs, state=None, *, deterministic=True):
        logits = nn.Dense(self.vocab_size)(nn.Embed(self.vocab_size, 4)(inputs))
        return ModelOutput(logits, None, jnp.zeros(()), {})


def test_families_without_features_fall_back_to_logits():
    module = _LogitsOnly()
    tokens = jnp.arange(14).reshape(2, 7) % 11
    params = module.init(jax.random.key(0), tokens)
    assert not accepts_return_features(module)
    out = apply_for_features(module, params, tokens)
    assert out.features is None
    assert out.logits.shape == (2, 7, 11)
    terms = objective_terms(out, tokens, jnp.ones((2, 7), bool), LossConfig())
    want = losses.next_token_ce(out.logits, tokens)[0]
    np.testing.assert_allclose(terms["ce"], want, rtol=1e-6)


def test_loss_config_validates_ce_impl_and_chunk():
    with pytest.raises(cfgs.ConfigError, match=r"LossConfig\.ce_impl = .* allowed"):
        LossConfig(ce_impl="fast")
    with pytest.raises(cfgs.ConfigError, match=r"LossConfig\.head_chunk = .* allowed"):
        LossConfig(head_chunk=0)
    assert LossConfig(head_chunk=None).head_chunk is None  # null: auto_head_chunk
    assert dataclasses.replace(LossConfig(), ce_impl="plain").ce_impl == "plain"
