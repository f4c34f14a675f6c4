"""The generic op-parity harness: every op's backends against its float64 reference.

An op describes itself once with an :class:`OpSpec` (how to draw inputs, its
float64 reference, which arguments are differentiable, tolerances, edge cases);
``test_parity.py`` then runs the same checks over every registered spec, every
backend the op declares and every shape and edge case:

* forward outputs and the gradients of every differentiable input against the
  reference computed in float64 from the same (low-precision) inputs, as a
  relative norm ‖x − ref‖ / ‖ref‖ with per-dtype tolerances;
* NaN where the reference has NaN and nowhere else (with outputs drawn from
  NaN-filled memory by the ``poisoned_outputs`` fixture, an element a kernel
  forgets to write shows as NaN);
* upstream gradients are seeded random tensors, so results are reproducible.

A backend the op declares but that cannot run here is skipped — except in CI
(``CI=true``), where a missing C++ extension or Triton on CPU fails the run, and
under ``REXFAST_REQUIRE_CUDA=1`` (benchmarks/run_device.sh on a GPU), where a GPU
backend that cannot run on CUDA tensors fails: a build that silently left the CUDA
kernels out must not read as a row of skips.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import pytest
import torch

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


@dataclass
class Case:
    """Inputs of one call: positional ``args`` and keyword ``kwargs`` of the public op."""

    args: tuple
    kwargs: dict = field(default_factory=dict)
    label: str = ""


@dataclass
class OpSpec:
    name: str
    fn: Callable  # the public op: fn(*args, **kwargs, backend=name)
    reference: Callable  # the float64 truth: reference(*args, **kwargs) -> tensor | tuple of tensors
    backends: object  # the op's rexfast.ops.registry.OpBackends
    make_case: Callable[..., Case]  # make_case(shape, dtype=, device=, seed=, **mode) -> Case
    shapes: list  # float32 parity shapes, each run in every mode
    modes: tuple = ({},)  # extra make_case keywords, e.g. ({"noise": "explicit"}, {"noise": "none"})
    dtype_shapes: list = field(default_factory=list)  # shapes for fp16/bf16/fp64 (first mode only)
    differentiable: tuple = ()  # positions in Case.args that receive gradients
    tolerance: dict = field(default_factory=lambda: dict(TOLERANCE))
    grad_tolerance_scale: dict = field(default_factory=dict)  # arg position -> factor on the tolerance
    edge_cases: dict = field(default_factory=dict)  # name -> (dtype, device) -> Case
    dtypes: dict = field(default_factory=dict)  # backend -> dtypes it takes (default: all four)
    too_slow: Optional[Callable] = None  # (backend, shape) -> True to skip (e.g. the Triton interpreter)
    output_names: tuple = ()

    def takes(self, backend: str, dtype: torch.dtype) -> bool:
        return dtype in self.dtypes.get(backend, tuple(TOLERANCE))


def stable_seed(*parts) -> int:
    """A seed from test parameters that is the same in every process (str hash is salted)."""
    return zlib.crc32(repr(parts).encode()) % 100_000


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


REQUIRE_CUDA_ENV = "REXFAST_REQUIRE_CUDA"


def require_cuda() -> bool:
    """``REXFAST_REQUIRE_CUDA=1``: a CUDA device and every GPU backend must be there (see tests/conftest.py)."""
    return os.environ.get(REQUIRE_CUDA_ENV, "") == "1"


def cpu_backends(spec: OpSpec) -> list[str]:
    """The backends of ``spec`` meant to run on CPU tensors here: the reference,
    the C++ kernel, and Triton under its interpreter (when TRITON_INTERPRET=1)."""
    wanted = ["reference", "cpu"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])
    return [b for b in wanted if b in spec.backends.names]


def require_backend(spec: OpSpec, backend: str, device_type: str) -> None:
    """Skip when ``backend`` cannot run here; in CI a missing CPU backend is a failure,
    and with ``REXFAST_REQUIRE_CUDA=1`` so is a missing CUDA-tensor backend."""
    if backend in spec.backends.available(device_type):
        return
    why = spec.backends.why_unavailable(backend, device_type)
    if in_ci() and device_type == "cpu":
        pytest.fail(f"{spec.name}: the {backend} backend must run in CI but cannot: {why}")
    if require_cuda() and device_type == "cuda":
        pytest.fail(f"{spec.name}: the {backend} backend must run on CUDA tensors ({REQUIRE_CUDA_ENV}=1) but cannot: {why}")
    pytest.skip(f"{spec.name}: {backend} unavailable for {device_type} tensors ({why})")


def as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _to64(x):
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.detach().to(torch.float64)
    return x


def run_backend(spec: OpSpec, case: Case, backend: str, *, grad_seed: int = 0):
    """(outputs, grads, upstream) of one backend: the forward, then the gradients of
    the differentiable inputs for seeded random upstream gradients."""
    args = [a.detach().clone().requires_grad_(True) if i in spec.differentiable else a
            for i, a in enumerate(case.args)]
    outputs = as_tuple(spec.fn(*args, **case.kwargs, backend=backend))
    gen = torch.Generator().manual_seed(grad_seed)
    upstream = tuple(torch.randn(o.shape, generator=gen).to(o.dtype).to(o.device) for o in outputs)
    leaves = [args[i] for i in spec.differentiable]
    grads = ()
    if leaves:
        diff = [(o, u) for o, u in zip(outputs, upstream) if o.requires_grad]
        grads = torch.autograd.grad([o for o, _ in diff], leaves, [u for _, u in diff], allow_unused=True)
    return outputs, grads, upstream


def run_reference(spec: OpSpec, case: Case, upstream):
    """The float64 reference on the same inputs, and its gradients for the same upstream gradients."""
    args = [_to64(a) for a in case.args]
    args = [a.requires_grad_(True) if i in spec.differentiable else a for i, a in enumerate(args)]
    kwargs = {k: _to64(v) for k, v in case.kwargs.items()}
    outputs = as_tuple(spec.reference(*args, **kwargs))
    leaves = [args[i] for i in spec.differentiable]
    grads = ()
    if leaves:
        pairs = [(o, u.to(torch.float64)) for o, u in zip(outputs, upstream) if o.requires_grad]
        grads = torch.autograd.grad([o for o, _ in pairs], leaves, [u for _, u in pairs], allow_unused=True)
    return outputs, grads


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """‖x − ref‖ / ‖ref‖ over the finite entries (NaN patterns are compared separately)."""
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    finite = torch.isfinite(ref) & torch.isfinite(x)
    x, ref = x[finite], ref[finite]
    denom = ref.norm().item()
    return (x - ref).norm().item() / (denom if denom > 0 else 1.0)


def assert_close_to_reference(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} vs reference {tuple(want.shape)}"
    got_c, want_c = got.detach().double().cpu(), want.detach().double().cpu()
    nan_got, nan_want = torch.isnan(got_c), torch.isnan(want_c)
    if not torch.equal(nan_got, nan_want):
        extra, missing = (nan_got & ~nan_want).sum().item(), (nan_want & ~nan_got).sum().item()
        raise AssertionError(f"{name}: NaN pattern differs from the reference ({extra} extra NaN, e.g. unwritten "
                             f"outputs; {missing} NaN missing)")
    inf_got, inf_want = torch.isinf(got_c), torch.isinf(want_c)
    assert torch.equal(inf_got, inf_want) and torch.equal(got_c[inf_got], want_c[inf_want]), \
        f"{name}: infinities differ from the reference"
    err = rel_err(got_c, want_c)
    assert err < tol, f"{name}: rel err {err:.2e} (tolerance {tol:.0e})"


def check_against_reference(spec: OpSpec, case: Case, backend: str, dtype: torch.dtype, *,
                            grad_seed: int = 0, device_type: Optional[str] = None, check_grads: bool = True):
    """Forward and backward of ``backend`` on ``case`` against the float64 reference."""
    outputs, grads, upstream = run_backend(spec, case, backend, grad_seed=grad_seed)
    ref_outputs, ref_grads = run_reference(spec, case, upstream)
    tol = spec.tolerance[dtype]
    names = spec.output_names or tuple(f"output{i}" for i in range(len(outputs)))
    assert len(outputs) == len(ref_outputs)
    for name, got, want in zip(names, outputs, ref_outputs):
        assert got.dtype == dtype, f"{name}: dtype {got.dtype}, expected {dtype}"
        if device_type is not None:
            assert got.device.type == device_type, name
        assert_close_to_reference(f"{spec.name}[{backend}] {name}", got, want, tol)
    if check_grads:
        for pos, got, want in zip(spec.differentiable, grads, ref_grads):
            label = f"{spec.name}[{backend}] grad of argument {pos}"
            if want is None:
                assert got is None or not got.any(), f"{label}: the reference gives no gradient"
                continue
            assert got is not None, f"{label}: missing"
            assert got.dtype == case.args[pos].dtype, label
            assert_close_to_reference(label, got, want, tol * spec.grad_tolerance_scale.get(pos, 1.0))
    return outputs, grads


__all__ = ["TOLERANCE", "Case", "OpSpec", "stable_seed", "in_ci", "require_cuda", "cpu_backends", "require_backend", "run_backend",
           "run_reference", "rel_err", "assert_close_to_reference", "check_against_reference", "as_tuple"]
