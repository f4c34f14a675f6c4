"""The torch glue of csrc/cuda/, repeated for the simulated device: the same input
preparation, parameter filling and output allocation (NaN-filled device memory),
calling the host launchers of kernels/ through :mod:`cuda_sim_lib`. Each function
returns ordinary CPU tensors (copies), like the op's CUDA backend would.
"""

from __future__ import annotations

import torch

from cuda_sim_lib import DTYPE_CODE, Sim, i64


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _inner(t: torch.Tensor) -> torch.Tensor:
    """The kernels take any outer strides but unit stride on the last axis (the glue's inner_contiguous)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _out(*tensors):
    return tuple(t.clone() for t in tensors)


# ----------------------------------------------------------------------------- group_assign
def group_assign_fwd(sim: Sim, q, k, v, tau, noise=None, key=None):
    """(out, assign, counts) as csrc/cuda/group_assign.cu's group_assign_fwd_cuda returns them."""
    q, k, v = _inner(q), _inner(k), _inner(v)
    B, N, C = q.shape
    P, D = k.shape[1], v.shape[2]
    acc = acc_dtype(q.dtype)
    qd, kd, vd = sim.device(q), sim.device(k), sim.device(v)
    taud = sim.device(tau.reshape(1).to(acc))
    noised = sim.device(None if noise is None else noise.to(acc).contiguous())
    out, assign, counts = sim.empty((B, N, D), q.dtype), sim.empty((B, N, P), q.dtype), sim.empty((B, N), torch.float32)
    code, dims = DTYPE_CODE[q.dtype], i64(B, N, P, C, D)
    ws_bytes = sim.lib.sim_group_assign_workspace(code, 0, dims)
    if ws_bytes == 0:
        raise ValueError(f"group_assign_fwd (sim): unsupported sizes {(B, N, P, C, D)}")
    ws = sim.raw(ws_bytes)
    status = sim.lib.sim_group_assign_fwd(
        code, dims, sim.ptr(qd), i64(q.stride(0), q.stride(1)), sim.ptr(kd), i64(k.stride(0), k.stride(1)),
        sim.ptr(vd), i64(v.stride(0), v.stride(1)), sim.ptr(taud), sim.ptr(noised), 0 if key is None else key,
        key is not None, sim.ptr(out), sim.ptr(assign), sim.ptr(counts), sim.ptr(ws), ws_bytes)
    sim.check(status, "group_assign_fwd")
    return _out(out, assign, counts)


def group_assign_bwd(sim: Sim, dout, dassign, q, k, v, tau, noise, key, out, counts):
    """(dq, dk, dv, dtau) as group_assign_bwd_cuda returns them; dassign is read in the
    input dtype when it has it, else through the accumulation type (as the glue does)."""
    q, k, v = _inner(q), _inner(k), _inner(v)
    B, N, C = q.shape
    P, D = k.shape[1], v.shape[2]
    acc = acc_dtype(q.dtype)
    native = dassign.dtype == q.dtype
    qd, kd, vd = sim.device(q), sim.device(k), sim.device(v)
    taud = sim.device(tau.reshape(1).to(acc))
    noised = sim.device(None if noise is None else noise.to(acc).contiguous())
    doutd = sim.device(dout.to(acc).contiguous())
    dassignd = sim.device((dassign if native else dassign.to(acc)).contiguous())
    outd = sim.device(out.to(acc).contiguous())
    countsd = sim.device(counts.to(torch.float32).contiguous())
    dq, dk, dv = sim.empty(q.shape, q.dtype), sim.empty(k.shape, k.dtype), sim.empty(v.shape, v.dtype)
    dtau = sim.empty((1,), acc)
    code, dims = DTYPE_CODE[q.dtype], i64(B, N, P, C, D)
    ws_bytes = sim.lib.sim_group_assign_workspace(code, 1, dims)
    if ws_bytes == 0:
        raise ValueError(f"group_assign_bwd (sim): unsupported sizes {(B, N, P, C, D)}")
    ws = sim.raw(ws_bytes)
    status = sim.lib.sim_group_assign_bwd(
        code, dims, sim.ptr(qd), i64(q.stride(0), q.stride(1)), sim.ptr(kd), i64(k.stride(0), k.stride(1)),
        sim.ptr(vd), i64(v.stride(0), v.stride(1)), sim.ptr(taud), sim.ptr(noised), 0 if key is None else key,
        key is not None, sim.ptr(doutd), sim.ptr(dassignd) if native else None,
        None if native else sim.ptr(dassignd), sim.ptr(outd), sim.ptr(countsd), sim.ptr(dq), sim.ptr(dk),
        sim.ptr(dv), sim.ptr(dtau), sim.ptr(ws), ws_bytes)
    sim.check(status, "group_assign_bwd")
    return _out(dq, dk, dv, dtau)


# ----------------------------------------------------------------------------- ms_deform_attn
def _msda_dims(value, loc):
    B, S, M, D = value.shape
    return (B, S, M, D, loc.shape[1], loc.shape[3], loc.shape[4])


def ms_deform_attn_fwd(sim: Sim, value, spatial_shapes, level_start_index, loc, attn):
    """out (B, Q, M·D) as ms_deform_attn_fwd_cuda returns it (the launcher is called for
    empty outputs too, where the glue returns early)."""
    value = value if value.stride(3) == 1 else value.contiguous()
    dims = _msda_dims(value, loc)
    B, S, M, D, Q, L, Pn = dims
    vd = sim.device(value)
    shapes, starts = sim.device(spatial_shapes.contiguous()), sim.device(level_start_index.contiguous())
    locd, attnd = sim.device(loc.contiguous()), sim.device(attn.contiguous())
    out = sim.empty((B, Q, M * D), value.dtype)
    status = sim.lib.sim_msda_fwd(DTYPE_CODE[value.dtype], i64(*dims), sim.ptr(vd),
                                  i64(value.stride(0), value.stride(1), value.stride(2)), sim.ptr(shapes),
                                  sim.ptr(starts), sim.ptr(locd), sim.ptr(attnd), sim.ptr(out))
    sim.check(status, "ms_deform_attn_fwd")
    return out.clone()


def ms_deform_attn_bwd(sim: Sim, grad_out, value, spatial_shapes, level_start_index, loc, attn, deterministic):
    """(grad_value, grad_loc, grad_attn) as ms_deform_attn_bwd_cuda returns them."""
    value = value if value.stride(3) == 1 else value.contiguous()
    dims = _msda_dims(value, loc)
    B, S, M, D, Q, L, Pn = dims
    code = DTYPE_CODE[value.dtype]
    vd = sim.device(value)
    shapes, starts = sim.device(spatial_shapes.contiguous()), sim.device(level_start_index.contiguous())
    locd, attnd = sim.device(loc.contiguous()), sim.device(attn.contiguous())
    god = sim.device(grad_out.to(value.dtype).contiguous())
    gv = sim.empty((B, S, M, D), value.dtype)
    gl, ga = sim.empty(loc.shape, value.dtype), sim.empty(attn.shape, value.dtype)
    ws_bytes = sim.lib.sim_msda_workspace(code, i64(*dims), int(deterministic))
    ws = sim.raw(max(ws_bytes, 1))
    status = sim.lib.sim_msda_bwd(code, i64(*dims), sim.ptr(god), sim.ptr(vd),
                                  i64(value.stride(0), value.stride(1), value.stride(2)), sim.ptr(shapes),
                                  sim.ptr(starts), sim.ptr(locd), sim.ptr(attnd), sim.ptr(gv), sim.ptr(gl),
                                  sim.ptr(ga), int(deterministic), sim.ptr(ws), ws_bytes)
    sim.check(status, "ms_deform_attn_bwd")
    return _out(gv, gl, ga)


# ----------------------------------------------------------------------------- region attention
MASK_NONE, MASK_PADDING, MASK_REGION = 0, 1, 2


def _finite_per_bh(*tensors) -> torch.Tensor:
    ok = None
    for t in tensors:
        f = torch.isfinite(t).flatten(2).all(-1)
        ok = f if ok is None else ok & f
    return ok.to(torch.uint8).contiguous()


class _Region:
    """The mask fields of RegionAttnParams and the device copies they point to."""

    def __init__(self, sim: Sim, *, mask=MASK_NONE, logits=None, kh=0, kw=0, mode=0, threshold=0.0,
                 resampled=None, padded=None, empty=None):
        self.mask, self.mode, self.threshold = mask, mode, float(threshold)
        self.logits = sim.device(None if logits is None else logits.to(torch.float32).contiguous())
        self.resampled = sim.device(None if resampled is None else resampled.to(torch.float32).contiguous())
        self.region = None if logits is None else i64(logits.shape[2], logits.shape[3], kh, kw)
        self.padded, self.empty = sim.device(padded), sim.device(empty)


def _region_call(sim: Sim, what, q, k, v, scale, reg: _Region, *, open_rows=None, v_finite=None, out=None, lse=None,
                 safe=None, dout=None, lse_in=None, delta=None, dq=None, dk=None, dv=None, open_out=None):
    B, H, Q, D = q.shape
    S = k.shape[2]
    p = sim.ptr
    status = sim.lib.sim_region_attention(
        what, DTYPE_CODE[q.dtype], i64(B, H, Q, S, D), p(q), i64(*q.stride()[:3]), p(k), i64(*k.stride()[:3]),
        p(v), i64(*v.stride()[:3]), float(scale), reg.mask, p(reg.logits), reg.region, reg.mode, reg.threshold,
        p(reg.resampled), p(open_rows), p(reg.padded), p(reg.empty), p(v_finite), p(out), p(lse), p(safe), p(dout),
        p(lse_in), p(delta), p(dq), p(dk), p(dv), p(open_out))
    sim.check(status, ["region_open_rows", "region_attention_fwd", "region_attention_bwd"][what])


def _forward(sim: Sim, q, k, v, scale, reg: _Region, *, with_open: bool):
    q, k, v = _inner(q), _inner(k), _inner(v)
    B, H, Q, D = q.shape
    acc = acc_dtype(q.dtype)
    qd, kd, vd = sim.device(q), sim.device(k), sim.device(v)
    open_rows = None
    if with_open:  # the first pass: rows that block every key
        open_rows = sim.empty((B, Q), torch.uint8)
        _region_call(sim, 0, qd, kd, vd, scale, reg, open_out=open_rows)
    out, lse = sim.empty((B, H, Q, D), q.dtype), sim.empty((B, H, Q), acc)
    v_finite = sim.device(_finite_per_bh(v))
    _region_call(sim, 1, qd, kd, vd, scale, reg, open_rows=open_rows, v_finite=v_finite, out=out, lse=lse)
    return out.clone(), lse.clone(), None if open_rows is None else open_rows.clone().bool()


def _backward(sim: Sim, dout, q, k, v, scale, out, lse, reg: _Region, open_rows=None):
    q, k, v = _inner(q), _inner(k), _inner(v)
    acc = acc_dtype(q.dtype)
    dout = dout.to(q.dtype).contiguous()
    delta = (dout.to(acc) * out.to(acc)).sum(-1).contiguous()
    qd, kd, vd = sim.device(q), sim.device(k), sim.device(v)
    dq, dk, dv = sim.empty(q.shape, q.dtype), sim.empty(k.shape, k.dtype), sim.empty(v.shape, v.dtype)
    _region_call(sim, 2, qd, kd, vd, scale, reg,
                 open_rows=sim.device(None if open_rows is None else open_rows.to(torch.uint8).contiguous()),
                 safe=sim.device(_finite_per_bh(q, k, dout)), dout=sim.device(dout),
                 lse_in=sim.device(lse.to(acc).contiguous()), delta=sim.device(delta), dq=dq, dk=dk, dv=dv)
    return _out(dq, dk, dv)


def ria_fwd(sim: Sim, q, k, v, logits, kh, kw, scale, mode, threshold, resampled=None):
    """(out, lse, open) as csrc/cuda/region_image_attention.cu's ria_fwd_cuda returns them."""
    reg = _Region(sim, mask=MASK_REGION, logits=logits, kh=kh, kw=kw, mode=mode, threshold=threshold,
                  resampled=resampled)
    return _forward(sim, q, k, v, scale, reg, with_open=True)


def ria_bwd(sim: Sim, dout, q, k, v, logits, kh, kw, scale, mode, threshold, resampled, out, lse, open_rows):
    reg = _Region(sim, mask=MASK_REGION, logits=logits, kh=kh, kw=kw, mode=mode, threshold=threshold,
                  resampled=resampled)
    return _backward(sim, dout, q, k, v, scale, out, lse, reg, open_rows)


def _padding(sim: Sim, key_padding_mask):
    if key_padding_mask is None:
        return _Region(sim)
    return _Region(sim, mask=MASK_PADDING, padded=key_padding_mask.to(torch.uint8).contiguous(),
                   empty=key_padding_mask.all(-1).to(torch.uint8).contiguous())


def rla_fwd(sim: Sim, q, k, v, key_padding_mask, scale):
    """(out, lse) as csrc/cuda/region_language_attention.cu's rla_fwd_cuda returns them."""
    out, lse, _ = _forward(sim, q, k, v, scale, _padding(sim, key_padding_mask), with_open=False)
    return out, lse


def rla_bwd(sim: Sim, dout, q, k, v, key_padding_mask, scale, out, lse):
    return _backward(sim, dout, q, k, v, scale, out, lse, _padding(sim, key_padding_mask))
