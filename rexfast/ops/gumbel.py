"""The counter-based Gumbel noise every backend shares.

An op that draws its own noise (``seed=...``) never materialises it: element
``i`` (flat, row-major) of a noise field for a 32-bit key is::

    h = mix32(mix32(i ^ key) + key)          mix32 = lowbias32 (C. Wellons)
    u = ((h >> 9) + 0.5) / 2^23               exact in float32, never 0 or 1
    g = -log(-log(u))                         always finite

This module is the PyTorch definition (used by the references and the tests);
``kernels/rng.h`` (C++ and CUDA) and :mod:`rexfast.ops.triton_lib` (Triton)
evaluate the same hash, so every backend draws the same noise for a seed.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
# lowbias32 constants; see kernels/rng.h
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
    """Standard Gumbel(0, 1) noise for every element of a contiguous ``shape``,
    exactly the noise an op draws for ``seed=seed`` (see the module docstring)."""
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


__all__ = ["seed_key", "gumbel_noise", "gumbel_noise_from_key"]
