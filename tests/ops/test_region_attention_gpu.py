"""region_image_attention / region_language_attention on CUDA tensors ("triton", "cuda"):
exact mask decisions against the official path run on the GPU (torch's CUDA resampler
and sigmoid), ReLA's shapes, and bitwise reproducibility. The generic parity cases
(every spec in test_parity.SPECS) run on CUDA through test_group_assign_gpu.py.

Every test is marked ``gpu`` (skipped without a CUDA device, see conftest.py).
"""

import pytest
import torch

from harness import check_against_reference, require_backend
from region_attention_cases import RIA_SPEC, RLA_SPEC, decision_probe, ria_case, rla_case
from rexfast.ops import region_image_attention, region_language_attention
from rexfast.ops.region_attention.mask import official_region_blocked
from rexfast.ops.region_attention.plan import sigmoid_threshold
from test_region_attention import DECISION_SIZES, _decision_logits

pytestmark = pytest.mark.gpu


def _need(spec, backend):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    require_backend(spec, backend, "cuda")


def test_cuda_resampler_arithmetic_is_torchs():
    """The arithmetic the Triton/CUDA kernels repeat equals torch's CUDA F.interpolate here
    (else the plan falls back to reading F.interpolate's values: still exact, but then
    this test tells that the in-kernel path is not the one running)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from rexfast.ops.region_attention.plan import cuda_resampler_verified

    assert cuda_resampler_verified(torch.device("cuda"))


def test_cuda_sigmoid_threshold_is_a_clean_threshold():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    t = sigmoid_threshold(torch.device("cuda"))
    x = torch.tensor([t, float(torch.nextafter(torch.tensor(t), torch.tensor(0.0)))], device="cuda")
    assert (torch.sigmoid(x.repeat(64)) < 0.5).tolist() == [True, False] * 64


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("size", DECISION_SIZES, ids=lambda s: "{}x{}<-{}x{}-Q{}".format(*s))
def test_mask_decisions_equal_the_official_ones_on_cuda(backend, size):
    _need(RIA_SPEC, backend)
    kh, kw, mh, mw, Q = size
    logits = _decision_logits(2, Q, mh, mw, seed=kh * 100 + Q).cuda()
    q, k, v = decision_probe(logits, (kh, kw))
    out = region_image_attention(q, k, v, logits, (kh, kw), backend=backend)[:, 0]
    allowed = ~official_region_blocked(logits, (kh, kw))  # F.interpolate + sigmoid on the GPU
    mismatch = ((out > 0) != allowed).sum().item()
    assert mismatch == 0, f"{mismatch} of {allowed.numel()} decisions differ from the official path on CUDA"


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_rela_shapes_match_reference(poisoned_outputs, backend, dtype):
    _need(RIA_SPEC, backend)
    for shape in [(2, 8, 100, 15, 15, 32, 120, 120), (2, 8, 100, 30, 30, 32, 120, 120),
                  (2, 8, 100, 60, 60, 32, 120, 120)]:
        case = ria_case(shape, dtype=dtype, device="cuda", seed=1)
        check_against_reference(RIA_SPEC, case, backend, dtype, device_type="cuda")
    case = rla_case((2, 8, 100, 20, 32), dtype=dtype, device="cuda", mask="none", seed=2)
    check_against_reference(RLA_SPEC, case, backend, dtype, device_type="cuda")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_bitwise_reproducible(backend):
    _need(RIA_SPEC, backend)
    q, k, v, logits, ks = ria_case((2, 8, 100, 30, 30, 32, 120, 120), device="cuda", seed=3).args
    results = []
    for _ in range(2):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        out = region_image_attention(*leaves, logits, ks, backend=backend)
        results.append((out, *torch.autograd.grad(out, leaves, torch.ones_like(out))))
        out2 = region_language_attention(*leaves, backend=backend)
        results[-1] += (out2, *torch.autograd.grad(out2, leaves, torch.ones_like(out2)))
    for a, b in zip(*results):
        assert torch.equal(a, b)
