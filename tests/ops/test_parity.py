"""Every op × every backend it declares × shapes, dtypes and edge cases, against its
float64 reference (see harness.py). CPU tensors here; tests/ops/test_*_gpu.py run
the same specs on CUDA tensors."""

from __future__ import annotations

import pytest
import torch

import group_assign_cases
import ms_deform_attn_cases
import region_attention_cases
from harness import check_against_reference, cpu_backends, require_backend, stable_seed

SPECS = [group_assign_cases.SPEC, ms_deform_attn_cases.SPEC, region_attention_cases.RIA_SPEC,
         region_attention_cases.RLA_SPEC]


def _mode_id(mode: dict) -> str:
    return "-".join(f"{v}" for v in mode.values()) or "default"


def shape_params(specs, backends_of, *, dtypes=False):
    out = []
    for spec in specs:
        for backend in backends_of(spec):
            shapes = spec.dtype_shapes if dtypes else spec.shapes
            modes = spec.modes[:1] if dtypes else spec.modes
            for shape in shapes:
                if spec.too_slow and spec.too_slow(backend, shape):
                    continue
                for mode in modes:
                    out.append(pytest.param(spec, backend, shape, mode,
                                            id=f"{spec.name}-{backend}-{'x'.join(map(str, shape))}-{_mode_id(mode)}"))
    return out


def edge_params(specs, backends_of):
    return [pytest.param(spec, backend, name, id=f"{spec.name}-{backend}-{name}")
            for spec in specs for backend in backends_of(spec) for name in spec.edge_cases]


@pytest.mark.parametrize("spec, backend, shape, mode", shape_params(SPECS, cpu_backends))
def test_fp32_matches_reference(poisoned_outputs, spec, backend, shape, mode):
    require_backend(spec, backend, "cpu")
    case = spec.make_case(shape, dtype=torch.float32, seed=stable_seed(spec.name, shape, mode), **mode)
    check_against_reference(spec, case, backend, torch.float32, grad_seed=1234)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("spec, backend, shape, mode", shape_params(SPECS, cpu_backends, dtypes=True))
def test_other_dtypes_match_reference(poisoned_outputs, spec, backend, shape, mode, dtype):
    if not spec.takes(backend, dtype):
        pytest.skip(f"{spec.name}[{backend}] does not take {dtype}")
    require_backend(spec, backend, "cpu")
    case = spec.make_case(shape, dtype=dtype, seed=7, **mode)
    check_against_reference(spec, case, backend, dtype, grad_seed=1234)


@pytest.mark.parametrize("spec, backend, name", edge_params(SPECS, cpu_backends))
def test_edge_cases_match_reference(poisoned_outputs, spec, backend, name):
    """Ties, zero vectors, NaN/±inf in every input and an empty batch: every backend
    gives the reference's values, NaN where it has NaN and nowhere else."""
    require_backend(spec, backend, "cpu")
    case = spec.edge_cases[name](torch.float32, "cpu")
    check_against_reference(spec, case, backend, torch.float32, grad_seed=99)
