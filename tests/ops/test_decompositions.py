"""Every op's inference decomposition (``rexfast/ops/<op>/decomposition.py``) against the
registered op on every backend that runs here: the same decisions exactly (group_assign's
winners and counts, RIA's masks read back through probe inputs), NaN where the op has NaN
and nowhere else, values within the fp32 tolerance; parity shapes and the ops' edge cases
(ties, zero vectors, non-finite inputs, empty batches). And the decomposition table lowers
``torch.export`` programs to graphs without ``rexfast::`` ops."""

from __future__ import annotations

import pytest
import torch

import group_assign_cases as ga_cases
import ms_deform_attn_cases as msda_cases
import region_attention_cases as ra_cases
from harness import cpu_backends, require_backend, stable_seed
from rexfast.ops.decompositions import INFERENCE_DECOMPOSITIONS
from rexfast.ops.group_assign.decomposition import group_assign_decomposition
from rexfast.ops.ms_deform_attn.decomposition import ms_deform_attn_decomposition
from rexfast.ops.region_attention.region_image_attention.decomposition import region_image_attention_decomposition
from rexfast.ops.region_attention.region_language_attention.decomposition import region_language_attention_decomposition

FP32_TOL = 1e-5


def assert_same_nan_and_close(got, want, tol=FP32_TOL, what=""):
    """NaN exactly where ``want`` has NaN, ±inf equal, finite values within a relative norm ``tol``."""
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, want.shape, got.dtype, want.dtype)
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{what}: NaN positions differ"
    inf = torch.isinf(want)
    assert torch.equal(torch.isinf(got), inf) and torch.equal(got[inf], want[inf]), f"{what}: inf differs"
    finite = torch.isfinite(want)
    g, w = got[finite].double(), want[finite].double()
    if w.numel():
        err = (g - w).norm() / w.norm().clamp_min(1e-30)
        assert err <= tol, f"{what}: relative error {err:.3g} > {tol}"


def assert_identical(got, want, what=""):
    assert got.shape == want.shape, (what, got.shape, want.shape)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True, msg=f"{what}: not identical")


# ----------------------------------------------------------------------------- group_assign
GA_EDGE = ["ties", "ties_gemm_path", "zero_rows", "zero_rows_gemm_path", "nan_q", "inf_q", "nan_k", "inf_k", "nan_v",
           "inf_v", "empty_batch"]


def _ga_registered(case, backend):
    q, k, v, tau = case.args
    return torch.ops.rexfast.group_assign(q, k, v, tau.reshape(1), None, None, backend)


def _check_ga(case, backend):
    q, k, v, tau = case.args
    out, assign, counts = group_assign_decomposition(q, k, v, tau)
    want_out, want_assign, want_counts = _ga_registered(case, backend)
    assert_identical(assign, want_assign, "assign")  # the same winner for every pixel, NaN columns included
    assert_identical(counts, want_counts, "counts")
    assert_same_nan_and_close(out, want_out, FP32_TOL if q.dtype != torch.float64 else 1e-12, "out")
    finite = torch.isfinite(assign).all(dim=1)
    assert ((assign.sum(dim=1) == 1) | ~finite).all(), "exactly one winner per pixel"


@pytest.mark.parametrize("shape", ga_cases.PARITY_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", cpu_backends(ga_cases.SPEC))
def test_group_assign_decomposition_equals_the_op(backend, shape):
    require_backend(ga_cases.SPEC, backend, "cpu")
    if ga_cases.SPEC.too_slow(backend, shape):
        pytest.skip("too slow for the Triton interpreter")
    case = ga_cases.make_case(shape, noise="none", seed=stable_seed("decomp", shape))
    _check_ga(case, backend)


@pytest.mark.parametrize("name", GA_EDGE)
@pytest.mark.parametrize("backend", cpu_backends(ga_cases.SPEC))
def test_group_assign_decomposition_edge_cases(backend, name):
    require_backend(ga_cases.SPEC, backend, "cpu")
    case = ga_cases.EDGE_CASES[name](torch.float32, "cpu")
    _check_ga(case, backend)  # the noise of the poke cases is not used: the decomposition is noise-free


def test_group_assign_decomposition_picks_the_first_maximum_and_poisons_like_the_kernels():
    # Hand-made logits: exact ties go to the first token, a NaN column goes to token 0
    # with a NaN assignment and NaN counts for its whole batch item.
    q = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]])
    k = torch.tensor([[[2.0, 0.0], [0.0, 3.0], [0.0, 0.0], [1.0, 1.0]], [[1.0, 0.0], [float("nan"), 0.0],
                                                                          [0.0, 1.0], [0.0, 0.0]]])
    v = torch.arange(8.0).view(2, 4, 1)
    out, assign, counts = group_assign_decomposition(q, k, v, torch.tensor([0.5]))
    winners = assign.argmax(dim=1)
    assert winners[0].tolist() == [0, 2, 0, 0]  # tie (0, 1) → 0; zero key: all tie → 0; (1,1): tokens 0,1,2 tie → 0
    assert torch.isnan(assign[1, :, 1]).all() and winners[1, [0, 2, 3]].tolist() == [0, 1, 0]
    assert counts[0].tolist() == [3.0, 0.0, 1.0] and torch.isnan(counts[1]).all()
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1]).all()
    for backend in ("reference", "cpu"):
        if backend in ga_cases.BACKENDS.available("cpu"):
            got = torch.ops.rexfast.group_assign(q, k, v, torch.tensor([0.5]), None, None, backend)
            assert_identical(assign, got[1], backend)
            assert_identical(counts, got[2], backend)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_group_assign_decomposition_other_dtypes(dtype):
    case = ga_cases.make_case((2, 8, 129, 32, 16), dtype=dtype, noise="none", seed=3)
    out, assign, counts = group_assign_decomposition(*case.args)
    ref_out, ref_assign, ref_counts = _ga_registered(case, "reference")
    assert out.dtype == assign.dtype == dtype and counts.dtype == torch.float32
    assert_identical(assign, ref_assign, "assign")
    assert_identical(counts, ref_counts, "counts")
    tol = 1e-12 if dtype == torch.float64 else 1e-2
    assert_same_nan_and_close(out, ref_out, tol, "out")


def test_group_assign_registered_decomposition_refuses_noise():
    q, k, v, tau = ga_cases.make_case((1, 2, 10, 4, 3), noise="none").args
    decompose = INFERENCE_DECOMPOSITIONS[torch.ops.rexfast.group_assign.default]
    with pytest.raises(ValueError, match="noise"):
        decompose(q, k, v, tau, torch.zeros(1, 2, 10), None, "reference")
    with pytest.raises(ValueError, match="noise"):
        decompose(q, k, v, tau, None, 123, "reference")


# ----------------------------------------------------------------------------- ms_deform_attn
def _check_msda(case, backend, tol=FP32_TOL):
    got = ms_deform_attn_decomposition(*case.args)
    want = msda_cases.ms_deform_attn(*case.args, backend=backend)
    assert_same_nan_and_close(got, want, tol, f"ms_deform_attn vs {backend}")
    truth = msda_cases.ms_deform_attn_reference(*[t.double() if t.is_floating_point() else t for t in case.args])
    assert_same_nan_and_close(got.double(), truth, tol, "ms_deform_attn vs the float64 reference")


@pytest.mark.parametrize("shape", msda_cases.PARITY_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", msda_cases.LAYOUTS)
@pytest.mark.parametrize("backend", cpu_backends(msda_cases.SPEC))
def test_ms_deform_attn_decomposition_equals_the_op(backend, layout, shape):
    require_backend(msda_cases.SPEC, backend, "cpu")
    if msda_cases.SPEC.too_slow(backend, shape):
        pytest.skip("too slow for the Triton interpreter")
    _check_msda(msda_cases.make_case(shape, seed=stable_seed("decomp", shape), layout=layout), backend)


@pytest.mark.parametrize("name", list(msda_cases.EDGE_CASES))
@pytest.mark.parametrize("backend", cpu_backends(msda_cases.SPEC))
def test_ms_deform_attn_decomposition_edge_cases(backend, name):
    require_backend(msda_cases.SPEC, backend, "cpu")
    _check_msda(msda_cases.EDGE_CASES[name](torch.float32, "cpu"), backend)


def test_ms_deform_attn_decomposition_float64_is_the_reference():
    case = msda_cases.make_case((1, 29, 4, 16, 8, 5, 6, 9, 4, 2, 2, 11, 3), dtype=torch.float64, seed=5)
    assert_same_nan_and_close(ms_deform_attn_decomposition(*case.args), msda_cases.ms_deform_attn_reference(*case.args),
                              1e-12, "float64")


# ----------------------------------------------------------------------------- RIA / RLA
def _ria_decomposed(case):
    q, k, v, logits, (kh, kw) = case.args
    scale = case.kwargs.get("scale", q.shape[-1] ** -0.5)
    return region_image_attention_decomposition(q, k, v, logits, kh, kw, scale)


@pytest.mark.parametrize("shape", ra_cases.RIA_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", cpu_backends(ra_cases.RIA_SPEC))
def test_region_image_attention_decomposition_equals_the_op(backend, shape):
    require_backend(ra_cases.RIA_SPEC, backend, "cpu")
    if ra_cases.RIA_SPEC.too_slow(backend, shape):
        pytest.skip("too slow for the Triton interpreter")
    case = ra_cases.ria_case(shape, seed=stable_seed("decomp", shape))
    out, lse, open_rows = _ria_decomposed(case)
    want = ra_cases.region_image_attention(*case.args, **case.kwargs, backend=backend)
    assert_same_nan_and_close(out, want, FP32_TOL, "out")
    q, k, v, logits, key_size = case.args
    _, want_lse, want_open = torch.ops.rexfast.region_image_attention(q, k, v, logits, *key_size,
                                                                      q.shape[-1] ** -0.5, backend)
    assert_same_nan_and_close(lse, want_lse, FP32_TOL, "lse")
    assert_identical(open_rows, want_open, "open_rows")


@pytest.mark.parametrize("name", list(ra_cases.RIA_EDGE_CASES))
@pytest.mark.parametrize("backend", cpu_backends(ra_cases.RIA_SPEC))
def test_region_image_attention_decomposition_edge_cases(backend, name):
    require_backend(ra_cases.RIA_SPEC, backend, "cpu")
    case = ra_cases.RIA_EDGE_CASES[name](torch.float32, "cpu")
    out = _ria_decomposed(case)[0]
    assert_same_nan_and_close(out, ra_cases.region_image_attention(*case.args, **case.kwargs, backend=backend),
                              FP32_TOL, name)


@pytest.mark.parametrize("name", [n for n in ra_cases.RIA_EDGE_CASES if n.startswith("near_zero")])
@pytest.mark.parametrize("backend", cpu_backends(ra_cases.RIA_SPEC))
def test_region_image_attention_decomposition_makes_the_ops_masks(backend, name):
    # q = k = 0, v = identity: the output row is allowed/count, so the mask reads back exactly.
    require_backend(ra_cases.RIA_SPEC, backend, "cpu")
    logits, key_size = ra_cases.RIA_EDGE_CASES[name](torch.float32, "cpu").args[3:5]
    if backend == "triton" and key_size[0] * key_size[1] > 256:
        pytest.skip("the probe's head dimension (one per key) is above the Triton kernels' 256")
    q, k, v = ra_cases.decision_probe(logits, key_size)
    got = region_image_attention_decomposition(q, k, v, logits, *key_size, 1.0)[0]
    want = ra_cases.region_image_attention(q, k, v, logits, key_size, scale=1.0, backend=backend)
    assert_identical(got > 0, want > 0, name)


@pytest.mark.parametrize("shape", ra_cases.RLA_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask", ["padded", "none", "with_empty", "scattered"])
@pytest.mark.parametrize("backend", cpu_backends(ra_cases.RLA_SPEC))
def test_region_language_attention_decomposition_equals_the_op(backend, mask, shape):
    require_backend(ra_cases.RLA_SPEC, backend, "cpu")
    if ra_cases.RLA_SPEC.too_slow(backend, shape):
        pytest.skip("too slow for the Triton interpreter")
    case = ra_cases.rla_case(shape, seed=stable_seed("decomp", shape, mask), mask=mask)
    q, k, v, kpm = case.args
    out, lse = region_language_attention_decomposition(q, k, v, kpm, q.shape[-1] ** -0.5)
    want, want_lse = torch.ops.rexfast.region_language_attention(q, k, v, kpm, q.shape[-1] ** -0.5, backend)
    assert_same_nan_and_close(out, want, FP32_TOL, "out")
    assert_same_nan_and_close(lse, want_lse, FP32_TOL, "lse")


@pytest.mark.parametrize("name", list(ra_cases.RLA_EDGE_CASES))
@pytest.mark.parametrize("backend", cpu_backends(ra_cases.RLA_SPEC))
def test_region_language_attention_decomposition_edge_cases(backend, name):
    require_backend(ra_cases.RLA_SPEC, backend, "cpu")
    q, k, v, kpm = ra_cases.RLA_EDGE_CASES[name](torch.float32, "cpu").args
    out, _ = region_language_attention_decomposition(q, k, v, kpm, q.shape[-1] ** -0.5)
    assert_same_nan_and_close(out, ra_cases.region_language_attention(q, k, v, kpm, backend=backend), FP32_TOL,
                              name)


# ----------------------------------------------------------------------------- the table
def test_every_registered_op_has_an_inference_decomposition():
    from rexfast.ops import registry

    names = {op._schema.name.split("::")[1] for op in INFERENCE_DECOMPOSITIONS}
    assert names == set(registry.OPS), "an op without an inference decomposition cannot be exported"


def test_run_decompositions_removes_every_rexfast_op_and_keeps_the_values():
    class Ops(torch.nn.Module):
        def forward(self, q, k, v, value, loc, attn, rq, rk, rv, logits):
            from rexfast.ops import group_assign, ms_deform_attn, region_image_attention, region_language_attention

            pooled, assign = group_assign(q, k, v, torch.tensor(0.5), backend="reference")
            shapes = torch.tensor([[4, 8], [2, 2]])
            starts = torch.tensor([0, 32])
            sampled = ms_deform_attn(value, shapes, starts, loc, attn, backend="reference")
            ria = region_image_attention(rq, rk, rv, logits, (3, 4), backend="reference")
            rla = region_language_attention(rq, rk, rv, backend="reference")
            return pooled, assign, sampled, ria, rla

    g = torch.Generator().manual_seed(0)
    args = (torch.randn(2, 3, 8, generator=g), torch.randn(2, 20, 8, generator=g), torch.randn(2, 20, 5, generator=g),
            torch.randn(2, 36, 2, 4, generator=g), torch.rand(2, 7, 2, 2, 3, 2, generator=g),
            torch.rand(2, 7, 2, 2, 3, generator=g), torch.randn(2, 2, 5, 4, generator=g),
            torch.randn(2, 2, 12, 4, generator=g), torch.randn(2, 2, 12, 4, generator=g),
            torch.randn(2, 5, 6, 8, generator=g))
    ep = torch.export.export(Ops(), args).run_decompositions(INFERENCE_DECOMPOSITIONS)
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not [t for t in targets if "rexfast" in t], targets
    for got, want in zip(ep.module()(*args), Ops()(*args)):
        assert_same_nan_and_close(got, want, FP32_TOL)
