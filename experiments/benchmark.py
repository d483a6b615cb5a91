"""Side-by-side training-speed benchmark of model families on synthetic token batches.

    python -m experiments.benchmark --models qpf:tiny,transformer:tiny,diagrnn:tiny \
        --seq-len 256 --batch-size 8 --steps 10 --json OUT.json [--md OUT.md]
    python -m experiments.benchmark ... --seq-lens 256,1024,4096      # length sweep

All models run in one process. For each (model, length): the compile time of the jitted,
donated train step (``lower().compile()``), the train-step time and tokens/s (forward +
backward + AdamW update), forward-only tokens/s, the parameter count and memory. Timings
are medians over ``--steps`` repeats after a warm-up, and the models take turns
(round-robin) within each repeat so that machine drift and neighbouring load hit all of
them alike.

Memory: ``peak_mem_bytes`` is the device's ``peak_bytes_in_use`` on accelerators, the
process's peak RSS on CPU. Both are process-wide and only grow, so a model's value is the
peak *up to and including* its own warm-up (models warm up in ``--models`` order).
``compiled_mem_bytes`` (XLA's temp + argument + output - aliased bytes of the compiled
train step) is per model.

Model overrides use ``--set [SCOPE:]SECTION.FIELD=VALUE`` (see ``experiments.model_set``);
sections model, optim and loss apply (data and train have their own flags here).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.model_set import overrides_for, parse_models, parse_overrides
from qpf.config import ConfigError
from qpf.data import DataConfig
from qpf.training.config import RunConfig, TrainConfig
from qpf.training.objectives import LossConfig
from qpf.training.optim import OptimConfig, make_optimizer
from qpf.training.step import init_train_state, make_train_step
from qpf.training.trainer import peak_lr

BENCH_SECTIONS = ("model", "optim", "loss")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m experiments.benchmark", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--models", default="qpf:tiny,transformer:tiny,diagrnn:tiny")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--seq-lens", default=None, help="comma-separated lengths (a sweep)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10, help="timed repeats (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    ap.add_argument("--vocab-size", type=int, default=None, help="default: each preset's")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="[SCOPE:]SECTION.FIELD=VALUE",
        help="config override (repeatable), e.g. model.dim=16 or qpf:model.backbone.num_layers=1",
    )
    ap.add_argument("--json", type=Path, help="write the per-model records here")
    ap.add_argument("--md", type=Path, help="write the markdown table(s) here")
    args = ap.parse_args(argv)
    for name in ("seq_len", "batch_size", "steps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        ap.error("--warmup must be >= 0")
    return args


def seq_lens(args: argparse.Namespace) -> list[int]:
    if not args.seq_lens:
        return [args.seq_len]
    try:
        lens = [int(x) for x in args.seq_lens.split(",") if x.strip()]
    except ValueError:
        msg = f"--seq-lens {args.seq_lens!r}: expected integers like 256,1024"
        raise ConfigError(msg) from None
    if not lens or min(lens) < 2:
        raise ConfigError(f"--seq-lens {args.seq_lens!r}: lengths must be >= 2")
    return lens


def run_config(spec: str, preset: Any, args: argparse.Namespace, overrides: dict) -> RunConfig:
    """The model/optimizer/loss configuration of one benchmarked model."""
    bad = [k for k in overrides if k.partition(".")[0] not in BENCH_SECTIONS]
    if bad:
        raise ConfigError(
            f"--set {bad[0]}: the benchmark takes sections {', '.join(BENCH_SECTIONS)} "
            "(use --seq-len/--batch-size/--steps for the rest)"
        )
    model = preset.model
    if args.vocab_size is not None:
        model = dataclasses.replace(model, vocab_size=args.vocab_size)
    if args.dtype:
        model = dataclasses.replace(model, dtype=args.dtype)
    data = DataConfig(seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed)
    run = RunConfig(spec, model, data, OptimConfig(), LossConfig(), TrainConfig(seed=args.seed))
    return run.with_overrides(overrides)


def peak_mem_bytes() -> int:
    """Device peak bytes in use on accelerators, else this process's peak RSS."""
    device = jax.devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            return int(stats["peak_bytes_in_use"])
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss * 1024 if sys.platform != "darwin" else rss)  # KiB on Linux, B on macOS


def compiled_mem(compiled: Any) -> int | None:
    """Bytes XLA assigns to one call of ``compiled`` (None if the backend does not say)."""
    try:
        m = compiled.memory_analysis()
    except (AttributeError, NotImplementedError, RuntimeError):
        return None
    if m is None:
        return None
    return int(
        m.temp_size_in_bytes
        + m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
    )


class Bench:
    """One (model, length): compiled train and forward steps and their live state."""

    def __init__(self, spec: str, run: RunConfig, seq_len: int, args: argparse.Namespace):
        self.spec, self.seq_len, self.batch = spec, seq_len, args.batch_size
        family = run.family
        self.config = run.model_config
        module = family.build(self.config)
        tx, _ = make_optimizer(run.optim, peak_lr(run), total_steps=1000)
        rng = np.random.default_rng(args.seed)
        vocab = self.config.vocab_size
        tokens = jnp.asarray(rng.integers(0, vocab, (self.batch, seq_len)), jnp.int32)
        self.batch_arrays = {"tokens": tokens, "mask": jnp.ones(tokens.shape, bool)}
        self.state = jax.jit(lambda: init_train_state(module, tx, args.seed, tokens[:1]))()
        self.params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.state.params))

        step = make_train_step(module, tx, run.loss, seed=args.seed)
        t0 = time.perf_counter()
        self.train_step = (
            jax.jit(step, donate_argnums=0).lower(self.state, self.batch_arrays).compile()
        )
        self.compile_s = time.perf_counter() - t0
        self.compiled_mem_bytes = compiled_mem(self.train_step)

        # Reduce the logits over the vocabulary so the whole LM head is computed (as in a
        # greedy prediction) without returning [B, T, V] to the host.
        def forward(params: Any, toks: jax.Array) -> jax.Array:
            out = module.apply({"params": params}, toks, deterministic=True)
            return jnp.max(out.logits, axis=-1)

        self.forward = jax.jit(forward).lower(self.state.params, tokens).compile()
        self.train_times: list[float] = []
        self.forward_times: list[float] = []
        self.loss = math.nan

    def warm_up(self, n: int) -> None:
        for _ in range(n):
            self.time_train()
            self.time_forward()
        self.train_times.clear()
        self.forward_times.clear()
        self.peak_mem_bytes = peak_mem_bytes()

    def time_train(self) -> None:
        t0 = time.perf_counter()
        self.state, metrics = self.train_step(self.state, self.batch_arrays)
        jax.block_until_ready((self.state, metrics))
        self.train_times.append(time.perf_counter() - t0)
        self.loss = float(metrics["loss"])

    def time_forward(self) -> None:
        t0 = time.perf_counter()
        jax.block_until_ready(self.forward(self.state.params, self.batch_arrays["tokens"]))
        self.forward_times.append(time.perf_counter() - t0)

    def record(self) -> dict[str, Any]:
        tokens = self.batch * self.seq_len
        step_s = statistics.median(self.train_times)
        fwd_s = statistics.median(self.forward_times)
        return {
            "model": self.spec,
            "seq_len": self.seq_len,
            "batch": self.batch,
            "vocab_size": self.config.vocab_size,
            "dtype": self.config.dtype,
            "params": self.params,
            "compile_s": self.compile_s,
            "step_ms": step_s * 1e3,
            "step_ms_min": min(self.train_times) * 1e3,
            "train_tokens_per_s": tokens / step_s,
            "forward_ms": fwd_s * 1e3,
            "forward_tokens_per_s": tokens / fwd_s,
            "peak_mem_bytes": self.peak_mem_bytes,
            "peak_mem_kind": "device peak" if jax.devices()[0].platform != "cpu" else "peak RSS",
            "compiled_mem_bytes": self.compiled_mem_bytes,
            "final_loss": self.loss,
            "repeats": len(self.train_times),
            "device": jax.devices()[0].device_kind,
            "jax_version": jax.__version__,
        }


def bench_length(runs: list[tuple[str, RunConfig]], seq_len: int, args) -> list[dict[str, Any]]:
    """Benchmark every model at one length, alternating models within each repeat."""
    benches = []
    for spec, run in runs:
        bench = Bench(spec, run, seq_len, args)
        bench.warm_up(args.warmup)
        benches.append(bench)
        print(f"compiled {spec} at T={seq_len} in {bench.compile_s:.1f}s", flush=True)
    for _ in range(args.steps):
        for bench in benches:
            bench.time_train()
    for _ in range(args.steps):
        for bench in benches:
            bench.time_forward()
    records = [b.record() for b in benches]
    del benches  # free the states before the next length
    return records


def _mib(x: int | None) -> str:
    return "n/a" if x is None else f"{x / 2**20:,.0f}"


def markdown(records: list[dict[str, Any]]) -> str:
    """One row per record; ratios are against the first model at the same length."""
    first = {}
    for r in records:
        first.setdefault(r["seq_len"], r)
    lines = [
        "| model | T | params | compile (s) | step (ms) | train tok/s | x first | "
        "fwd tok/s | x first | peak mem (MiB) | compiled mem (MiB) | x first |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        f = first[r["seq_len"]]
        mem_ratio = (
            f"{r['compiled_mem_bytes'] / f['compiled_mem_bytes']:.2f}"
            if r["compiled_mem_bytes"] and f["compiled_mem_bytes"]
            else "n/a"
        )
        lines.append(
            f"| {r['model']} | {r['seq_len']} | {r['params']:,} | {r['compile_s']:.1f} | "
            f"{r['step_ms']:,.1f} | {r['train_tokens_per_s']:,.0f} | "
            f"{r['train_tokens_per_s'] / f['train_tokens_per_s']:.2f} | "
            f"{r['forward_tokens_per_s']:,.0f} | "
            f"{r['forward_tokens_per_s'] / f['forward_tokens_per_s']:.2f} | "
            f"{_mib(r['peak_mem_bytes'])} | {_mib(r['compiled_mem_bytes'])} | {mem_ratio} |"
        )
    return "\n".join(lines)


def scaling_markdown(records: list[dict[str, Any]]) -> str:
    """Train-step time per model across lengths, and its growth over the shortest length."""
    lens = sorted({r["seq_len"] for r in records})
    models = list(dict.fromkeys(r["model"] for r in records))
    by = {(r["model"], r["seq_len"]): r for r in records}
    head = " | ".join(f"T={t} ms (x)" for t in lens)
    lines = [f"| model | {head} |", "|---|" + "---:|" * len(lens)]
    for m in models:
        base = by[(m, lens[0])]["step_ms"]
        cells = [f"{by[(m, t)]['step_ms']:,.1f} ({by[(m, t)]['step_ms'] / base:.2f})" for t in lens]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines.append(
        f"\n(x) = step time over the T={lens[0]} step time; linear scaling in T gives "
        + ", ".join(f"{t / lens[0]:g}" for t in lens)
        + "."
    )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    models = parse_models(args.models)
    specs = [spec for spec, _, _ in models]
    overrides = parse_overrides(args.set, specs)
    runs = [
        (spec, run_config(spec, preset, args, overrides_for(spec, overrides)))
        for spec, _family, preset in models
    ]
    lens = seq_lens(args)
    records = []
    for seq_len in lens:
        records.extend(bench_length(runs, seq_len, args))
    # --models order first, then length: the list reads per model.
    order = {spec: i for i, spec in enumerate(specs)}
    records.sort(key=lambda r: (order[r["model"]], r["seq_len"]))
    return records


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    try:
        records = run(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    text = markdown(sorted(records, key=lambda r: r["seq_len"]))
    if len({r["seq_len"] for r in records}) > 1:
        text += "\n\nTrain-step time vs sequence length:\n\n" + scaling_markdown(records)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(records, indent=2) + "\n")
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(text + "\n")
    return records


if __name__ == "__main__":
    main()
