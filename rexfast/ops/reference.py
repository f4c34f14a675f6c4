"""Pure-PyTorch references: the truth every fused backend is tested against.

These functions are written for clarity, not speed, and follow the released
CGFormer code (``model/layers.py``: ``l2norm``, ``gumbel_softmax``,
``CGAttention``) operation for operation. Autograd through them defines the
gradients the fused kernels must reproduce.

The Gumbel noise that an op draws itself (``seed=...``) comes from a
counter-based hash of (seed, flat element index), defined here once. The C++,
CUDA and Triton backends evaluate the same hash, so every backend draws the same
noise for the same seed without ever materialising it in memory.
"""

from __future__ import annotations

import torch

L2N_EPS = 1e-12  # released code: x / (sqrt(sum(x^2)) + 1e-12)

_MASK32 = 0xFFFFFFFF
# lowbias32 constants (C. Wellons' integer hash prospector); see kernels/rng.cuh
_MIX_M1 = 0x7FEB352D
_MIX_M2 = 0x846CA68B
_SEED_SALT = 0x9E3779B9


def _mul32(x: torch.Tensor, m: int) -> torch.Tensor:
    # (x * m) mod 2^32 on int64 tensors without ever overflowing int64:
    # split m into 16-bit halves so every partial product stays below 2^48.
    lo = (x * (m & 0xFFFF)) & _MASK32
    hi = ((x * (m >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, _MIX_M1)
    x = x ^ (x >> 15)
    x = _mul32(x, _MIX_M2)
    x = x ^ (x >> 16)
    return x


def _mix32_int(x: int) -> int:
    x &= _MASK32
    x ^= x >> 16
    x = (x * _MIX_M1) & _MASK32
    x ^= x >> 15
    x = (x * _MIX_M2) & _MASK32
    x ^= x >> 16
    return x


def seed_key(seed: int) -> int:
    """The 32-bit key every backend derives from a user seed (any Python int)."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    return _mix32_int(_mix32_int((seed & _MASK32) ^ _SEED_SALT) ^ (seed >> 32))


def gumbel_noise(seed: int, shape, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """Standard Gumbel(0, 1) noise for every element of a contiguous ``shape``.

    Element ``i`` (flat, row-major) gets ``-log(-log(u))`` with
    ``u = ((h >> 9) + 0.5) / 2^23`` (exact in float32) and ``h = mix(mix(i ^ key) + key)``, key =
    :func:`seed_key`. ``u`` is never 0 or 1, so the noise is always finite.
    """
    return gumbel_noise_from_key(seed_key(seed), shape, dtype=dtype, device=device)


def gumbel_noise_from_key(key: int, shape, *, dtype=torch.float64, device=None) -> torch.Tensor:
    """:func:`gumbel_noise` for an already derived 32-bit key."""
    numel = 1
    for s in shape:
        numel *= int(s)
    if numel >= 2**32:
        raise ValueError(f"gumbel_noise: at most 2^32 elements are supported, got shape {tuple(shape)}")
    idx = torch.arange(numel, dtype=torch.int64, device=device)
    h = _mix32(idx ^ key)
    h = _mix32((h + key) & _MASK32)
    u = ((h >> 9).to(torch.float64) + 0.5) * (2.0**-23)
    g = -torch.log(-torch.log(u))
    return g.to(dtype).reshape(tuple(int(s) for s in shape))


def l2n(x: torch.Tensor) -> torch.Tensor:
    """Released-code L2 normalisation over the last axis."""
    return x / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) + L2N_EPS)


def group_assign_reference(q, k, v, tau, noise=None, seed=None):
    """CGFormer grouping: cosine similarity, Gumbel hard assignment, pooling.

    q (B,N,C) token queries, k (B,P,C) pixel keys, v (B,P,D) pixel values,
    tau a positive scalar tensor. Returns ``(out, assign)`` with
    out (B,N,D) = Â·v and assign (B,N,P) = A, the straight-through one-hot.
    """
    s = l2n(q) @ l2n(k).transpose(-1, -2)  # (B, N, P)
    if seed is not None:
        noise = gumbel_noise(seed, s.shape, dtype=s.dtype, device=s.device)
    if noise is not None:
        s = s + noise.to(s.dtype)
    y_soft = (s / tau.to(s.dtype)).softmax(dim=-2)  # over the token axis
    index = y_soft.argmax(dim=-2, keepdim=True)
    y_hard = torch.zeros_like(y_soft).scatter_(-2, index, 1.0)
    assign = y_hard - y_soft.detach() + y_soft  # straight-through
    normalised = assign / (assign.sum(dim=-1, keepdim=True) + 1)
    return normalised @ v, assign
