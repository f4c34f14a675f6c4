"""Triton backend of ``ms_deform_attn`` (multi-scale deformable attention).

Entry points (called by :mod:`rexfast.ops.ms_deform_attn` for ``backend="triton"``)::

    forward(value, spatial_shapes, level_start_index, loc, attn)                        -> out (B, Q, M·D)
    backward(grad_out, value, spatial_shapes, level_start_index, loc, attn, deterministic) -> (d value, d loc, d attn)

Semantics (bilinear zero-padded sampling, NaN/inf and border rules) and the
gradient formulas: :mod:`rexfast.ops.ms_deform_attn.reference` and ``op.py``.

Why this structure
------------------
The op is a gather: per (b, q, h) row it reads L·P sampling points and four
D-wide value rows per point, so it is bound by the gathers (and, in the
backward, the scatter of the value gradient), with O(D) arithmetic per tap.

* Forward and backward tile the flattened (b, q, h) rows: a program owns
  BLOCK_R consecutive rows (consecutive heads of one query first, so their
  locations and weights are contiguous) × BLOCK_D = next_pow2(D) channels, and
  loops over levels and points at run time (level shapes are read from the
  device tensors: no host sync, no recompile per shape). Each point's four taps
  are masked gathers of [BLOCK_R, BLOCK_D] tiles; outside taps load 0 and have
  weight 0, so the sample is ((w0·v0 + w1·v1) + w2·v2) + w3·v3 exactly as the
  reference adds it; a NaN location gives a NaN sample; the sample is always
  multiplied by its attention weight. Integer corner coordinates are formed only
  from finite, in-range floats (validity is decided on the floats first), and
  every tap is also bounded by S, so unchecked bad level shapes cannot read out
  of bounds.
* Backward, one pass over the same tiles: per point, the sample s and
  t_c = (a·g)·v_c give d a = g·s and d loc (W_l·Σ_c ±wy_c t_c, H_l·Σ_c ±wx_c t_c;
  (0, 0) on the half-pixel edge x = −1 or y = −1);
  both are per-row values stored directly. The value gradient (every inside tap
  adds w_c·a·g to the row it read) is a scatter with two modes:
    - atomics (default): ``tl.atomic_add`` of the [BLOCK_R, BLOCK_D] contributions
      into a float32 (B, S, M, D) buffer. Not bitwise reproducible (float
      addition order varies run to run).
    - deterministic (when ``torch.are_deterministic_algorithms_enabled()``): the
      backward kernel writes, per tap, the target row (b·S + s)·M + h (a sentinel
      for outside taps) and w_c; a stable ``torch.sort`` groups the taps by target
      row in tap order; a gather kernel then sums, per value row, its taps'
      w_c·(a·g) in that fixed order (BLOCK_T taps per step, a fixed reduction
      tree). Bitwise reproducible run to run; costs the sort and 12 bytes/tap.
* Precision: loads are converted to float32 and everything accumulates in
  float32; outputs are stored in the input dtype. No ``tl.dot`` (no interpreter
  bf16 trap), no libdevice calls.

Memory traffic per forward: locations and weights once (3·L·P·e per row), four
gathered D-rows per point (mostly L2 hits: neighbouring queries sample
neighbouring pixels), the output once. The backward adds the output gradient
read, the location/weight gradient writes, and the scatter (atomics: four
D-row read-modify-writes per point in L2).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ..triton_lib import CompileConfig

TILE = 2048  # BLOCK_R · BLOCK_D elements per tile
MAX_BLOCK_D = 2048


# ----------------------------------------------------------------------------- device helpers
@triton.jit
def _level(shapes_ptr, starts_ptr, lvl):
    height = tl.load(shapes_ptr + 2 * lvl).to(tl.int32)
    width = tl.load(shapes_ptr + 2 * lvl + 1).to(tl.int32)
    start = tl.load(starts_ptr + lvl).to(tl.int32)
    return height, width, start


@triton.jit
def _corners(lx, ly, height, width, start, S):
    """Pixel coordinates of a column of points, their corner validity, the flat
    value rows of the four corners (0 where outside), and whether the point lies
    on the half-pixel edge x = −1 or y = −1 (no location gradient there)."""
    wf = width.to(tl.float32)
    hf = height.to(tl.float32)
    x = lx * wf - 0.5
    y = ly * hf - 0.5
    nan_loc = (x != x) | (y != y)
    edge = (x == -1.0) | (y == -1.0)
    x0 = tl.floor(x)
    y0 = tl.floor(y)
    fx = x - x0
    fy = y - y0
    # corner validity on the floats (false for NaN, ±inf and huge values)
    in_x0 = (x0 >= 0.0) & (x0 <= wf - 1.0)
    in_x1 = (x0 >= -1.0) & (x0 <= wf - 2.0)
    in_y0 = (y0 >= 0.0) & (y0 <= hf - 1.0)
    in_y1 = (y0 >= -1.0) & (y0 <= hf - 2.0)
    ix = tl.where(in_x0 | in_x1, x0, 0.0).to(tl.int32)  # finite and in [−1, W−1] before the conversion
    iy = tl.where(in_y0 | in_y1, y0, 0.0).to(tl.int32)
    base = start + iy * width + ix
    p00 = base
    p10 = base + 1
    p01 = base + width
    p11 = base + width + 1
    i00 = in_x0 & in_y0 & (p00 >= 0) & (p00 < S)
    i10 = in_x1 & in_y0 & (p10 >= 0) & (p10 < S)
    i01 = in_x0 & in_y1 & (p01 >= 0) & (p01 < S)
    i11 = in_x1 & in_y1 & (p11 >= 0) & (p11 < S)
    return nan_loc, edge, fx, fy, p00, p10, p01, p11, i00, i10, i01, i11


@triton.jit
def _gather(value_ptr, vrow_base, pix, inside, stride_vs, offs_d, mask_rd):
    ptrs = value_ptr + (vrow_base + pix.to(tl.int64) * stride_vs)[:, None] + offs_d[None, :]
    return tl.load(ptrs, mask=mask_rd & inside[:, None], other=0.0).to(tl.float32)


# ----------------------------------------------------------------------------- forward kernel
@triton.jit
def _msda_fwd_kernel(
    value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, out_ptr,
    n_rows, Q, M, S, D, L, P, stride_vb, stride_vs, stride_vm,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rows < n_rows
    rows64 = rows.to(tl.int64)
    h = rows64 % M
    b = rows64 // M // Q
    vrow_base = b * stride_vb + h * stride_vm
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    mask_rd = mask_r[:, None] & mask_d[None, :]
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for lvl in range(0, L):
        height, width, start = _level(shapes_ptr, starts_ptr, lvl)
        for p in range(0, P):
            point = (rows64 * L + lvl) * P + p
            lx = tl.load(loc_ptr + 2 * point, mask=mask_r, other=0.0).to(tl.float32)
            ly = tl.load(loc_ptr + 2 * point + 1, mask=mask_r, other=0.0).to(tl.float32)
            a = tl.load(attn_ptr + point, mask=mask_r, other=0.0).to(tl.float32)
            nan_loc, edge, fx, fy, p00, p10, p01, p11, i00, i10, i01, i11 = _corners(lx, ly, height, width, start, S)
            w00 = tl.where(i00, (1.0 - fx) * (1.0 - fy), 0.0)
            w10 = tl.where(i10, fx * (1.0 - fy), 0.0)
            w01 = tl.where(i01, (1.0 - fx) * fy, 0.0)
            w11 = tl.where(i11, fx * fy, 0.0)
            v00 = _gather(value_ptr, vrow_base, p00, i00, stride_vs, offs_d, mask_rd)
            v10 = _gather(value_ptr, vrow_base, p10, i10, stride_vs, offs_d, mask_rd)
            v01 = _gather(value_ptr, vrow_base, p01, i01, stride_vs, offs_d, mask_rd)
            v11 = _gather(value_ptr, vrow_base, p11, i11, stride_vs, offs_d, mask_rd)
            s = ((w00[:, None] * v00 + w10[:, None] * v10) + w01[:, None] * v01) + w11[:, None] * v11
            s = tl.where(nan_loc[:, None], float("nan"), s)
            acc += a[:, None] * s
    out_ptrs = out_ptr + rows64[:, None] * D + offs_d[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_rd)


# ----------------------------------------------------------------------------- backward kernel
@triton.jit
def _value_grad(grad_value_ptr, key_ptr, wtap_ptr, grow_base, sentinel, tap, pix, inside, w, gs, M, D, offs_d,
                mask_r, mask_rd, ATOMIC: tl.constexpr):
    """The value gradient of one corner tap of a column of points: w·(a·g) added
    atomically to its row, or (deterministic) its target row and weight recorded
    for the sort-and-gather pass."""
    grow = grow_base + pix.to(tl.int64) * M
    if ATOMIC:
        tl.atomic_add(grad_value_ptr + grow[:, None] * D + offs_d[None, :], w[:, None] * gs,
                      mask=mask_rd & inside[:, None])
    else:
        key = tl.where(inside, grow, sentinel)
        tl.store(key_ptr + tap, key.to(key_ptr.dtype.element_ty), mask=mask_r)
        tl.store(wtap_ptr + tap, w, mask=mask_r)


@triton.jit
def _msda_bwd_kernel(
    grad_out_ptr, value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr,
    grad_loc_ptr, grad_attn_ptr, grad_value_ptr, key_ptr, wtap_ptr,
    n_rows, Q, M, S, D, L, P, stride_vb, stride_vs, stride_vm,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ATOMIC: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rows < n_rows
    rows64 = rows.to(tl.int64)
    h = rows64 % M
    b = rows64 // M // Q
    vrow_base = b * stride_vb + h * stride_vm
    # the value-gradient row of pixel s for this (b, h): (b·S + s)·M + h in the contiguous (B, S, M, D) output
    grow_base = b * S * M + h
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    mask_rd = mask_r[:, None] & mask_d[None, :]
    g = tl.load(grad_out_ptr + rows64[:, None] * D + offs_d[None, :], mask=mask_rd, other=0.0).to(tl.float32)
    sentinel = (n_rows // Q) * S  # B·S·M: sorts after every real value row
    for lvl in range(0, L):
        height, width, start = _level(shapes_ptr, starts_ptr, lvl)
        for p in range(0, P):
            point = (rows64 * L + lvl) * P + p
            lx = tl.load(loc_ptr + 2 * point, mask=mask_r, other=0.0).to(tl.float32)
            ly = tl.load(loc_ptr + 2 * point + 1, mask=mask_r, other=0.0).to(tl.float32)
            a = tl.load(attn_ptr + point, mask=mask_r, other=0.0).to(tl.float32)
            nan_loc, edge, fx, fy, p00, p10, p01, p11, i00, i10, i01, i11 = _corners(lx, ly, height, width, start, S)
            wx0 = tl.where(i00 | i01, 1.0 - fx, 0.0)
            wx1 = tl.where(i10 | i11, fx, 0.0)
            wy0 = tl.where(i00 | i10, 1.0 - fy, 0.0)
            wy1 = tl.where(i01 | i11, fy, 0.0)
            w00 = tl.where(i00, (1.0 - fx) * (1.0 - fy), 0.0)
            w10 = tl.where(i10, fx * (1.0 - fy), 0.0)
            w01 = tl.where(i01, (1.0 - fx) * fy, 0.0)
            w11 = tl.where(i11, fx * fy, 0.0)
            v00 = _gather(value_ptr, vrow_base, p00, i00, stride_vs, offs_d, mask_rd)
            v10 = _gather(value_ptr, vrow_base, p10, i10, stride_vs, offs_d, mask_rd)
            v01 = _gather(value_ptr, vrow_base, p01, i01, stride_vs, offs_d, mask_rd)
            v11 = _gather(value_ptr, vrow_base, p11, i11, stride_vs, offs_d, mask_rd)
            s = ((w00[:, None] * v00 + w10[:, None] * v10) + w01[:, None] * v01) + w11[:, None] * v11
            s = tl.where(nan_loc[:, None], float("nan"), s)
            gs = a[:, None] * g  # d sample = a·g
            gs = tl.where(mask_rd, gs, 0.0)
            tl.store(grad_attn_ptr + point, tl.sum(tl.where(mask_rd, g * s, 0.0), axis=1).to(
                grad_attn_ptr.dtype.element_ty), mask=mask_r)
            t00 = tl.sum(gs * v00, axis=1)
            t10 = tl.sum(gs * v10, axis=1)
            t01 = tl.sum(gs * v01, axis=1)
            t11 = tl.sum(gs * v11, axis=1)
            # ∂w/∂fx = ±wy, ∂w/∂fy = ±wx, inside taps only (corner order 00, 10, 01, 11)
            gfx = tl.where(i00, -(wy0 * t00), 0.0)
            gfx += tl.where(i10, wy0 * t10, 0.0)
            gfx += tl.where(i01, -(wy1 * t01), 0.0)
            gfx += tl.where(i11, wy1 * t11, 0.0)
            gfy = tl.where(i00, -(wx0 * t00), 0.0)
            gfy += tl.where(i10, -(wx1 * t10), 0.0)
            gfy += tl.where(i01, wx0 * t01, 0.0)
            gfy += tl.where(i11, wx1 * t11, 0.0)
            # the half-pixel edge x = −1 or y = −1: the sample is 0 for x ≤ −1, left-hand derivative 0
            gfx = tl.where(edge, 0.0, gfx)
            gfy = tl.where(edge, 0.0, gfy)
            ety = grad_loc_ptr.dtype.element_ty
            tl.store(grad_loc_ptr + 2 * point, (gfx * width.to(tl.float32)).to(ety), mask=mask_r)
            tl.store(grad_loc_ptr + 2 * point + 1, (gfy * height.to(tl.float32)).to(ety), mask=mask_r)
            tap = point * 4
            _value_grad(grad_value_ptr, key_ptr, wtap_ptr, grow_base, sentinel, tap, p00, i00, w00, gs, M, D,
                        offs_d, mask_r, mask_rd, ATOMIC)
            _value_grad(grad_value_ptr, key_ptr, wtap_ptr, grow_base, sentinel, tap + 1, p10, i10, w10, gs, M, D,
                        offs_d, mask_r, mask_rd, ATOMIC)
            _value_grad(grad_value_ptr, key_ptr, wtap_ptr, grow_base, sentinel, tap + 2, p01, i01, w01, gs, M, D,
                        offs_d, mask_r, mask_rd, ATOMIC)
            _value_grad(grad_value_ptr, key_ptr, wtap_ptr, grow_base, sentinel, tap + 3, p11, i11, w11, gs, M, D,
                        offs_d, mask_r, mask_rd, ATOMIC)


@triton.jit
def _msda_gather_kernel(
    grad_out_ptr, attn_ptr, perm_ptr, offsets_ptr, wtap_ptr, grad_value_ptr,
    D, LP,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One value row per program: Σ over its taps (sorted, in tap order) of w·(a·g)."""
    vrow = tl.program_id(0).to(tl.int64)
    begin = tl.load(offsets_ptr + vrow)
    end = tl.load(offsets_ptr + vrow + 1)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for i0 in range(begin, end, BLOCK_T):
        idx = i0 + tl.arange(0, BLOCK_T)
        m = idx < end
        tap = tl.load(perm_ptr + idx, mask=m, other=0)
        point = tap // 4
        row = point // LP  # the (b, q, h) row of the tap's point
        a = tl.load(attn_ptr + point, mask=m, other=0.0).to(tl.float32)
        w = tl.load(wtap_ptr + tap, mask=m, other=0.0)
        mm = m[:, None] & mask_d[None, :]
        g = tl.load(grad_out_ptr + row[:, None] * D + offs_d[None, :], mask=mm, other=0.0).to(tl.float32)
        contrib = w[:, None] * (a[:, None] * g)
        acc += tl.sum(tl.where(mm, contrib, 0.0), axis=0)
    tl.store(grad_value_ptr + vrow * D + offs_d, acc.to(grad_value_ptr.dtype.element_ty), mask=mask_d)


# ----------------------------------------------------------------------------- host side
def _blocks(D: int, backward: bool = False):
    """(BLOCK_R, BLOCK_D, num_warps): a BLOCK_R × next_pow2(D) tile of ~TILE elements
    (half that in the backward, which holds four more tiles per point). Chosen from
    sm_90 compile statistics (no register spills, .ci/compile_triton_sm90.py), not
    from GPU timings (none measured yet)."""
    block_d = max(2, triton.next_power_of_2(D))
    tile = TILE // 2 if backward else TILE
    block_r = max(2, min(64, tile // block_d))
    return block_r, block_d, 4


def _gather_blocks(D: int):
    """(BLOCK_T, BLOCK_D, num_warps) of the deterministic gather: BLOCK_T taps × D per step."""
    block_d = max(2, triton.next_power_of_2(D))
    return max(2, min(16, TILE // block_d)), block_d, 1 if block_d <= 64 else 4


def _on_device(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _check(value, loc, attn):
    for name, t in (("value", value), ("sampling_locations", loc), ("attention_weights", attn)):
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"ms_deform_attn[triton]: {name} must be float32/float16/bfloat16, got {t.dtype}")
    if value.stride(-1) != 1:
        raise ValueError(f"ms_deform_attn[triton]: value needs unit stride over D, got strides {value.stride()}")
    if not (loc.is_contiguous() and attn.is_contiguous()):
        raise ValueError("ms_deform_attn[triton]: sampling_locations and attention_weights must be contiguous")
    if value.shape[-1] > MAX_BLOCK_D:
        raise ValueError(f"ms_deform_attn[triton]: D = {value.shape[-1]} is above the supported {MAX_BLOCK_D}")


def _dims(value, loc):
    B, S, M, D = value.shape
    Q, L, P = loc.shape[1], loc.shape[3], loc.shape[4]
    return B, S, M, D, Q, L, P


def forward(value, spatial_shapes, level_start_index, loc, attn):
    _check(value, loc, attn)
    B, S, M, D, Q, L, P = _dims(value, loc)
    out = torch.empty((B, Q, M * D), dtype=value.dtype, device=value.device)
    n_rows = B * Q * M
    if n_rows == 0:
        return out
    block_r, block_d, warps = _blocks(D)
    with _on_device(value):
        _msda_fwd_kernel[(triton.cdiv(n_rows, block_r),)](
            value, spatial_shapes, level_start_index, loc, attn, out,
            n_rows, Q, M, S, D, L, P, value.stride(0), value.stride(1), value.stride(2),
            BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps,
        )
    return out


def backward(grad_out, value, spatial_shapes, level_start_index, loc, attn, *, deterministic: bool = False):
    _check(value, loc, attn)
    B, S, M, D, Q, L, P = _dims(value, loc)
    dev = value.device
    grad_out = grad_out.contiguous()
    grad_loc = torch.empty(loc.shape, dtype=loc.dtype, device=dev)
    grad_attn = torch.empty(attn.shape, dtype=attn.dtype, device=dev)
    n_rows = B * Q * M
    if n_rows == 0:
        return torch.zeros(value.shape, dtype=value.dtype, device=dev), grad_loc, grad_attn
    block_r, block_d, warps = _blocks(D, backward=True)
    n_value_rows = B * S * M
    n_taps = n_rows * L * P * 4
    if deterministic:
        grad_acc = torch.empty((B, S, M, D), dtype=value.dtype, device=dev)
        key_dtype = torch.int32 if n_value_rows < 2**31 - 1 else torch.int64
        keys = torch.empty(n_taps, dtype=key_dtype, device=dev)
        wtap = torch.empty(n_taps, dtype=torch.float32, device=dev)
    else:
        grad_acc = torch.zeros((B, S, M, D), dtype=torch.float32, device=dev)
        keys = wtap = grad_acc  # unused
    with _on_device(value):
        _msda_bwd_kernel[(triton.cdiv(n_rows, block_r),)](
            grad_out, value, spatial_shapes, level_start_index, loc, attn,
            grad_loc, grad_attn, grad_acc, keys, wtap,
            n_rows, Q, M, S, D, L, P, value.stride(0), value.stride(1), value.stride(2),
            BLOCK_R=block_r, BLOCK_D=block_d, ATOMIC=not deterministic, num_warps=warps,
        )
        if not deterministic:
            return grad_acc.to(value.dtype), grad_loc, grad_attn
        # Group the taps by target row, in tap order (a stable sort is deterministic).
        sorted_keys, perm = torch.sort(keys, stable=True)
        bounds = torch.arange(n_value_rows + 1, device=dev, dtype=sorted_keys.dtype)
        offsets = torch.searchsorted(sorted_keys, bounds)
        block_t, _, gather_warps = _gather_blocks(D)
        _msda_gather_kernel[(n_value_rows,)](
            grad_out, attn, perm, offsets, wtap, grad_acc,
            D, L * P,
            BLOCK_T=block_t, BLOCK_D=block_d, num_warps=gather_warps,
        )
    return grad_acc, grad_loc, grad_attn


# ----------------------------------------------------------------------------- sm_90 compile check
def compile_configs() -> list[CompileConfig]:
    """The specialisations ``.ci/compile_triton_sm90.py`` compiles for sm_90: every
    dtype at ReLA's D = 32 (forward, backward with atomics and deterministic, the
    deterministic gather), a small odd D and a large D, unaligned strides."""
    configs = []
    ints = ("n_rows", "Q", "M", "S", "D", "L", "P", "stride_vb", "stride_vs", "stride_vm")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for d in (32, 5, 1024):
            block_r, block_d, warps = _blocks(d)
            name = f"{str(dtype).split('.')[-1]:8s} D={d:<4d} BLOCK_R={block_r} BLOCK_D={block_d}"
            aligned_ptrs = ("value_ptr", "loc_ptr", "attn_ptr", "out_ptr")
            fwd = dict(value_ptr=dtype, shapes_ptr=torch.int64, starts_ptr=torch.int64, loc_ptr=dtype,
                       attn_ptr=dtype, out_ptr=dtype)
            aligned = aligned_ptrs + ints if d == 32 else ()
            configs.append(CompileConfig(f"ms_deform_attn fwd {name}", _msda_fwd_kernel, fwd,
                                         dict(BLOCK_R=block_r, BLOCK_D=block_d), warps, aligned))
            block_r, block_d, warps = _blocks(d, backward=True)
            name = f"{str(dtype).split('.')[-1]:8s} D={d:<4d} BLOCK_R={block_r} BLOCK_D={block_d}"
            for atomic in (True, False):
                bwd = dict(grad_out_ptr=dtype, value_ptr=dtype, shapes_ptr=torch.int64, starts_ptr=torch.int64,
                           loc_ptr=dtype, attn_ptr=dtype, grad_loc_ptr=dtype, grad_attn_ptr=dtype,
                           grad_value_ptr=torch.float32 if atomic else dtype, key_ptr=torch.int32,
                           wtap_ptr=torch.float32)
                configs.append(CompileConfig(
                    f"ms_deform_attn bwd {'atomic' if atomic else 'determ'} {name}", _msda_bwd_kernel, bwd,
                    dict(BLOCK_R=block_r, BLOCK_D=block_d, ATOMIC=atomic), warps,
                    ("grad_out_ptr", "value_ptr", "loc_ptr", "attn_ptr") + ints if d == 32 else ()))
            gather = dict(grad_out_ptr=dtype, attn_ptr=dtype, perm_ptr=torch.int64, offsets_ptr=torch.int64,
                          wtap_ptr=torch.float32, grad_value_ptr=dtype)
            block_t, block_d, gather_warps = _gather_blocks(d)
            configs.append(CompileConfig(
                f"ms_deform_attn gather {str(dtype).split('.')[-1]:8s} D={d:<4d} BLOCK_T={block_t} BLOCK_D={block_d}",
                _msda_gather_kernel, gather, dict(BLOCK_T=block_t, BLOCK_D=block_d), gather_warps,
                ("grad_out_ptr", "D") if d == 32 else ()))
    return configs
