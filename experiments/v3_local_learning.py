"""Does v3 learn without backpropagation? Backprop vs a genuinely backprop-free mode.

The original's "no backprop" path trains no weight (spec §B4). This trains the SAME sane
``qllm_v3`` model three ways on the same byte batches and reports validation CE:

* ``backprop``: AdamW on the final next-byte CE, gradients through the whole stack;
* ``local``: each layer l has its own objective CE(output_proj(h_l)) and its input is
  ``stop_gradient(h_{l-1})`` (``local_learning=True``), so no gradient crosses a layer
  boundary; the shared STM/LTM/head get the sum of the per-layer gradients. Evaluated with
  the normal forward (last layer's logits);
* ``none``: no weight update (the original's ``train_brain_llm`` path), for reference.

    python -m experiments.v3_local_learning --data-dir ../shared/data --steps 200
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qpf.models.qllm_v3 import QLLMv3, QLLMv3Config
from qpf.ops.v3_ops import cross_entropy


def load_bytes(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """TinyStories slice as bytes; the last 10% is validation."""
    path = next((data_dir / "tinystories").glob("TinyStories-train*.txt"))
    data = np.frombuffer(path.read_bytes(), np.uint8).astype(np.int32)
    cut = int(0.9 * len(data))
    return data[:cut], data[cut:]


def batches(data: np.ndarray, n: int, batch: int, seq: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(data) - seq - 1, (n, batch))
    return data[starts[..., None] + np.arange(seq + 1)]


def make_loss(model: QLLMv3, mode: str):
    def loss(params, tokens):
        x, y = tokens[:, :-1], tokens[:, 1:]
        if mode == "local":
            out = model.apply({"params": params}, x, local_learning=True)
            layers = out.intermediates["layer_logits"]
            return sum(cross_entropy(layers[i], y) for i in range(layers.shape[0]))
        return cross_entropy(model.apply({"params": params}, x).logits, y)

    return loss


def run(mode: str, config: QLLMv3Config, train, val, steps: int, lr: float, seed: int) -> dict:
    model = QLLMv3(config)
    params = jax.jit(model.init)(jax.random.key(seed), jnp.asarray(train[0][:, :-1]))["params"]
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr, weight_decay=0.01))
    opt = tx.init(params)
    grad = jax.value_and_grad(make_loss(model, mode))

    @jax.jit
    def step(params, opt, tokens):
        loss, g = grad(params, tokens)
        updates, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    evaluate = jax.jit(
        lambda p, t: cross_entropy(model.apply({"params": p}, t[:, :-1]).logits, t[:, 1:])
    )
    t0 = time.perf_counter()
    curve = []
    for i in range(steps if mode != "none" else 0):
        params, opt, loss = step(params, opt, jnp.asarray(train[i]))
        if (i + 1) % max(steps // 5, 1) == 0:
            v = float(np.mean([evaluate(params, jnp.asarray(b)) for b in val]))
            curve.append({"step": i + 1, "train_objective": float(loss), "val_ce": v})
    wall = time.perf_counter() - t0
    final = float(np.mean([evaluate(params, jnp.asarray(b)) for b in val]))
    return {"mode": mode, "val_ce": final, "curve": curve, "wall_s": round(wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    config = QLLMv3Config(
        vocab_size=259,
        dim=args.dim,
        num_layers=args.layers,
        memory_size=16,
        concept_dim=32,
        num_concepts=64,
    )
    train, val = load_bytes(args.data_dir)
    tb = batches(train, args.steps, args.batch_size, args.seq_len, args.seed)
    vb = batches(val, 8, args.batch_size, args.seq_len, args.seed + 1)
    counts = np.bincount(val, minlength=259).astype(float)
    p = counts / counts.sum()
    results = {
        "config": {k: getattr(config, k) for k in ("dim", "num_layers", "spiking")},
        "budget": vars(args) | {"data_dir": str(args.data_dir), "out": str(args.out)},
        "unigram_entropy_val": float(-(p[p > 0] * np.log(p[p > 0])).sum()),
        "runs": [
            run(m, config, tb, vb, args.steps, args.lr, args.seed)
            for m in ("none", "local", "backprop")
        ],
    }
    text = json.dumps(results, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
