"""Pieces every Triton kernel module shares: the Gumbel hash in Triton, and the
description of one compile configuration for the sm_90 compile check.

Importing this module imports triton; only the ops' ``triton_kernels.py`` modules do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl


@triton.jit
def mix32(x):
    # lowbias32 (kernels/rng.h, rexfast/ops/gumbel.py); x is uint32, arithmetic wraps mod 2^32.
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    x = x ^ (x >> 16)
    return x


@triton.jit
def gumbel_from_key(index, key):
    # index, key: uint32. u = ((h >> 9) + 0.5) * 2^-23, g = -log(-log(u)).
    h = mix32(mix32(index ^ key) + key)
    u = ((h >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07
    # -log(u) near u = 1 from w = 1 - u (exact in fp32) by its series: a GPU
    # log with an absolute error near 2^-22 could make -log(u) <= 0 for the
    # largest u (1 - 2^-24) and the noise inf/NaN. Truncation error < 5e-10 relative.
    w = 1.0 - u
    series = w * (1.0 + w * (0.5 + w * (0.3333333333333333 + w * (0.25 + w * (0.2 + w * (0.16666666666666666 + w * 0.14285714285714285))))))
    neg_log_u = tl.where(w < 0.0625, series, -tl.log(u))
    return -tl.log(neg_log_u)


def key_as_int32(key: int) -> int:
    """A 32-bit key as the int32 bit pattern a kernel argument carries."""
    key = int(key) & 0xFFFFFFFF
    return key - (1 << 32) if key >= (1 << 31) else key


@dataclass(frozen=True)
class CompileConfig:
    """One kernel specialisation for ``.ci/compile_triton_sm90.py``.

    ``pointers`` maps pointer arguments to their element dtype; every other
    non-constexpr argument is an i32 scalar. ``aligned`` names the arguments the
    JIT would mark 16-byte aligned / divisible by 16 (empty: compile unaligned).
    """

    label: str
    kernel: object
    pointers: dict
    constexprs: dict
    num_warps: int
    aligned: tuple = field(default=())
    scalars: dict = field(default_factory=dict)  # non-i32 scalar arguments: name -> "fp32" | "i64"


POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.int32: "*i32",
                 torch.int64: "*i64", torch.uint8: "*u8", torch.int8: "*i8"}

__all__ = ["mix32", "gumbel_from_key", "key_as_int32", "CompileConfig", "POINTER_TYPES"]
