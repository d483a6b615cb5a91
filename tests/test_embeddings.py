"""Morphology-aware embedding, byte patch encoder and the causal within-patch decoder."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import parity
from conftest import load_fixture

from qpf import config as cfgs
from qpf.layers.embeddings import BytePatchDecoder, BytePatchEncoder, MorphologyEmbed
from qpf.models import torch_weights as tw
from qpf.ops import phase2d as p2d


def test_parity_morph_embed_fixture():
    z = load_fixture("morph_embed.npz")
    sd = tw.StateDict(tw.state_dict_from_npz(z))
    params = tw.morph_embed(sd, "")
    sd.check_all_used(dead_ok=())
    cfg = cfgs.MorphologyEmbedConfig(
        root_vocab_size=100, prefix_vocab_size=20, suffix_vocab_size=24
    )
    embed = MorphologyEmbed(cfg=cfg, dim=32)
    ids = [jnp.asarray(z[k]) for k in ("root_ids", "prefix_ids", "suffix_ids")]
    out = embed.apply({"params": params}, *ids)
    parity.assert_allclose("output", p2d.to_torch_layout(out), z["output"], rtol=1e-4, atol=1e-5)
    bare = embed.apply({"params": params}, *ids, apply_magnitude=False)
    parity.assert_allclose(
        "output_no_magnitude",
        p2d.to_torch_layout(bare),
        z["output_no_magnitude"],
        rtol=1e-4,
        atol=1e-5,
    )


def test_parity_byte_patcher_fixture():
    z = load_fixture("byte_patcher.npz")
    sd = tw.StateDict(tw.state_dict_from_npz(z))
    params = tw.byte_patcher(sd, "", 4)
    sd.check_all_used(dead_ok=())
    encoder = BytePatchEncoder(vocab_size=259, dim=32, patch_size=4)
    out = encoder.apply({"params": params}, jnp.asarray(z["input"]))
    assert out.shape[1] == int(z["info"][1]) == 5
    parity.assert_allclose("output", p2d.to_torch_layout(out), z["output"], rtol=1e-4, atol=1e-5)


def test_byte_decoder_target_sees_only_earlier_positions_of_its_patch():
    """Logits at in-patch position p depend on inputs at positions <= p only."""
    dec = BytePatchDecoder(vocab_size=259, dim=8, patch_size=4, num_layers=2)
    prev = jax.random.randint(jax.random.key(0), (2, 3, 4), 0, 259)
    ctx = jax.random.normal(jax.random.key(1), (2, 3, 2, 8))
    params = dec.init(jax.random.key(2), prev, ctx)["params"]
    base = dec.apply({"params": params}, prev, ctx)
    for p in range(4):
        moved = dec.apply({"params": params}, prev.at[:, :, p].set((prev[:, :, p] + 1) % 259), ctx)
        diff = np.asarray(jnp.abs(moved - base).max(axis=(0, 1, 3)))
        assert np.all(diff[:p] == 0)
        assert np.all(diff[p:] > 0)
