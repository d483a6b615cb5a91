"""Generation: exact incremental decoding, compiled decode loop, beam search, streaming."""

from __future__ import annotations

import functools
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_configs import ALL_BANKS

from qpf import config as cfgs
from qpf.generation import (
    beam_search,
    decode,
    evaluate_stream,
    generate,
    generate_text,
    prefill,
    start_state,
    step,
)
from qpf.generation.stream import chunk_logprobs
from qpf.models import QPFModel
from qpf.ops.sampling import SamplingConfig
from qpf.zoo import get_family

BANKS = ALL_BANKS
MEMORY = cfgs.MemoryConfig(num_slots=5, top_k=3, key_chunk_size=3)
SLOW = pytest.mark.slow


def tiny(mode="token", banks=BANKS[:1], memory=MEMORY, regime="chunked", episodic=True):
    """A tiny config whose episodic window (5) and SSM chunk (4) are shorter than the tests'
    sequences, so window and chunk boundaries are crossed while decoding."""
    return cfgs.ModelConfig(
        vocab_size=259 if mode == "byte_patch" else 31,
        dim=8,
        input_mode=mode,
        banks=banks,
        backbone=cfgs.BackboneConfig(state_dim=7, num_layers=2, scan_type="chunked", chunk_size=4),
        memory=memory,
        episodic=cfgs.EpisodicConfig(window=5, regime=regime) if episodic else None,
        byte_patch=cfgs.BytePatchConfig(patch_size=3, decoder_layers=1),
    )


@functools.cache
def variables(config):
    """Perturbed variables of ``QPFModel(config)`` (every parameter moved away from its init,
    so scales that start at 0 still matter); cached so tests share one init per config."""
    model = QPFModel(config)
    params = jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 6), jnp.int32))
    rng = np.random.default_rng(2)
    return jax.tree.map(lambda p: p + 0.05 * rng.standard_normal(p.shape).astype(p.dtype), params)


def build(config, batch=2, t=17, seed=0):
    """Module, variables and random tokens ``[batch, t]``."""
    tokens = jax.random.randint(jax.random.key(seed), (batch, t), 0, 31)
    return QPFModel(config), variables(config), tokens


@functools.cache
def forward(model):
    """Compiled full forward pass -> logits (one wrapper per module, reused across tests)."""
    return jax.jit(lambda params, x: model.apply(params, x).logits)


@pytest.mark.parametrize(
    ("mode", "banks", "memory", "regime", "episodic"),
    [
        # Each configuration compiles its own model (~10-30 s of XLA on a busy 2-core CPU);
        # byte-patch, the subtle one, runs by default, the others with the slow marker.
        pytest.param("token", BANKS[:1], MEMORY, "chunked", True, marks=SLOW, id="one-bank"),
        pytest.param(
            "token", BANKS[:2], None, "sliding", True, marks=SLOW, id="two-banks-no-memory"
        ),
        pytest.param(
            "token", BANKS, MEMORY, "chunked", False, marks=SLOW, id="six-banks-no-episodic"
        ),
        pytest.param("byte_patch", BANKS[:2], MEMORY, "chunked", True, id="byte-patch"),
    ],
)
def test_prefill_then_steps_equal_the_full_forward(mode, banks, memory, regime, episodic):
    config = tiny(mode, banks, memory, regime, episodic)
    model, params, tokens = build(config)
    t = tokens.shape[1]
    full = forward(model)(params, tokens)
    one_step = jax.jit(partial(step, model))
    # Chunk 3 = the patch size in byte mode; prompts of 4, 7 and 13 cross the episodic
    # window (5), the SSM chunk (4) and (byte mode) patch boundaries at several offsets.
    for k in (0, 1, 4, 7, 13):
        if k == 0:
            state, got = start_state(model, 2, t), []
        else:
            last, state = prefill(model, params, tokens[:, :k], chunk_size=3)
            got = [last]
        for i in range(k, t):
            logits, state = one_step(params, state, tokens[:, i])
            got.append(logits)
        want = full[:, k - 1 :] if k else full
        np.testing.assert_allclose(
            jnp.stack(got, 1), want, rtol=1e-4, atol=1e-5, err_msg=f"prompt length {k}"
        )


def _model_only(config, t):
    return QPFModel(config), None, jax.random.randint(jax.random.key(0), (2, t), 0, 31)


def test_original_episodic_regime_cannot_be_decoded():
    model, _, tokens = _model_only(tiny(regime="original"), t=4)
    shapes = jax.eval_shape(QPFModel(tiny()).init, jax.random.key(0), tokens)
    with pytest.raises(ValueError, match="cannot be streamed"):  # raised while tracing
        jax.eval_shape(lambda p: prefill(model, p, tokens), shapes)


def greedy_decode(model, params, logits, state, **kw):
    """Eight greedy tokens after a prefill's (logits, state); ``kw``: eos_id, pad_id."""
    greedy = SamplingConfig(temperature=0.0)
    key = jax.random.key(0)
    return decode(model, params, logits, state, key, max_new_tokens=8, config=greedy, **kw)


@pytest.fixture(scope="module")
def lm():
    return build(tiny(banks=BANKS[:2]), t=6)


def test_decode_stops_each_row_at_eos(lm):
    model, params, prompt = lm
    logits, state = prefill(model, params, prompt)
    greedy = greedy_decode(model, params, logits, state)
    tokens = np.asarray(greedy.tokens)
    assert (np.asarray(greedy.lengths) == 8).all()
    # Make each row's 2nd / 4th greedy token its EOS: that row stops there and pads after.
    eos_rows = []
    for row, pos in ((0, 1), (1, 3)):
        eos = int(tokens[row, pos])
        if eos in tokens[row, :pos]:
            continue
        out = greedy_decode(model, params, logits, state, eos_id=eos, pad_id=30)
        got = np.asarray(out.tokens)[row]
        np.testing.assert_array_equal(got[: pos + 1], tokens[row, : pos + 1])
        assert (got[pos + 1 :] == 30).all()
        assert int(out.lengths[row]) == pos + 1
        eos_rows.append(row)
    assert eos_rows, "greedy sequence repeated its tokens; pick another seed"


def test_sampled_generation_is_seeded_and_rows_differ(lm):
    model, params, prompt = lm
    cfg = SamplingConfig(temperature=1.5, top_k=20)
    same_prompt = jnp.tile(prompt[:1], (2, 1))
    a = generate(model, params, same_prompt, jax.random.key(3), max_new_tokens=8, config=cfg)
    b = generate(model, params, same_prompt, jax.random.key(3), max_new_tokens=8, config=cfg)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens[0], a.tokens[1])  # per-row streams


def test_beam_search_width_one_is_greedy_and_wider_beams_score_higher(lm):
    model, params, prompt = lm
    logits, state = prefill(model, params, prompt)
    greedy = greedy_decode(model, params, logits, state)
    one = beam_search(model, params, prompt, width=1, max_new_tokens=4)
    np.testing.assert_array_equal(one.tokens[:, 0], greedy.tokens[:, :4])
    three = beam_search(model, params, prompt, width=3, max_new_tokens=4)
    scores = np.asarray(three.scores)
    assert (np.diff(scores, axis=1) <= 1e-6).all()
    # Every reported score is its sequence's log-probability under a full forward pass.
    t = prompt.shape[1]

    def rescore(new_tokens):
        seq = jnp.concatenate([prompt, new_tokens], 1)
        logp = jax.nn.log_softmax(forward(model)(params, seq), -1)
        return jnp.take_along_axis(logp[:, t - 1 : -1], seq[:, t:, None], -1)[..., 0]

    for beam in range(3):
        np.testing.assert_allclose(
            rescore(three.tokens[:, beam]).sum(1), scores[:, beam], rtol=1e-4, atol=1e-4
        )
    # Over two steps greedy's path is always a candidate of the wider beam, so the best
    # beam scores at least as well (beyond two steps beam search can lose greedy's path).
    greedy_two = rescore(greedy.tokens[:, :4])[:, :2].sum(1)
    short = beam_search(model, params, prompt, width=3, max_new_tokens=2)
    assert (np.asarray(short.scores[:, 0]) >= np.asarray(greedy_two) - 1e-5).all()


def test_generate_text_streams_pieces(lm):
    model, params, _ = lm
    vocab = [chr(ord("a") + i) for i in range(31)]
    pieces = list(
        generate_text(
            model,
            params,
            "abc",
            encode=lambda s: [vocab.index(ch) for ch in s],
            decode_ids=lambda ids: "".join(vocab[i] for i in ids),
            max_new_tokens=8,
            config=SamplingConfig(temperature=0.0),
            block_size=4,
        )
    )
    greedy = generate(
        model,
        params,
        jnp.array([[0, 1, 2]]),
        jax.random.key(0),
        max_new_tokens=8,
        config=SamplingConfig(temperature=0.0),
    )
    assert "".join(pieces) == "".join(vocab[i] for i in np.asarray(greedy.tokens[0]))
    assert len(pieces) == 2


@pytest.mark.parametrize("mode", ["token", "byte_patch"])
def test_stream_in_chunks_matches_one_pass(mode):
    model, params, tokens = build(tiny(mode, BANKS[:2]), t=40)
    logp = jax.nn.log_softmax(forward(model)(params, tokens)[:, :-1], -1)
    nll = -float(jnp.take_along_axis(logp, tokens[:, 1:, None], -1).sum())
    stats = evaluate_stream(model, params, np.asarray(tokens), chunk_size=9)  # 39 = 4·9 + 3
    assert stats.count == 2 * 39
    np.testing.assert_allclose(stats.nll, nll, rtol=1e-5)
    np.testing.assert_allclose(stats.perplexity, np.exp(nll / 78), rtol=1e-5)


def state_bytes(state) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


def test_stream_memory_is_flat_in_the_input_length():
    """The decoding state (all the stream keeps between chunks) has one size at any length.

    Control: the transformer's KV cache, which must grow with the context, does grow.
    """
    config = tiny(banks=BANKS[:2])
    model, params, _ = build(config, batch=1)
    family = get_family("qpf")
    assert state_bytes(family.init_state(config, 1, 1024)) == state_bytes(
        family.init_state(config, 1, 64 * 1024)
    )
    state, x, sizes = start_state(model, 1, 0).model, jnp.zeros((1, 16), jnp.int32), []
    for _ in range(6):
        _, state = chunk_logprobs(model, params, state, x, x)
        sizes.append(state_bytes(state))
    assert int(state["pos"]) == 6 * 16
    assert len(set(sizes)) == 1, sizes
    kv = get_family("transformer")
    small_cfg = kv.preset("test").model
    assert state_bytes(kv.init_state(small_cfg, 1, 64 * 1024)) > 8 * state_bytes(
        kv.init_state(small_cfg, 1, 1024)
    )
