"""region_image_attention (RIA) and region_language_attention (RLA) beyond the generic
parity harness (test_parity.py): the reference against the authors' nn.MultiheadAttention
with their mask construction, exact mask decisions (read back from the output),
the all-padded rule, gradcheck, opcheck, torch.compile (Inductor), torch.export,
overflowing scores, bad input and backend selection."""

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness import check_against_reference, cpu_backends, rel_err, require_backend
from region_attention_cases import (RIA_SPEC, RLA_SPEC, THRESHOLD, THRESHOLD_UP, blob_logits, decision_probe,
                                    ria_case, rla_case)
from rexfast.ops import (region_image_attention, region_image_attention_reference, region_language_attention,
                         region_language_attention_reference)
from rexfast.ops.region_attention.mask import official_region_blocked
from rexfast.ops.region_attention.region_image_attention import BACKENDS as RIA_BACKENDS
from rexfast.ops.region_attention.region_language_attention import BACKENDS as RLA_BACKENDS

RIA_CPU = cpu_backends(RIA_SPEC)
RLA_CPU = cpu_backends(RLA_SPEC)
FP64_CPU = [b for b in ("reference", "cpu") if b in RIA_BACKENDS.names]


# ------------------------------------------------------------------ the reference is the authors' path
def _heads(x, W, b, H):
    L, B, E = x.shape
    return (x @ W.T + b).reshape(L, B, H, E // H).permute(1, 2, 0, 3)


def test_ria_reference_is_the_authors_masked_multihead_attention():
    """nn.MultiheadAttention (as ReLA's RIA layer calls it, need_weights default) with the
    attention mask built exactly as ReLA's decoder builds it, against in-projection →
    the reference → out-projection."""
    torch.manual_seed(0)
    E, H, Q, B, (kh, kw) = 32, 4, 10, 2, (6, 5)
    mha = nn.MultiheadAttention(E, H, dropout=0.0).eval()
    tgt, memory = torch.randn(Q, B, E), torch.randn(kh * kw, B, E)
    all_mask = blob_logits(B, Q, 12, 10, torch.Generator().manual_seed(1))
    all_mask[1, 2] = -5.0  # a row that blocks everything
    # forward_prediction_heads + forward, as the authors write them
    attn_mask = F.interpolate(all_mask, size=(kh, kw), mode="bilinear", align_corners=False)
    attn_mask = (attn_mask.sigmoid().flatten(2).unsqueeze(1).repeat(1, H, 1, 1).flatten(0, 1) < 0.5).bool()
    attn_mask[torch.where(attn_mask.sum(-1) == attn_mask.shape[-1])] = False
    assert attn_mask.any() and not attn_mask.all(-1).any()
    with torch.no_grad():
        want = mha(tgt, memory, memory, attn_mask=attn_mask)[0]
        Wq, Wk, Wv = mha.in_proj_weight.chunk(3)
        bq, bk, bv = mha.in_proj_bias.chunk(3)
        q, k, v = _heads(tgt, Wq, bq, H), _heads(memory, Wk, bk, H), _heads(memory, Wv, bv, H)
        out = region_image_attention_reference(q, k, v, all_mask, (kh, kw))
        got = out.permute(2, 0, 1, 3).reshape(Q, B, E) @ mha.out_proj.weight.T + mha.out_proj.bias
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    # and the mask the reference uses is that one
    assert torch.equal(official_region_blocked(all_mask, (kh, kw)).repeat_interleave(H, 0), attn_mask)


def test_rla_reference_without_mask_is_the_authors_word_attention():
    """RLA_lang_att: nn.MultiheadAttention over the (projected) words, no key padding mask."""
    torch.manual_seed(2)
    E, H, Q, B, L = 32, 8, 12, 3, 20
    mha = nn.MultiheadAttention(E, H, dropout=0.0).eval()
    tgt, words = torch.randn(Q, B, E), torch.randn(L, B, E)
    with torch.no_grad():
        want = mha(tgt, words, words)[0]
        Wq, Wk, Wv = mha.in_proj_weight.chunk(3)
        bq, bk, bv = mha.in_proj_bias.chunk(3)
        out = region_language_attention_reference(_heads(tgt, Wq, bq, H), _heads(words, Wk, bk, H),
                                                  _heads(words, Wv, bv, H))
        got = out.permute(2, 0, 1, 3).reshape(Q, B, E) @ mha.out_proj.weight.T + mha.out_proj.bias
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


def test_rla_padding_mask_matches_multihead_attention_key_padding():
    torch.manual_seed(3)
    B, H, Q, S, d = 3, 2, 5, 9, 8
    q, k, v = torch.randn(B, H, Q, d), torch.randn(B, H, S, d), torch.randn(B, H, S, d)
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[0, 4:] = True
    kpm[2, ::2] = True
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=~kpm[:, None, None, :])
    torch.testing.assert_close(region_language_attention_reference(q, k, v, kpm), sdpa)


# ------------------------------------------------------------------ exact decisions
DECISION_SIZES = [  # (kh, kw, mh, mw, Q): ReLA's ratios, other sizes, Q across the resampler's lane split
    (15, 15, 120, 120, 20),
    (6, 6, 12, 12, 100),
    (5, 7, 13, 9, 17),
    (4, 9, 4, 9, 33),
    (7, 3, 2, 5, 9),
    (3, 11, 7, 5, 3),
]


def _decision_logits(B, Q, mh, mw, seed):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.rand(B, Q, mh, mw, generator=g) - 0.55) * 1.2e-6  # all within rounding of the threshold
    logits[:, ::3] = torch.tensor([THRESHOLD, THRESHOLD_UP, 0.0, -1e-7])[torch.randint(0, 4, (B, len(range(0, Q, 3)),
                                                                                            mh, mw), generator=g)]
    logits[:, 1::5] = blob_logits(B, len(range(1, Q, 5)), mh, mw, g, forced=False)
    return logits


@pytest.mark.parametrize("backend", RIA_CPU)
@pytest.mark.parametrize("size", DECISION_SIZES, ids=lambda s: "{}x{}<-{}x{}-Q{}".format(*s))
def test_ria_mask_decisions_equal_the_official_ones_exactly(backend, size):
    """The blocked/allowed decision of every (query, key), read back from the output, is
    the official fp32 one, for logits within rounding of the decision threshold."""
    require_backend(RIA_SPEC, backend, "cpu")
    kh, kw, mh, mw, Q = size
    S = kh * kw
    if backend == "triton" and Q * S * S > 2_000_000:
        pytest.skip("too slow under the Triton interpreter")
    logits = _decision_logits(2, Q, mh, mw, seed=kh * 100 + Q)
    q, k, v = decision_probe(logits, (kh, kw))
    out = region_image_attention(q, k, v, logits, (kh, kw), backend=backend)[:, 0]
    allowed = ~official_region_blocked(logits, (kh, kw))
    assert allowed.any(-1).all()
    got_allowed = out > 0
    mismatch = (got_allowed != allowed).sum().item()
    assert mismatch == 0, f"{mismatch} of {allowed.numel()} decisions differ from the official path"
    torch.testing.assert_close(out, allowed.float() / allowed.sum(-1, keepdim=True), atol=1e-6, rtol=1e-6)


def test_threshold_constant_is_torchs_fp32_sigmoid():
    """THRESHOLD (the edge cases' anchor) is the largest fp32 logit with sigmoid < 0.5."""
    x = torch.tensor([THRESHOLD, THRESHOLD_UP])
    assert (torch.sigmoid(x) < 0.5).tolist() == [True, False]
    assert (torch.sigmoid(x.repeat(40)) < 0.5).tolist() == [True, False] * 40  # vectorised path too


# ------------------------------------------------------------------ the all-padded rule
@pytest.mark.parametrize("backend", RLA_CPU)
def test_rla_all_padded_sample_gives_zero_output_and_zero_gradients(backend):
    require_backend(RLA_SPEC, backend, "cpu")
    case = rla_case((3, 2, 6, 11, 8), mask="with_empty", seed=4)
    q, k, v, kpm = (t.detach().clone().requires_grad_(True) if i < 3 else t for i, t in enumerate(case.args))
    assert kpm[1].all() and not kpm[0].all()
    out = region_language_attention(q, k, v, kpm, backend=backend)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    for g in (dq, dk, dv):
        assert torch.equal(g[1], torch.zeros_like(g[1]))
        assert g[0].abs().sum() > 0


@pytest.mark.parametrize("backend", RIA_CPU)
def test_ria_all_blocked_row_attends_to_every_key(backend):
    require_backend(RIA_SPEC, backend, "cpu")
    logits = torch.full((1, 2, 4, 4), -3.0)
    logits[0, 1, :2, :2] = 3.0
    q, k, v = decision_probe(logits, (2, 2))
    out = region_image_attention(q, k, v, logits, (2, 2), backend=backend)[0, 0]
    torch.testing.assert_close(out, torch.tensor([[0.25] * 4, [1.0, 0.0, 0.0, 0.0]]))


# ------------------------------------------------------------------ scores that overflow fp32
@pytest.mark.parametrize("backend", [b for b in RIA_CPU if b != "reference"])
def test_ria_overflowing_scores_match_the_reference_backend(backend):
    """Finite fp32 inputs whose scores overflow (q·k = ±inf) give NaN rows; every backend
    agrees with the reference backend (same fp32 semantics), gradients included."""
    require_backend(RIA_SPEC, backend, "cpu")
    case = ria_case((2, 2, 9, 6, 5, 8, 12, 10), seed=5)
    q, k, v, logits, ks = case.args
    q, k = q.clone(), k.clone()
    q[1, 0, 2] = 3e19
    k[1, 0] = k[1, 0].sign() * 3e19
    results = []
    for b in ("reference", backend):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        out = region_image_attention(*leaves, logits, ks, backend=b)
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
        results.append((out, *grads))
    assert results[0][0].isnan().any()
    for want, got in zip(*results):
        assert torch.equal(got.isnan(), want.isnan())
    for want, got in zip(results[0][:1] + results[0][2:], results[1][:1] + results[1][2:]):
        assert rel_err(got, want) < 1e-5
    # dq of the finite rows next to the huge keys is ill-conditioned: dq_i = scale·Σ_j P_ij (dp_ij − D_i) k_j
    # with |k_j| = 3e19, so one fp32 rounding of (dp_ij − D_i), which cancels exactly in exact arithmetic,
    # is worth eps·|dp|·|k|·scale. Backends (and the Triton interpreter's numpy matmul on different CPUs)
    # round those sums in different orders; within that bound they agree, and elsewhere to 1e-5.
    want, got = results[0][1], results[1][1]
    d = q.shape[-1]
    bound = 8 * torch.finfo(torch.float32).eps * d ** -0.5 * k.abs().amax() * d * v.abs().amax()
    finite = ~want.isnan()
    assert ((got - want).abs()[finite] <= 1e-5 * want.abs()[finite].amax() + bound).all()
    rest = torch.ones_like(want, dtype=torch.bool)
    rest[1, 0] = False
    assert rel_err(got[rest], want[rest]) < 1e-5


# ------------------------------------------------------------------ gradcheck (float64)
@pytest.mark.parametrize("backend", FP64_CPU)
def test_ria_gradcheck_float64(backend):
    require_backend(RIA_SPEC, backend, "cpu")
    q, k, v, logits, ks = ria_case((2, 2, 5, 3, 4, 6, 6, 8), dtype=torch.float64, seed=6).args
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    assert torch.autograd.gradcheck(
        lambda q_, k_, v_: region_image_attention(q_, k_, v_, logits, ks, scale=0.7, backend=backend), leaves)


@pytest.mark.parametrize("mask", ["padded", "none", "with_empty"])
@pytest.mark.parametrize("backend", FP64_CPU)
def test_rla_gradcheck_float64(backend, mask):
    require_backend(RLA_SPEC, backend, "cpu")
    q, k, v, kpm = rla_case((3, 2, 5, 7, 6), dtype=torch.float64, mask=mask, seed=7).args
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    assert torch.autograd.gradcheck(lambda q_, k_, v_: region_language_attention(q_, k_, v_, kpm, backend=backend),
                                    leaves)


# ------------------------------------------------------------------ registration
@pytest.mark.parametrize("backend", RIA_CPU)
def test_ria_opcheck(backend):
    require_backend(RIA_SPEC, backend, "cpu")
    q, k, v, logits, (kh, kw) = ria_case((2, 2, 5, 3, 4, 8, 6, 8), seed=8).args
    args = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    torch.library.opcheck(torch.ops.rexfast.region_image_attention.default, (*args, logits, kh, kw, 0.35, backend))


@pytest.mark.parametrize("backend", RLA_CPU)
def test_rla_opcheck(backend):
    require_backend(RLA_SPEC, backend, "cpu")
    q, k, v, kpm = rla_case((2, 2, 5, 7, 8), seed=9).args
    args = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    torch.library.opcheck(torch.ops.rexfast.region_language_attention.default, (*args, kpm, 0.35, backend))
    torch.library.opcheck(torch.ops.rexfast.region_language_attention.default, (*args, None, 0.35, backend))


def _heads_view(t: torch.Tensor) -> torch.Tensor:
    """The same values as a (B, H, N, d) view of a (B, N, H, d) tensor: how the models' attention
    projections hand q, k, v over (not contiguous)."""
    return t.detach().transpose(1, 2).contiguous().transpose(1, 2)


@pytest.mark.parametrize("backend", RIA_CPU)
def test_ria_opcheck_head_views(backend):
    """opcheck with q, k, v laid out as the models pass them (head views). opcheck does not compare
    output strides with the fake function's: the ``fake_functions_match_real_strides`` tests do."""
    require_backend(RIA_SPEC, backend, "cpu")
    q, k, v, logits, (kh, kw) = ria_case((2, 2, 5, 3, 4, 8, 6, 8), seed=8).args
    args = [_heads_view(t).requires_grad_(True) for t in (q, k, v)]
    assert not args[0].is_contiguous()
    torch.library.opcheck(torch.ops.rexfast.region_image_attention.default, (*args, logits, kh, kw, 0.35, backend))


@pytest.mark.parametrize("backend", RLA_CPU)
def test_rla_opcheck_head_views(backend):
    require_backend(RLA_SPEC, backend, "cpu")
    q, k, v, kpm = rla_case((2, 2, 5, 7, 8), seed=9).args
    args = [_heads_view(t).requires_grad_(True) for t in (q, k, v)]
    assert not args[0].is_contiguous()
    torch.library.opcheck(torch.ops.rexfast.region_language_attention.default, (*args, kpm, 0.35, backend))


def _assert_fake_strides_match(op, args):
    from torch._subclasses.fake_tensor import FakeTensorMode

    real = op(*args)
    with FakeTensorMode() as mode:
        fake = op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    for i, (r, f) in enumerate(zip(real, fake)):
        assert (r.shape, r.stride(), r.dtype) == (f.shape, f.stride(), f.dtype), f"{op} output {i}"
    return real


@pytest.mark.parametrize("backend", RIA_CPU)
def test_ria_fake_functions_match_real_strides_on_head_views(backend):
    """Inductor checks a custom op's real output strides against its fake function's: a
    mismatch failed the compiled ReLA training step (region_image_attention_backward)."""
    require_backend(RIA_SPEC, backend, "cpu")
    q, k, v, logits, (kh, kw) = ria_case((2, 2, 5, 3, 4, 8, 6, 8), seed=8).args
    q, k, v = (_heads_view(t) for t in (q, k, v))
    out, lse, open_rows = _assert_fake_strides_match(torch.ops.rexfast.region_image_attention.default,
                                                     (q, k, v, logits, kh, kw, 0.35, backend))
    dout = _heads_view(torch.randn_like(out))
    _assert_fake_strides_match(torch.ops.rexfast.region_image_attention_backward.default,
                               (dout, q, k, v, logits, kh, kw, 0.35, out, lse, open_rows, backend))


@pytest.mark.parametrize("backend", RLA_CPU)
def test_rla_fake_functions_match_real_strides_on_head_views(backend):
    require_backend(RLA_SPEC, backend, "cpu")
    q, k, v, kpm = rla_case((2, 2, 5, 7, 8), seed=9).args
    q, k, v = (_heads_view(t) for t in (q, k, v))
    out, lse = _assert_fake_strides_match(torch.ops.rexfast.region_language_attention.default,
                                          (q, k, v, kpm, 0.35, backend))
    dout = _heads_view(torch.randn_like(out))
    _assert_fake_strides_match(torch.ops.rexfast.region_language_attention_backward.default,
                               (dout, q, k, v, kpm, 0.35, out, lse, backend))


def _best_cpu(backends):
    return "cpu" if "cpu" in backends.available("cpu") else "reference"


def test_torch_compile_fullgraph_inductor():
    ria_backend, rla_backend = _best_cpu(RIA_BACKENDS), _best_cpu(RLA_BACKENDS)
    q, k, v, logits, ks = ria_case((2, 2, 6, 3, 4, 8, 6, 8), seed=10).args
    kpm = torch.zeros(2, 12, dtype=torch.bool)
    kpm[1, 7:] = True

    def fn(q, k, v, logits, kpm):
        x = region_image_attention(q, k, v, logits, ks, backend=ria_backend)
        y = region_language_attention(x * 2.0, k, v, kpm, backend=rla_backend)
        return (x.sin() + y).sum()

    compiled = torch.compile(fn, fullgraph=True)  # Inductor
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    leaves_c = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    loss = fn(*leaves, logits, kpm)
    loss_c = compiled(*leaves_c, logits, kpm)
    torch.testing.assert_close(loss_c, loss)
    for a, b in zip(torch.autograd.grad(loss, leaves), torch.autograd.grad(loss_c, leaves_c)):
        torch.testing.assert_close(a, b)


def test_torch_export():
    ria_backend, rla_backend = _best_cpu(RIA_BACKENDS), _best_cpu(RLA_BACKENDS)

    class Block(nn.Module):
        def forward(self, q, k, v, logits, words):
            x = region_image_attention(q, k, v, logits, (3, 4), backend=ria_backend)
            return region_language_attention(x, words, words, backend=rla_backend)

    q, k, v, logits, _ = ria_case((1, 2, 5, 3, 4, 8, 6, 8), seed=11).args
    words = torch.randn(1, 2, 7, 8)
    exported = torch.export.export(Block(), (q, k, v, logits, words))
    torch.testing.assert_close(exported.module()(q, k, v, logits, words), Block()(q, k, v, logits, words))


# ------------------------------------------------------------------ bad input
def _ria_ok():
    return torch.randn(2, 3, 5, 8), torch.randn(2, 3, 12, 8), torch.randn(2, 3, 12, 8), torch.randn(2, 5, 6, 7), (3, 4)


def _re(words):
    return re.escape(words)


@pytest.mark.parametrize(
    "mutate, exc, words",
    [
        (lambda q, k, v, r, s: (q[0], k, v, r, s), ValueError, "q must be 4-D (B, H, L, d), got shape (3, 5, 8)"),
        (lambda q, k, v, r, s: (q, k[:, :2], v, r, s), ValueError, "k must be (B, H, S, d) = (2, 3, S, 8)"),
        (lambda q, k, v, r, s: (q, k, v[..., :4], r, s), ValueError, "v must have k's shape"),
        (lambda q, k, v, r, s: (q, k, v, r, (4, 4)), ValueError, "key_size (4, 4) has kh*kw = 16 keys but k has S = 12"),
        (lambda q, k, v, r, s: (q, k, v, r, (3, 0)), ValueError, "key_size must be positive"),
        (lambda q, k, v, r, s: (q, k, v, r, 12), TypeError, "key_size must be a pair"),
        (lambda q, k, v, r, s: (q, k, v, r, (3.0, 4)), TypeError, "key_size must hold two ints"),
        (lambda q, k, v, r, s: (q, k, v, r[:1], s), ValueError, "region_logits must be (B, Q, mh, mw) = (2, 5, mh, mw)"),
        (lambda q, k, v, r, s: (q, k, v, r[0], s), ValueError, "region_logits must be 4-D"),
        (lambda q, k, v, r, s: (q, k, v, r[..., :0], s), ValueError, "empty region map"),
        (lambda q, k, v, r, s: (q, k, v, r.long(), s), TypeError, "region_logits must be a float tensor"),
        (lambda q, k, v, r, s: (q, k, v, r.to("meta"), s), ValueError, "region_logits is on meta"),
        (lambda q, k, v, r, s: (q, k.double(), v, r, s), TypeError, "share a dtype"),
        (lambda q, k, v, r, s: (q.int(), k, v, r, s), TypeError, "q must be float"),
        (lambda q, k, v, r, s: ([1.0], k, v, r, s), TypeError, "q must be a torch.Tensor"),
        (lambda q, k, v, r, s: (q, k, v, "mask", s), TypeError, "region_logits must be a torch.Tensor"),
        (lambda q, k, v, r, s: (q[..., :0], k[..., :0], v[..., :0], r, s), ValueError, "head dimension d"),
        (lambda q, k, v, r, s: (q, k, v.to("meta"), r, s), ValueError, "one device"),
    ],
)
def test_ria_bad_input(mutate, exc, words):
    with pytest.raises(exc, match=_re(words)):
        region_image_attention(*mutate(*_ria_ok()))


def test_ria_bad_scale_and_backend():
    q, k, v, r, s = _ria_ok()
    with pytest.raises(TypeError, match="scale must be a float"):
        region_image_attention(q, k, v, r, s, scale="0.5")
    with pytest.raises(ValueError, match="scale must be finite"):
        region_image_attention(q, k, v, r, s, scale=float("inf"))
    with pytest.raises(ValueError, match="unknown backend"):
        region_image_attention(q, k, v, r, s, backend="fpga")
    with pytest.raises(RuntimeError, match="cannot run cpu tensors"):
        region_image_attention(q, k, v, r, s, backend="cuda")


@pytest.mark.parametrize(
    "mask, exc, words",
    [
        (torch.zeros(2, 11, dtype=torch.bool), ValueError, "key_padding_mask must be (B, S) = (2, 12)"),
        (torch.zeros(2, 12), TypeError, "key_padding_mask must be a bool tensor (True = padded), got torch.float32"),
        ([True] * 12, TypeError, "key_padding_mask must be a bool tensor or None"),
        (torch.zeros(2, 12, dtype=torch.bool, device="meta"), ValueError, "key_padding_mask is on meta"),
    ],
)
def test_rla_bad_input(mask, exc, words):
    q, k, v, _, _ = _ria_ok()
    with pytest.raises(exc, match=_re(words)):
        region_language_attention(q, k, v, mask)
    with pytest.raises(ValueError, match="k must be"):
        region_language_attention(q, k[:1], v[:1])


def test_empty_inputs_give_empty_outputs_and_gradients():
    for B, Q in ((0, 5), (2, 0)):
        q = torch.randn(B, 3, Q, 8, requires_grad=True)
        k, v = torch.randn(B, 3, 12, 8, requires_grad=True), torch.randn(B, 3, 12, 8, requires_grad=True)
        out = region_image_attention(q, k, v, torch.randn(B, Q, 6, 7), (3, 4))
        assert out.shape == (B, 3, Q, 8)
        out2 = region_language_attention(q, k, v, torch.zeros(B, 12, dtype=torch.bool))
        assert out2.shape == (B, 3, Q, 8)
        grads = torch.autograd.grad((out.sum() + out2.sum()), (q, k, v), allow_unused=True)
        for g, t in zip(grads, (q, k, v)):
            assert g is None or (g.shape == t.shape and not g.any())


def test_backend_env_override(monkeypatch):
    monkeypatch.setenv("REXFAST_BACKEND", "reference")
    assert RIA_BACKENDS.choose(torch.device("cpu"), None) == "reference"
    assert RLA_BACKENDS.choose(torch.device("cpu"), None) == "reference"
    monkeypatch.setenv("REXFAST_BACKEND", "nope")
    with pytest.raises(ValueError, match="unknown backend"):
        RIA_BACKENDS.choose(torch.device("cpu"), None)


# ------------------------------------------------------------------ the C++ kernel specifics
RESAMPLE_SIZES = [  # (mh, mw, kh, kw, Q): both torch CPU resampling kernels, the 8-lane split, equal sizes
    (120, 120, 60, 60, 100), (120, 120, 15, 15, 20), (13, 9, 5, 7, 21), (5, 5, 9, 3, 9), (2, 5, 7, 3, 13),
    (33, 47, 61, 67, 5), (12, 12, 6, 6, 3), (9, 9, 9, 9, 18), (7, 3, 7, 3, 8), (40, 30, 70, 61, 2),
]


@pytest.mark.parametrize("size", RESAMPLE_SIZES, ids=lambda s: "{}x{}->{}x{}-Q{}".format(*s))
def test_cpu_resampler_is_torchs_bit_for_bit(size):
    """The resampled logits the C++ kernel compares with the threshold equal F.interpolate's
    bit for bit (NaN and inf texels included), for the plan this machine gets."""
    require_backend(RIA_SPEC, "cpu", "cpu")
    from rexfast.ops.region_attention.plan import RESAMPLE_MAP, decision_plan

    mh, mw, kh, kw, Q = size
    g = torch.Generator().manual_seed(mh * 1000 + kw)
    logits = torch.randn(2, Q, mh, mw, generator=g) * 3
    logits[:, ::4] *= 1e-7
    logits[0, 0, 0, :3] = torch.tensor([float("inf"), float("nan"), float("-inf")])
    plan = decision_plan(torch.device("cpu"), Q, (mh, mw), (kh, kw))
    if plan.mode == RESAMPLE_MAP:
        pytest.skip("this CPU's resampler is not reproduced (the kernel reads F.interpolate's values)")
    want = F.interpolate(logits, size=(kh, kw), mode="bilinear", align_corners=False).flatten(2)
    got = torch.ops.rexfast_C.region_resample(logits, kh, kw, plan.mode, plan.fma, plan.q_vec)
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(), want.nan_to_num()), f"{(got != want).sum().item()} values differ"


@pytest.mark.parametrize("op", ["ria", "rla"])
def test_cpu_results_do_not_depend_on_the_thread_count(op):
    spec = RIA_SPEC if op == "ria" else RLA_SPEC
    require_backend(spec, "cpu", "cpu")
    if op == "ria":
        case = ria_case((2, 3, 37, 15, 15, 32, 120, 120), seed=12)
        fn = region_image_attention
    else:
        case = rla_case((3, 2, 41, 150, 16), mask="with_empty", seed=12)
        fn = region_language_attention
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            leaves = [t.detach().clone().requires_grad_(True) for t in case.args[:3]]
            out = fn(*leaves, *case.args[3:], backend="cpu")
            grads = torch.autograd.grad(out, leaves, torch.linspace(-1, 1, out.numel()).reshape(out.shape))
            results.append((out, *grads))
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(*results):
        assert torch.equal(a, b), "the CPU kernel must be bitwise independent of the thread count"


def test_cpu_kernel_skips_blocked_tiles_without_changing_results():
    """Sparse masks (a small blob per query, so most key tiles are blocked for a whole
    query block) against the reference backend; and the same with a NaN in v, where the
    kernel must not skip (0·NaN reaches every row)."""
    require_backend(RIA_SPEC, "cpu", "cpu")
    g = torch.Generator().manual_seed(13)
    B, H, Q, kh, kw, d = 1, 2, 32, 30, 30, 16
    q, k, v = torch.randn(B, H, Q, d, generator=g), torch.randn(B, H, kh * kw, d, generator=g), \
        torch.randn(B, H, kh * kw, d, generator=g)
    logits = torch.full((B, Q, 60, 60), -4.0)
    logits[:, :, :6, :6] = 4.0  # every query allows only the top-left corner
    for poison in (False, True):
        vv = v.clone()
        if poison:
            vv[0, 1, kh * kw - 1, 3] = float("nan")  # a key every query blocks
        want = region_image_attention(q, k, vv, logits, (kh, kw), backend="reference")
        got = region_image_attention(q, k, vv, logits, (kh, kw), backend="cpu")
        assert torch.equal(got.isnan(), want.isnan())
        assert rel_err(got, want) < 1e-5
        if poison:
            assert got[0, 1, :, 3].isnan().all() and not got[0, 0].isnan().any()


# ------------------------------------------------------------------ the other decision plans
def _plan(mode, Q, region_size, key_size):
    from rexfast.ops.region_attention.plan import DecisionPlan, sigmoid_threshold

    return DecisionPlan(mode, True, 0, sigmoid_threshold(torch.device("cpu")))


@pytest.mark.parametrize("backend", [b for b in RIA_CPU if b in ("cpu", "triton")])
def test_map_plan_reads_torchs_resampled_values(backend, monkeypatch):
    """RESAMPLE_MAP (a CPU whose resampler the kernels do not reproduce): the kernels read
    F.interpolate's values; decisions still exact."""
    require_backend(RIA_SPEC, backend, "cpu")
    from rexfast.ops.region_attention import plan
    from rexfast.ops.region_attention.plan import RESAMPLE_MAP

    kh, kw, mh, mw, Q = 5, 7, 13, 9, 17
    logits = _decision_logits(2, Q, mh, mw, seed=21)
    # plan.plan_args (the C++ kernels' arguments) reads plan.decision_plan; the Triton module
    # imported the name
    monkeypatch.setattr(plan, "decision_plan",
                        lambda device, Q, region_size, key_size, **kw: _plan(RESAMPLE_MAP, Q, region_size, key_size))
    if backend == "triton":
        import importlib

        rat = importlib.import_module("rexfast.ops.region_attention.triton_kernels")
        monkeypatch.setattr(rat, "decision_plan", plan.decision_plan)
    q, k, v = decision_probe(logits, (kh, kw))
    out = region_image_attention(q, k, v, logits, (kh, kw), backend=backend)[:, 0]
    allowed = ~official_region_blocked(logits, (kh, kw))
    assert ((out > 0) != allowed).sum().item() == 0


def _cuda_formula_emulation(logits, kh, kw):
    from rexfast.ops.region_attention.plan import emulate_cuda_resample

    return emulate_cuda_resample(logits, (kh, kw))


@pytest.mark.parametrize("size", [(120, 120, 60, 60), (13, 9, 5, 7), (5, 5, 9, 3), (4, 9, 4, 9)],
                         ids=lambda s: "{}x{}->{}x{}".format(*s))
def test_cuda_resampler_emulations_agree(size):
    """The CUDA plan's arithmetic, written three times (the torch emulation the once-per-GPU
    check compares with F.interpolate, the C++ Resampler's CUDA mode, the Triton kernel's
    under the interpreter), gives the same values and so the same decisions (the CUDA
    kernel's fourth copy is only compiled here)."""
    require_backend(RIA_SPEC, "cpu", "cpu")
    from rexfast.ops.region_attention.plan import RESAMPLE_CUDA

    mh, mw, kh, kw = size
    logits = _decision_logits(2, 11, mh, mw, seed=mh + kw)
    want = _cuda_formula_emulation(logits, kh, kw)
    got = torch.ops.rexfast_C.region_resample(logits, kh, kw, RESAMPLE_CUDA, True, 0)
    assert torch.equal(got, want)
    if "triton" in RIA_CPU and registry_triton_ok() and kh * kw <= 256:  # the probe has d = S
        import rexfast.ops.region_attention.triton_kernels as rat

        plan = _plan(RESAMPLE_CUDA, 11, (mh, mw), (kh, kw))
        orig = rat.decision_plan
        try:
            rat.decision_plan = lambda *a, **k: plan
            q, k, v = decision_probe(logits, (kh, kw))
            out = region_image_attention(q, k, v, logits, (kh, kw), backend="triton")[:, 0]
        finally:
            rat.decision_plan = orig
        blocked = want <= plan.threshold
        blocked = blocked & ~blocked.all(-1, keepdim=True)
        assert torch.equal(out > 0, ~blocked)


def _nvcc():
    """The real nvcc (PATH, then /usr/local/cuda*/bin), or None."""
    import glob
    import shutil

    found = shutil.which("nvcc")
    candidates = ([found] if found else []) + sorted(glob.glob("/usr/local/cuda*/bin/nvcc"), reverse=True)
    return candidates[0] if candidates else None


_PTX_PROBE = r"""
#include "region_attention.cu"
extern "C" __global__ void rexfast_bilinear_probe(float a, float b, float c, float d, float lx0, float lx1,
                                                  float ly0, float ly1, float* out) {
  rexfast::cuda::AxisTap x{0, 0, lx0, lx1}, y{0, 0, ly0, ly1};
  *out = rexfast::cuda::torch_bilinear(a, b, c, d, x, y);
}
"""
_PROBE_ARGS = ("a", "b", "c", "d", "lx0", "lx1", "ly0", "ly1")


def _ptx_expression(ptx: str, entry: str):
    """The value an entry point stores, as a tree ('fma', p, q, r) / ('mul', p, q) over its
    parameter names, from its straight-line PTX (f32 params, mul.rn / fma.rn only)."""
    body = ptx[ptx.index(f".entry {entry}("):]
    body = body[:body.index("\n}")]
    regs, stored = {}, None
    for line in body.splitlines():
        line = line.strip().rstrip(";")
        m = re.match(r"ld\.param\.f32\s+(%f\d+), \[\w+_param_(\d+)\]", line)
        if m:
            regs[m[1]] = _PROBE_ARGS[int(m[2])]
            continue
        m = re.match(r"(mul|fma|add|sub)(\.\w+)*\.f32\s+(%f\d+), (.*)", line)
        if m:
            assert m[1] in ("mul", "fma") and ".rn" in line, f"unexpected arithmetic in the probe: {line}"
            regs[m[3]] = (m[1],) + tuple(regs[r.strip()] for r in m[4].split(","))
            continue
        m = re.match(r"st\.global\.f32\s+\[%rd\d+\], (%f\d+)", line)
        if m:
            stored = regs[m[1]]
    return stored


def _canonical(tree):
    """Multiplication commutes exactly: sort the factors of each product (mul, or fma's p·q)."""
    if isinstance(tree, str):
        return tree
    args = [_canonical(t) for t in tree[1:]]
    factors = sorted(args[:2], key=repr)
    return (tree[0], *factors, *args[2:])


def _evaluate(tree, values):
    from rexfast.ops.region_attention.plan import fma32

    if isinstance(tree, str):
        return values[tree]
    args = [_evaluate(t, values) for t in tree[1:]]
    return args[0] * args[1] if tree[0] == "mul" else fma32(*args)


def test_cuda_kernel_resampler_is_the_documented_fma_order(tmp_path):
    """The CUDA kernel's resampler (kernels/region_attention.cu, torch_bilinear), compiled by
    nvcc for sm_90, computes t0 = fma(λx0, a, λx1·b), t1 = fma(λx0, c, λx1·d),
    v = fma(λy0, t0, λy1·t1): its PTX, read back as an expression tree, is that tree, and
    evaluated with exact fma on random and adversarial inputs it equals
    ``region_attention.cuda_bilinear`` (the copy the once-per-GPU check compares with
    torch, and which the C++ and Triton copies equal: test above) bit for bit.

    That this is torch's own arithmetic was read from the sm_90 SASS of
    upsample_bilinear2d_out_frame<float, float> in torch 2.11.0's CUDA 13 wheel (the
    device image's torch); this machine has no CUDA torch to read it from, so what this
    test cannot see is torch's binary: ``test_cuda_resampler_arithmetic_is_torchs``
    (GPU) compares with F.interpolate itself. PTX is enough for the kernel's side:
    mul.rn/fma.rn are never re-contracted or reordered by ptxas."""
    import subprocess

    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("needs nvcc (compile only, no GPU)")
    from pathlib import Path

    from rexfast.ops.region_attention.plan import cuda_bilinear

    kernels = Path(__file__).resolve().parents[2] / "kernels"
    (tmp_path / "probe.cu").write_text(_PTX_PROBE)
    subprocess.run([nvcc, "-std=c++17", "-O3", "-arch=sm_90", "-ptx", f"-I{kernels}", "probe.cu", "-o", "probe.ptx"],
                   cwd=tmp_path, check=True, capture_output=True, timeout=300)
    tree = _ptx_expression((tmp_path / "probe.ptx").read_text(), "rexfast_bilinear_probe")
    want = ("fma", "ly0", ("fma", "lx0", "a", ("mul", "lx1", "b")),
            ("mul", "ly1", ("fma", "lx0", "c", ("mul", "lx1", "d"))))
    assert _canonical(tree) == _canonical(want), tree

    g = torch.Generator().manual_seed(0)
    n = 4096
    texels = torch.randn(4, n, generator=g) * 10.0 ** torch.randint(-8, 3, (4, n), generator=g)
    lam1 = torch.rand(2, n, generator=g)
    lam1[:, :64] = torch.tensor([0.0, 0.5, 0.25, 1 - 2**-24]).repeat(16)  # exact and extreme weights
    values = dict(zip(("a", "b", "c", "d"), texels))
    values.update(lx1=lam1[0], lx0=1 - lam1[0], ly1=lam1[1], ly0=1 - lam1[1])
    got = _evaluate(tree, values)
    expected = cuda_bilinear(*(values[k] for k in _PROBE_ARGS))
    assert torch.equal(got, expected), f"{(got != expected).sum().item()} of {n} values differ"


def test_cuda_resampler_probe_tells_the_fma_orders_apart():
    """The once-per-GPU check (cuda_resampler_verified) can only catch a wrong contraction
    order if its probe logits round differently under the two orders of t0 that nvcc
    produces for torch's expression (fma(λx0, a, λx1·b) in the NCHW kernel,
    fma(λx1, b, λx0·a) in the channels-last one)."""
    from rexfast.ops.region_attention import plan as ra
    from rexfast.ops.region_attention.plan import fma32

    differ = 0
    for logits, (kh, kw) in ra.cuda_resampler_probes():
        plan = ra.DecisionPlan(ra.RESAMPLE_CUDA, True, 0, 0.0)
        y0, y1, ly0, ly1 = (t.long() if t.dtype == torch.int32 else t for t in ra.resample_axis(logits.shape[2], kh, plan))
        x0, x1, lx0, lx1 = (t.long() if t.dtype == torch.int32 else t for t in ra.resample_axis(logits.shape[3], kw, plan))
        a, b = logits[..., y0[:, None], x0[None, :]], logits[..., y0[:, None], x1[None, :]]
        c, d = logits[..., y1[:, None], x0[None, :]], logits[..., y1[:, None], x1[None, :]]
        LX0, LX1, LY0, LY1 = lx0[None, :], lx1[None, :], ly0[:, None], ly1[:, None]
        other = fma32(LY0, fma32(LX1, b, LX0 * a), LY1 * fma32(LX0, c, LX1 * d)).flatten(2)
        differ += (ra.emulate_cuda_resample(logits, (kh, kw)) != other).sum().item()
    assert differ > 100, differ


# ------------------------------------------------------------------ Triton bf16: what the GPU rounds
def test_round_bf16_is_the_gpus_conversion():
    """``_round_bf16`` (the interpreter's stand-in for the GPU's fp32 → bf16 conversion, as
    the interpreter's own conversion truncates) rounds to nearest, ties to even, like
    torch: random values over the whole range, exact ties both ways, the largest finite
    values (→ ±inf), subnormals, ±0, ±inf and NaN."""
    require_backend(RIA_SPEC, "triton", "cpu")
    import triton
    import triton.language as tl

    from rexfast.ops.region_attention import triton_kernels as region_attention_triton

    # a jitted function finds its callees among its module's globals
    globals()["_round_bf16"] = region_attention_triton._round_bf16

    @triton.jit
    def kernel(x_ptr, y_ptr, N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(y_ptr + offs, _round_bf16(tl.load(x_ptr + offs)))  # noqa: F821

    g = torch.Generator().manual_seed(0)
    n = 1 << 14
    bits = torch.randint(0, 2**31 - 1, (n,), generator=g, dtype=torch.int64)
    bits[: n // 4] = (bits[: n // 4] & ~0xFFFF) | 0x8000  # exact ties
    bits[n // 4: n // 2] = (bits[n // 4: n // 2] & ~0xFFFF) | 0x7FFF  # just below a tie
    sign = torch.randint(0, 2, (n,), generator=g, dtype=torch.int64) << 31
    x = (bits | sign).to(torch.int32).view(torch.float32).clone()
    x[:8] = torch.tensor([float("inf"), -float("inf"), 0.0, -0.0, 3.4028235e38, -3.4028235e38, 1e-40, -1e-45])
    x[8] = float("nan")
    x = x[~x.isnan() | (torch.arange(n) == 8)]
    size = triton.next_power_of_2(x.numel())
    x = torch.cat([x, torch.zeros(size - x.numel())])
    y = torch.empty_like(x)
    kernel[(1,)](x, y, N=size)
    want = x.to(torch.bfloat16).float()
    assert torch.equal(y.isnan(), want.isnan())
    assert torch.equal(y[~want.isnan()], want[~want.isnan()])


def _sharp_case(op: str, seed: int = 3):
    """bf16 inputs with a peaked softmax (q·kᵀ scaled ×40: few keys carry each row, as in
    trained attention), where dS = P∘(dP − Δ) cancels and the row statistic Δ decides."""
    if op == "ria":
        q, k, v, logits, ks = ria_case((1, 2, 33, 15, 15, 64, 30, 30), seed=seed).args
        rest, fn, ref = (logits, ks), region_image_attention, region_image_attention_reference
    else:
        q, k, v, kpm = rla_case((2, 3, 33, 70, 16), seed=seed).args
        rest, fn, ref = (kpm,), region_language_attention, region_language_attention_reference
    return (q * 40).to(torch.bfloat16), k.to(torch.bfloat16), v.to(torch.bfloat16), rest, fn, ref


@pytest.mark.parametrize("op", ["ria", "rla"])
def test_triton_bf16_backward_accuracy_on_a_peaked_softmax(op):
    """dq, dk, dv of the Triton kernels in bf16 within 5e-3 (relative norm) of the float64
    truth from the same rounded inputs, on a peaked softmax (measured 2.4e-3..2.8e-3;
    PyTorch's bf16 SDPA gives 1.2e-2 on the RIA case, the C++ backend 1.1e-2). Δ comes from
    the fp32 pass (Σ_j p·dp), not from the bf16-rounded output (1.1e-2..1.2e-2 with it).

    Under the interpreter the bf16 path (EMU_BF16) computes what the GPU computes as far
    as values go: exact bf16 operands, fp32 dot accumulation, and every value the GPU
    rounds to bf16 (p and dS as dot operands, the stored out, dk, dv) rounded to nearest
    even. What it cannot see: the tensor cores' accumulation order and internal
    precision, the GPU's exp/log approximations and denormal flushing; the GPU tests
    measure those."""
    require_backend(RIA_SPEC, "triton", "cpu")
    q, k, v, rest, fn, ref = _sharp_case(op)
    truth = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    out64 = ref(*truth, *rest)
    dout = torch.randn(out64.shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    want = torch.autograd.grad(out64, truth, dout.double())
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    got = torch.autograd.grad(fn(*leaves, *rest, backend="triton"), leaves, dout)
    errors = [rel_err(a, b) for a, b in zip(got, want)]
    assert max(errors) < 5e-3, errors


@pytest.mark.parametrize("spec, name", [(RIA_SPEC, n) for n in ("nan_q", "inf_k", "nan_k_blocked_key", "nan_v",
                                                                 "inf_v", "nan_logits", "all_blocked_rows")]
                         + [(RLA_SPEC, n) for n in ("all_padded_sample", "nan_k_padded_word", "nan_v_padded_word",
                                                    "inf_v", "inf_k_no_mask")],
                         ids=lambda x: getattr(x, "name", x))
def test_triton_bf16_edge_cases_match_reference(poisoned_outputs, spec, name):
    """The bf16 backward's Δ pass (Σ_j p·dp over every key) keeps the NaN/inf rules of the
    fp32 path: NaN where the float64 reference has NaN and nowhere else."""
    require_backend(spec, "triton", "cpu")
    check_against_reference(spec, spec.edge_cases[name](torch.bfloat16, "cpu"), "triton", torch.bfloat16,
                            grad_seed=99)


def registry_triton_ok():
    return "triton" in RIA_BACKENDS.available("cpu")


def _strided_copy(t: torch.Tensor) -> torch.Tensor:
    """The same values with the last two dims' strides swapped: not contiguous, stride(-1) != 1."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def test_cpu_backward_reads_strided_float32_gradients_and_saved_outputs():
    # The C++ backward converts what it reads to a contiguous float32 copy in one pass; where the
    # dtype already matches, `Tensor.to(memory_format=Contiguous)` would hand back a strided
    # float32 input itself, read as if contiguous (silently wrong gradients). Called directly:
    # the Python op makes these contiguous before the call, so only this path reaches the case.
    require_backend(RLA_SPEC, "cpu", "cpu")
    case = rla_case((2, 3, 21, 9, 16), mask="with_empty", seed=5)
    q, k, v, mask = case.args[:4]
    scale = q.shape[-1] ** -0.5
    out, lse = torch.ops.rexfast_C.region_language_attention_fwd(q, k, v, mask, scale)
    dout = torch.randn_like(out)
    want = torch.ops.rexfast_C.region_language_attention_bwd(dout, q, k, v, mask, scale, out, lse)
    got = torch.ops.rexfast_C.region_language_attention_bwd(_strided_copy(dout), q, k, v, mask, scale,
                                                            _strided_copy(out), _strided_copy(lse))
    assert not _strided_copy(out).is_contiguous() and not _strided_copy(lse).is_contiguous()
    for a, b in zip(want, got):
        assert torch.equal(a, b)
