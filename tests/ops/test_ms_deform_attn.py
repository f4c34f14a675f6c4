"""ms_deform_attn specifics beyond the generic parity harness (test_parity.py): the
reference against two independent formulations (a per-corner loop and
torch.nn.functional.grid_sample per level, the official CPU path), the NaN/inf
and border rules, gradcheck, opcheck, torch.compile (Inductor), torch.export,
thread-count determinism of the C++ kernel, bad input and backend selection."""

import math

import pytest
import torch
import torch.nn.functional as F

from harness import check_against_reference, cpu_backends, rel_err, require_backend
from ms_deform_attn_cases import SPEC, level_tensors, make_case
from rexfast.ops import ms_deform_attn, ms_deform_attn_reference
from rexfast.ops.ms_deform_attn import BACKENDS

CPU_BACKENDS = cpu_backends(SPEC)
NAN, INF = float("nan"), float("inf")


# ------------------------------------------------------------------ independent formulations
def grid_sample_formulation(value, spatial_shapes, sampling_locations, attention_weights):
    """The official semantics, written here independently: per level one
    grid_sample (bilinear, zeros, align_corners=False) at 2·loc − 1 over a
    (B·M, D, H_l, W_l) map, then the attention-weighted sum over levels and points."""
    B, S, M, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    out = value.new_zeros(B, M, D, Q)
    start = 0
    for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
        v = value[:, start:start + h * w].permute(0, 2, 3, 1).reshape(B * M, D, h, w)
        start += h * w
        grid = 2 * sampling_locations[:, :, :, lvl] - 1  # (B, Q, M, P, 2)
        grid = grid.permute(0, 2, 1, 3, 4).reshape(B * M, Q, P, 2)
        s = F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # (B·M, D, Q, P)
        a = attention_weights[:, :, :, lvl].permute(0, 2, 1, 3).reshape(B * M, 1, Q, P)
        out = out + (s * a).sum(-1).reshape(B, M, D, Q)
    return out.permute(0, 3, 1, 2).reshape(B, Q, M * D)


def corner_loop_formulation(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Python scalars, one corner at a time (tiny cases only)."""
    B, S, M, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    out = torch.zeros(B, Q, M, D, dtype=torch.float64)
    for b in range(B):
        for q in range(Q):
            for m in range(M):
                for lvl in range(L):
                    h, w = (int(t) for t in spatial_shapes[lvl])
                    start = int(level_start_index[lvl])
                    for p in range(P):
                        x = float(sampling_locations[b, q, m, lvl, p, 0]) * w - 0.5
                        y = float(sampling_locations[b, q, m, lvl, p, 1]) * h - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        a = float(attention_weights[b, q, m, lvl, p])
                        for cx, cy in ((x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)):
                            if 0 <= cx < w and 0 <= cy < h:
                                weight = (1 - abs(x - cx)) * (1 - abs(y - cy))
                                out[b, q, m] += a * weight * value[b, start + cy * w + cx, m].double()
    return out.reshape(B, Q, M * D)


@pytest.mark.parametrize("shape", [(2, 5, 2, 3, 2, 3, 4, 2, 5), (1, 7, 3, 2, 3, 1, 6, 4, 1, 3, 3)],
                         ids=lambda s: "x".join(map(str, s)))
def test_reference_equals_a_per_corner_loop(shape):
    value, shapes, starts, loc, attn = make_case(shape, dtype=torch.float64, seed=2).args
    want = corner_loop_formulation(value, shapes, starts, loc, attn)
    got = ms_deform_attn_reference(value, shapes, starts, loc, attn)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(2, 37, 3, 8, 4, 6, 9, 3, 5), (1, 29, 4, 16, 8, 5, 6, 9, 4, 2, 2, 11, 3)],
                         ids=lambda s: "x".join(map(str, s)))
def test_reference_and_gradients_equal_grid_sample_per_level(shape):
    case = make_case(shape, dtype=torch.float64, seed=3)
    value, shapes, starts, loc, attn = case.args
    leaves = [t.detach().clone().requires_grad_(True) for t in (value, loc, attn)]
    leaves_gs = [t.detach().clone().requires_grad_(True) for t in (value, loc, attn)]
    out = ms_deform_attn_reference(leaves[0], shapes, starts, leaves[1], leaves[2])
    out_gs = grid_sample_formulation(leaves_gs[0], shapes, leaves_gs[1], leaves_gs[2])
    torch.testing.assert_close(out, out_gs, rtol=1e-12, atol=1e-12)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(out, leaves, upstream), torch.autograd.grad(out_gs, leaves_gs, upstream)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_every_backend_equals_grid_sample_at_relas_head_layout(backend):
    """ReLA's heads (8 × D = 32, 4 points) on two of its levels (15², 30²); smaller maps for the interpreter."""
    require_backend(SPEC, backend, "cpu")
    shape = (2, 45, 8, 32, 4, 3, 3, 6, 6) if backend == "triton" else (2, 225 + 900, 8, 32, 4, 15, 15, 30, 30)
    value, shapes, starts, loc, attn = make_case(shape, seed=4).args
    got = ms_deform_attn(value, shapes, starts, loc, attn, backend=backend)
    want = grid_sample_formulation(value.double(), shapes, loc.double(), attn.double())
    assert rel_err(got, want) < 1e-5


# ------------------------------------------------------------------ NaN / inf / border semantics
def _tiny(loc_xy, *, fill=None, at=None, weight=1.0):
    """One level (4 × 8), one head, D = 2, one query with one point at loc_xy."""
    shapes, starts = level_tensors([(4, 8)])
    value = torch.arange(64, dtype=torch.float64).reshape(1, 32, 1, 2) / 10 + 1
    if fill is not None:
        value[0, at, 0, :] = fill
    loc = torch.tensor(loc_xy, dtype=torch.float64).reshape(1, 1, 1, 1, 1, 2)
    attn = torch.full((1, 1, 1, 1, 1), weight, dtype=torch.float64)
    return value, shapes, starts, loc, attn


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_documented_non_finite_and_border_rules(backend):
    require_backend(SPEC, backend, "cpu")
    dtype = torch.float64 if SPEC.takes(backend, torch.float64) else torch.float32

    def run(*args):
        args = [a.to(dtype) if a.is_floating_point() else a for a in args]
        return ms_deform_attn(*args, backend=backend).double()[0, 0]

    value = _tiny((0.5, 0.5))[0]
    # a pixel centre reads exactly that pixel: (x, y) = (3, 1) → row 1·8 + 3
    torch.testing.assert_close(run(*_tiny((3.5 / 8, 1.5 / 4))), value[0, 11, 0])
    # loc = (0, 0): half a pixel outside in x and y → a quarter of the corner pixel
    torch.testing.assert_close(run(*_tiny((0.0, 0.0))), value[0, 0, 0] / 4)
    # loc = (1, 1): the same at the bottom-right corner pixel (3, 7)
    torch.testing.assert_close(run(*_tiny((1.0, 1.0))), value[0, 31, 0] / 4)
    # the half-pixel edge x = −1 and fully outside / ±inf / huge: exactly 0
    for xy in ((-0.5 / 8, 0.5), (-0.2, 0.5), (0.5, 1.3), (INF, 0.5), (0.5, -INF), (1e30, 0.5)):
        assert torch.equal(run(*_tiny(xy)), torch.zeros(2, dtype=torch.float64)), xy
    # a NaN location samples NaN in every channel
    assert run(*_tiny((NAN, 0.5))).isnan().all() and run(*_tiny((0.5, NAN))).isnan().all()
    # inf at a tap whose bilinear weight is 0 (pixel centre (3, 1); the x+1 neighbour (4, 1) holds inf)
    assert run(*_tiny((3.5 / 8, 1.5 / 4), fill=INF, at=12)).isnan().all()
    # ... but a value no tap reaches never matters
    torch.testing.assert_close(run(*_tiny((3.5 / 8, 1.5 / 4), fill=NAN, at=30)), value[0, 11, 0])
    # a NaN weight on a point outside the map: NaN·0 = NaN
    assert run(*_tiny((-0.5, 0.5), weight=NAN)).isnan().all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_location_gradients(backend):
    """A NaN location reads nothing: zero location gradient, no value gradient; NaN weight gradient."""
    require_backend(SPEC, backend, "cpu")
    dtype = torch.float64 if SPEC.takes(backend, torch.float64) else torch.float32
    value, shapes, starts, loc, attn = (t.to(dtype) if t.is_floating_point() else t for t in _tiny((NAN, 0.5)))
    leaves = [t.clone().requires_grad_(True) for t in (value, loc, attn)]
    out = ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2], backend=backend)
    gv, gl, ga = torch.autograd.grad(out, leaves, torch.ones_like(out))
    assert torch.equal(gv, torch.zeros_like(gv)) and torch.equal(gl, torch.zeros_like(gl)) and ga.isnan().all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_location_gradient_is_zero_on_the_half_pixel_edge(backend):
    """x = −1 or y = −1 exactly (loc = −0.5/W_l): the sample is 0 there and for every
    x < −1, so the location gradient is 0 (the left-hand derivative), as the module
    docstring and the official kernel (it skips points with x ≤ −1) give — not the
    right-hand one of the weight-0 tap x = 0. Both components are 0. Just inside the
    edge the gradient is the ordinary one (nonzero here), and the value and weight
    gradients keep their usual rules."""
    require_backend(SPEC, backend, "cpu")
    dtype = torch.float64 if SPEC.takes(backend, torch.float64) else torch.float32
    H, W = 4, 8  # powers of two: −0.5/W, −0.5/H and the points below are exact in every dtype
    on_edge = [(-0.5 / W, 0.375), (0.4375, -0.5 / H), (-0.5 / W, -0.5 / H)]  # x = −1; y = −1; both
    inside = [(-0.25 / W, 0.375), (0.4375, -0.25 / H)]  # x = −0.75; y = −0.75
    points = on_edge + inside
    shapes, starts = level_tensors([(H, W)])
    value = (torch.arange(32 * 3, dtype=torch.float64).reshape(1, 32, 1, 3) / 7 + 1).to(dtype)
    loc = torch.tensor(points, dtype=dtype).reshape(1, len(points), 1, 1, 1, 2)
    attn = torch.full((1, len(points), 1, 1, 1), 0.75, dtype=dtype)
    leaves = [t.clone().requires_grad_(True) for t in (value, loc, attn)]
    out = ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2], backend=backend)
    upstream = torch.linspace(-1, 2, out.numel(), dtype=dtype).reshape(out.shape)
    gv, gl, ga = torch.autograd.grad(out, leaves, upstream)
    gl = gl.reshape(len(points), 2)
    n_edge = len(on_edge)
    assert torch.equal(out[0, :n_edge], torch.zeros_like(out[0, :n_edge]))
    assert torch.equal(gl[:n_edge], torch.zeros_like(gl[:n_edge])), gl[:n_edge]
    assert (gl[n_edge:].abs() > 0.1).any(dim=1).all(), gl[n_edge:]  # the test can see a location gradient
    assert torch.equal(ga.reshape(-1)[:n_edge], torch.zeros(n_edge, dtype=dtype))
    # the float64 reference's autograd is the truth for every point
    ref = [t.detach().double().requires_grad_(True) for t in (value, loc, attn)]
    want = torch.autograd.grad(ms_deform_attn_reference(ref[0], shapes, starts, ref[1], ref[2]), ref,
                               upstream.double())
    for got, w in zip((gv, gl.reshape(loc.shape), ga), want):
        torch.testing.assert_close(got.double(), w, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ gradcheck (float64)
@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "triton"])
def test_gradcheck_float64(backend):
    require_backend(SPEC, backend, "cpu")
    value, shapes, starts, loc, attn = make_case((2, 6, 2, 3, 2, 3, 4, 2, 5), dtype=torch.float64, seed=5).args
    leaves = [t.detach().clone().requires_grad_(True) for t in (value, loc, attn)]
    # locations are ≥ 1e-3 pixel from every grid line (make_case): eps = 1e-6 stays on one smooth piece
    assert torch.autograd.gradcheck(
        lambda v, l, a: ms_deform_attn(v, shapes, starts, l, a, backend=backend), leaves, eps=1e-6, atol=1e-7,
        rtol=1e-5,
    )


# ------------------------------------------------------------------ registration
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    require_backend(SPEC, backend, "cpu")
    value, shapes, starts, loc, attn = make_case((2, 7, 2, 4, 2, 3, 4, 2, 5), seed=9).args
    args = [t.detach().clone().requires_grad_(True) for t in (value, loc, attn)]
    torch.library.opcheck(torch.ops.rexfast.ms_deform_attn.default, (args[0], shapes, starts, args[1], args[2],
                                                                     backend))


def _compile_backend():
    return "cpu" if "cpu" in BACKENDS.available("cpu") else "reference"


def test_torch_compile_fullgraph_inductor():
    backend = _compile_backend()
    value, shapes, starts, loc, attn = make_case((2, 20, 4, 8, 3, 5, 6, 3, 3), seed=13).args

    def fn(value, loc, attn):
        out = ms_deform_attn(value * 2, shapes, starts, loc.clamp(-0.5, 1.5), attn.softmax(-1), backend=backend)
        return (out * out).sum()

    compiled = torch.compile(fn, fullgraph=True)  # Inductor
    leaves = [t.detach().clone().requires_grad_(True) for t in (value, loc, attn)]
    leaves_c = [t.detach().clone().requires_grad_(True) for t in (value, loc, attn)]
    loss = fn(*leaves)
    loss_c = compiled(*leaves_c)
    torch.testing.assert_close(loss_c, loss)
    for a, b in zip(torch.autograd.grad(loss, leaves), torch.autograd.grad(loss_c, leaves_c)):
        torch.testing.assert_close(a, b)


def test_torch_export():
    backend = _compile_backend()

    class Block(torch.nn.Module):
        def forward(self, value, shapes, starts, loc, attn):
            return ms_deform_attn(value, shapes, starts, loc, attn, backend=backend)

    args = make_case((1, 12, 2, 4, 2, 3, 4, 2, 5), seed=1).args
    exported = torch.export.export(Block(), args)
    torch.testing.assert_close(exported.module()(*args), Block()(*args))


# ------------------------------------------------------------------ C++ kernel determinism
@pytest.mark.parametrize("shape", [(2, 300, 8, 32, 4, 15, 15, 8, 8, 4, 4), (1, 77, 3, 5, 3, 9, 7, 4, 5)],
                         ids=["rela-like", "odd"])
def test_cpu_results_do_not_depend_on_the_thread_count(shape):
    require_backend(SPEC, "cpu", "cpu")
    case = make_case(shape, seed=6)
    value, shapes, starts, loc, attn = case.args
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            leaves = [t.detach().clone().requires_grad_(True) for t in (value, loc, attn)]
            out = ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2], backend="cpu")
            grads = torch.autograd.grad(out, leaves, torch.cos(torch.arange(out.numel()).reshape(out.shape)))
            results.append((out, *grads))
    finally:
        torch.set_num_threads(previous)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b), "the CPU kernel must be bitwise independent of the thread count"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_repeated_calls_are_bitwise_identical(backend):
    require_backend(SPEC, backend, "cpu")
    value, shapes, starts, loc, attn = make_case((1, 40, 2, 8, 4, 6, 9, 3, 5), seed=8).args
    results = []
    for _ in range(2):
        leaves = [t.detach().clone().requires_grad_(True) for t in (value, loc, attn)]
        out = ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2], backend=backend)
        results.append((out, *torch.autograd.grad(out, leaves, torch.ones_like(out))))
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ float64 at ReLA's level layout
def test_cpu_float64_at_relas_level_layout():
    """ReLA's pixel decoder levels (15², 30², 60²), fewer queries: every level and
    all of the value gradient's rows exercised by the C++ kernel in float64."""
    require_backend(SPEC, "cpu", "cpu")
    case = make_case((1, 300, 8, 32, 4, 15, 15, 30, 30, 60, 60), dtype=torch.float64, seed=12)
    check_against_reference(SPEC, case, "cpu", torch.float64, grad_seed=3)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bf16_inputs_give_the_cpu_kernels_numbers(backend):
    """What an optimized bf16 ReLA feeds the op (bf16 values, locations and weights at its
    level layout): every backend samples in float32 from the same bf16 numbers and rounds the
    output to bf16 once, so they agree with the C++ kernel to that last rounding (a sum in
    another order may land on the neighbouring bf16 value), far inside the 1e-2 they are held
    to against float64. Triton here runs under its CPU interpreter, whose float32 → bf16 store
    rounds toward zero (measured: half the outputs one step smaller in magnitude, none larger),
    so it is held to the one step only."""
    require_backend(SPEC, "cpu", "cpu")
    require_backend(SPEC, backend, "cpu")
    shape = (1, 300 if backend == "reference" else 40, 8, 32, 4, 15, 15, 30, 30, 60, 60)
    value, shapes, starts, loc, attn = make_case(shape, dtype=torch.bfloat16, seed=13).args
    assert all(t.dtype == torch.bfloat16 for t in (value, loc, attn))
    cpu = ms_deform_attn(value, shapes, starts, loc, attn, backend="cpu")
    other = ms_deform_attn(value, shapes, starts, loc, attn, backend=backend)
    assert cpu.dtype == other.dtype == torch.bfloat16
    ulp = torch.finfo(torch.bfloat16).eps * cpu.float().abs().clamp_min(2.0 ** -60)  # one step at each value
    assert ((cpu.float() - other.float()).abs() <= ulp).all()
    if backend == "reference":
        assert (cpu == other).float().mean() > 0.99


# ------------------------------------------------------------------ bad input
def _ok():
    shapes, starts = level_tensors([(3, 4), (2, 5)])
    return (torch.randn(2, 22, 2, 4), shapes, starts, torch.rand(2, 6, 2, 2, 3, 2), torch.rand(2, 6, 2, 2, 3))


def _with(i, new):
    def mutate(args):
        args = list(args)
        args[i] = new(args[i]) if callable(new) else new
        return args
    return mutate


@pytest.mark.parametrize(
    "mutate, exc, words",
    [
        (_with(0, lambda v: v[0]), ValueError, "value must be 4-D (B, S, M, D), got shape (22, 2, 4)"),
        (_with(0, [1.0]), TypeError, "value must be a torch.Tensor, got list"),
        (_with(0, lambda v: v.int()), TypeError, "value must be float16/bfloat16/float32/float64"),
        (_with(0, lambda v: v.double()), TypeError, "must share a dtype"),
        (_with(0, lambda v: v[:, :21]), ValueError, "hold Σ H_l·W_l = 22 pixels but value has S = 21"),
        (_with(0, lambda v: v[:, :, :1]), ValueError, "sampling_locations must be (B, Q, M, L, P, 2) = (2, Q, 1, 2"),
        (_with(0, lambda v: v.to("meta")), ValueError, "must be on one device"),
        (_with(1, lambda s: s.int()), TypeError, "spatial_shapes must be int64"),
        (_with(1, lambda s: s[:, :1]), ValueError, "spatial_shapes must be (L, 2)"),
        (_with(1, lambda s: s[:1]), ValueError, "level_start_index must be (L,) = (1,)"),
        (_with(1, lambda s: torch.tensor([[3, 4], [0, 5]])), ValueError, "every level needs H_l, W_l >= 1"),
        (_with(1, lambda s: torch.tensor([[2, 4], [2, 7]])), ValueError, "level_start_index must be [0, 8]"),
        (_with(2, lambda s: torch.tensor([0, 11])), ValueError, "level_start_index must be [0, 12]"),
        (_with(2, lambda s: s.float()), TypeError, "level_start_index must be int64"),
        (_with(3, lambda t: t[..., :1]), ValueError, "sampling_locations must be (B, Q, M, L, P, 2)"),
        (_with(3, lambda t: t[:1]), ValueError, "sampling_locations must be (B, Q, M, L, P, 2) = (2, Q, 2, 2, P, 2)"),
        (_with(3, lambda t: t[0]), ValueError, "sampling_locations must be 6-D"),
        (_with(3, lambda t: t[:, :, :, :, :0]), ValueError, "has no points (P = 0)"),
        (_with(4, lambda t: t[..., :2]), ValueError, "attention_weights must be (B, Q, M, L, P) = (2, 6, 2, 2, 3)"),
        (_with(4, lambda t: t[:, :5]), ValueError, "attention_weights must be (B, Q, M, L, P)"),
        (_with(4, lambda t: t.half()), TypeError, "must share a dtype"),
    ],
)
def test_bad_input(mutate, exc, words):
    import re

    with pytest.raises(exc, match=re.escape(words)):
        ms_deform_attn(*mutate(_ok()))


def test_empty_batch_and_queries_give_empty_outputs_and_zero_value_gradient():
    value, shapes, starts, loc, attn = _ok()
    for v, l, a in ((value[:0], loc[:0], attn[:0]), (value, loc[:, :0], attn[:, :0])):
        leaves = [t.clone().requires_grad_(True) for t in (v, l, a)]
        out = ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2])
        assert out.shape == (v.shape[0], l.shape[1], 8)
        gv, gl, ga = torch.autograd.grad(out.sum(), leaves)
        assert torch.equal(gv, torch.zeros_like(v)) and gl.shape == l.shape and ga.shape == a.shape


def test_backend_selection():
    value, shapes, starts, loc, attn = _ok()
    with pytest.raises(ValueError, match="unknown backend"):
        ms_deform_attn(value, shapes, starts, loc, attn, backend="fpga")
    with pytest.raises(RuntimeError, match="cannot run cpu tensors"):
        ms_deform_attn(value, shapes, starts, loc, attn, backend="cuda")


def test_backend_env_override(monkeypatch):
    monkeypatch.setenv("REXFAST_BACKEND", "reference")
    assert BACKENDS.choose(torch.device("cpu"), None) == "reference"
    monkeypatch.setenv("REXFAST_BACKEND", "nope")
    with pytest.raises(ValueError, match="unknown backend"):
        BACKENDS.choose(torch.device("cpu"), None)

