"""LoRA freezing (optax partition, no state for frozen leaves) and the REINFORCE pieces."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qpf.models import lightwave as lw
from qpf.models import lightwave_finetune as ft
from qpf.zoo import get_family


@pytest.fixture(scope="module")
def lora_model():
    cfg = get_family("lightwave").preset("test").model.replace(use_lora=True, lora_rank=2)
    module = lw.Lightwave(cfg)
    ids = jax.random.randint(jax.random.key(3), (2, 7), 0, cfg.vocab_size)
    base = jax.jit(lw.Lightwave(cfg.replace(use_lora=False)).init)(jax.random.key(0), ids)
    params = ft.with_lora(base, jax.jit(module.init)(jax.random.key(1), ids))
    return module, base, params, ids


def test_with_lora_keeps_base_weights(lora_model):
    module, base, params, ids = lora_model
    # lora_b starts at zero, so the adapted model computes exactly the base model.
    plain = lw.Lightwave(module.config.replace(use_lora=False))
    got = jax.jit(module.apply)(params, ids).logits
    np.testing.assert_array_equal(got, jax.jit(plain.apply)(base, ids).logits)


def test_freeze_updates_only_trainable_and_keeps_no_state_for_frozen(lora_model):
    module, _, params, ids = lora_model
    mask = ft.trainable_mask(params, ft.LORA_TRAINABLE)
    trainable = [x.size for x, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if m]
    tx = ft.freeze(optax.adam(1e-2), mask)
    state = tx.init(params)
    # Adam keeps two moments per trainable element, nothing for frozen ones (+ a counter).
    assert ft.state_leaf_count(state) == 2 * sum(trainable) + 1
    step = ft.make_lora_step(module, tx, pad_id=-1)
    new, state, _ = step(params, state, ids)
    new, state, _ = step(new, state, ids)
    for path, old_leaf in jax.tree_util.tree_leaves_with_path(params):
        name = jax.tree_util.keystr(path)
        new_leaf = np.asarray(dict(jax.tree_util.tree_leaves_with_path(new))[path])
        if any(p in name for p in ft.LORA_TRAINABLE):
            assert not np.array_equal(new_leaf, old_leaf), name
        else:
            np.testing.assert_array_equal(new_leaf, old_leaf, err_msg=name)


def test_original_reward():
    prompt = "once upon a time"
    assert ft.original_reward("", prompt) == 0.0
    long = "the cat sat on a mat and then it ran to the big red barn today."
    # 50 < len < 300 (+1), 14 words with 12 unique (+2·12/14), >5 new words (+1.5), "." (+1)
    words = long.lower().split()
    want = 1.0 + 2.0 * len(set(words)) / len(words) + 1.5 + 1.0
    assert ft.original_reward(long, prompt) == pytest.approx(want)
    assert ft.original_reward("a b c", prompt) == 0.0


def test_continuation_logprob_matches_incremental_sampling(lora_model):
    module, _, params, _ = lora_model
    cfg, temp = module.config, 0.7

    @jax.jit
    def one(p, state, token):
        out = module.apply(p, token, state)
        return out.logits[:, -1], out.state

    prompt = [5, 9, 2]
    cont = ft.sample_continuation(
        one, params, lw.init_state(cfg, 1, 16), prompt, jax.random.key(4), 6, temp, eos_id=96
    )
    # Σ log softmax(logits/T)[a_t] along the sampled path, step by step.
    state, want = lw.init_state(cfg, 1, 16), 0.0
    for tok in prompt:
        logits, state = one(params, state, jnp.asarray([[tok]]))
    for tok in cont:
        want += float(jax.nn.log_softmax(logits[0] / temp)[tok])
        logits, state = one(params, state, jnp.asarray([[tok]]))
    ids = np.full((1, 12), 0, np.int32)
    ids[0, : len(prompt) + len(cont)] = prompt + cont
    got = ft.continuation_logprob(
        module, params, jnp.asarray(ids), jnp.asarray([3]), jnp.asarray([len(cont)]), temp
    )
    np.testing.assert_allclose(float(got[0]), want, rtol=1e-5)
    loss = ft.reinforce_loss(
        module, params, jnp.asarray(ids), jnp.asarray([3]), jnp.asarray([len(cont)]),
        jnp.asarray([2.0]), temp,
    )  # fmt: skip
    np.testing.assert_allclose(float(loss), -2.0 * want, rtol=1e-5)
