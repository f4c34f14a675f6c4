"""Triton kernels shared by ``region_image_attention`` (RIA) and ``region_language_attention``
(RLA): one flash-style masked-attention family whose mask is decided in the kernel.

Semantics: :mod:`.core` (every backend computes the same). Each op's Triton backend
is a pair of functions at the end of this module, registered by the op lazily
(``rexfast.ops.common.lazy``: triton is imported on the first Triton call):

    ria_forward(q, k, v, region_logits, kh, kw, scale)              -> (out, lse, open_rows)
    ria_backward(dout, q, k, v, region_logits, kh, kw, scale, out, lse, open_rows) -> (dq, dk, dv)
    rla_forward(q, k, v, key_padding_mask, scale)                   -> (out, lse)
    rla_backward(dout, q, k, v, key_padding_mask, scale, out, lse)  -> (dq, dk, dv)

RIA's forward runs the first cheap pass (``_open_rows_kernel``: rows that block every
key) and then the flash kernel; its backward takes the forward's open rows back. RLA
has a key padding mask (MASK_PADDING) or none (MASK_NONE).

Kernels
-------
* ``_open_rows_kernel`` (RIA only, the first cheap pass): grid (query blocks, B); per
  row, whether any key is allowed; rows that block every key are "open" (they attend
  to all keys). One decision per (b, query, key), shared by the heads.
* ``_fwd_kernel``: grid (query blocks, B·H). Per key block: the decision tile
  (MASK = 0 none, 1 key padding, 2 region), skipped when nothing in it is allowed and
  skipping is exact (v of this (b, h) finite), s = q kᵀ·scale → −∞ where blocked,
  online softmax (NaN-propagating maximum, so a NaN row stays NaN as in PyTorch),
  acc += p v. Writes out and lse = m + log l; no score or mask tensor in memory.
* ``_delta_kernel`` (fp16/bf16 backward only): grid (query blocks, B·H). The softmax
  backward's row statistic Δ_i = Σ_j p_ij dp_ij from fp32 p and dp, over every key (see
  Precision). fp32 takes Δ_i = dout_i · out_i on the host instead (out is fp32 there).
* ``_bwd_kernel``: grid (key blocks, B·H). Recomputes p = exp(s − lse) per query block,
  dv += pᵀ dout, dp = dout vᵀ, ds = where(allowed, p (dp − Δ), 0)·scale,
  dk += dsᵀ q, and writes this key block's dq partial ds k (fp32) to its own slice:
  the wrapper sums the partials over key blocks in order — no atomics, bitwise
  reproducible. Blocked tiles are skipped only where exact (finite q, k, dout of the
  (b, h) and finite lse on every row of the query block).

Decisions (MASK = 2): the resampled logit of (query i, key j) from the per-key texel
offsets and weights (tables made on the host exactly as the plan's resampler makes
them, ``plan.resample_axis``), with ``tl.fma`` where that resampler
rounds once: CUDA tensors follow torch's CUDA kernel, CPU tensors (the interpreter)
torch's CPU kernels, with the 8-lane vector/tail split over queries. Then blocked iff
value <= threshold (NaN never blocked). Every add is either inside an explicit fma or
of two values that are not products, so the compiler's fp fusion has nothing left to
contract.

Precision: fp32 inputs use ``input_precision="ieee"`` dots (the 1e-5 parity target
leaves no room for tf32); fp16/bf16 use native dots with fp32 accumulation, p and dS
kept in fp32 and cast to the input dtype only as dot operands (p·v, pᵀ·dout, dSᵀ·q,
dS·k), as flash attention does. The softmax statistics stay fp32: lse from the
forward, and Δ from the Δ pass rather than from dout·out with out rounded to fp16/bf16.
Where the softmax is peaked, dS = p (dp − Δ) cancels and that rounding of out decided
the error: dq/dk 1.1e-2..1.2e-2 (relative norm against the float64 truth from the same
bf16 inputs, q·kᵀ ×40) with dout·out, 2.4e-3..2.8e-3 with the Δ pass (measured under
the interpreter with the GPU's roundings, below; PyTorch's bf16 SDPA: 1.2e-2).

The interpreter: its bf16 ``tl.dot`` is wrong, and its fp32 → bf16 conversion
truncates (the GPU rounds to nearest even). So for bf16 under the interpreter
(``EMU_BF16``) the operands are cast to fp32 (exact) for fp32 dots, and every value
the GPU converts to bf16 — p and dS as dot operands, the stored out, dk and dv — is
rounded by ``_round_bf16`` (integer arithmetic, the GPU's rounding) first: the
interpreter then computes the GPU's values, up to the dots' accumulation order and
the GPU's exp/log approximations. fp16 needs none of this (its interpreter dot and
conversion are right).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ..registry import triton_interpret
from ..triton_lib import CompileConfig
from .plan import RESAMPLE_CL, RESAMPLE_COPY, RESAMPLE_CUDA, RESAMPLE_GENERIC, RESAMPLE_MAP, decision_plan, resample_axis

RIA, RLA = "region_image_attention", "region_language_attention"

MASK_NONE, MASK_PADDING, MASK_REGION = 0, 1, 2
# Tiles and warps from sm_90 compile statistics (.ci/compile_triton_sm90.py), not from GPU
# timings (none here): with 8 warps the forward needs <= 245 registers and no spill stack
# for fp32/bf16/fp16 at d <= 64, the backward none for fp16/bf16 and a small spill
# (~0.8 KB) for fp32; 4 warps spill 5 KB in the fp32 backward.
BLOCK_M, BLOCK_N, NUM_WARPS = 32, 64, 8


# ----------------------------------------------------------------------------- device helpers
@triton.jit
def _nanmax(a, b):
    return tl.where(a != a, a, tl.where(b != b, b, tl.maximum(a, b)))


@triton.jit
def _row_nanmax(x):
    """Row maximum of a 2-D block, NaN where the row holds a NaN."""
    has_nan = tl.max((x != x).to(tl.int32), axis=1) > 0
    return tl.where(has_nan, float("nan"), tl.max(tl.where(x != x, float("-inf"), x), axis=1))


@triton.jit
def _round_bf16(x):
    """fp32 x rounded to the nearest bfloat16 (ties to even), kept in fp32: what the GPU's
    fp32 → bf16 conversion gives. Integer arithmetic on the bits, so the interpreter
    computes it too (its own conversion truncates). NaN stays NaN, overflow gives ±inf."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(x != x, x, rounded.to(tl.float32, bitcast=True))


@triton.jit
def _dot_operand(x, dtype: tl.constexpr, EMU_BF16: tl.constexpr):
    """x (fp32) as the operand of a dot in ``dtype``: on the GPU the conversion; under the
    interpreter for bf16 inputs (EMU_BF16, fp32 dots) the same rounding, kept in fp32."""
    if EMU_BF16:
        return _round_bf16(x)
    return x.to(dtype)


@triton.jit
def _resample(a, b, c, d, w0, w1, w2, w3, vec_row, MODE: tl.constexpr, FMA: tl.constexpr):
    """torch's resampled value from texels a..d and weights (see the module docstring)."""
    if MODE == 0:  # RESAMPLE_CL: w = w00, w01, w10, w11
        if FMA:
            v_vec = tl.fma(a, w0, tl.fma(b, w1, tl.fma(d, w3, c * w2)))
            v_tail = tl.fma(d, w3, tl.fma(c, w2, tl.fma(a, w0, b * w1)))
        else:
            v_vec = a * w0 + (b * w1 + (c * w2 + d * w3))
            v_tail = ((a * w0 + b * w1) + c * w2) + d * w3
        v = tl.where(vec_row, v_vec, v_tail)
    elif MODE == 1:  # RESAMPLE_GENERIC: w = λy0, λy1, λx0, λx1
        if FMA:
            v = tl.fma(tl.fma(a, w2, b * w3), w0, tl.fma(c, w2, d * w3) * w1)
        else:
            v = (a * w2 + b * w3) * w0 + (c * w2 + d * w3) * w1
    elif MODE == 2:  # RESAMPLE_CUDA: w = λy0, λy1, λx0, λx1 (plan.cuda_bilinear)
        t0 = tl.fma(w2, a, w3 * b)
        t1 = tl.fma(w2, c, w3 * d)
        v = tl.fma(w0, t0, w1 * t1)
    else:  # RESAMPLE_COPY
        v = a
    return v


@triton.jit
def _allowed(b, offs_m, offs_n, Q, S, logits_ptr, plane, offs_ptr, wts_ptr, map_ptr, open_ptr, pad_ptr,
             threshold, q_vec,
             MASK: tl.constexpr, MODE: tl.constexpr, FMA: tl.constexpr, USE_OPEN: tl.constexpr):
    """(BM, BN) allowed decisions of queries offs_m × keys offs_n of sample b (in range only)."""
    valid = (offs_m[:, None] < Q) & (offs_n[None, :] < S)
    if MASK == 0:
        allowed = valid
    elif MASK == 1:
        padded = tl.load(pad_ptr + b.to(tl.int64) * S + offs_n, mask=offs_n < S, other=1)
        allowed = valid & (padded == 0)[None, :]
    else:
        rows = (b * Q + offs_m).to(tl.int64)
        mask_n = offs_n < S
        if MODE == 4:  # RESAMPLE_MAP: torch's values, resampled by the wrapper
            value = tl.load(map_ptr + rows[:, None] * S + offs_n[None, :], mask=valid, other=0.0)
        else:
            o0 = tl.load(offs_ptr + offs_n, mask=mask_n, other=0)
            o1 = tl.load(offs_ptr + S + offs_n, mask=mask_n, other=0)
            o2 = tl.load(offs_ptr + 2 * S + offs_n, mask=mask_n, other=0)
            o3 = tl.load(offs_ptr + 3 * S + offs_n, mask=mask_n, other=0)
            w0 = tl.load(wts_ptr + offs_n, mask=mask_n, other=0.0)
            w1 = tl.load(wts_ptr + S + offs_n, mask=mask_n, other=0.0)
            w2 = tl.load(wts_ptr + 2 * S + offs_n, mask=mask_n, other=0.0)
            w3 = tl.load(wts_ptr + 3 * S + offs_n, mask=mask_n, other=0.0)
            base = logits_ptr + rows[:, None] * plane
            ta = tl.load(base + o0[None, :], mask=valid, other=0.0)
            tb = tl.load(base + o1[None, :], mask=valid, other=0.0)
            tc = tl.load(base + o2[None, :], mask=valid, other=0.0)
            td = tl.load(base + o3[None, :], mask=valid, other=0.0)
            vec_row = (offs_m < q_vec)[:, None]
            value = _resample(ta, tb, tc, td, w0[None, :], w1[None, :], w2[None, :], w3[None, :], vec_row,
                              MODE, FMA)
        allowed = valid & ~(value <= threshold)  # NaN: allowed
        if USE_OPEN:
            is_open = tl.load(open_ptr + b * Q + offs_m, mask=offs_m < Q, other=0)
            allowed = allowed | (valid & (is_open != 0)[:, None])
    return allowed


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _open_rows_kernel(
    logits_ptr, offs_ptr, wts_ptr, map_ptr, open_ptr, Q, S, plane, threshold, q_vec,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MODE: tl.constexpr, FMA: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    count = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for n0 in range(0, S, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        allowed = _allowed(b, offs_m, offs_n, Q, S, logits_ptr, plane, offs_ptr, wts_ptr, map_ptr, open_ptr,
                           open_ptr, threshold, q_vec, 2, MODE, FMA, False)
        count += tl.sum(allowed.to(tl.int32), axis=1)
    tl.store(open_ptr + b * Q + offs_m, (count == 0).to(tl.int8), mask=offs_m < Q)


@triton.jit
def _fwd_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr,
    logits_ptr, offs_ptr, wts_ptr, map_ptr, open_ptr, pad_ptr, empty_ptr, vfinite_ptr,
    H, Q, S, D, scale, threshold, q_vec, plane,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    MASK: tl.constexpr, MODE: tl.constexpr, FMA: tl.constexpr, NATIVE_DOT: tl.constexpr, PREC: tl.constexpr,
    EMU_BF16: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < Q
    mask_d = offs_d < D
    q_base = q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    q = tl.load(q_base + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    if not NATIVE_DOT:
        q = q.to(tl.float32)
    k_base = k_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    out_rows = out_ptr + (bh.to(tl.int64) * Q + offs_m[:, None]) * D + offs_d[None, :]
    lse_rows = lse_ptr + bh.to(tl.int64) * Q + offs_m

    empty = False
    if MASK == 1:
        empty = tl.load(empty_ptr + b) != 0
    if empty:  # a sample whose every word is padded: zero rows, lse = −∞
        tl.store(out_rows, tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32).to(out_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_d[None, :])
        tl.store(lse_rows, tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32), mask=mask_m)
    else:
        v_finite = tl.load(vfinite_ptr + bh) != 0
        m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for n0 in range(0, S, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < S
            keep = _allowed(b, offs_m, offs_n, Q, S, logits_ptr, plane, offs_ptr, wts_ptr, map_ptr, open_ptr,
                            pad_ptr, threshold, q_vec, MASK, MODE, FMA, True)
            n_keep = tl.sum(tl.sum(keep.to(tl.int32), axis=1), axis=0)
            if (n_keep > 0) | (~v_finite):  # a fully blocked tile adds exactly nothing (finite v)
                kt = tl.load(k_base + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :],
                             mask=mask_n[:, None] & mask_d[None, :], other=0.0)
                vt = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vn + offs_d[None, :],
                             mask=mask_n[:, None] & mask_d[None, :], other=0.0)
                if not NATIVE_DOT:
                    kt = kt.to(tl.float32)
                    vt = vt.to(tl.float32)
                s = tl.dot(q, tl.trans(kt), input_precision=PREC) * scale
                s = tl.where(keep, s, float("-inf"))
                m_new = _nanmax(m, _row_nanmax(s))
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp(m - m_use)
                p = tl.exp(s - m_use[:, None])
                p = tl.where(mask_n[None, :], p, 0.0)  # keys past S do not exist
                l = l * alpha + tl.sum(p, axis=1)
                acc = acc * alpha[:, None] + tl.dot(_dot_operand(p, vt.dtype, EMU_BF16), vt, input_precision=PREC)
                m = m_new
        m_use = tl.where(m == float("-inf"), 0.0, m)
        out = acc / l[:, None]
        if EMU_BF16:
            out = _round_bf16(out)
        tl.store(out_rows, out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
        tl.store(lse_rows, m_use + tl.log(l), mask=mask_m)


@triton.jit
def _delta_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr,
    logits_ptr, offs_ptr, wts_ptr, map_ptr, open_ptr, pad_ptr, empty_ptr, safe_ptr,
    H, Q, S, D, scale, threshold, q_vec, plane,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    MASK: tl.constexpr, MODE: tl.constexpr, FMA: tl.constexpr, NATIVE_DOT: tl.constexpr, PREC: tl.constexpr,
):
    """Δ_i = Σ_j p_ij dp_ij in fp32 (p = exp(s − lse), dp = dout vᵀ), grid (query blocks, B·H):
    the softmax backward's row statistic from unrounded p and dp, where dout·out would
    take the output rounded to fp16/bf16. Every key counts (p = 0 at a blocked key, so a
    NaN/inf dp there makes Δ NaN, as autograd's softmax backward does); a tile without
    an allowed key is skipped only where it adds exactly 0 (finite q, k, v, dout of the
    (b, h) and finite lse on every row of the block)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < Q
    mask_d = offs_d < D
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None].to(tl.int64) * stride_qm
                + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    g = tl.load(dout_ptr + bh.to(tl.int64) * Q * D + offs_m[:, None] * D + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    if not NATIVE_DOT:
        q = q.to(tl.float32)
        g = g.to(tl.float32)
    k_base = k_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    lse = tl.load(lse_ptr + bh.to(tl.int64) * Q + offs_m, mask=mask_m, other=0.0)
    lse_bad = tl.sum(((lse != lse) | (lse == float("inf")) | (lse == float("-inf"))).to(tl.int32), axis=0)
    safe = tl.load(safe_ptr + bh) != 0
    delta = tl.zeros((BLOCK_M,), dtype=tl.float32)
    empty = False
    if MASK == 1:
        empty = tl.load(empty_ptr + b) != 0
    if not empty:  # an all-padded sample: nothing flows back (Δ unused)
        for n0 in range(0, S, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < S
            keep = _allowed(b, offs_m, offs_n, Q, S, logits_ptr, plane, offs_ptr, wts_ptr, map_ptr, open_ptr,
                            pad_ptr, threshold, q_vec, MASK, MODE, FMA, True)
            n_keep = tl.sum(tl.sum(keep.to(tl.int32), axis=1), axis=0)
            if (n_keep > 0) | (~safe) | (lse_bad > 0):
                kt = tl.load(k_base + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :],
                             mask=mask_n[:, None] & mask_d[None, :], other=0.0)
                vt = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vn + offs_d[None, :],
                             mask=mask_n[:, None] & mask_d[None, :], other=0.0)
                if not NATIVE_DOT:
                    kt = kt.to(tl.float32)
                    vt = vt.to(tl.float32)
                s = tl.dot(q, tl.trans(kt), input_precision=PREC) * scale
                s = tl.where(keep, s, float("-inf"))
                p = tl.exp(s - lse[:, None])
                dp = tl.dot(g, tl.trans(vt), input_precision=PREC)
                delta += tl.sum(tl.where(mask_m[:, None] & mask_n[None, :], p * dp, 0.0), axis=1)
    tl.store(delta_ptr + bh.to(tl.int64) * Q + offs_m, delta, mask=mask_m)


@triton.jit
def _bwd_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, dq_part_ptr,
    logits_ptr, offs_ptr, wts_ptr, map_ptr, open_ptr, pad_ptr, empty_ptr, safe_ptr,
    B, H, Q, S, D, scale, threshold, q_vec, plane,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    MASK: tl.constexpr, MODE: tl.constexpr, FMA: tl.constexpr, NATIVE_DOT: tl.constexpr, PREC: tl.constexpr,
    EMU_BF16: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < S
    mask_d = offs_d < D
    k_base = k_ptr + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    kt = tl.load(k_base + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :],
                 mask=mask_n[:, None] & mask_d[None, :], other=0.0)
    vt = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vn + offs_d[None, :],
                 mask=mask_n[:, None] & mask_d[None, :], other=0.0)
    if not NATIVE_DOT:
        kt = kt.to(tl.float32)
        vt = vt.to(tl.float32)
    q_base = q_ptr + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    g_base = dout_ptr + bh.to(tl.int64) * Q * D  # dout: contiguous (B, H, Q, D)
    dq_base = dq_part_ptr + ((pid_n.to(tl.int64) * B + b) * H + h) * Q * D
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    empty = False
    if MASK == 1:
        empty = tl.load(empty_ptr + b) != 0
    safe = tl.load(safe_ptr + bh) != 0
    for m0 in range(0, Q, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < Q
        dq_rows = dq_base + offs_m[:, None] * D + offs_d[None, :]
        if empty:  # all-padded sample: nothing flows back
            tl.store(dq_rows, tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32), mask=mask_m[:, None] & mask_d[None, :])
        else:
            lse = tl.load(lse_ptr + bh.to(tl.int64) * Q + offs_m, mask=mask_m, other=0.0)
            keep = _allowed(b, offs_m, offs_n, Q, S, logits_ptr, plane, offs_ptr, wts_ptr, map_ptr, open_ptr,
                            pad_ptr, threshold, q_vec, MASK, MODE, FMA, True)
            n_keep = tl.sum(tl.sum(keep.to(tl.int32), axis=1), axis=0)
            lse_bad = tl.sum(((lse != lse) | (lse == float("inf")) | (lse == float("-inf"))).to(tl.int32), axis=0)
            if (n_keep > 0) | (~safe) | (lse_bad > 0):
                q = tl.load(q_base + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :],
                            mask=mask_m[:, None] & mask_d[None, :], other=0.0)
                g = tl.load(g_base + offs_m[:, None] * D + offs_d[None, :],
                            mask=mask_m[:, None] & mask_d[None, :], other=0.0)
                if not NATIVE_DOT:
                    q = q.to(tl.float32)
                    g = g.to(tl.float32)
                delta = tl.load(delta_ptr + bh.to(tl.int64) * Q + offs_m, mask=mask_m, other=0.0)
                s = tl.dot(q, tl.trans(kt), input_precision=PREC) * scale
                s = tl.where(keep, s, float("-inf"))
                p = tl.exp(s - lse[:, None])
                p = tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)
                dv += tl.dot(tl.trans(_dot_operand(p, g.dtype, EMU_BF16)), g, input_precision=PREC)
                dp = tl.dot(g, tl.trans(vt), input_precision=PREC)
                ds = tl.where(keep, p * (dp - delta[:, None]), 0.0) * scale
                dk += tl.dot(tl.trans(_dot_operand(ds, q.dtype, EMU_BF16)), q, input_precision=PREC)
                dq = tl.dot(_dot_operand(ds, kt.dtype, EMU_BF16), kt, input_precision=PREC)
                tl.store(dq_rows, dq, mask=mask_m[:, None] & mask_d[None, :])
            else:
                tl.store(dq_rows, tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32),
                         mask=mask_m[:, None] & mask_d[None, :])
    rows = (bh.to(tl.int64) * S + offs_n[:, None]) * D + offs_d[None, :]
    if EMU_BF16:
        dk = _round_bf16(dk)
        dv = _round_bf16(dv)
    tl.store(dk_ptr + rows, dk.to(dk_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_d[None, :])
    tl.store(dv_ptr + rows, dv.to(dv_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_d[None, :])


# ----------------------------------------------------------------------------- host side
def modes(dtype: torch.dtype, interpret: bool | None = None):
    """(NATIVE_DOT, PREC, EMU_BF16) for q/k/v of ``dtype``: EMU_BF16 under the interpreter for
    bf16 (whose bf16 tl.dot is wrong and whose fp32 → bf16 conversion truncates), where
    the kernels take fp32 dots of the exact bf16 operands and round every value the GPU
    converts to bf16 (dot operands, stored outputs) with ``_round_bf16`` instead."""
    if dtype == torch.float32:
        return False, "ieee", False
    if triton_interpret() if interpret is None else interpret:
        return dtype == torch.float16, "ieee", dtype == torch.bfloat16  # fp16 dots and casts are right there
    return True, "ieee", False


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _on_device(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _check(q, k, v, op):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"{op}[triton]: {name} must be float32/float16/bfloat16, got {t.dtype}")
        if t.stride(-1) != 1:
            raise ValueError(f"{op}[triton]: {name} needs unit stride on its last axis, got {t.stride()}")
    if q.shape[3] > 256:
        raise ValueError(f"{op}[triton]: head dimension {q.shape[3]} > 256 is not supported")


class MaskArgs:
    """The decision inputs of one call, as kernel arguments (dummies where unused)."""

    def __init__(self, device, *, mask=MASK_NONE, logits=None, offs=None, wts=None, resampled=None, open_rows=None,
                 padded=None, empty=None, plan=None, plane=1):
        dummy = torch.zeros(1, dtype=torch.int32, device=device)
        self.mask = mask
        self.logits = logits if logits is not None else dummy.float()
        self.offs = offs if offs is not None else dummy
        self.wts = wts if wts is not None else dummy.float()
        self.map = resampled if resampled is not None else dummy.float()
        self.open = open_rows if open_rows is not None else dummy.to(torch.int8)
        self.pad = padded if padded is not None else dummy.to(torch.int8)
        self.empty = empty if empty is not None else dummy.to(torch.int8)
        self.mode = plan.mode if plan is not None else RESAMPLE_CL
        self.fma = bool(plan.fma) if plan is not None else True
        self.q_vec = int(plan.q_vec) if plan is not None else 0
        self.threshold = float(plan.threshold) if plan is not None else 0.0
        self.plane = int(plane)


def region_mask_args(q, region_logits, kh, kw):
    """RIA's decision inputs: the plan for this device, the per-key tables, and the open
    rows from the first pass (``_open_rows_kernel``)."""
    B, _, Q, _ = q.shape
    device = q.device
    logits = region_logits.detach().to(torch.float32).contiguous()
    mh, mw = logits.shape[2:]
    plan = decision_plan(device, Q, (mh, mw), (kh, kw))
    S = kh * kw
    offs = wts = resampled = None
    if plan.mode == RESAMPLE_MAP:
        resampled = torch.nn.functional.interpolate(logits, size=(kh, kw), mode="bilinear",
                                                    align_corners=False).flatten(2).contiguous()
    else:
        y0, y1, ly0, ly1 = resample_axis(mh, kh, plan)
        x0, x1, lx0, lx1 = resample_axis(mw, kw, plan)
        if plan.mode == RESAMPLE_COPY:
            y0 = y1 = torch.arange(kh, dtype=torch.int32)
            x0 = x1 = torch.arange(kw, dtype=torch.int32)
        Y0, Y1, X0, X1 = (t.long() for t in (y0, y1, x0, x1))
        offs = torch.stack([(Y0[:, None] * mw + X0[None, :]), (Y0[:, None] * mw + X1[None, :]),
                            (Y1[:, None] * mw + X0[None, :]), (Y1[:, None] * mw + X1[None, :])]).reshape(4, S)
        if plan.mode == RESAMPLE_CL:  # torch: w00 = λy0·λx0, ... (fp32 products)
            wts = torch.stack([ly0[:, None] * lx0[None, :], ly0[:, None] * lx1[None, :],
                               ly1[:, None] * lx0[None, :], ly1[:, None] * lx1[None, :]]).reshape(4, S)
        else:
            ones = torch.ones(kh, kw)
            wts = torch.stack([ly0[:, None] * ones, ly1[:, None] * ones, lx0[None, :] * ones,
                               lx1[None, :] * ones]).reshape(4, S)
        offs = offs.to(torch.int32).contiguous().to(device)
        wts = wts.to(torch.float32).contiguous().to(device)
    args = MaskArgs(device, mask=MASK_REGION, logits=logits, offs=offs, wts=wts, resampled=resampled, plan=plan,
                    plane=mh * mw)
    return args


def open_rows(q, margs: MaskArgs, S: int) -> torch.Tensor:
    """The first pass: (B, Q) int8, 1 where a row blocks every key."""
    B, Q = q.shape[0], q.shape[2]
    out = torch.empty((B, Q), dtype=torch.int8, device=q.device)
    with _on_device(q):
        _open_rows_kernel[(triton.cdiv(Q, BLOCK_M), B)](
            margs.logits, margs.offs, margs.wts, margs.map, out, Q, S, margs.plane, margs.threshold, margs.q_vec,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, MODE=margs.mode, FMA=margs.fma, num_warps=4,
        )
    return out


def _finite_per_bh(*tensors) -> torch.Tensor:
    ok = None
    for t in tensors:
        f = torch.isfinite(t).flatten(2).all(-1)
        ok = f if ok is None else ok & f
    return ok.to(torch.int8).contiguous()


def forward(q, k, v, margs: MaskArgs, scale: float, op: str):
    _check(q, k, v, op)
    B, H, Q, D = q.shape
    S = k.shape[2]
    out = torch.empty((B, H, Q, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Q), dtype=torch.float32, device=q.device)
    native, prec, emu = modes(q.dtype)
    v_finite = _finite_per_bh(v)
    with _on_device(q):
        _fwd_kernel[(triton.cdiv(Q, BLOCK_M), B * H)](
            q, k, v, out, lse,
            margs.logits, margs.offs, margs.wts, margs.map, margs.open, margs.pad, margs.empty, v_finite,
            H, Q, S, D, float(scale), margs.threshold, margs.q_vec, margs.plane,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=_block_d(D),
            MASK=margs.mask, MODE=margs.mode, FMA=margs.fma, NATIVE_DOT=native, PREC=prec, EMU_BF16=emu,
            num_warps=NUM_WARPS,
        )
    return out, lse


def backward(dout, q, k, v, out, lse, margs: MaskArgs, scale: float, op: str):
    _check(q, k, v, op)
    B, H, Q, D = q.shape
    S = k.shape[2]
    dout = dout.to(q.dtype).contiguous()
    lse = lse.float().contiguous()
    safe = _finite_per_bh(q, k, dout)
    native, prec, emu = modes(q.dtype)
    if q.dtype == torch.float32:
        delta = (dout * out.float()).sum(-1).contiguous()  # Δ_i = dout_i · out_i, out exact to fp32
    else:  # out is rounded to fp16/bf16: Δ_i = Σ_j p_ij dp_ij from fp32 p and dp instead
        delta = torch.empty((B, H, Q), dtype=torch.float32, device=q.device)
        with _on_device(q):
            _delta_kernel[(triton.cdiv(Q, BLOCK_M), B * H)](
                q, k, v, dout, lse, delta,
                margs.logits, margs.offs, margs.wts, margs.map, margs.open, margs.pad, margs.empty,
                _finite_per_bh(q, k, v, dout),
                H, Q, S, D, float(scale), margs.threshold, margs.q_vec, margs.plane,
                q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                v.stride(0), v.stride(1), v.stride(2),
                BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=_block_d(D),
                MASK=margs.mask, MODE=margs.mode, FMA=margs.fma, NATIVE_DOT=native, PREC=prec, num_warps=NUM_WARPS,
            )
    nkb = triton.cdiv(S, BLOCK_N)
    dk = torch.empty((B, H, S, D), dtype=q.dtype, device=q.device)
    dv = torch.empty((B, H, S, D), dtype=q.dtype, device=q.device)
    dq_part = torch.empty((nkb, B, H, Q, D), dtype=torch.float32, device=q.device)
    with _on_device(q):
        _bwd_kernel[(nkb, B * H)](
            q, k, v, dout, lse, delta, dk, dv, dq_part,
            margs.logits, margs.offs, margs.wts, margs.map, margs.open, margs.pad, margs.empty, safe,
            B, H, Q, S, D, float(scale), margs.threshold, margs.q_vec, margs.plane,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=_block_d(D),
            MASK=margs.mask, MODE=margs.mode, FMA=margs.fma, NATIVE_DOT=native, PREC=prec, EMU_BF16=emu,
            num_warps=NUM_WARPS,
        )
    dq = dq_part.sum(dim=0)  # key blocks in order: deterministic
    return dq.to(q.dtype), dk, dv


# ----------------------------------------------------------------------------- sm_90 compile check
def compile_configs() -> list[CompileConfig]:
    """Specialisations for ``.ci/compile_triton_sm90.py``, both ops': RIA's, then RLA's."""
    return _op_compile_configs(RIA) + _op_compile_configs(RLA)


def _op_compile_configs(op: str) -> list[CompileConfig]:
    """One op's: every dtype at d = 32 (ReLA), d = 64 and an odd d = 24 (padded to 32),
    for the op's mask kinds; on CUDA the region decisions use the CUDA resampler (or the
    copy for equal sizes)."""
    configs = []
    if op == RIA:
        plans = [(MASK_REGION, RESAMPLE_CUDA), (MASK_REGION, RESAMPLE_COPY)]
    else:
        plans = [(MASK_PADDING, RESAMPLE_CL), (MASK_NONE, RESAMPLE_CL)]
    mask_names = {MASK_NONE: "none", MASK_PADDING: "padding", MASK_REGION: "region"}
    mode_names = {RESAMPLE_CUDA: "cuda", RESAMPLE_COPY: "copy", RESAMPLE_CL: "-", RESAMPLE_GENERIC: "generic",
                  RESAMPLE_MAP: "map"}
    scalars = {"scale": "fp32", "threshold": "fp32"}
    common = dict(logits_ptr=torch.float32, offs_ptr=torch.int32, wts_ptr=torch.float32, map_ptr=torch.float32,
                  open_ptr=torch.int8, pad_ptr=torch.int8, empty_ptr=torch.int8)
    for mask, mode in plans:
        for dtype, d in [(torch.float32, 32), (torch.bfloat16, 32), (torch.float16, 32), (torch.bfloat16, 64),
                         (torch.float32, 24)]:
            native, prec, emu = modes(dtype, interpret=False)
            const = dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=_block_d(d), MASK=mask, MODE=mode, FMA=True,
                         NATIVE_DOT=native, PREC=prec, EMU_BF16=emu)
            label = f"{op} {str(dtype).split('.')[-1]:8s} d={d:<3d} mask={mask_names[mask]} resample={mode_names[mode]}"
            fwd = dict(common, q_ptr=dtype, k_ptr=dtype, v_ptr=dtype, out_ptr=dtype, lse_ptr=torch.float32,
                       vfinite_ptr=torch.int8)
            bwd = dict(common, q_ptr=dtype, k_ptr=dtype, v_ptr=dtype, dout_ptr=dtype, lse_ptr=torch.float32,
                       delta_ptr=torch.float32, dk_ptr=dtype, dv_ptr=dtype, dq_part_ptr=torch.float32,
                       safe_ptr=torch.int8)
            configs.append(CompileConfig(f"fwd {label}", _fwd_kernel, fwd, const, NUM_WARPS, scalars=scalars))
            configs.append(CompileConfig(f"bwd {label}", _bwd_kernel, bwd, const, NUM_WARPS, scalars=scalars))
            if dtype != torch.float32:  # the Δ pass runs for fp16/bf16 only
                delta = dict(common, q_ptr=dtype, k_ptr=dtype, v_ptr=dtype, dout_ptr=dtype, lse_ptr=torch.float32,
                             delta_ptr=torch.float32, safe_ptr=torch.int8)
                dconst = {key: val for key, val in const.items() if key != "EMU_BF16"}
                configs.append(CompileConfig(f"delta {label}", _delta_kernel, delta, dconst, NUM_WARPS,
                                             scalars=scalars))
    if op == RIA:
        for mode in (RESAMPLE_CUDA, RESAMPLE_COPY):
            configs.append(CompileConfig(
                f"open-rows {op} resample={mode_names[mode]}", _open_rows_kernel,
                dict(logits_ptr=torch.float32, offs_ptr=torch.int32, wts_ptr=torch.float32, map_ptr=torch.float32,
                     open_ptr=torch.int8),
                dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, MODE=mode, FMA=True), 4, scalars={"threshold": "fp32"}))
    return configs


# ----------------------------------------------------------------------------- the two ops' backends
def ria_forward(q, k, v, region_logits, kh, kw, scale):
    margs = region_mask_args(q, region_logits, kh, kw)
    margs.open = open_rows(q, margs, kh * kw)
    out, lse = forward(q, k, v, margs, scale, RIA)
    return out, lse, margs.open.bool()


def ria_backward(dout, q, k, v, region_logits, kh, kw, scale, out, lse, open_rows):
    margs = region_mask_args(q, region_logits, kh, kw)
    margs.open = open_rows.to(torch.int8).contiguous()
    return backward(dout, q, k, v, out, lse, margs, scale, RIA)


def _padding_mask_args(q, key_padding_mask):
    if key_padding_mask is None:
        return MaskArgs(q.device, mask=MASK_NONE)
    padded = key_padding_mask.to(torch.int8).contiguous()
    empty = key_padding_mask.all(dim=-1).to(torch.int8).contiguous()
    return MaskArgs(q.device, mask=MASK_PADDING, padded=padded, empty=empty)


def rla_forward(q, k, v, key_padding_mask, scale):
    return forward(q, k, v, _padding_mask_args(q, key_padding_mask), scale, RLA)


def rla_backward(dout, q, k, v, key_padding_mask, scale, out, lse):
    return backward(dout, q, k, v, out, lse, _padding_mask_args(q, key_padding_mask), scale, RLA)


__all__ = ["MASK_NONE", "MASK_PADDING", "MASK_REGION", "MaskArgs", "region_mask_args", "open_rows", "forward",
           "backward", "ria_forward", "ria_backward", "rla_forward", "rla_backward", "compile_configs", "modes"]
