"""Scaffolding every op folder shares: the float dtypes ops accept, the one layout
rule the kernels need, the per-tensor input checks, and the backend set an op
registers.

Why one module: each op used to carry its own copy of these few lines, and the
copies drift (a dtype added to one op's list and not another's, a message worded
two ways). An op's ``op.py`` keeps what is particular to it — its shapes, its
custom ops, its autograd — and takes these from here.

Nothing here imports triton: an op's Triton backend is a :func:`lazy` function
that imports the op's Triton module on its first call (so ``import rexfast``
stays light, and a machine without triton loses only that backend).
"""

from __future__ import annotations

import importlib
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor

from . import registry

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def inner_contiguous(t: Tensor) -> Tensor:
    """``t`` itself when its last axis has unit stride, else a contiguous copy.

    The kernels take any batch/row/head stride (the models pass head views of
    (B, N, H, d) tensors, and copying them would cost a pass over memory) but
    need unit stride on the last axis, which they read as rows."""
    return t if t.stride(-1) == 1 else t.contiguous()


def check_float_tensors(op: str, named: Iterable[tuple[str, object]], dims: int, layout: str = "") -> None:
    """Each ``(name, value)`` must be a tensor of ``dims`` dimensions and a float dtype
    (:data:`FLOAT_DTYPES`); the error names the op, the argument and what it got.
    ``layout`` (e.g. ``"(B, H, L, d)"``) is added to the dimension message."""
    shape_of = f"{dims}-D {layout}" if layout else f"{dims}-D"
    for name, t in named:
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != dims:
            raise ValueError(f"{op}: {name} must be {shape_of}, got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} must be float16/bfloat16/float32/float64, got {t.dtype}")


def lazy(module: str, name: str) -> Callable:
    """``module.name`` called through a stub that imports ``module`` on first use.

    Ops register their Triton forward and backward this way: the Triton modules
    import triton at the top, and only a call that runs the Triton backend should
    pay for that import (or fail for want of it)."""

    def call(*args, **kwargs):
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"{module}.{name}, imported on first call."
    return call


def op_backends(op: str, *, reference: tuple[Callable, Optional[Callable]],
                native: Optional[tuple[Callable, Optional[Callable]]] = None, native_symbol: Optional[str] = None,
                triton: Optional[tuple[Callable, Optional[Callable]]] = None,
                triton_module: Optional[str] = None) -> registry.OpBackends:
    """The op's :class:`~rexfast.ops.registry.OpBackends` with what it has registered.

    Args:
        reference: (forward, backward) in PyTorch; every op has it.
        native: (forward, backward) calling ``rexfast._C``; registered as both the
            ``cpu`` and the ``cuda`` backend (the dispatcher picks the kernel by the
            tensors' device), each available where ``rexfast_C::<native_symbol>``
            has a kernel for that device.
        triton: (forward, backward); by default ``forward`` and ``backward`` of
            ``triton_module``, imported on first call (:func:`lazy`).
        triton_module: the module holding the op's Triton kernels and its
            ``compile_configs()`` (read by ``.ci/compile_triton_sm90.py``).
    """
    backends = registry.OpBackends(op, triton_module=triton_module)
    backends.register(registry.reference_backend(*reference))
    if native is not None:
        if native_symbol is None:
            raise ValueError(f"{op}: native backends need native_symbol (the rexfast_C symbol to probe)")
        backends.register(registry.cpu_backend(*native, native_symbol))
        backends.register(registry.cuda_backend(*native, native_symbol))
    if triton is None and triton_module is not None:
        triton = (lazy(triton_module, "forward"), lazy(triton_module, "backward"))
    if triton is not None:
        backends.register(registry.triton_backend(*triton))
    return backends


__all__ = ["FLOAT_DTYPES", "inner_contiguous", "check_float_tensors", "lazy", "op_backends"]
