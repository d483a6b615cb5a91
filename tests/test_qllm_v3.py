"""qllm_v3: configs and presets, sane-mode contract (causality, decode == forward, every
parameter gets gradient, no persistent state), faithful state threading, LIF and causal
softmax against numpy references, and the stop-gradient structure of local learning."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qpf.config import ConfigError
from qpf.generation import generate
from qpf.models.param_count import family_param_count
from qpf.models.qllm_v3 import (
    PRESETS,
    QLLM_V3_FAMILY,
    QLLMv3,
    QLLMv3Config,
    faithful_state,
    generate_faithful,
    init_state,
)
from qpf.ops import v3_ops as ops
from qpf.ops.sampling import SamplingConfig
from qpf.zoo import resolve_model

TRANSFORMER = {"tiny": 13191552, "small": 63493120, "tiny-byte": 689664, "small-byte": 12377600}


def small_config(**kw) -> QLLMv3Config:
    return PRESETS["test"].model.replace(**kw)


@functools.cache
def compiled(config: QLLMv3Config):
    model = QLLMv3(config)
    apply = jax.jit(lambda p, x, s: model.apply({"params": p}, x, s))
    return model, apply


@functools.cache
def sane_params(seed: int = 1):
    """One init shared by every sane variant (spiking/threshold do not change the params)."""
    config = small_config()
    tokens = jnp.zeros((2, 13), jnp.int32)
    return jax.jit(QLLMv3(config).init)(jax.random.key(seed), tokens)


def built(config: QLLMv3Config, batch: int = 2, t: int = 13, seed: int = 0):
    model, apply = compiled(config)
    tokens = jax.random.randint(jax.random.key(seed), (batch, t), 0, config.vocab_size)
    return model, sane_params(), tokens, apply


def full_count(config: QLLMv3Config) -> int:
    """Params plus the persistent state the original keeps as nn.Parameters."""
    init = lambda k: QLLMv3(config).init(k, jnp.zeros((1, 8), jnp.int32))  # noqa: E731
    shapes = jax.eval_shape(init, jax.random.key(0))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))
    state = shapes.get("state", {})
    return n + sum(int(np.prod(x.shape)) for k, x in state.items() if not k.endswith("_delta"))


def test_faithful_presets_match_original_parameter_counts():
    # spec B3: train_brain_llm defaults and simple_train defaults (state tensors included).
    assert full_count(PRESETS["original"].model) == 16_420_584
    assert full_count(PRESETS["original-simple"].model) == 3_342_923


@pytest.mark.parametrize("name", sorted(TRANSFORMER))
def test_sane_presets_match_transformer_sizes(name):
    family, preset = resolve_model(f"qllm_v3:{name}")
    assert family is QLLM_V3_FAMILY
    assert preset.model.mode == "sane"
    n = family_param_count(family, preset.model)
    assert abs(n / TRANSFORMER[name] - 1) < 0.04, (name, n)


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"mode": "quantum"}, "mode"),
        ({"mode": "faithful", "spiking": "lif"}, "spiking"),
        ({"spiking": "global"}, "spiking"),
        ({"spike_decay": 1.0}, "spike_decay"),
        ({"dim": 0}, "dim"),
        ({"max_dim": 2}, "max_dim"),
    ],
)
def test_bad_config_values_name_the_field(kw, field):
    with pytest.raises(ConfigError, match=field):
        QLLMv3Config(**kw)


@pytest.mark.parametrize("spiking", ["lif", "off"])
def test_sane_logits_at_t_ignore_later_tokens(spiking):
    config = small_config(spiking=spiking)
    _, variables, tokens, apply = built(config)
    base = apply(variables["params"], tokens, None).logits
    for t in (0, 5, 11):
        changed = tokens.at[:, t + 1 :].set((tokens[:, t + 1 :] + 7) % config.vocab_size)
        out = apply(variables["params"], changed, None).logits
        np.testing.assert_allclose(out[:, : t + 1], base[:, : t + 1], rtol=1e-5, atol=1e-6)
        assert not np.allclose(out[:, t + 1 :], base[:, t + 1 :])


def test_sane_batch_rows_are_independent():
    _, variables, tokens, apply = built(small_config())
    base = apply(variables["params"], tokens, None).logits
    other = tokens.at[1].set((tokens[1] + 3) % 61)
    np.testing.assert_allclose(
        apply(variables["params"], other, None).logits[0], base[0], atol=1e-6
    )


@pytest.mark.parametrize(("spiking", "cuts"), [("lif", tuple(range(14))), ("off", (0, 4, 5, 13))])
def test_sane_decode_in_pieces_equals_one_pass(spiking, cuts):
    config = small_config(spiking=spiking)
    _, variables, tokens, apply = built(config, seed=3)
    full = apply(variables["params"], tokens, None)
    state, pieces = init_state(config, 2, 64), []
    for a, b in itertools.pairwise(cuts):
        out = apply(variables["params"], tokens[:, a:b], state)
        state, pieces = out.state, [*pieces, out.logits]
    np.testing.assert_allclose(jnp.concatenate(pieces, 1), full.logits, rtol=1e-4, atol=1e-5)
    for key in ("lse", "v", "hist"):
        np.testing.assert_allclose(state[key], full.state[key], rtol=1e-5, atol=1e-6)
    assert int(state["pos"]) == 13


def test_sane_has_no_persistent_state_and_is_a_function_of_the_input():
    _, variables, tokens, apply = built(small_config())
    assert set(variables) == {"params"}
    a = apply(variables["params"], tokens, None).logits
    apply(variables["params"], (tokens + 1) % 61, None)
    np.testing.assert_array_equal(apply(variables["params"], tokens, None).logits, a)


def test_sane_every_parameter_receives_gradient():
    # spiking 'off' has the same parameters and one path fewer; the low threshold makes
    # the LIF spike so the surrogate path is exercised.
    config = small_config(spike_threshold=0.3)
    model, variables, tokens, _ = built(config, batch=3)

    def loss(p):
        logits = model.apply({"params": p}, tokens).logits
        return ops.cross_entropy(logits[:, :-1], tokens[:, 1:])

    grads = jax.jit(jax.grad(loss))(variables["params"])
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    dead = [jax.tree_util.keystr(p) for p, g in flat if not np.any(np.asarray(g) != 0)]
    assert not dead, f"parameters with zero gradient: {dead}"
    assert all(np.all(np.isfinite(np.asarray(g))) for _, g in flat)
    # Embedding rows: exactly the rows of tokens in the batch get gradient.
    seen = np.zeros(config.vocab_size, bool)
    seen[np.asarray(tokens[:, :-1]).ravel()] = True  # the last inputs score nothing
    rows = np.any(np.asarray(grads["token_embedding"]) != 0, -1)
    np.testing.assert_array_equal(rows, seen)


def test_bfloat16_forward_is_close_to_float32():
    config = small_config()
    _, variables, tokens, apply = built(config)
    f32 = apply(variables["params"], tokens, None).logits
    bf = jax.jit(QLLMv3(config.replace(dtype="bfloat16")).apply)(variables, tokens)
    assert bf.logits.dtype == jnp.bfloat16
    assert bf.state["v"].dtype == jnp.float32
    # Bounded relative to the logits (measured: max 0.05 of the spread, mean 0.01 of the
    # std); an absolute tolerance flips on one element when XLA reorders a reduction.
    f32 = np.asarray(f32)
    diff = np.abs(np.asarray(bf.logits, np.float32) - f32)
    spread = f32.max() - f32.min()
    assert diff.max() <= 0.1 * spread, (diff.max(), spread)
    assert diff.mean() <= 0.03 * f32.std(), (diff.mean(), f32.std())


def test_faithful_state_threads_through_the_contract_like_the_collection():
    """Two eval calls through the 'state' collection == two calls through the decoding
    state (as generation makes them); the persistent state changes the second call."""
    config = small_config(mode="faithful", spike_threshold=0.05)
    model = QLLMv3(config)
    tokens = jax.random.randint(jax.random.key(5), (2, 11), 0, config.vocab_size)
    variables = jax.jit(model.init)(jax.random.key(6), tokens)
    assert set(variables["state"]) >= {"membrane_potential", "spike_history", "usage_count"}
    mut = jax.jit(lambda v, x: model.apply(v, x, mutable=["state"]))
    out1, upd = mut(variables, tokens)
    out2, _ = mut({"params": variables["params"], **upd}, tokens)
    assert not np.allclose(out1.logits, out2.logits)  # state mutates in eval (upstream)
    contract = jax.jit(lambda p, x, s: model.apply({"params": p}, x, s))
    c1 = contract(variables["params"], tokens, faithful_state(variables))
    c2 = contract(variables["params"], tokens, c1.state)
    np.testing.assert_allclose(c1.logits, out1.logits, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(c2.logits, out2.logits, rtol=1e-6, atol=1e-6)
    for key, value in upd["state"].items():
        np.testing.assert_allclose(c1.state["persistent"][key], value, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="persistent state"):  # no state given at all
        model.apply({"params": variables["params"]}, tokens)


def _numpy_lif(s, v, h, decay, thr, refr):
    outs = []
    for t in range(s.shape[1]):
        v = decay * v + s[:, t]
        z = (v > thr).astype(float)
        v = v * (1 - z)
        h = decay * h + z
        outs.append(s[:, t] * (1 - (h > refr)))
    return np.stack(outs, 1), v, h


def test_lif_scan_matches_numpy_and_uses_the_surrogate_gradient():
    s = jax.random.normal(jax.random.key(0), (2, 17, 5)) * 0.8
    v0 = jax.random.normal(jax.random.key(1), (2, 5)) * 0.1
    h0 = jnp.zeros((2, 5))
    kw = {"decay": 0.9, "threshold": 1.0, "refractory": 0.1, "slope": 10.0}
    out, v, h = ops.lif_scan(s, v0, h0, **kw)
    ref = _numpy_lif(np.asarray(s, np.float64), np.asarray(v0), np.asarray(h0), 0.9, 1.0, 0.1)
    for got, want in zip((out, v, h), ref, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert 0 < float(jnp.mean(out == 0)) < 1  # some features were silenced
    x = jnp.array([-0.5, 0.0, 0.2])
    g = jax.grad(lambda x: jnp.sum(ops.spike_fn(x, 10.0)))(x)
    np.testing.assert_allclose(g, 1 / (1 + 10 * np.abs(np.asarray(x))) ** 2, rtol=1e-6)


def test_causal_softmax_over_time_matches_numpy_and_continues_in_chunks():
    c = jax.random.normal(jax.random.key(2), (2, 9, 3)) * 3
    lse0 = jnp.full((2, 3), -jnp.inf)
    w, lse = ops.causal_softmax_over_time(c, lse0)
    cn = np.asarray(c, np.float64)
    ref = np.stack([np.exp(cn[:, t]) / np.exp(cn[:, : t + 1]).sum(1) for t in range(9)], 1)
    np.testing.assert_allclose(w, ref, rtol=1e-5)
    w1, l1 = ops.causal_softmax_over_time(c[:, :4], lse0)
    w2, l2 = ops.causal_softmax_over_time(c[:, 4:], l1)
    np.testing.assert_allclose(jnp.concatenate([w1, w2], 1), w, rtol=1e-5)
    np.testing.assert_allclose(l2, lse, rtol=1e-6)


def test_local_learning_cuts_gradients_between_layers():
    """Under local_learning the gradient of layer 0's parameters from the sum of per-layer
    losses equals the gradient of layer 0's own loss: nothing flows back from layer 1."""
    config = small_config()
    model, variables, tokens, _ = built(config)

    def layer_losses(p):
        out = model.apply({"params": p}, tokens, local_learning=True)
        ll = out.intermediates["layer_logits"]
        return [ops.cross_entropy(ll[i][:, :-1], tokens[:, 1:]) for i in range(ll.shape[0])]

    def backprop(p):
        return ops.cross_entropy(model.apply({"params": p}, tokens).logits[:, :-1], tokens[:, 1:])

    grads = jax.jit(
        lambda p: (
            jax.grad(lambda q: sum(layer_losses(q)))(p),
            jax.grad(lambda q: layer_losses(q)[0])(p),
            jax.grad(lambda q: layer_losses(q)[-1])(p),
            jax.grad(backprop)(p),
        )
    )
    total, own, last, cross = grads(variables["params"])
    for name in ("spiking_neurons_0", "developmental_plasticity_0", "consciousness"):
        for a, b in zip(jax.tree.leaves(total[name]), jax.tree.leaves(own[name]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert not any(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(last["spiking_neurons_0"]))
    # ...while with backprop the final loss reaches layer 0.
    assert all(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(cross["spiking_neurons_0"]))


def test_sane_greedy_generation_matches_full_forward_argmax():
    config = small_config()
    model, variables, tokens, apply = built(config)
    res = generate(
        model,
        variables,
        tokens[:, :5],
        jax.random.key(0),
        max_new_tokens=4,
        config=SamplingConfig(temperature=0.0),
    )
    seq = jnp.concatenate([tokens[:, :5], res.tokens], 1)
    full = apply(variables["params"], seq, None).logits
    np.testing.assert_array_equal(res.tokens, jnp.argmax(full[:, 4:-1], -1))


def test_faithful_generation_threads_the_persistent_state():
    config = small_config(mode="faithful", spike_threshold=0.05)
    model = QLLMv3(config)
    prompt = jax.random.randint(jax.random.key(9), (2, 6), 0, config.vocab_size)
    variables = jax.jit(model.init)(jax.random.key(10), prompt)
    toks, persistent = generate_faithful(
        model, variables, prompt, jax.random.key(0), max_new_tokens=3, temperature=0.0
    )
    mut = jax.jit(lambda v, x: model.apply(v, x, mutable=["state"]))
    v, x, want = variables, prompt, []
    for _ in range(3):  # the same calls through the 'state' collection
        out, upd = mut(v, x)
        x = jnp.argmax(out.logits[:, -1], -1)[:, None]
        v = {"params": variables["params"], **upd}
        want.append(x[:, 0])
    np.testing.assert_array_equal(toks, jnp.stack(want, 1))
    _, upd = mut(v, x)  # the last token is fed too
    for k, value in upd["state"].items():
        np.testing.assert_allclose(persistent[k], value, rtol=1e-6, atol=1e-7)
