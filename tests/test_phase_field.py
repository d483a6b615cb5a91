"""The full model: causality, gradients to every parameter, streaming, mixed precision."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from family_checks import dead_gradients, mismatch, perturb_params, piecewise_logits
from tiny_configs import ALL_BANKS

from qpf import config as cfgs
from qpf.models import QPFModel, init_state
from qpf.models.phase_field import segment_resets
from qpf.ops import norms
from qpf.ops import phase2d as p2d
from qpf.presets import TEST_MATRIX_PRESETS, TEST_V5_PRESET
from qpf.training.objectives import LossConfig, objective_terms, total_loss


def small_config(mode: str = "token", banks=ALL_BANKS, regime="chunked", **kw) -> cfgs.ModelConfig:
    base = dict(
        vocab_size=259 if mode == "byte_patch" else 31,
        dim=6,
        input_mode=mode,
        banks=banks,
        backbone=cfgs.BackboneConfig(state_dim=7, num_layers=2),
        memory=cfgs.MemoryConfig(num_slots=5, top_k=3, key_chunk_size=3),
        episodic=cfgs.EpisodicConfig(window=4, regime=regime),
        byte_patch=cfgs.BytePatchConfig(patch_size=3, decoder_layers=1),
        morphology=cfgs.MorphologyEmbedConfig(
            root_vocab_size=31, prefix_vocab_size=7, suffix_vocab_size=6
        ),
    )
    base.update(kw)
    return cfgs.ModelConfig(**base)


def random_tokens(config: cfgs.ModelConfig, batch: int, t: int, seed: int = 0) -> jax.Array:
    key = jax.random.key(seed)
    if config.input_mode == "morphological":
        m = config.morphology
        ks = jax.random.split(key, 3)
        return jnp.stack(
            [
                jax.random.randint(k, (batch, t), 0, v)
                for k, v in zip(ks, (m.root_vocab_size, m.prefix_vocab_size, m.suffix_vocab_size))
            ],
            -1,
        )
    return jax.random.randint(key, (batch, t), 0, min(config.vocab_size, 256))


def build(config, batch=2, t=18, seed=0):
    model = QPFModel(config)
    tokens = random_tokens(config, batch, t, seed)
    params = model.init(jax.random.key(seed + 1), tokens)["params"]
    return model, params, tokens


@pytest.mark.parametrize(
    ("mode", "regime"),
    [
        ("token", "chunked"),
        ("token", "original"),
        ("token", "sliding"),
        ("morphological", "chunked"),  # byte_patch: tests/test_families.py (qpf:test)
    ],
)
def test_logits_at_t_ignore_tokens_after_t(mode, regime):
    config = small_config(mode, regime=regime)
    model, params, tokens = build(config, t=15)
    apply = jax.jit(lambda x: model.apply({"params": params}, x).logits)
    base = apply(tokens)
    for t in (0, 4, 8, 13):
        changed = tokens.at[:, t + 1 :].set((tokens[:, t + 1 :] + 1) % 5)
        np.testing.assert_allclose(
            apply(changed)[:, : t + 1],
            base[:, : t + 1],
            rtol=1e-6,
            atol=1e-7,
            err_msg=f"position {t} saw the future",
        )
        assert not np.allclose(apply(changed)[:, t + 1 :], base[:, t + 1 :])


def test_original_byte_patcher_leak_is_fixed():
    """In the original, byte t+1 changed logits[t] at in-patch positions 0-2 (spec §11.3)."""
    config = small_config("byte_patch", banks=ALL_BANKS[:1])
    model, params, tokens = build(config, t=12)
    apply = jax.jit(lambda x: model.apply({"params": params}, x).logits)
    base = apply(tokens)
    for t in range(11):
        moved = apply(tokens.at[:, t + 1].set((tokens[:, t + 1] + 7) % 256))
        np.testing.assert_array_equal(moved[:, t], base[:, t])


@pytest.mark.parametrize("mode", ["token", "byte_patch", "morphological"])
def test_every_parameter_receives_gradient_from_the_training_loss(mode):
    config = small_config(mode, regime="sliding")
    model, params, tokens = build(config, batch=3, t=24)
    languages = jnp.array([0, 1, 2])
    mask = jnp.ones(tokens.shape[:2], bool)
    loss_cfg = LossConfig(energy=0.01)

    def loss(p):
        out = model.apply(
            {"params": p},
            tokens,
            deterministic=False,
            language_ids=languages,
            rngs={"dropout": jax.random.key(5)},
        )
        return total_loss(objective_terms(out, tokens, mask, loss_cfg), loss_cfg)

    grads = jax.jit(jax.grad(loss))(params)
    roots = tokens[..., 0] if tokens.ndim == 3 else tokens
    failures = dead_gradients(grads, roots[:, :-1], config.vocab_size)
    assert not failures, "\n".join(failures)


def test_tied_head_is_the_embedding_tables_and_collects_both_gradients():
    """tie_embeddings: logits = features @ [E_re | E_im]^T (Re<z, e_v>), exactly the untied
    model whose head kernel holds the tables, and the tables' gradient is that model's
    embedding gradient plus its head gradient."""
    tied = small_config("token", banks=ALL_BANKS[:1], tie_embeddings=True, head_norm="rms")
    untied = dataclasses.replace(tied, tie_embeddings=False)
    model, params, tokens = build(tied, t=13)
    assert "output_proj" not in params
    emb = params["embed"]
    table = np.concatenate([emb["embedding_re"], emb["embedding_im"]], axis=1)  # [V, 2d]
    out = model.apply({"params": params}, tokens, return_features=True)
    # head_norm 'rms': the features are the complex RMS norm of head_proj(phase states).
    head_proj = lambda m, h: m.head_proj(h)  # noqa: E731
    projected = model.apply({"params": params}, out.phase_states, method=head_proj)
    z = np.asarray(projected, np.float64)
    rms = np.sqrt((z**2).sum(-2).mean(-1) + norms.RMS_NORM_EPS)[..., None, None]
    expected = z / rms * np.asarray(params["head_norm"]["scale"])
    np.testing.assert_allclose(out.features, p2d.to_concat(expected), rtol=1e-5, atol=1e-6)
    logits = model.apply({"params": params}, tokens).logits
    np.testing.assert_allclose(logits, np.asarray(out.features) @ table.T, rtol=1e-5, atol=1e-6)
    untied_params = {**params, "output_proj": {"kernel": jnp.asarray(table.T)}}

    def loss(config, p):
        logits = QPFModel(config).apply({"params": p}, tokens[:, :-1]).logits
        picked = jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1)
        return -picked.mean()

    np.testing.assert_allclose(loss(tied, params), loss(untied, untied_params), rtol=1e-6, atol=0)
    g_tied = jax.grad(loss, argnums=1)(tied, params)["embed"]
    g_untied = jax.grad(loss, argnums=1)(untied, untied_params)
    head = np.asarray(g_untied["output_proj"]["kernel"])  # [2d, V]
    d = tied.dim
    for part, rows in (("embedding_re", head[:d]), ("embedding_im", head[d:])):
        expected = np.asarray(g_untied["embed"][part]) + rows.T
        np.testing.assert_allclose(g_tied[part], expected, rtol=1e-5, atol=1e-7, err_msg=part)


@pytest.mark.parametrize(
    ("mode", "banks", "regime", "cuts"),
    [
        ("token", ALL_BANKS[:1], "chunked", (0, 1, 9, 10, 22)),
        ("token", ALL_BANKS, "sliding", (0, 5, 6, 17, 22)),
        ("token", ALL_BANKS[:2], "chunked", (0, 11, 12, 13, 22)),
        ("byte_patch", ALL_BANKS[:2], "chunked", (0, 3, 12, 21, 22)),
        ("morphological", ALL_BANKS[1:2], "sliding", (0, 2, 15, 22)),
        ("token-tied", ALL_BANKS[1:2], "chunked", (0, 4, 13, 22)),
    ],
)
def test_processing_in_pieces_with_carried_state_equals_one_pass(mode, banks, regime, cuts):
    tied = mode == "token-tied"
    config = small_config(
        mode.removesuffix("-tied"), banks=banks, regime=regime, tie_embeddings=tied
    )
    model, params, tokens = build(config, t=22, seed=3)
    apply = jax.jit(lambda x, s: model.apply({"params": params}, x, s))
    full = model.apply({"params": params}, tokens).logits
    state0 = init_state(config, tokens.shape[0])
    pieces, state = piecewise_logits(apply, tokens, state0, cuts)
    assert not (err := mismatch(pieces, full, rtol=1e-4, atol=1e-5)), err
    assert int(state["pos"]) == tokens.shape[1]
    dropped, _ = piecewise_logits(apply, tokens, state0, cuts, carry=False)  # negative control
    assert mismatch(dropped, full, rtol=1e-4, atol=1e-5)


def test_bfloat16_compute_stays_close_to_float32():
    """Absolute bounds: qpf is exempt from the generic relative bf16 check (see presets)."""
    config = small_config(banks=ALL_BANKS[:2])
    model, params, tokens = build(config)
    f32 = jax.jit(model.apply)({"params": params}, tokens).logits
    bf16_model = QPFModel(config.replace(dtype="bfloat16"))
    bf16 = jax.jit(bf16_model.apply)({"params": params}, tokens)
    assert bf16.logits.dtype == jnp.bfloat16
    assert bf16.state["backbone"].dtype == jnp.float32
    # bf16 keeps 8 mantissa bits (0.4% per rounding), compounded through ~10 GEMMs and norms:
    # individual logits may move by ~0.1, the typical one by far less.
    err = np.abs(np.asarray(bf16.logits, np.float32) - np.asarray(f32))
    assert err.max() < 0.15, err.max()
    assert err.mean() < 0.02, err.mean()


# ----------------------------------------------------------------------------- documents

_V5_BACKBONE = TEST_V5_PRESET.model.backbone


def _segment_case(name: str) -> cfgs.ModelConfig:
    """Configs whose every component resets at document starts (``segment_resets``)."""
    if name == "v4-all-banks":  # faithful stack, every bank, both memories (chunked regime)
        return small_config("token")
    if name == "v5-chunked-scan":  # test-v5's options (conv, RG-LRU, Griffin...) on tokens
        backbone = dataclasses.replace(_V5_BACKBONE, scan_type="chunked", chunk_size=5)
        return small_config("token", banks=TEST_V5_PRESET.model.banks, backbone=backbone)
    if name == "matrix-hybrid":  # the matrix-state backbone with local attention, tokens
        backbone = TEST_MATRIX_PRESETS["test-matrix-hybrid"].model.backbone
        return small_config("token", banks=TEST_V5_PRESET.model.banks, backbone=backbone)
    banks = TEST_V5_PRESET.model.banks  # the context bank: the one with a window
    return small_config("morphological", banks=banks, regime="sliding", backbone=_V5_BACKBONE)


@pytest.mark.parametrize(
    "name", ["v4-all-banks", "v5-chunked-scan", "morph-v5-sliding", "matrix-hybrid"]
)
def test_second_packed_document_equals_it_alone(name):
    """A window holding two documents (ids 0 then 1 from position 7): the second one's
    logits equal those of it alone, the first one's those of the window's prefix; all-zero
    ids equal none. Perturbed parameters, so no zero-initialised branch hides a leak."""
    config = _segment_case(name)
    assert segment_resets(config) == ""
    model = QPFModel(config)
    tokens = random_tokens(config, 2, 16)
    params = perturb_params(jax.jit(model.init)(jax.random.key(1), tokens)["params"])
    split = 7
    seg = jnp.broadcast_to(jnp.arange(16) >= split, (2, 16)).astype(jnp.int32)
    run = jax.jit(lambda x, g: model.apply({"params": params}, x, segment_ids=g).logits)
    plain = jax.jit(lambda x: model.apply({"params": params}, x).logits)
    packed, whole = run(tokens, seg), plain(tokens)
    # The second document alone, padded back to 16 tokens (causal: the padding after it
    # changes none of its logits) so that the compiled forward is reused.
    alone = plain(jnp.concatenate([tokens[:, split:], tokens[:, :split]], axis=1))[:, : 16 - split]
    assert not (err := mismatch(packed[:, split:], alone, 1e-4, 1e-5)), err
    assert not (err := mismatch(packed[:, :split], whole[:, :split], 1e-4, 1e-5)), err
    assert mismatch(whole[:, split:], alone, 1e-4, 1e-5)  # control: without ids it differs
    zeros = run(tokens, jnp.zeros((2, 16), jnp.int32))
    np.testing.assert_allclose(zeros, whole, rtol=1e-5, atol=1e-6)


def test_unwired_components_refuse_segment_ids():
    byte = small_config("byte_patch")
    assert "byte_patch" in segment_resets(byte)
    assert "original" in segment_resets(small_config("token", regime="original"))
    seg = jnp.zeros((1, 6), jnp.int32)
    tokens = jnp.zeros((1, 6), jnp.int32)
    # Traced only (eval_shape): the check comes first in the call.
    with pytest.raises(ValueError, match="byte_patch"):
        jax.eval_shape(lambda: QPFModel(byte).init(jax.random.key(0), tokens, segment_ids=seg))
    token = small_config("token")
    state = init_state(token, 1)
    with pytest.raises(ValueError, match="full forwards"):
        jax.eval_shape(
            lambda: QPFModel(token).init(jax.random.key(0), tokens, state, segment_ids=seg)
        )
