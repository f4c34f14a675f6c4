"""Every __global__ kernel in kernels/*.cu runs under cuda_sim: one small forward and
backward of each op (both value-gradient modes of ms_deform_attn, half precision
for its conversion kernel) must launch every kernel the sources define, so a
kernel added to kernels/ without a simulated test fails here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import sim_glue
from group_assign_cases import make_case as group_assign_case
from ms_deform_attn_cases import make_case as ms_deform_attn_case
from region_attention_cases import ria_case, rla_case
from rexfast.ops.region_attention.plan import RESAMPLE_CUDA, sigmoid_threshold

pytestmark = pytest.mark.cuda_sim

KERNELS = Path(__file__).resolve().parents[2] / "kernels"
_GLOBAL = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(")


def defined_kernels() -> set[str]:
    names = set()
    for source in KERNELS.glob("*.cu"):
        names |= {f"{source.stem}:{name}" for name in _GLOBAL.findall(source.read_text())}
    return names


def test_every_kernel_in_kernels_is_launched(sim):
    launched = set()

    def collect(stem):
        launched.update(f"{stem}:{r.name.split('<')[0]}" for r in sim.launches() if r.status == 0)
        sim.reset()

    q, k, v, tau = (case := group_assign_case((2, 3, 70, 16, 8), seed=1)).args
    out, assign, counts = sim_glue.group_assign_fwd(sim, q, k, v, tau, case.kwargs["noise"])
    sim_glue.group_assign_bwd(sim, out, assign, q, k, v, tau, case.kwargs["noise"], None, out, counts)
    collect("group_assign")

    args = ms_deform_attn_case((1, 5, 2, 8, 2, 3, 4), dtype=torch.float16, seed=1).args
    out = sim_glue.ms_deform_attn_fwd(sim, *args)
    for deterministic in (False, True):
        sim_glue.ms_deform_attn_bwd(sim, out, *args, deterministic)
    collect("ms_deform_attn")

    q, k, v, logits, (kh, kw) = ria_case((1, 1, 5, 3, 4, 8, 6, 5), seed=1).args
    threshold = sigmoid_threshold(torch.device("cpu"))
    out, lse, open_rows = sim_glue.ria_fwd(sim, q, k, v, logits, kh, kw, 0.3, RESAMPLE_CUDA, threshold)
    sim_glue.ria_bwd(sim, out, q, k, v, logits, kh, kw, 0.3, RESAMPLE_CUDA, threshold, None, out, lse, open_rows)
    q, k, v, kpm = rla_case((1, 1, 3, 5, 8), seed=1).args
    out, lse = sim_glue.rla_fwd(sim, q, k, v, kpm, 0.3)
    sim_glue.rla_bwd(sim, out, q, k, v, kpm, 0.3, out, lse)
    collect("region_attention")

    defined = defined_kernels()
    assert len(defined) == 19, sorted(defined)  # if kernels/ gained one, cover it here and in its test file
    assert defined <= launched, f"never launched: {sorted(defined - launched)}"
