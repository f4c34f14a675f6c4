"""Comparison of a simulated CUDA kernel's forward and backward with the float64
reference of tests/ops (its op specs, reference functions and tolerances)."""

from __future__ import annotations

import dataclasses

import torch

from harness import Case, OpSpec, assert_close_to_reference, run_reference


def upstream_for(outputs, grad_seed: int = 0) -> tuple:
    """Seeded upstream gradients, drawn exactly as tests/ops/harness.run_backend draws them."""
    gen = torch.Generator().manual_seed(grad_seed)
    return tuple(torch.randn(o.shape, generator=gen).to(o.dtype) for o in outputs)


def check_against_reference(spec: OpSpec, case: Case, outputs, grads, upstream, dtype, *, reference=None,
                            label: str = "cuda_sim") -> None:
    """``outputs`` (the op's differentiable outputs) and ``grads`` (of spec.differentiable,
    in that order) against the float64 reference for the same ``upstream`` gradients."""
    if reference is not None:
        spec = dataclasses.replace(spec, reference=reference)
    ref_outputs, ref_grads = run_reference(spec, case, upstream)
    tol = spec.tolerance[dtype]
    names = spec.output_names or tuple(f"output{i}" for i in range(len(outputs)))
    assert len(outputs) == len(ref_outputs)
    for name, got, want in zip(names, outputs, ref_outputs):
        assert got.dtype == dtype, f"{name}: dtype {got.dtype}"
        assert_close_to_reference(f"{spec.name}[{label}] {name}", got, want, tol)
    for pos, got, want in zip(spec.differentiable, grads, ref_grads):
        what = f"{spec.name}[{label}] grad of argument {pos}"
        if want is None:
            assert not got.any(), f"{what}: the reference gives none"
            continue
        assert_close_to_reference(what, got.reshape(want.shape), want,
                                  tol * spec.grad_tolerance_scale.get(pos, 1.0))
