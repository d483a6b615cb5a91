"""Fused Pallas kernel of the v4 oscillatory SSM scan, forward and backward.

The op (spec §8.2, §23): for every batch row b and state channel n,

    g_t = σ(gate_t),  δ = 0.5 + 0.5·σ(damping),  (c, s) = Cayley(skew)
    a_t = (1 - g_t)·δ·(c + i s),  b_t = g_t·Bx_t,  h_t = a_t·h_{t-1} + b_t   (complex)

with complex values as real pairs in the planar layout ``[B, T, 2, N]``.

Backend
-------
Targets the **Triton lowering of ``pl.pallas_call``**, selected explicitly with
``compiler_params=jax.experimental.pallas.triton.CompilerParams(...)``. Checked against the
installed jax 0.10.2 source (``jax/_src/pallas/pallas_call.py``, ``gpu_lowering``): with
``compiler_params=None`` a GPU ``pallas_call`` goes to Mosaic GPU (the default since jax 0.9,
``jax_pallas_use_mosaic_gpu=True``) and warns that ``pallas_call`` for Mosaic GPU is
deprecated in favour of ``plgpu.kernel``; passing Triton ``CompilerParams`` picks the Triton
backend, which carries no deprecation warning in 0.10.2 and is the path of jax's own
sequential GPU kernels (``jax.experimental.pallas.ops.gpu.layer_norm``). Triton suits this
kernel: each program owns a vector of ``block_n`` lanes (one per thread) and walks time with
masked row loads and stores; Mosaic GPU works on warpgroup-sized SMEM tiles and would need a
pipelined time-tile copy for the same job. The kernel obeys the Triton lowering's limits as
read from ``jax/_src/pallas/triton/lowering.py``: every loaded array has a power-of-two size
(``block_n``), loops are ``fori_loop``s with unroll 1 (the scan rule rejects ``unroll != 1``
and ``reverse``, so unrolling is done by hand and the reverse walk indexes ``T-1-i``), and
the sigmoid is written as ``1/(1 + exp(-x))`` (no ``logistic`` rule). Fallback: on CPU (and
wherever ``interpret=True``) the same kernel runs in Pallas interpret mode; if Triton
lowering fails on some GPU/jax version, use ``scan_type="sequential"`` (the benchmark reports
such a failure as an error row).

Data parallelism
----------------
A ``pallas_call`` has no GSPMD partitioning rule, so under ``--data-parallel`` each kernel is
wrapped in ``shard_map`` over the batch axis (``_per_device_rows``) when the trace runs under
the training mesh: every device runs the kernel on its own rows and nothing is gathered.

Why the time loop runs inside the kernel
-----------------------------------------
The recurrence is a chain of T dependent steps per channel, but channels are independent.
One program per (batch row, block of channels) keeps h in registers for the whole sequence
and touches memory only to stream the inputs in and h out, exactly once each. A grid over
time would round-trip h through HBM at every block boundary and serialise launches; the
associative scan instead materialises ~log T intermediates of a and b.

Memory traffic
--------------
Forward: read gate ``[B,T,N]`` and Bx ``[B,T,2,N]``, write h ``[B,T,2,N]`` (plus O(B·N) for
h0, h_last and the per-channel parameters): 5·B·T·N elements in their dtypes, the minimum
for this op. a_t and b_t are never written to memory, unlike ``oscillatory_coefficients`` +
``linear_scan`` (which write and re-read two extra ``[B,T,2,N]`` float32 arrays). Backward:
read gate, Bx, h, dh; write dgate and dBx (13·B·T·N elements) in one reverse pass, with the
parameter gradients reduced in registers. The kernel is latency-bound rather than
bandwidth-bound when B·N/block_n programs cannot fill the GPU; ``unroll`` issues the loads
of several steps together (they do not depend on h) to hide part of that latency.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.sharding import PartitionSpec

from qpf.ops.sharding import DATA_AXIS

Array = jax.Array
F32 = jnp.float32


class KernelOptions(NamedTuple):
    """Static launch options (hashable, so they can be a custom_vjp nondiff argument)."""

    block_n: int  # lanes per program: a power of two (Triton needs power-of-two tensors)
    unroll: int  # time steps per loop iteration, unrolled by hand
    num_warps: int
    num_stages: int
    interpret: bool


def _sigmoid(x: Array) -> Array:
    # No logistic lowering rule in Pallas-Triton; exp(-x) -> inf still gives exactly 0.
    return 1.0 / (1.0 + jnp.exp(-x))


def _rotation(damping_logit: Array, skew: Array) -> tuple[Array, Array, Array]:
    """(δ, c, s) from the per-channel parameters (float32), as in ``kernels.reference``."""
    delta = 0.5 + 0.5 * _sigmoid(damping_logit)
    inv = 1.0 / (1.0 + skew * skew)
    return delta, (1.0 - skew * skew) * inv, 2.0 * skew * inv


def _time_loop(length: int, body: Callable, carry, unroll: int):
    """carry = body(i, carry) for i in 0..length-1, with ``unroll`` bodies per iteration.

    The Triton lowering rejects ``fori_loop(..., unroll=k)`` (scan unroll != 1), so the
    unrolled block is written out in Python and the remainder runs as a second loop.
    """
    full = length // unroll

    def block(i, c):
        for u in range(unroll):
            c = body(i * unroll + u, c)
        return c

    if full:
        carry = jax.lax.fori_loop(0, full, block, carry)
    if length > full * unroll:
        carry = jax.lax.fori_loop(full * unroll, length, body, carry)
    return carry


class _Lanes:
    """Masked float32 loads/stores of the program's ``block_n`` lanes along the last axis.

    The mask is only built when N is not a multiple of block_n (the last block is partial).
    """

    def __init__(self, n: int, block_n: int):
        self.slice = pl.ds(0, block_n)
        self.mask = None
        if n % block_n:
            self.mask = pl.program_id(1) * block_n + jnp.arange(block_n) < n

    def _at(self, ref, idx: tuple):
        # Static Python ints become int32 scalars: the interpreter's masked-load discharge
        # rule cannot index with a bare int.
        idx = tuple(jnp.int32(i) if isinstance(i, int) else i for i in idx)
        return ref.at[(*idx, self.slice)]

    def load(self, ref, *idx) -> Array:
        other = None if self.mask is None else 0.0
        return plgpu.load(self._at(ref, idx), mask=self.mask, other=other).astype(F32)

    def store(self, ref, idx: tuple, value: Array) -> None:
        plgpu.store(self._at(ref, idx), value.astype(ref.dtype), mask=self.mask)


def _forward_kernel(
    gate_ref, bx_ref, damp_ref, skew_ref, h0_ref, h_ref, h_last_ref, *, n: int, unroll: int
):
    """One (batch row, channel block): h_t for t = 0..T-1, carried in registers.

    Refs: gate ``[T, bn]``, bx ``[T, 2, bn]``, damp/skew ``[bn]``, h0 ``[2, bn]``;
    outputs h ``[T, 2, bn]`` and h_last ``[2, bn]``.
    """
    lanes = _Lanes(n, damp_ref.shape[-1])
    delta, c, s = _rotation(lanes.load(damp_ref), lanes.load(skew_ref))

    def step(t, h):
        hr, hi = h
        g = _sigmoid(lanes.load(gate_ref, t))
        decay = (1.0 - g) * delta
        ar, ai = decay * c, decay * s
        xr, xi = lanes.load(bx_ref, t, 0), lanes.load(bx_ref, t, 1)
        hr, hi = ar * hr - ai * hi + g * xr, ar * hi + ai * hr + g * xi
        lanes.store(h_ref, (t, 0), hr)
        lanes.store(h_ref, (t, 1), hi)
        return hr, hi

    h0 = (lanes.load(h0_ref, 0), lanes.load(h0_ref, 1))
    hr, hi = _time_loop(gate_ref.shape[0], step, h0, unroll)
    lanes.store(h_last_ref, (0,), hr)
    lanes.store(h_last_ref, (1,), hi)


def _backward_kernel(
    gate_ref,
    bx_ref,
    damp_ref,
    skew_ref,
    h0_ref,
    h_ref,
    dh_ref,
    dh_last_ref,
    dgate_ref,
    dbx_ref,
    dh0_ref,
    dparams_ref,
    *,
    n: int,
    unroll: int,
):
    """Reverse recurrence fused with the chain rule, for one (batch row, channel block).

    With λ_t the total cotangent of h_t (as a complex number dL/dh_r + i dL/dh_i),
    λ_t = dh_t + conj(a_{t+1})·λ_{t+1} (λ_T also gets dh_last), and per step
    db_t = λ_t, da_t = λ_t·conj(h_{t-1}), dh0 = conj(a_1)·λ_1. Then, with
    a_t = keep_t·R, keep_t = (1 - g_t)·δ, R = c + i s:
    dkeep_t = Re(da_t·conj R), dR += keep_t·da_t, dδ += (1 - g_t)·dkeep_t,
    dg_t = Re(λ_t·conj Bx_t) - δ·dkeep_t, dgate_t = dg_t·g_t(1 - g_t), dBx_t = g_t·λ_t.

    Outputs: dgate ``[T, bn]``, dbx ``[T, 2, bn]``, dh0 ``[2, bn]`` and
    dparams ``[3, bn]`` = (dc, ds, dδ) summed over time (summed over batch outside).
    """
    lanes = _Lanes(n, damp_ref.shape[-1])
    delta, c, s = _rotation(lanes.load(damp_ref), lanes.load(skew_ref))
    length = gate_ref.shape[0]

    def step(t, carry, prev):
        mr, mi, d_rr, d_ri, d_delta = carry
        pr, pi = prev
        lr, li = lanes.load(dh_ref, t, 0) + mr, lanes.load(dh_ref, t, 1) + mi
        g = _sigmoid(lanes.load(gate_ref, t))
        decay = (1.0 - g) * delta
        ar, ai = decay * c, decay * s
        dar, dai = lr * pr + li * pi, li * pr - lr * pi
        ddecay = dar * c + dai * s
        xr, xi = lanes.load(bx_ref, t, 0), lanes.load(bx_ref, t, 1)
        dg = lr * xr + li * xi - delta * ddecay
        lanes.store(dgate_ref, (t,), dg * g * (1.0 - g))
        lanes.store(dbx_ref, (t, 0), g * lr)
        lanes.store(dbx_ref, (t, 1), g * li)
        mr, mi = ar * lr + ai * li, ar * li - ai * lr  # conj(a_t)·λ_t, carried to t-1
        return mr, mi, d_rr + decay * dar, d_ri + decay * dai, d_delta + (1.0 - g) * ddecay

    def inner(i, carry):
        t = length - 1 - i  # reverse walk by index: the Triton scan rule has no reverse
        return step(t, carry, (lanes.load(h_ref, t - 1, 0), lanes.load(h_ref, t - 1, 1)))

    zero = jnp.zeros_like(delta)
    carry = (lanes.load(dh_last_ref, 0), lanes.load(dh_last_ref, 1), zero, zero, zero)
    # Steps T-1..1 read h_{t-1} from h; step 0 is peeled off because its h_{-1} is h0.
    carry = _time_loop(length - 1, inner, carry, unroll)
    h0 = (lanes.load(h0_ref, 0), lanes.load(h0_ref, 1))
    mr, mi, d_rr, d_ri, d_delta = step(0, carry, h0)
    lanes.store(dh0_ref, (0,), mr)
    lanes.store(dh0_ref, (1,), mi)
    lanes.store(dparams_ref, (0,), d_rr)
    lanes.store(dparams_ref, (1,), d_ri)
    lanes.store(dparams_ref, (2,), d_delta)


def _specs(bsz: int, t: int, n: int, block_n: int):
    """BlockSpecs over the grid (batch row b, channel block j); time is whole per program."""
    del bsz, n
    seq = pl.BlockSpec((None, t, block_n), lambda b, j: (b, 0, j))
    pairs = pl.BlockSpec((None, t, 2, block_n), lambda b, j: (b, 0, 0, j))
    vec = pl.BlockSpec((block_n,), lambda b, j: (j,))
    state = lambda rows: pl.BlockSpec((None, rows, block_n), lambda b, j: (b, 0, j))  # noqa: E731
    return seq, pairs, vec, state


def _per_device_rows(call: Callable, batched_in: tuple[bool, ...], n_out: int) -> Callable:
    """``call`` run by every device on its own batch rows when traced under a data mesh.

    A ``pallas_call`` has no partitioning rule: under GSPMD data parallelism (a batch sharded
    over the ``('data',)`` mesh, see ``qpf.training.distributed``) XLA would gather the whole
    batch onto every device and run the kernel on all of it. When the trace runs under a mesh
    with the data axis (``distributed.under_mesh``), the call is wrapped in ``shard_map``
    instead: inputs flagged in ``batched_in`` (and all ``n_out`` outputs, which are per-row)
    are split along axis 0, the per-channel parameters are passed whole. Nothing is
    differentiated through the ``shard_map`` (the custom VJP's backward is its own wrapped
    kernel), so the replication check (``check_vma``) has nothing to verify and is off.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or DATA_AXIS not in mesh.axis_names:
        return call
    rows, whole = PartitionSpec(DATA_AXIS), PartitionSpec()

    def checked(*args):
        devices, bsz = mesh.shape[DATA_AXIS], args[0].shape[0]
        if bsz % devices:
            raise ValueError(
                f"the Pallas scan under data parallelism got {bsz} batch rows, which do not "
                f"split over the {devices} devices of the {DATA_AXIS!r} mesh axis: make the "
                "batch (per micro-batch) a multiple of the device count"
            )
        return jax.shard_map(
            call,
            mesh=mesh,
            in_specs=tuple(rows if b else whole for b in batched_in),
            out_specs=(rows,) * n_out,
            check_vma=False,
        )(*args)

    return checked


def _call(kernel, opts: KernelOptions, shape, in_specs, out_specs, out_shape, name: str):
    bsz, _, n = shape
    return pl.pallas_call(
        kernel,
        grid=(bsz, pl.cdiv(n, opts.block_n)),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        # Triton params select the Triton lowering on GPU (None would mean Mosaic GPU).
        compiler_params=plgpu.CompilerParams(num_warps=opts.num_warps, num_stages=opts.num_stages),
        interpret=opts.interpret,
        name=name,
    )


def _forward_rows(gate, bx, damp, skew, h0, opts: KernelOptions) -> tuple[Array, Array]:
    """The forward kernel over the rows it is given (all of them, or one device's shard)."""
    bsz, t, n = gate.shape
    seq, pairs, vec, state = _specs(bsz, t, n, opts.block_n)
    kernel = functools.partial(_forward_kernel, n=n, unroll=opts.unroll)
    out_shape = (
        jax.ShapeDtypeStruct(bx.shape, bx.dtype),
        jax.ShapeDtypeStruct((bsz, 2, n), F32),
    )
    call = _call(
        kernel,
        opts,
        gate.shape,
        [seq, pairs, vec, vec, state(2)],
        [pairs, state(2)],
        out_shape,
        "oscillatory_scan_fwd",
    )
    return call(gate, bx, damp, skew, h0)


def _backward_rows(gate, bx, damp, skew, h0, h, dh, dh_last, opts: KernelOptions):
    """The backward kernel over the rows it is given; dparams stays per row ``[B, 3, N]``."""
    bsz, t, n = gate.shape
    seq, pairs, vec, state = _specs(bsz, t, n, opts.block_n)
    kernel = functools.partial(_backward_kernel, n=n, unroll=opts.unroll)
    out_shape = (
        jax.ShapeDtypeStruct(gate.shape, gate.dtype),
        jax.ShapeDtypeStruct(bx.shape, bx.dtype),
        jax.ShapeDtypeStruct((bsz, 2, n), F32),
        jax.ShapeDtypeStruct((bsz, 3, n), F32),
    )
    call = _call(
        kernel,
        opts,
        gate.shape,
        [seq, pairs, vec, vec, state(2), pairs, pairs, state(2)],
        [seq, pairs, state(2), state(3)],
        out_shape,
        "oscillatory_scan_bwd",
    )
    return call(gate, bx, damp, skew, h0, h, dh, dh_last)


# Which arguments of the two kernels are per batch row (split over devices) and which are
# the per-channel parameters (damping_logit, skew: passed whole).
_FORWARD_ROWS = (True, True, False, False, True)
_BACKWARD_ROWS = (True, True, False, False, True, True, True, True)


def _forward(gate, bx, damp, skew, h0, opts: KernelOptions) -> tuple[Array, Array]:
    rows = functools.partial(_forward_rows, opts=opts)
    return _per_device_rows(rows, _FORWARD_ROWS, 2)(gate, bx, damp, skew, h0)


def _backward(gate, bx, damp, skew, h0, h, dh, dh_last, opts: KernelOptions):
    rows = functools.partial(_backward_rows, opts=opts)
    return _per_device_rows(rows, _BACKWARD_ROWS, 4)(gate, bx, damp, skew, h0, h, dh, dh_last)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _fused_scan(gate, bx, damp, skew, h0, opts: KernelOptions) -> tuple[Array, Array]:
    return _forward(gate, bx, damp, skew, h0, opts)


def _fused_scan_fwd(gate, bx, damp, skew, h0, opts: KernelOptions):
    h, h_last = _forward(gate, bx, damp, skew, h0, opts)
    # Residuals are the inputs and h itself (in bx.dtype, the array the caller keeps anyway):
    # nothing of size [B, T, ...] is stored beyond what the forward pass already wrote.
    return (h, h_last), (gate, bx, damp, skew, h0, h)


def _fused_scan_bwd(opts: KernelOptions, residuals, cotangents):
    gate, bx, damp, skew, h0, h = residuals
    dh, dh_last = cotangents
    dgate, dbx, dh0, dparams = _backward(
        gate, bx, damp, skew, h0, h, dh.astype(h.dtype), dh_last.astype(F32), opts
    )
    # Per-channel chain rule through δ(damping) and (c, s) = Cayley(skew), on [N] vectors.
    # The batch sum is outside the kernel's shard_map: under data parallelism XLA turns it
    # into the cross-device all-reduce, like every other parameter gradient.
    dc, ds, ddelta = jnp.sum(dparams, axis=0)
    sk = skew.astype(F32)
    den2 = (1.0 + sk * sk) ** 2
    dskew = dc * (-4.0 * sk / den2) + ds * (2.0 * (1.0 - sk * sk) / den2)
    sig = jax.nn.sigmoid(damp.astype(F32))
    ddamp = ddelta * 0.5 * sig * (1.0 - sig)
    return dgate, dbx, ddamp.astype(damp.dtype), dskew.astype(skew.dtype), dh0.astype(h0.dtype)


_fused_scan.defvjp(_fused_scan_fwd, _fused_scan_bwd)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def oscillatory_scan_pallas(
    gate_logits: Array,
    bx: Array,
    damping_logit: Array,
    skew: Array,
    h0: Array | None = None,
    *,
    block_n: int | None = None,
    unroll: int | None = None,
    num_warps: int | None = None,
    num_stages: int = 1,
    interpret: bool | None = None,
) -> tuple[Array, Array]:
    """Fused oscillatory scan (same contract as ``qpf.ops.scan.oscillatory_scan``).

    Args:
      gate_logits: ``[B, T, N]`` (float32 or bfloat16).
      bx: ``[B, T, 2, N]`` complex input as real pairs.
      damping_logit, skew: ``[N]``.
      h0: ``[B, 2, N]`` initial state, zeros if None.
      block_n: channels per program, a power of two; default min(next_pow2(N), 32) on GPU
        (one lane per thread of one warp, and B·N/32 programs to spread over the SMs) and
        min(next_pow2(N), 512) in interpret mode (fewer, wider programs run faster there).
      unroll: time steps per loop iteration; default 8 compiled (the loads of unrolled steps
        do not depend on h and are issued together) and 1 in interpret mode (where unrolling
        only lengthens the compile).
      num_warps: Triton warps per program; default block_n // 32 (at least 1).
      num_stages: Triton pipeline stages.
      interpret: run in Pallas interpret mode; default True iff the default backend is CPU.

    Returns:
      (h ``[B, T, 2, N]`` in ``bx.dtype``, h_last ``[B, 2, N]`` float32). Differentiable
      in all five inputs (custom VJP: a reverse Pallas kernel); accumulation is float32.
    """
    bsz, t, n = gate_logits.shape
    if bx.shape != (bsz, t, 2, n):
        raise ValueError(f"bx has shape {bx.shape}, expected {(bsz, t, 2, n)}")
    if damping_logit.shape != (n,) or skew.shape != (n,):
        raise ValueError(
            f"damping_logit {damping_logit.shape} and skew {skew.shape} must be ({n},)"
        )
    h0 = jnp.zeros((bsz, 2, n), F32) if h0 is None else h0
    if h0.shape != (bsz, 2, n):
        raise ValueError(f"h0 has shape {h0.shape}, expected {(bsz, 2, n)}")
    if t == 0:
        return bx, h0.astype(F32)
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    if block_n is None:
        block_n = min(_next_pow2(n), 512 if interpret else 32)
    if block_n <= 0 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two, got {block_n}")
    if unroll is None:
        unroll = 1 if interpret else 8
    if unroll < 1:
        raise ValueError(f"unroll must be >= 1, got {unroll}")
    opts = KernelOptions(
        block_n=block_n,
        unroll=unroll,
        num_warps=num_warps or max(1, block_n // 32),
        num_stages=num_stages,
        interpret=bool(interpret),
    )
    return _fused_scan(gate_logits, bx, damping_logit, skew, h0, opts)
