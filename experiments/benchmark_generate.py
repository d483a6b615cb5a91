"""Benchmark chunked prefill and decoding at long contexts (batch 1).

    python -m experiments.benchmark_generate --models qpf:tiny \
        --contexts 1024,4096,16384,65536,262144 --new-tokens 64 --json OUT.json

For each model and context length: prefill tokens/s (chunked prompt processing with the
carried state), decode tokens/s (the compiled sampling loop) and peak memory — peak RSS
of this process on CPU (``resource.getrusage``; it only grows, so it is the peak so far),
the device's ``peak_bytes_in_use`` on accelerators. Compilation is excluded: each shape is
run once before it is timed. Sampling follows ``--temperature/--top-k/--top-p``; the
sampler alone (``qpf.ops.sampling.sample``) and its dense reference (``sample_reference``) are
also timed on the prompt's last logits. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qpf.config import apply_overrides
from qpf.generation import decode, prefill
from qpf.generation.core import patch_size
from qpf.ops.sampling import SamplingConfig, row_keys, sample, sample_reference
from qpf.zoo import resolve_model


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="qpf:tiny", help="comma-separated family:preset")
    ap.add_argument("--contexts", default="1024,4096,16384", help="comma-separated lengths")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--chunk-size", type=int, default=4096, help="prefill chunk (tokens)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model config override, e.g. dim=16 or backbone.num_layers=1 (repeatable)",
    )
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write the results here")
    return ap.parse_args(argv)


def peak_memory_mib() -> float:
    """Peak device memory on accelerators, else the process's peak RSS, in MiB."""
    device = jax.devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            return stats["peak_bytes_in_use"] / 2**20
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 1024 if sys.platform != "darwin" else kib / 2**20


def bench_one(module, params, context: int, args: argparse.Namespace) -> dict[str, Any]:
    vocab = module.config.vocab_size
    rng = np.random.default_rng(args.seed)
    prompt = jnp.asarray(rng.integers(0, min(vocab, 256), (1, context)), jnp.int32)
    chunk = min(args.chunk_size, context)
    p = patch_size(module)
    if p:
        chunk = max(p, chunk - chunk % p)
    max_len = context + args.new_tokens
    # Compile the chunk shape and the remainder shape(s) before timing.
    rest = context % chunk
    prefill(module, params, prompt[:, :chunk], chunk_size=chunk, max_len=max_len)[
        0
    ].block_until_ready()
    if rest:
        prefill(module, params, prompt[:, :rest], chunk_size=chunk, max_len=max_len)[
            0
        ].block_until_ready()
    t0 = time.perf_counter()
    logits, state = prefill(module, params, prompt, chunk_size=chunk, max_len=max_len)
    logits.block_until_ready()
    prefill_s = time.perf_counter() - t0

    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    key = jax.random.key(args.seed)

    def run():
        out = decode(
            module, params, logits, state, key, max_new_tokens=args.new_tokens, config=sampling
        )
        return out.tokens.block_until_ready()

    run()  # compile
    t0 = time.perf_counter()
    run()
    decode_s = time.perf_counter() - t0
    return {
        "context": context,
        "prefill_chunk": chunk,
        "prefill_tokens_per_s": context / prefill_s,
        "decode_tokens_per_s": args.new_tokens / decode_s,
        "decode_ms_per_token": decode_s / args.new_tokens * 1e3,
        **sampler_ms(logits, sampling, key),
        "peak_memory_mib": peak_memory_mib(),
        "memory_kind": "device peak" if jax.devices()[0].platform != "cpu" else "peak RSS",
    }


def sampler_ms(logits: jax.Array, config: SamplingConfig, key: jax.Array, n: int = 50) -> dict:
    """ms per call of the sampler alone (``sample``) and of its dense reference on ``[B, V]``
    logits, compiled, median of ``n`` calls."""
    out = {}
    for name, fn in (("sampler_ms", sample), ("reference_sampler_ms", sample_reference)):
        f = jax.jit(lambda x, k, fn=fn: fn(x, row_keys(k, 0, x.shape[0]), config))
        f(logits, key).block_until_ready()
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            f(logits, key).block_until_ready()
            times.append(time.perf_counter() - t0)
        out[name] = float(np.median(times)) * 1e3
    return out


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | context | prefill tok/s | decode tok/s | decode ms/token | sampler ms | "
        "reference sampler ms | peak memory (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['context']} | {r['prefill_tokens_per_s']:,.0f} | "
            f"{r['decode_tokens_per_s']:,.1f} | {r['decode_ms_per_token']:.2f} | "
            f"{r['sampler_ms']:.3f} | {r['reference_sampler_ms']:.3f} | "
            f"{r['peak_memory_mib']:,.0f} ({r['memory_kind']}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    overrides = dict(s.split("=", 1) for s in args.set)
    contexts = [int(c) for c in args.contexts.split(",") if c]
    rows = []
    for spec in args.models.split(","):
        family, preset = resolve_model(spec)
        config = apply_overrides(preset.model, overrides) if overrides else preset.model
        module = family.build(config)
        init_len = 2 * max(1, patch_size(module))
        params = jax.jit(module.init)(
            jax.random.key(args.seed), jnp.zeros((1, init_len), jnp.int32)
        )
        for context in contexts:
            row = {"model": spec, "device": jax.devices()[0].device_kind}
            row.update(bench_one(module, params, context, args))
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
