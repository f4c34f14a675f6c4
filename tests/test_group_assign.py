"""group_assign on every backend this machine can run, against the float64 reference."""

import math
import zlib

import pytest
import torch

from group_assign_cases import PARITY_SHAPES, check_against_reference, make_case, rel_err
from rexfast.ops import group_assign, gumbel_noise
from rexfast.ops import _backends

CPU_BACKENDS = [b for b in ("reference", "cpu", "triton") if b in _backends.available("cpu")]
SHAPES = PARITY_SHAPES


def _stable_seed(*parts) -> int:
    # Python's str hash is salted per process; cases must be the same every run
    return zlib.crc32(repr(parts).encode()) % 1000






@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("noise", ["explicit", "none", "seed"])
def test_matches_reference_fp32(poisoned_outputs, backend, shape, noise):
    if backend == "triton" and shape[1] * shape[2] * max(shape[3], shape[4]) > 2_000_000:
        pytest.skip("too slow for the Triton interpreter")
    case = make_case(*shape, dtype=torch.float32, noise=noise, generator_seed=_stable_seed(shape, noise))
    check_against_reference(case, backend, torch.float32, grad_seed=1234)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(2, 2, 300, 64, 48), (1, 16, 77, 40, 24)], ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_dtypes(poisoned_outputs, backend, dtype, shape):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels take fp32/fp16/bf16")
    case = make_case(*shape, dtype=dtype, noise="explicit", generator_seed=7)
    check_against_reference(case, backend, dtype, grad_seed=1234)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_inputs(poisoned_outputs, backend):
    case = make_case(2, 4, 150, 24, 20, noise="explicit", layout="strided", generator_seed=3)
    assert case.k.stride(-1) == 1 and not case.k.is_contiguous() and case.q.stride(-1) != 1
    check_against_reference(case, backend, torch.float32, grad_seed=1234)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_seeded_noise_equals_explicit_hash_noise(backend):
    case = make_case(2, 4, 64, 16, 8, noise="seed", generator_seed=11)
    out_seed, assign_seed = group_assign(*case.inputs(), seed=case.seed, backend=backend)
    noise = gumbel_noise(case.seed, (2, 4, 64))
    out_explicit, assign_explicit = group_assign(*case.inputs(), noise=noise, backend=backend)
    assert torch.equal(assign_seed, assign_explicit)
    assert rel_err(out_seed, out_explicit) < 1e-6
    again, _ = group_assign(*case.inputs(), seed=case.seed, backend=backend)
    assert torch.equal(out_seed, again), "seeded noise must be reproducible"


def test_gumbel_noise_statistics():
    g = gumbel_noise(1234, (200_000,), dtype=torch.float64)
    assert torch.isfinite(g).all()
    assert abs(g.mean().item() - 0.5772156649) < 0.01  # Euler–Mascheroni
    assert abs(g.var().item() - math.pi**2 / 6) < 0.03
    assert not torch.equal(g[:1000], gumbel_noise(1235, (1000,), dtype=torch.float64))
    assert torch.equal(gumbel_noise(1234, (4, 5)), gumbel_noise(1234, (20,)).reshape(4, 5).float())


def test_deterministic_without_noise():
    case = make_case(2, 3, 80, 16, 8, noise="none")
    a = group_assign(*case.inputs())
    b = group_assign(*case.inputs())
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_assignment_is_one_hot_and_pooling_normalised():
    case = make_case(2, 5, 120, 16, 8, noise="explicit")
    out, assign = group_assign(*case.inputs(), noise=case.noise)
    torch.testing.assert_close(assign.sum(dim=1), torch.ones(2, 120))
    counts = assign.sum(-1, keepdim=True)
    torch.testing.assert_close(out, (assign @ case.v) / (counts + 1))


# ------------------------------------------------------------------ gradcheck (float64)
class _FrozenAssignment(torch.autograd.Function):
    """Forward: the smooth function whose derivative *is* the straight-through
    gradient at the check point (the hard one-hot H0 and soft Y0 frozen there,
    A(x) = H0 − Y0 + Y(x)). Backward: the backend's fused backward under test."""

    @staticmethod
    def forward(ctx, q, k, v, tau, noise, frozen, backend):
        hard0, soft0, out0, counts0 = frozen
        from rexfast.ops.reference import l2n

        s = l2n(q) @ l2n(k).transpose(-1, -2)
        y = ((s + noise) / tau).softmax(dim=1)
        assign = hard0 - soft0 + y
        out = assign / (assign.sum(-1, keepdim=True) + 1) @ v
        ctx.save_for_backward(q, k, v, tau, noise, out0, counts0)
        ctx.backend = backend
        return out, assign

    @staticmethod
    def backward(ctx, dout, dassign):
        q, k, v, tau, noise, out0, counts0 = ctx.saved_tensors
        dq, dk, dv, dtau = torch.ops.rexfast.group_assign_backward(
            dout, dassign, q, k, v, tau, noise, None, out0, counts0, ctx.backend
        )
        return dq, dk, dv, dtau, None, None, None


@pytest.mark.parametrize("backend", [b for b in ("reference", "cpu") if b in CPU_BACKENDS])
def test_gradcheck_float64(backend):
    case = make_case(2, 3, 40, 6, 5, dtype=torch.float64, noise="explicit", generator_seed=5)
    q, k, v = (t.detach().requires_grad_(True) for t in (case.q, case.k, case.v))
    tau = case.tau.double().reshape(1).requires_grad_(True)
    noise = case.noise
    # v: the op is linear in v, so plain finite differences apply.
    assert torch.autograd.gradcheck(lambda v_: group_assign(q.detach(), k.detach(), v_, tau.detach(), noise=noise,
                                                            backend=backend), (v,))
    with torch.no_grad():
        out0, hard0, counts0 = torch.ops.rexfast.group_assign(q, k, v, tau, noise, None, backend)
        from rexfast.ops.reference import l2n

        soft0 = (((l2n(q) @ l2n(k).transpose(-1, -2)) + noise) / tau).softmax(dim=1)
    frozen = (hard0, soft0, out0, counts0)
    assert torch.autograd.gradcheck(
        lambda q_, k_, v_, t_: _FrozenAssignment.apply(q_, k_, v_, t_, noise, frozen, backend), (q, k, v, tau),
        atol=1e-6, rtol=1e-4,
    )


# ------------------------------------------------------------------ registration
@pytest.mark.parametrize("backend", [b for b in ("reference", "cpu") if b in CPU_BACKENDS])
def test_opcheck(backend):
    case = make_case(2, 3, 40, 8, 6, noise="explicit", generator_seed=9)
    args = [t.detach().clone().requires_grad_(True) for t in case.inputs()]
    torch.library.opcheck(torch.ops.rexfast.group_assign.default, (*args, case.noise, None, backend))
    torch.library.opcheck(torch.ops.rexfast.group_assign.default, (*args, None, 12345, backend))


def test_torch_compile_fullgraph():
    backend = "cpu" if "cpu" in CPU_BACKENDS else "reference"
    case = make_case(2, 3, 64, 8, 6, noise="explicit", generator_seed=13)

    def fn(q, k, v, tau, noise):
        out, assign = group_assign(q, k, v, tau, noise=noise, backend=backend)
        return out.sum() + (assign * 0.5).sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    leaves = [t.detach().clone().requires_grad_(True) for t in case.inputs()]
    leaves_c = [t.detach().clone().requires_grad_(True) for t in case.inputs()]
    loss = fn(*leaves, case.noise)
    loss_c = compiled(*leaves_c, case.noise)
    torch.testing.assert_close(loss_c, loss)
    for a, b in zip(torch.autograd.grad(loss, leaves), torch.autograd.grad(loss_c, leaves_c)):
        torch.testing.assert_close(a, b)


def test_torch_export():
    backend = "cpu" if "cpu" in CPU_BACKENDS else "reference"

    class Block(torch.nn.Module):
        def forward(self, q, k, v, tau):
            return group_assign(q, k, v, tau, backend=backend)

    case = make_case(1, 2, 50, 8, 4, noise="none")
    exported = torch.export.export(Block(), case.inputs())
    got = exported.module()(*case.inputs())
    want = Block()(*case.inputs())
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


# ------------------------------------------------------------------ bad input
def _ok():
    return torch.randn(2, 3, 8), torch.randn(2, 20, 8), torch.randn(2, 20, 5), torch.tensor(0.5)


@pytest.mark.parametrize(
    "mutate, exc, words",
    [
        (lambda q, k, v, t: (q[0], k, v, t), ValueError, "q must be 3-D"),
        (lambda q, k, v, t: (q, k[:, :, :4], v, t), ValueError, "k must be (B, P, C)"),
        (lambda q, k, v, t: (q, k, v[:1], t), ValueError, "v must be (B, P, D)"),
        (lambda q, k, v, t: (q, k[:, :0], v[:, :0], t), ValueError, "empty pixel axis"),
        (lambda q, k, v, t: (q, k.double(), v, t), TypeError, "share a dtype"),
        (lambda q, k, v, t: (q.int(), k, v, t), TypeError, "q must be float"),
        (lambda q, k, v, t: (q, k, v, torch.tensor(0.0)), ValueError, "tau must be positive"),
        (lambda q, k, v, t: (q, k, v, torch.tensor(-1.0)), ValueError, "tau must be positive"),
        (lambda q, k, v, t: (q, k, v, torch.tensor(float("nan"))), ValueError, "tau is NaN"),
        (lambda q, k, v, t: (q, k, v, torch.ones(2)), ValueError, "tau must hold one value"),
        (lambda q, k, v, t: (q, k, v, "0.5"), TypeError, "tau must be a float"),
        (lambda q, k, v, t: ([1.0], k, v, t), TypeError, "q must be a torch.Tensor"),
        (lambda q, k, v, t: (q, k, v.to("meta"), t), ValueError, "one device"),
    ],
)
def test_bad_input(mutate, exc, words):
    with pytest.raises(exc, match=words.replace("(", r"\(").replace(")", r"\)")):
        group_assign(*mutate(*_ok()))


def test_bad_noise_and_seed():
    q, k, v, t = _ok()
    with pytest.raises(ValueError, match="noise must be"):
        group_assign(q, k, v, t, noise=torch.randn(2, 3, 19))
    with pytest.raises(ValueError, match="either noise= or seed="):
        group_assign(q, k, v, t, noise=torch.randn(2, 3, 20), seed=1)
    with pytest.raises(TypeError, match="seed must be an int"):
        group_assign(q, k, v, t, seed=1.5)
    with pytest.raises(ValueError, match="unknown backend"):
        group_assign(q, k, v, t, backend="fpga")
    with pytest.raises(RuntimeError, match="cannot run"):
        group_assign(q, k, v, t, backend="cuda")


def test_backend_env_override(monkeypatch):
    monkeypatch.setenv("REXFAST_BACKEND", "reference")
    assert _backends.choose("group_assign", torch.device("cpu"), None) == "reference"
    monkeypatch.setenv("REXFAST_BACKEND", "nope")
    with pytest.raises(ValueError):
        _backends.choose("group_assign", torch.device("cpu"), None)
