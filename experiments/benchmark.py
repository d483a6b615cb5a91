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

Speed against the hardware: ``gflop_per_step`` is XLA's ``cost_analysis`` of the compiled
train step, ``achieved_gflops`` that over the median step time and ``peak_fraction`` its
share of ``--peak-gflops`` (default: measured once at start with a large float32 matmul).
``head_ms`` splits the step: a second compiled variant replaces the LM head + CE by a cheap
function of the head's input (the rest of the step is unchanged), and ``head_ms`` = step -
that variant (families without pre-head features get none). ``head_matmul_ms`` times the
head's three matmuls alone at the step's shapes (logits ``x @ W``, input gradient
``G @ W^T``, weight gradient ``x^T @ G`` over the ``B·(T-1)`` positions with a target, in the
model's compute dtype), so ``head_ms / head_matmul_ms`` is the output layer + loss against
its unavoidable work. ``--ce-impls fused,plain``
benchmarks each model with each CE path side by side (``LossConfig.ce_impl``).
``page_faults_per_step`` (minor + major, ``getrusage``) and ``rss_growth_bytes`` (peak RSS
growth over the timed steps) show whether steps reuse their buffers.

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
from qpf.models.family import accepts_return_features, apply_for_features
from qpf.training.config import RunConfig, TrainConfig
from qpf.training.objectives import CE_IMPLS, LossConfig, objective_terms
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
    ap.add_argument(
        "--ce-impls",
        default="fused",
        help="comma-separated LossConfig.ce_impl values, each benchmarked (fused,plain)",
    )
    ap.add_argument("--no-head-split", action="store_true", help="skip the head/rest split")
    ap.add_argument(
        "--peak-gflops",
        type=float,
        default=None,
        help="stated peak GFLOP/s for peak_fraction (default: measured with a matmul)",
    )
    ap.add_argument("--json", type=Path, help="write the per-model records here")
    ap.add_argument("--md", type=Path, help="write the markdown table(s) here")
    args = ap.parse_args(argv)
    args.head_split = not args.no_head_split
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


def measure_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best float32 GFLOP/s of an ``[n, n] @ [n, n]`` matmul (after one compile run)."""
    a = jnp.ones((n, n), jnp.float32)
    mm = jax.jit(lambda a, b: a @ b)
    mm(a, a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        mm(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def step_flops(compiled: Any) -> float | None:
    """FLOPs of one call of ``compiled`` from XLA's cost analysis (None if unavailable)."""
    try:
        cost = compiled.cost_analysis()
    except (AttributeError, NotImplementedError, RuntimeError):
        return None
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops and flops > 0 else None


def faults() -> int:
    """Page faults (minor + major) of this process so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_minflt + r.ru_majflt


def objective_without_head(out: Any, tokens: Any, mask: Any, cfg: LossConfig) -> dict:
    """``objective_terms`` with the LM head + CE replaced by a cheap function of the head's
    input, so the step keeps the model's forward/backward and the optimizer update."""
    if out.features is None:
        return objective_terms(out, tokens, mask, cfg)
    feats = out.features[:, :-1].astype(jnp.float32)
    tmask = mask[:, 1:].astype(jnp.float32)
    ce_sum = 1e-3 * jnp.sum(jnp.sum(feats, -1) * tmask)
    cheap = out.replace(features=None, logits=jnp.zeros((*tokens.shape[:2], 1), jnp.float32))
    terms = objective_terms(cheap, jnp.zeros_like(tokens), mask, cfg)
    count = jnp.sum(tmask)
    return {**terms, "ce_sum": ce_sum, "ce": ce_sum / jnp.maximum(count, 1.0), "tokens": count}


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

        self.ce_impl = run.loss.ce_impl
        t0 = time.perf_counter()
        self.train_step = self._compile(make_train_step(module, tx, run.loss, seed=args.seed))
        self.compile_s = time.perf_counter() - t0
        self.compiled_mem_bytes = compiled_mem(self.train_step)
        self.flops = step_flops(self.train_step)
        self.rest_step = None
        split = args.head_split and run.loss.ce_impl == getattr(args, "split_impl", "fused")
        if split and accepts_return_features(module):
            self.rest_step = self._compile(
                make_train_step(
                    module, tx, run.loss, seed=args.seed, objective=objective_without_head
                )
            )
        self.rest_times: list[float] = []
        self.head_shape = self._head_shape(module, tokens) if self.rest_step else None
        self.head_matmul_times: list[float] = []
        self.faults = 0

        # Reduce the logits over the vocabulary so the whole LM head is computed (as in a
        # greedy prediction) without returning [B, T, V] to the host.
        def forward(params: Any, toks: jax.Array) -> jax.Array:
            out = module.apply({"params": params}, toks, deterministic=True)
            return jnp.max(out.logits, axis=-1)

        self.forward = jax.jit(forward).lower(self.state.params, tokens).compile()
        self.train_times: list[float] = []
        self.forward_times: list[float] = []
        self.loss = math.nan

    def _head_shape(self, module: Any, tokens: jax.Array) -> tuple[int, int, int]:
        """(positions with a target, head features F, vocabulary V) of this step."""
        out = jax.eval_shape(
            lambda p, t: apply_for_features(module, {"params": p}, t), self.state.params, tokens
        )
        return (tokens.shape[0] * (tokens.shape[1] - 1), *out.head_weight.shape)

    def time_head_matmuls(self, repeats: int) -> None:
        """Time the head's three matmuls alone. Run after every model's timed steps and
        memory readings: their full ``[positions, V]`` operands would inflate the peak RSS."""
        if self.head_shape is None:
            return
        n, f, v = self.head_shape
        dtype = jnp.dtype(self.config.dtype)
        key = jax.random.split(jax.random.key(0), 3)
        x = jax.random.normal(key[0], (n, f), dtype)
        w = jax.random.normal(key[1], (f, v), dtype)
        g = jax.random.normal(key[2], (n, v), dtype)
        acc = jnp.promote_types(dtype, jnp.float32)

        def three(x: jax.Array, w: jax.Array, g: jax.Array) -> tuple[jax.Array, ...]:
            dot = lambda a, b, dims: jax.lax.dot_general(  # noqa: E731
                a, b, (dims, ((), ())), preferred_element_type=acc
            )
            return dot(x, w, ((1,), (0,))), dot(g, w, ((1,), (1,))), dot(x, g, ((0,), (0,)))

        fn = jax.jit(three).lower(x, w, g).compile()
        jax.block_until_ready(fn(x, w, g))
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(x, w, g))
            self.head_matmul_times.append(time.perf_counter() - t0)

    def head_matmul_fields(self, head_ms: float | None) -> dict[str, float | None]:
        """``head_matmul_ms`` and ``head_over_matmuls`` = ``head_ms`` over it (None without
        a head split)."""
        if not self.head_matmul_times or head_ms is None:
            return {"head_matmul_ms": None, "head_over_matmuls": None}
        mm_ms = statistics.median(self.head_matmul_times) * 1e3
        return {"head_matmul_ms": mm_ms, "head_over_matmuls": head_ms / mm_ms}

    def _compile(self, step: Any) -> Any:
        return jax.jit(step, donate_argnums=0).lower(self.state, self.batch_arrays).compile()

    def warm_up(self, n: int) -> None:
        for _ in range(n):
            self.time_train()
            self.time_rest()
            self.time_forward()
        self.train_times.clear()
        self.rest_times.clear()
        self.forward_times.clear()
        self.peak_mem_bytes = peak_mem_bytes()
        self.faults = 0

    def time_train(self) -> None:
        f0 = faults()
        t0 = time.perf_counter()
        self.state, metrics = self.train_step(self.state, self.batch_arrays)
        jax.block_until_ready((self.state, metrics))
        self.train_times.append(time.perf_counter() - t0)
        self.faults += faults() - f0
        self.loss = float(metrics["loss"])

    def time_rest(self) -> None:
        if self.rest_step is None:
            return
        t0 = time.perf_counter()
        self.state, metrics = self.rest_step(self.state, self.batch_arrays)
        jax.block_until_ready((self.state, metrics))
        self.rest_times.append(time.perf_counter() - t0)

    def time_forward(self) -> None:
        t0 = time.perf_counter()
        jax.block_until_ready(self.forward(self.state.params, self.batch_arrays["tokens"]))
        self.forward_times.append(time.perf_counter() - t0)

    def record(self, peak_gflops: float | None) -> dict[str, Any]:
        tokens = self.batch * self.seq_len
        step_s = statistics.median(self.train_times)
        fwd_s = statistics.median(self.forward_times)
        achieved = self.flops / step_s / 1e9 if self.flops else None
        rest_s = statistics.median(self.rest_times) if self.rest_times else None
        return {
            "model": self.spec,
            "ce_impl": self.ce_impl,
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
            "gflop_per_step": self.flops / 1e9 if self.flops else None,
            "achieved_gflops": achieved,
            "peak_gflops": peak_gflops,
            "peak_fraction": achieved / peak_gflops if achieved and peak_gflops else None,
            "rest_ms": rest_s * 1e3 if rest_s is not None else None,
            "head_ms": (step_s - rest_s) * 1e3 if rest_s is not None else None,
            "page_faults_per_step": self.faults / len(self.train_times),
            "rss_growth_bytes": peak_mem_bytes() - self.peak_mem_bytes,
            "repeats": len(self.train_times),
            "device": jax.devices()[0].device_kind,
            "jax_version": jax.__version__,
        }


def bench_length(
    runs: list[tuple[str, RunConfig]], seq_len: int, args, peak_gflops: float | None = None
) -> list[dict[str, Any]]:
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
            bench.time_rest()
    for _ in range(args.steps):
        for bench in benches:
            bench.time_forward()
    records = [b.record(peak_gflops) for b in benches]
    for bench, record in zip(benches, records, strict=True):
        bench.time_head_matmuls(args.steps)
        record.update(bench.head_matmul_fields(record["head_ms"]))
    del benches  # free the states before the next length
    return records


def _mib(x: int | None) -> str:
    return "n/a" if x is None else f"{x / 2**20:,.0f}"


def _num(x: float | None, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def markdown(records: list[dict[str, Any]]) -> str:
    """One row per record; ratios are against the first model at the same length."""
    first = {}
    for r in records:
        first.setdefault(r["seq_len"], r)
    impls = {r.get("ce_impl") for r in records}
    lines = [
        "| model | T | params | compile (s) | step (ms) | train tok/s | x first | "
        "fwd tok/s | x first | peak mem (MiB) | compiled mem (MiB) | x first | "
        "GFLOP/step | GFLOP/s | of peak | head+CE (ms) | its 3 matmuls (ms) | x matmuls | "
        "rest (ms) | faults/step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        "---:|---:|",
    ]
    for r in records:
        f = first[r["seq_len"]]
        mem_ratio = (
            f"{r['compiled_mem_bytes'] / f['compiled_mem_bytes']:.2f}"
            if r["compiled_mem_bytes"] and f["compiled_mem_bytes"]
            else "n/a"
        )
        label = r["model"] + (f" [{r['ce_impl']}]" if len(impls) > 1 else "")
        lines.append(
            f"| {label} | {r['seq_len']} | {r['params']:,} | {r['compile_s']:.1f} | "
            f"{r['step_ms']:,.1f} | {r['train_tokens_per_s']:,.0f} | "
            f"{r['train_tokens_per_s'] / f['train_tokens_per_s']:.2f} | "
            f"{r['forward_tokens_per_s']:,.0f} | "
            f"{r['forward_tokens_per_s'] / f['forward_tokens_per_s']:.2f} | "
            f"{_mib(r['peak_mem_bytes'])} | {_mib(r['compiled_mem_bytes'])} | {mem_ratio} | "
            f"{_num(r.get('gflop_per_step'), '.1f')} | {_num(r.get('achieved_gflops'), '.1f')} | "
            f"{_num(r.get('peak_fraction'), '.0%')} | {_num(r.get('head_ms'), ',.0f')} | "
            f"{_num(r.get('head_matmul_ms'), ',.0f')} | "
            f"{_num(r.get('head_over_matmuls'), '.2f')} | "
            f"{_num(r.get('rest_ms'), ',.0f')} | {_num(r.get('page_faults_per_step'), ',.0f')} |"
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
    impls = ce_impls(args)
    args.split_impl = impls[0]  # the rest of the step does not depend on the CE path
    runs = []
    for spec, _family, preset in models:
        run = run_config(spec, preset, args, overrides_for(spec, overrides))
        runs += [
            (spec, dataclasses.replace(run, loss=dataclasses.replace(run.loss, ce_impl=i)))
            for i in impls
        ]
    peak = args.peak_gflops if args.peak_gflops is not None else measure_peak_gflops()
    print(f"peak: {peak:,.1f} GFLOP/s", flush=True)
    lens = seq_lens(args)
    records = []
    for seq_len in lens:
        records.extend(bench_length(runs, seq_len, args, peak))
    # --models order first, then CE path, then length: the list reads per model.
    order = {spec: i for i, spec in enumerate(specs)}
    records.sort(key=lambda r: (order[r["model"]], impls.index(r["ce_impl"]), r["seq_len"]))
    return records


def ce_impls(args: argparse.Namespace) -> list[str]:
    impls = [x.strip() for x in args.ce_impls.split(",") if x.strip()]
    bad = [x for x in impls if x not in CE_IMPLS]
    if not impls or bad or len(set(impls)) != len(impls):
        raise ConfigError(
            f"--ce-impls {args.ce_impls!r}: give distinct values from {', '.join(CE_IMPLS)}"
        )
    return impls


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
