"""LLM Lightwave fine-tuning as the original does it: LoRA with a frozen base, or REINFORCE.

    python -m experiments.lightwave_finetune --mode lora --preset test --steps 20
    python -m experiments.lightwave_finetune --mode reinforce --preset test --steps 5 \
        --run-dir runs/lightwave-tiny   # start from a trained run (else a fresh init)

Data follow the original (spec other_seeds §1.4): the TinyStories text split 95/5 by
characters, batches of 64-character windows tokenized with GPT-2 BPE and right-padded with
EOT to 64 tokens (pads are ignored by the loss). ``lora`` trains the adapters, couplings
and norm scales with Adam (lr 4e-4, clip 1.0) on the CE over real targets and reports the
validation loss with both denominators; ``reinforce`` samples continuations (≤ 50 tokens
at temperature 0.1) of decoded training windows (which contain literal "<|endoftext|>"
text, as the original's prompts do), scores them with the original's reward and trains the
modulators, couplings and norm scales on −R·Σ log π (Adam 2e-4, clip 1.0). Results go to
``OUT/finetune.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qpf.data.corpora import data_dir_from
from qpf.data.tokenizers import get_tokenizer
from qpf.models import lightwave as lw
from qpf.models import lightwave_finetune as ft
from qpf.zoo import family_of, resolve_model

TEXT = "tinystories/TinyStories-train.first2316stories.txt"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m experiments.lightwave_finetune")
    ap.add_argument("--mode", choices=("lora", "reinforce"), required=True)
    ap.add_argument("--preset", default="test", help="lightwave preset (ignored with --run-dir)")
    ap.add_argument("--run-dir", type=Path, default=None, help="start from a trained run")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--window", type=int, default=64, help="characters per sample")
    ap.add_argument("--lr", type=float, default=None, help="default: 4e-4 (lora), 2e-4 (rl)")
    ap.add_argument("--lora-rank", type=int, default=4)
    ap.add_argument("--samples", type=int, default=4, help="prompts per REINFORCE step")
    ap.add_argument("--max-new", type=int, default=50)
    ap.add_argument("--temperature", type=float, default=0.1)
    ap.add_argument("--val-batches", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=None, help="default $QPF_DATA_DIR")
    ap.add_argument("--out", type=Path, default=Path("runs/lightwave-finetune"))
    return ap.parse_args(argv)


def random_windows(text: str, tok: Any, rng: random.Random, n: int, length: int) -> np.ndarray:
    """The original's ``get_random_batch``: n windows of ``length`` characters, tokenized,
    right-padded with EOT to ``length`` tokens and truncated -> int32 ``[n, length]``."""
    rows = []
    for _ in range(n):
        start = rng.randint(0, len(text) - length - 1)
        ids = tok.encode(text[start : start + length])
        ids = ids + [tok.eos_id] * (length - len(ids))
        rows.append(ids[:length])
    return np.asarray(rows, np.int32)


def load_start(args: argparse.Namespace) -> tuple[lw.LightwaveConfig, Any]:
    """(config, params) from a trained run or a fresh init of the preset."""
    if args.run_dir is not None:
        from qpf.training.restore import load_run

        run = load_run(args.run_dir)
        if family_of(run.module.config).name != lw.LIGHTWAVE_FAMILY.name:
            raise SystemExit(f"{args.run_dir} is not a lightwave run")
        return run.module.config, run.params
    _, preset = resolve_model(f"lightwave:{args.preset}")
    cfg = preset.model.replace(vocab_size=50257)
    params = lw.Lightwave(cfg).init(jax.random.key(args.seed), jnp.zeros((1, 2), jnp.int32))
    return cfg, params


def validate(module: Any, params: Any, batches: list[np.ndarray], pad: int) -> dict[str, float]:
    total = real = count = 0.0
    for b in batches:
        loss = lw.lightwave_losses(module.apply(params, jnp.asarray(b)).logits, b, pad)
        total += float(loss["val_sum"])
        real += float(loss["num_real_targets"])
        count += float(loss["num_targets"])
    return {
        "val_loss": total / max(real, 1.0),
        "val_ppl": float(np.exp(total / max(real, 1.0))),
        "val_loss_original_denominator": total / count,
        "val_ppl_original_denominator": float(np.exp(total / count)),
    }


def run_lora(args, cfg, base, tok, train, val) -> dict[str, Any]:
    had_lora = cfg.use_lora
    cfg = cfg.replace(use_lora=True, lora_rank=cfg.lora_rank if had_lora else args.lora_rank)
    module = lw.Lightwave(cfg)
    init = module.init(jax.random.key(args.seed + 1), jnp.zeros((1, 2), jnp.int32))
    params = base if had_lora else ft.with_lora(base, init)
    mask = ft.trainable_mask(params, ft.LORA_TRAINABLE)
    inner = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(args.lr or 4e-4))
    tx = ft.freeze(inner, mask)
    opt_state = tx.init(params)
    full_state = ft.state_leaf_count(jax.eval_shape(inner.init, params))
    rng = random.Random(args.seed)
    val_batches = [
        random_windows(val, tok, rng, args.batch_size, args.window) for _ in range(args.val_batches)
    ]
    before = validate(module, params, val_batches, tok.eos_id)
    step = ft.make_lora_step(module, tx, tok.eos_id)
    start, losses = params, []
    for _ in range(args.steps):
        ids = jnp.asarray(random_windows(train, tok, rng, args.batch_size, args.window))
        params, opt_state, loss = step(params, opt_state, ids)
        losses.append(float(loss))
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), start, params)
    frozen_changed = sum(
        c for c, m in zip(jax.tree.leaves(changed), jax.tree.leaves(mask), strict=True) if not m
    )
    return {
        "train_loss": losses,
        "val_before": before,
        "val_after": validate(module, params, val_batches, tok.eos_id),
        "trainable_params": sum(
            int(x.size)
            for x, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask), strict=True)
            if m
        ),
        "optimizer_state_elements": ft.state_leaf_count(opt_state),
        "optimizer_state_elements_unfrozen": full_state,
        "frozen_leaves_changed": frozen_changed,
    }


def run_reinforce(args, cfg, params, tok, train) -> dict[str, Any]:
    module = lw.Lightwave(cfg)
    mask = ft.trainable_mask(params, ft.RL_TRAINABLE)
    tx = ft.freeze(optax.chain(optax.clip_by_global_norm(1.0), optax.adam(args.lr or 2e-4)), mask)
    opt_state = tx.init(params)
    rng, key = random.Random(args.seed), jax.random.key(args.seed)
    max_len = 4 * args.window + args.max_new + 1

    @jax.jit
    def one(params, state, token):
        out = module.apply(params, token, state)
        return out.logits[:, -1], out.state

    @jax.jit
    def update(params, opt_state, ids, plens, lens, rewards):
        def loss_fn(p):
            return ft.reinforce_loss(module, p, ids, plens, lens, rewards, args.temperature)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    log = []
    for _ in range(args.steps):
        windows = random_windows(train, tok, rng, args.samples, args.window)
        seqs, plens, lens, rewards = [], [], [], []
        for row in windows:
            prompt_text = tok.decode(row.tolist())
            prompt = tok.encode(prompt_text)[: 4 * args.window]
            key, sub = jax.random.split(key)
            state = lw.init_state(cfg, 1, max_len)
            cont = ft.sample_continuation(
                one, params, state, prompt, sub, args.max_new, args.temperature, tok.eos_id
            )
            rewards.append(ft.original_reward(tok.decode(cont), prompt_text))
            seqs.append(prompt + cont)
            plens.append(len(prompt))
            lens.append(len(cont))
        ids = np.full((len(seqs), max_len), tok.eos_id, np.int32)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = s
        params, opt_state, loss = update(
            params, opt_state, jnp.asarray(ids), jnp.asarray(plens), jnp.asarray(lens),
            jnp.asarray(rewards, jnp.float32),
        )  # fmt: skip
        log.append({"reward": float(np.mean(rewards)), "loss": float(loss)})
        print(f"rl step {len(log)}: reward {log[-1]['reward']:.2f} loss {log[-1]['loss']:.3f}")
    return {"steps": log, "optimizer_state_elements": ft.state_leaf_count(opt_state)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    data_dir = data_dir_from(args.data_dir)
    if data_dir is None or not (data_dir / TEXT).is_file():
        raise SystemExit(f"TinyStories text not found: set --data-dir or QPF_DATA_DIR ({TEXT})")
    text = (data_dir / TEXT).read_text(encoding="utf-8")
    split = int(len(text) * 0.95)
    tok = get_tokenizer("gpt2", data_dir=data_dir)
    cfg, params = load_start(args)
    t0 = time.time()
    if args.mode == "lora":
        result = run_lora(args, cfg, params, tok, text[:split], text[split:])
    else:
        result = run_reinforce(args, cfg, params, tok, text[:split])
    result.update({"mode": args.mode, "seconds": time.time() - t0, "config": str(cfg)})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "finetune.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k not in ("steps", "train_loss")}))
    return result


if __name__ == "__main__":
    main()
