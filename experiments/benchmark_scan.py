"""Time every oscillatory-scan backend, forward and forward+backward, against the HBM floor.

    python -m experiments.benchmark_scan --seq-lens 512,2048,8192 --batch 8 --state-dim 512 \\
        --json OUT.json

Backends: ``sequential`` (lax.scan, unroll 1/16/128), ``associative``, ``chunked`` (chunk
128) and ``pallas`` (the fused kernel in ``kernels/``). Each case is jitted, warmed up once
(the compile time is reported), then timed ``--repeats`` times with ``block_until_ready``;
the median is reported.

Memory-bandwidth floor: the bytes the op must move at least, divided by ``--hbm-gbps``
(default 4800 GB/s, an H200). Forward: read gate ``[B,T,N]`` and Bx ``[B,T,2,N]``, write h
``[B,T,2,N]``, each in its dtype. Forward+backward adds the fused backward pass: read gate,
Bx, h and dh, write dgate and dBx. O(B·N) terms (h0, h_last, parameters) are ignored. On a
CPU the floor is still computed from ``--hbm-gbps`` and is therefore a GPU figure, printed
only for reference.

On CPU the pallas backend can only run in interpret mode (very slow), so it is skipped unless
``--include-interpret`` is given. On GPU it is compiled for real; a case that fails to lower
or run becomes an error row and the benchmark carries on. ``--pallas-block-n`` and
``--pallas-unroll`` tune the kernel. On CPU, ``sequential/u128`` takes minutes to compile
at T ≥ 512 (XLA's slow-compile alarm fires); ``--backends`` selects a subset, e.g.
``--backends sequential/u1,associative,chunked``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import jax
import jax.numpy as jnp

from qpf.ops.scan import oscillatory_scan

Array = jax.Array


@dataclass(frozen=True)
class Backend:
    """One benchmarked configuration of ``oscillatory_scan`` (or of the kernel directly)."""

    label: str
    scan_type: str
    options: dict = field(default_factory=dict)


def default_backends(pallas_options: dict) -> list[Backend]:
    return [
        Backend("sequential/u1", "sequential", {"unroll": 1}),
        Backend("sequential/u16", "sequential", {"unroll": 16}),
        Backend("sequential/u128", "sequential", {"unroll": 128}),
        Backend("associative", "associative"),
        Backend("chunked/c128", "chunked", {"chunk_size": 128}),
        Backend("pallas", "pallas", pallas_options),
    ]


def scan_fn(backend: Backend) -> Callable[..., tuple[Array, Array]]:
    """(gate, bx, damping, skew, h0) -> (h, h_last) for the backend."""
    if backend.scan_type == "pallas":
        from kernels.oscillatory_scan import oscillatory_scan_pallas

        return lambda *a: oscillatory_scan_pallas(*a, **backend.options)
    return lambda *a: oscillatory_scan(*a, scan_type=backend.scan_type, **backend.options)


def forward_and_backward(scan: Callable) -> Callable:
    """Gradient of a loss touching h and h_last w.r.t. all five inputs (one fwd + one bwd)."""

    def loss(*args):
        h, h_last = scan(*args)
        return jnp.sum(h.astype(jnp.float32)) + jnp.sum(h_last)

    return jax.grad(loss, argnums=(0, 1, 2, 3, 4))


def make_inputs(batch: int, seq_len: int, n: int, dtype) -> tuple[Array, ...]:
    k = jax.random.split(jax.random.key(0), 5)
    return (
        jax.random.normal(k[0], (batch, seq_len, n), dtype),
        jax.random.normal(k[1], (batch, seq_len, 2, n), dtype),
        jax.random.normal(k[2], (n,), dtype),
        jax.random.normal(k[3], (n,), dtype),
        jnp.zeros((batch, 2, n), jnp.float32),
    )


def floor_bytes(batch: int, seq_len: int, n: int, itemsize: int, mode: str) -> int:
    """Minimum HBM traffic: forward 5·B·T·N elements; forward+backward 5 + 12 more.

    Forward: gate (1) + Bx (2) read, h (2) written. Backward: gate (1), Bx (2), h (2) and
    dh (2) read, dgate (1) and dBx (2) written. All arrays share the input dtype here.
    """
    per_step = 5 if mode == "fwd" else 5 + 12
    return per_step * batch * seq_len * n * itemsize


def time_case(fn: Callable, args: Sequence[Array], repeats: int) -> dict:
    """Compile + warm up once, then time ``repeats`` calls; errors become a result, not a crash."""
    try:
        jitted = jax.jit(fn)
        start = time.perf_counter()
        jax.block_until_ready(jitted(*args))
        compile_s = time.perf_counter() - start
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(jitted(*args))
            times.append(time.perf_counter() - start)
    except Exception as err:  # a backend that fails to lower must not end the run
        lines = [line for line in str(err).splitlines() if line.strip()]
        return {"error": f"{type(err).__name__}: {lines[0] if lines else ''}"[:300]}
    return {
        "median_ms": 1e3 * statistics.median(times),
        "min_ms": 1e3 * min(times),
        "compile_s": compile_s,
    }


def run(args: argparse.Namespace) -> dict:
    on_cpu = jax.default_backend() == "cpu"
    dtype = jnp.dtype(args.dtype)
    pallas_options = {}
    if args.pallas_block_n:
        pallas_options["block_n"] = args.pallas_block_n
    if args.pallas_unroll:
        pallas_options["unroll"] = args.pallas_unroll
    backends = default_backends(pallas_options)
    if args.backends:
        wanted = set(args.backends.split(","))
        backends = [b for b in backends if b.label in wanted or b.scan_type in wanted]
    rows = []
    for seq_len in args.seq_lens:
        inputs = make_inputs(args.batch, seq_len, args.state_dim, dtype)
        for backend in backends:
            for mode in ("fwd", "fwd+bwd"):
                row = {"backend": backend.label, "seq_len": seq_len, "mode": mode}
                nbytes = floor_bytes(args.batch, seq_len, args.state_dim, dtype.itemsize, mode)
                row["floor_ms"] = 1e3 * nbytes / (args.hbm_gbps * 1e9)
                if backend.scan_type == "pallas" and on_cpu and not args.include_interpret:
                    row["skipped"] = "interpret mode on CPU (pass --include-interpret)"
                else:
                    scan = scan_fn(backend)
                    fn = scan if mode == "fwd" else forward_and_backward(scan)
                    row.update(time_case(fn, inputs, args.repeats))
                    if "median_ms" in row:
                        row["x_floor"] = row["median_ms"] / row["floor_ms"]
                rows.append(row)
                print(json.dumps(row), flush=True)
    device = jax.devices()[0]
    meta = {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": getattr(device, "device_kind", str(device)),
        "dtype": dtype.name,
        "batch": args.batch,
        "state_dim": args.state_dim,
        "repeats": args.repeats,
        "hbm_gbps": args.hbm_gbps,
        "floor_note": (
            "floor = min bytes / hbm_gbps; "
            + ("a GPU figure, not this CPU's" if on_cpu else "for this accelerator")
        ),
        "backends": [asdict(b) for b in backends],
    }
    return {"meta": meta, "rows": rows}


def markdown(result: dict) -> str:
    """One line per (T, backend): forward and forward+backward side by side."""
    meta = result["meta"]
    lines = [
        f"jax {meta['jax']} on {meta['backend']} ({meta['device']}), {meta['dtype']}, "
        f"B={meta['batch']}, N={meta['state_dim']}; {meta['floor_note']} "
        f"({meta['hbm_gbps']} GB/s)",
        "",
        "| T | backend | fwd ms | fwd × floor | fwd+bwd ms | fwd+bwd × floor "
        "| floor fwd ms | floor fwd+bwd ms | compile s (fwd/fwd+bwd) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by_key: dict[tuple, dict] = {}
    for row in result["rows"]:
        by_key.setdefault((row["seq_len"], row["backend"]), {})[row["mode"]] = row

    def cell(row: dict, key: str, fmt: str) -> str:
        if "error" in row:
            return "error"
        if "skipped" in row:
            return "skipped"
        return format(row[key], fmt)

    notes = []
    for (seq_len, label), modes in by_key.items():
        f, fb = modes["fwd"], modes["fwd+bwd"]
        compile_s = "/".join(cell(r, "compile_s", ".1f") for r in (f, fb))
        lines.append(
            f"| {seq_len} | {label} | {cell(f, 'median_ms', '.3f')} | {cell(f, 'x_floor', '.0f')} "
            f"| {cell(fb, 'median_ms', '.3f')} | {cell(fb, 'x_floor', '.0f')} "
            f"| {f['floor_ms']:.4f} | {fb['floor_ms']:.4f} | {compile_s} |"
        )
        for r in (f, fb):
            if "error" in r or "skipped" in r:
                notes.append(
                    f"- T={seq_len} {label} {r['mode']}: {r.get('error', r.get('skipped'))}"
                )
    if notes:
        lines += ["", *dict.fromkeys(notes)]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    p.add_argument("--seq-lens", type=ints, default=[512, 2048, 8192])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--state-dim", type=int, default=512)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--hbm-gbps", type=float, default=4800.0, help="HBM GB/s (H200: 4800)")
    p.add_argument("--include-interpret", action="store_true", help="run pallas on CPU too")
    p.add_argument("--backends", default="", help="comma list of labels or scan types")
    p.add_argument("--pallas-block-n", type=int, default=0, help="kernel block_n (0: default)")
    p.add_argument("--pallas-unroll", type=int, default=0, help="kernel unroll (0: default)")
    p.add_argument("--json", default="", help="write the rows and metadata here")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    result = run(args)
    print(markdown(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
