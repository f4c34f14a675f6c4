"""Triton backend of ``group_assign`` (CGFormer hard Gumbel grouping).

Entry points (called by :mod:`rexfast.ops.group_assign` for ``backend="triton"``)::

    forward(q, k, v, tau, noise, key)                               -> (out, assign, counts)
    backward(dout, dassign, q, k, v, tau, noise, key, out, counts)  -> (dq, dk, dv, dtau)

Math and the exact backward formula: see the module docstring of
:mod:`rexfast.ops.group_assign`. Shapes: q (B,N,C), k (B,P,C), v (B,P,D); N is
small (CGFormer: 2 tokens; up to 128 supported), P = H·W pixels is large.

Why this structure
------------------
The op is memory-bound: per pixel it reads one key row (C values) and one value
row (D values) and, in the backward, writes one dk and one dv row, while the
per-pixel arithmetic is O(N·(C+D)). So both kernels stream the pixel axis once
and keep everything per-token (q̂, dout, out, counts) tiny and cache-resident.

* Grid ``(SPLITS, B)``. Program (s, b) owns a contiguous range of pixel tiles of
  batch b (tiles ``[s·T/S, (s+1)·T/S)``, T = ⌈P/BLOCK_P⌉, never empty since
  S ≤ T). SPLITS is chosen so that B·SPLITS ≈ 4 programs per SM, capped so the
  fp32 per-split partial sums stay small next to the k/v traffic (matters only
  for large N). Float sums over pixels are *not* done with atomics: every
  program writes its own partial slice and the wrapper reduces the partials
  with ``torch.sum`` over the split axis — a fixed order, so results are
  bitwise reproducible run to run.
* Token axis N is padded to BLOCK_N = max(16, next_pow2(N)) rows (``tl.dot``
  needs every dimension ≥ 16 on a GPU); padded rows get Z = −∞ and are masked
  on every load/store. P, C, D are looped/masked in BLOCK_P/BLOCK_C/BLOCK_D
  chunks, so no N×C or P×C slab is ever held in registers.
* Scores (shared helper ``_scores``, bitwise identical in forward and
  backward, so the backward's argmax is the forward's): per pixel tile,
  S = q̂·kᵀ via ``tl.dot`` over C chunks with ‖k_p‖² accumulated from the same
  loaded chunk, then S /= (‖k_p‖+1e-12), Z = (S + G)/τ. q̂ = l2n(q) in fp32 is
  precomputed by the wrapper (B·N·C, negligible). G is read from the explicit
  noise tensor, or recomputed in-register from the counter hash of
  ``kernels/rng.h`` (never materialised). τ is read from its device pointer (no
  host sync).
* Forward, two phases per program (no read-modify-write of partials):
  phase 1 streams k: argmax over N, writes the one-hot ``assign`` tile, the
  winning token index of each pixel (int32 scratch, 4 B/pixel) and per-token
  counts; phase 2 (after a block barrier) streams v once, per D chunk:
  partial_out[b,s,:,d] = Σ_tiles onehotᵀ·v via ``tl.dot(H, v)``. The wrapper
  sums partials and divides by counts+1.
* Backward, one pass per pixel tile: recompute S/Z/Y/argmax (k read #1), a D
  loop reading v once that forms W = dout·vᵀ and writes dv = Hᵀ·dout scaled by
  1/(r_a(p)+1), then dY, dZ, the dτ partial, dS = dZ/τ, and a C loop (k read
  #2, the same tile just read: an L2 hit) that writes dk (l2n backward folded
  in: dk = dSᵀq̂/d − k·(Σ_n dS·S)/(‖k‖ d)) and accumulates the program's
  dq̂ partial (Σ_p dS/d_p · k_p) in its own global slice (read-modify-write,
  fp32, cache-resident, separated by a block barrier). The wrapper sums dq̂
  partials and applies the l2n backward of q with torch (B·N·C), and reduces
  the dτ partials.
* Precision: all accumulation fp32. Products that are exact in the input dtype
  (one-hot·v, dout·vᵀ, one-hotᵀ·dout) run on tensor cores in fp16/bf16. Dots
  with an fp32 operand (q̂·kᵀ, dSᵀ·q̂, dS·k) use ``tf32x3`` (≈fp32 accuracy on
  tensor cores) for fp16/bf16 inputs and plain ``ieee`` fp32 for fp32 inputs,
  where the 1e-5 parity target leaves no room for tf32. Under the Triton
  interpreter bf16 ``tl.dot`` is wrong, so bf16 operands are cast to fp32 there
  (``NATIVE_DOT=False``); fp16 keeps the native path so the interpreter tests it.

Memory traffic (B·P pixels, e = bytes per input element): forward reads
k and v once (P·(C+D)·e) and writes assign (N·P·e) + 4 B/pixel index scratch;
backward reads k (twice, second from L2), v, dassign once and writes dk, dv once.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from ..registry import triton_interpret
from ..triton_lib import CompileConfig, gumbel_from_key, key_as_int32
from .reference import l2n, l2n_backward

NOISE_NONE, NOISE_EXPLICIT, NOISE_SEEDED = 0, 1, 2


# ----------------------------------------------------------------------------- device helpers
@triton.jit
def _scores(
    qh_ptr, k_ptr, noise_ptr, key, tau, b, N, P, C, stride_kb, stride_kp,
    offs_n, mask_n, offs_p, mask_p,
    BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    NOISE_MODE: tl.constexpr, PREC: tl.constexpr,
):
    """Scores of one pixel tile: S (cosine, BN×BP), Z = (S+G)/τ with padded rows
    at −∞, and per pixel ‖k_p‖ and d_p = ‖k_p‖ + eps."""
    s = tl.zeros((BLOCK_N, BLOCK_P), dtype=tl.float32)
    ksq = tl.zeros((BLOCK_P,), dtype=tl.float32)
    q_rows = qh_ptr + (b * N + offs_n[:, None]).to(tl.int64) * C
    k_rows = k_ptr + b.to(tl.int64) * stride_kb + offs_p[:, None].to(tl.int64) * stride_kp
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        qc = tl.load(q_rows + offs_c[None, :], mask=mask_n[:, None] & mask_c[None, :], other=0.0)
        kc = tl.load(k_rows + offs_c[None, :], mask=mask_p[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
        ksq += tl.sum(kc * kc, axis=1)
        s = tl.dot(qc, tl.trans(kc), s, input_precision=PREC)
    knorm = tl.sqrt(ksq)
    den = knorm + 1e-12
    s = s / den[None, :]
    if NOISE_MODE == 1:
        g = tl.load(
            noise_ptr + (b * N + offs_n[:, None]) * P + offs_p[None, :],
            mask=mask_n[:, None] & mask_p[None, :], other=0.0,
        ).to(tl.float32)
        z = (s + g) / tau
    elif NOISE_MODE == 2:
        index = ((b * N + offs_n[:, None]) * P + offs_p[None, :]).to(tl.uint32)
        g = gumbel_from_key(index, key.to(tl.uint32, bitcast=True))
        z = (s + g) / tau
    else:
        z = s / tau
    z = tl.where(mask_n[:, None], z, float("-inf"))
    return s, z, knorm, den


@triton.jit
def _winners(z):
    """Per pixel of a (BN, BP) logit tile: the winning token (first maximum, as
    torch.argmax), whether its softmax column is NaN as the reference computes it
    (a NaN or +inf logit, or every logit −inf; the winner is then token 0), and
    the column maximum over the non-NaN logits."""
    nan = z != z
    clean = tl.where(nan, float("-inf"), z)
    zmax = tl.max(clean, axis=0)
    poisoned = (tl.max(nan.to(tl.int32), axis=0) > 0) | (zmax == float("inf")) | (zmax == float("-inf"))
    win = tl.argmax(clean, axis=0, tie_break_left=True)
    win = tl.where(poisoned, 0, win)
    return win, poisoned, zmax


# ----------------------------------------------------------------------------- forward kernel
@triton.jit(do_not_specialize=["key"])
def _group_assign_fwd_kernel(
    qh_ptr, k_ptr, v_ptr, noise_ptr, tau_ptr, key,
    assign_ptr, index_ptr, counts_part_ptr, out_part_ptr,
    N, P, C, D, stride_kb, stride_kp, stride_vb, stride_vp, T, SPLITS,
    BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    NOISE_MODE: tl.constexpr, NATIVE_DOT: tl.constexpr, PREC: tl.constexpr,
):
    pid_s = tl.program_id(0)
    b = tl.program_id(1)
    t_begin = pid_s * T // SPLITS
    t_end = (pid_s + 1) * T // SPLITS
    tau = tl.load(tau_ptr).to(tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    part = b * SPLITS + pid_s

    # Phase 1: stream k; argmax over tokens, one-hot assign, winner index, counts.
    counts = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for t in range(t_begin, t_end):
        offs_p = t * BLOCK_P + tl.arange(0, BLOCK_P)
        mask_p = offs_p < P
        s, z, knorm, den = _scores(
            qh_ptr, k_ptr, noise_ptr, key, tau, b, N, P, C, stride_kb, stride_kp,
            offs_n, mask_n, offs_p, mask_p, BLOCK_N, BLOCK_P, BLOCK_C, NOISE_MODE, PREC,
        )
        win, poisoned, _ = _winners(z)
        hot = (offs_n[:, None] == win[None, :]) & mask_p[None, :]
        # a NaN softmax column: NaN assignment, and NaN counts for every token of the batch item
        hotf = tl.where(poisoned[None, :], float("nan"), hot.to(tl.float32))
        tl.store(
            assign_ptr + (b * N + offs_n[:, None]) * P + offs_p[None, :],
            hotf.to(assign_ptr.dtype.element_ty),
            mask=mask_n[:, None] & mask_p[None, :],
        )
        tl.store(index_ptr + b * P + offs_p, win.to(tl.int32), mask=mask_p)
        counts += tl.sum(tl.where(mask_p[None, :], hotf, 0.0), axis=1)
    tl.store(counts_part_ptr + part * N + offs_n, counts, mask=mask_n)

    # Every thread's index stores must be visible to the whole block before phase 2.
    tl.debug_barrier()

    # Phase 2: stream v once; partial_out[b, s] = Σ_tiles onehotᵀ v, one D chunk at a time.
    v_base = v_ptr + b.to(tl.int64) * stride_vb
    out_rows = out_part_ptr + (part * N + offs_n[:, None]).to(tl.int64) * D
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        for t in range(t_begin, t_end):
            offs_p = t * BLOCK_P + tl.arange(0, BLOCK_P)
            mask_p = offs_p < P
            win = tl.load(index_ptr + b * P + offs_p, mask=mask_p, other=-1, cache_modifier=".cg")
            hot = offs_n[:, None] == win[None, :]
            vt = tl.load(
                v_base + offs_p[:, None].to(tl.int64) * stride_vp + offs_d[None, :],
                mask=mask_p[:, None] & mask_d[None, :], other=0.0,
            )
            if NATIVE_DOT:  # one-hot × v is exact in the input dtype; fp32 accumulate
                acc = tl.dot(hot.to(tl.float32).to(vt.dtype), vt, acc)
            else:
                acc = tl.dot(hot.to(tl.float32), vt.to(tl.float32), acc, input_precision="ieee")
        tl.store(out_rows + offs_d[None, :], acc, mask=mask_n[:, None] & mask_d[None, :])


# ----------------------------------------------------------------------------- backward kernel
@triton.jit(do_not_specialize=["key"])
def _group_assign_bwd_kernel(
    qh_ptr, k_ptr, v_ptr, noise_ptr, tau_ptr, key,
    dout_ptr, dassign_ptr, inv_ptr, c_ptr,
    dk_ptr, dv_ptr, dqh_part_ptr, dtau_part_ptr,
    N, P, C, D, stride_kb, stride_kp, stride_vb, stride_vp, T, SPLITS,
    BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    NOISE_MODE: tl.constexpr, NATIVE_DOT: tl.constexpr, PREC: tl.constexpr,
):
    pid_s = tl.program_id(0)
    b = tl.program_id(1)
    t_begin = pid_s * T // SPLITS
    t_end = (pid_s + 1) * T // SPLITS
    tau = tl.load(tau_ptr).to(tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    part = b * SPLITS + pid_s
    inv = tl.load(inv_ptr + b * N + offs_n, mask=mask_n, other=0.0)  # 1/(r_n + 1)
    cn = tl.load(c_ptr + b * N + offs_n, mask=mask_n, other=0.0)  # dout_n · out_n
    dout_rows = dout_ptr + (b * N + offs_n[:, None]).to(tl.int64) * D
    v_base = v_ptr + b.to(tl.int64) * stride_vb
    k_base = k_ptr + b.to(tl.int64) * stride_kb
    q_rows = qh_ptr + (b * N + offs_n[:, None]).to(tl.int64) * C
    dq_rows = dqh_part_ptr + (part * N + offs_n[:, None]).to(tl.int64) * C
    dtau_acc = tl.zeros((BLOCK_P,), dtype=tl.float32)

    for t in range(t_begin, t_end):
        # The previous tile's dq̂ partial stores must be visible before we read them back.
        tl.debug_barrier()
        offs_p = t * BLOCK_P + tl.arange(0, BLOCK_P)
        mask_p = offs_p < P
        valid = mask_n[:, None] & mask_p[None, :]
        s, z, knorm, den = _scores(
            qh_ptr, k_ptr, noise_ptr, key, tau, b, N, P, C, stride_kb, stride_kp,
            offs_n, mask_n, offs_p, mask_p, BLOCK_N, BLOCK_P, BLOCK_C, NOISE_MODE, PREC,
        )
        win, _, zmax = _winners(z)
        e = tl.exp(z - zmax[None, :])  # NaN columns stay NaN, as in the reference
        y = e / tl.sum(e, axis=0)[None, :]
        hot = (offs_n[:, None] == win[None, :]) & mask_p[None, :]
        inv_p = tl.sum(tl.where(hot, inv[:, None], 0.0), axis=0)  # 1/(r_a(p) + 1)

        # D loop (v read once): W = dout·vᵀ and dv = onehotᵀ·dout / (r_a(p)+1).
        w = tl.zeros((BLOCK_N, BLOCK_P), dtype=tl.float32)
        v_rows = v_base + offs_p[:, None].to(tl.int64) * stride_vp
        dv_rows = dv_ptr + (b * P + offs_p[:, None]).to(tl.int64) * D
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            go = tl.load(dout_rows + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0)
            vt = tl.load(v_rows + offs_d[None, :], mask=mask_p[:, None] & mask_d[None, :], other=0.0)
            if NATIVE_DOT:  # exact products in the input dtype, fp32 accumulate
                w = tl.dot(go, tl.trans(vt), w)
                gv = tl.dot(tl.trans(hot.to(tl.float32).to(go.dtype)), go)
            else:
                go32 = go.to(tl.float32)
                w = tl.dot(go32, tl.trans(vt.to(tl.float32)), w, input_precision="ieee")
                gv = tl.dot(tl.trans(hot.to(tl.float32)), go32, input_precision="ieee")
            dv = gv * inv_p[:, None]
            tl.store(dv_rows + offs_d[None, :], dv.to(dv_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_d[None, :])

        da = tl.load(dassign_ptr + (b * N + offs_n[:, None]) * P + offs_p[None, :], mask=valid, other=0.0)
        dy = da.to(tl.float32) + (w - cn[:, None]) * inv[:, None]
        dz = y * (dy - tl.sum(y * dy, axis=0)[None, :])
        dz = tl.where(valid, dz, 0.0)
        # Σ_N dZ = 0 per pixel, so the max shift is exact and avoids cancellation.
        dtau_acc += tl.sum(tl.where(valid, dz * (z - zmax[None, :]), 0.0), axis=0)
        ds = dz / tau
        rowdot = tl.sum(ds * s, axis=0)  # Σ_n dS·S = (k · dk̂)/d
        coef = tl.where(knorm > 0, rowdot / (knorm * den), 0.0)
        ds_d = ds / den[None, :]  # dS / d_p: dq̂ = Σ_p (dS/d_p) k_p

        # C loop (k tile again, from L2): dk, and the dq̂ partial.
        k_rows = k_base + offs_p[:, None].to(tl.int64) * stride_kp
        dk_rows = dk_ptr + (b * P + offs_p[:, None]).to(tl.int64) * C
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < C
            kc = tl.load(k_rows + offs_c[None, :], mask=mask_p[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
            qc = tl.load(q_rows + offs_c[None, :], mask=mask_n[:, None] & mask_c[None, :], other=0.0)
            gk = tl.dot(tl.trans(ds), qc, input_precision=PREC)  # dk̂ = dSᵀ q̂  (BP × BC)
            dk = gk / den[:, None] - kc * coef[:, None]
            tl.store(dk_rows + offs_c[None, :], dk.to(dk_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_c[None, :])
            mask_q = mask_n[:, None] & mask_c[None, :]
            not_first = ((offs_c * 0 + t) > t_begin)[None, :]  # first tile of the split: start from 0
            acc = tl.load(dq_rows + offs_c[None, :], mask=mask_q & not_first, other=0.0, cache_modifier=".cg")
            acc = tl.dot(ds_d, kc, acc, input_precision=PREC)
            tl.store(dq_rows + offs_c[None, :], acc, mask=mask_q)

    tl.store(dtau_part_ptr + part, tl.sum(dtau_acc, axis=0))


# ----------------------------------------------------------------------------- host side
@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 8  # interpreter: few programs, but still several tiles per split in the tests


def _blocks(N: int):
    """(BLOCK_N, BLOCK_P, BLOCK_C, BLOCK_D, fwd num_warps, bwd num_warps).

    BLOCK_N/BLOCK_C are shared by forward and backward so both accumulate the
    scores in the same order (the backward's argmax is the forward's). Chosen
    from sm_90 compile statistics (registers, no spills; see
    .ci/compile_triton_sm90.py), not from GPU timings."""
    block_n = max(16, triton.next_power_of_2(N))
    if block_n == 16:  # CGFormer (N = 2): bwd 221-223 regs, no spills; fwd 134-176 regs
        return block_n, 64, 32, 64, 4, 8
    if block_n == 32:
        return block_n, 32, 32, 64, 4, 8
    if block_n == 64:
        return block_n, 32, 32, 32, 8, 8
    return block_n, 16, 32, 64, 8, 8  # N ≤ 128; the backward still spills some registers


def _splits(B: int, T: int, device, traffic_bytes_per_batch: int, partial_bytes_per_split: int) -> int:
    """Programs per batch element: ~4 per SM overall, at most one per tile, and
    few enough that the fp32 partials (written + read back) stay ≤ ~1/4 of the
    k/v traffic (binding only for large N)."""
    s = -(-_target_programs(device) // B)
    cap = max(1, traffic_bytes_per_batch // (4 * max(1, partial_bytes_per_split)))
    return max(1, min(T, s, cap))


def _modes(dtype: torch.dtype, interpret: bool | None = None):
    """(NATIVE_DOT, PREC): see the module docstring, 'Precision'."""
    if dtype == torch.float32:
        return False, "ieee"
    if triton_interpret() if interpret is None else interpret:
        return dtype == torch.float16, "ieee"  # interpreter: bf16 tl.dot is wrong, fp16 is fine
    return True, "tf32x3"


def _on_device(t: torch.Tensor):
    # Launch on the tensors' GPU even when it is not the current device.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _noise_args(noise, key, like):
    if noise is not None:
        return noise.contiguous(), 0, NOISE_EXPLICIT
    if key is not None:
        return like, key_as_int32(key), NOISE_SEEDED
    return like, 0, NOISE_NONE


def _check(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"group_assign[triton]: {name} must be float32/float16/bfloat16, got {t.dtype}")
        if t.stride(-1) != 1:
            raise ValueError(f"group_assign[triton]: {name} needs unit stride on its last axis, got {t.stride()}")


def forward(q, k, v, tau, noise, key):
    _check(q, k, v)
    B, N, C = q.shape
    P, D = k.shape[1], v.shape[2]
    dev = q.device
    if B == 0:  # nothing to launch (the grid would be empty)
        return (q.new_empty(0, N, D), q.new_empty(0, N, P), torch.empty(0, N, dtype=torch.float32, device=dev))
    qh = l2n(q.float()).contiguous()
    tau = tau.reshape(1)
    noise_t, key32, mode = _noise_args(noise, key, qh)
    native, prec = _modes(q.dtype)
    block_n, block_p, block_c, block_d, warps, _ = _blocks(N)
    T = triton.cdiv(P, block_p)
    splits = _splits(B, T, dev, P * (C + D) * q.element_size(), 8 * N * D)

    assign = torch.empty((B, N, P), dtype=q.dtype, device=dev)
    index = torch.empty((B, P), dtype=torch.int32, device=dev)
    counts_part = torch.empty((B, splits, N), dtype=torch.float32, device=dev)
    out_part = torch.empty((B, splits, N, D), dtype=torch.float32, device=dev)
    with _on_device(q):
        _group_assign_fwd_kernel[(splits, B)](
            qh, k, v, noise_t, tau, key32,
            assign, index, counts_part, out_part,
            N, P, C, D, k.stride(0), k.stride(1), v.stride(0), v.stride(1), T, splits,
            BLOCK_N=block_n, BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_D=block_d,
            NOISE_MODE=mode, NATIVE_DOT=native, PREC=prec, num_warps=warps,
        )
    counts = counts_part.sum(dim=1)
    out = (out_part.sum(dim=1) / (counts + 1.0).unsqueeze(-1)).to(q.dtype)
    return out, assign, counts


def backward(dout, dassign, q, k, v, tau, noise, key, out, counts):
    _check(q, k, v)
    B, N, C = q.shape
    P, D = k.shape[1], v.shape[2]
    dev = q.device
    dtype = q.dtype
    if B == 0:
        return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
                torch.zeros(1, dtype=torch.float32, device=dev))
    qh = l2n(q.float()).contiguous()
    tau = tau.reshape(1)
    dout = dout.to(dtype).contiguous()
    dassign = dassign.contiguous()
    inv = (1.0 / (counts.float() + 1.0)).contiguous()
    c = (dout.float() * out.float()).sum(-1).contiguous()
    noise_t, key32, mode = _noise_args(noise, key, qh)
    native, prec = _modes(dtype)
    block_n, block_p, block_c, block_d, _, warps = _blocks(N)
    T = triton.cdiv(P, block_p)
    splits = _splits(B, T, dev, 2 * P * (C + D) * q.element_size(), 8 * N * C)

    dk = torch.empty((B, P, C), dtype=dtype, device=dev)
    dv = torch.empty((B, P, D), dtype=dtype, device=dev)
    dqh_part = torch.empty((B, splits, N, C), dtype=torch.float32, device=dev)
    dtau_part = torch.empty((B, splits), dtype=torch.float32, device=dev)
    with _on_device(q):
        _group_assign_bwd_kernel[(splits, B)](
            qh, k, v, noise_t, tau, key32,
            dout, dassign, inv, c,
            dk, dv, dqh_part, dtau_part,
            N, P, C, D, k.stride(0), k.stride(1), v.stride(0), v.stride(1), T, splits,
            BLOCK_N=block_n, BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_D=block_d,
            NOISE_MODE=mode, NATIVE_DOT=native, PREC=prec, num_warps=warps,
        )
    dq = l2n_backward(q.float(), dqh_part.sum(dim=1)).to(dtype)
    dtau = (-dtau_part.sum() / tau.float()).reshape(1)
    return dq, dk, dv, dtau


# ----------------------------------------------------------------------------- sm_90 compile check
def compile_configs() -> list[CompileConfig]:
    """The kernel specialisations ``.ci/compile_triton_sm90.py`` compiles for sm_90:
    every dtype × noise mode at N = 2 (CGFormer), the other BLOCK_N sizes, and an
    unaligned variant (odd C/D and strides, e.g. k, v slices of a fused kv tensor)."""
    configs = []
    noise_names = {NOISE_NONE: "none", NOISE_EXPLICIT: "explicit", NOISE_SEEDED: "seeded"}
    plan = [(dt, mode, 2) for dt in (torch.float32, torch.bfloat16, torch.float16) for mode in noise_names]
    plan += [(torch.bfloat16, NOISE_SEEDED, 48), (torch.bfloat16, NOISE_EXPLICIT, 128), (torch.float32, NOISE_NONE, 128)]
    strides = ("C", "D", "stride_kb", "stride_kp", "stride_vb", "stride_vp")
    for dtype, mode, n in plan + [(torch.bfloat16, NOISE_SEEDED, 17)]:
        unaligned = n == 17
        native, prec = _modes(dtype, interpret=False)
        block_n, block_p, block_c, block_d, fwd_warps, bwd_warps = _blocks(n)
        noise_dtype = dtype if mode == NOISE_EXPLICIT else torch.float32
        const = dict(BLOCK_N=block_n, BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_D=block_d,
                     NOISE_MODE=mode, NATIVE_DOT=native, PREC=prec)
        label = f"{str(dtype).split('.')[-1]:8s} noise={noise_names[mode]:8s} N={n:<3d} BLOCK_N={block_n}"
        label += "  unaligned" if unaligned else ""
        common = dict(qh_ptr=torch.float32, k_ptr=dtype, v_ptr=dtype, noise_ptr=noise_dtype, tau_ptr=torch.float32)
        fwd = dict(common, assign_ptr=dtype, index_ptr=torch.int32, counts_part_ptr=torch.float32,
                   out_part_ptr=torch.float32)
        bwd = dict(common, dout_ptr=dtype, dassign_ptr=dtype, inv_ptr=torch.float32, c_ptr=torch.float32,
                   dk_ptr=dtype, dv_ptr=dtype, dqh_part_ptr=torch.float32, dtau_part_ptr=torch.float32)
        if not unaligned:
            configs.append(CompileConfig(f"group_assign fwd {label}", _group_assign_fwd_kernel, fwd, const,
                                         fwd_warps, tuple(fwd) + strides))
        configs.append(CompileConfig(f"group_assign bwd {label}", _group_assign_bwd_kernel, bwd, const, bwd_warps,
                                     () if unaligned else tuple(bwd) + strides))
    return configs

