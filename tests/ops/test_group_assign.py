"""group_assign specifics beyond the generic parity harness (test_parity.py): the
hash noise, one-hot exactness, ties, the C++ kernel's chunked GEMM path at
CGFormer's sizes, thread-count determinism, gradcheck, opcheck, torch.compile
(Inductor), torch.export, bad input and backend selection."""

import math
import os
import subprocess
import sys

import pytest
import torch

from group_assign_cases import SPEC, assert_one_hot, make_case, tie_case
from harness import check_against_reference, cpu_backends, rel_err, require_backend
from rexfast.ops import group_assign, gumbel_noise, registry
from rexfast.ops.group_assign import BACKENDS
from rexfast.ops.group_assign.reference import l2n

CPU_BACKENDS = cpu_backends(SPEC)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_seeded_noise_equals_explicit_hash_noise(backend):
    require_backend(SPEC, backend, "cpu")
    case = make_case((2, 4, 64, 16, 8), noise="seed", seed=11)
    q, k, v, tau = case.args
    seed = case.kwargs["seed"]
    out_seed, assign_seed = group_assign(q, k, v, tau, seed=seed, backend=backend)
    noise = gumbel_noise(seed, (2, 4, 64))
    out_explicit, assign_explicit = group_assign(q, k, v, tau, noise=noise, backend=backend)
    assert torch.equal(assign_seed, assign_explicit)
    assert rel_err(out_seed, out_explicit) < 1e-6
    again, _ = group_assign(q, k, v, tau, seed=seed, backend=backend)
    assert torch.equal(out_seed, again), "seeded noise must be reproducible"


def test_gumbel_noise_statistics():
    g = gumbel_noise(1234, (200_000,), dtype=torch.float64)
    assert torch.isfinite(g).all()
    assert abs(g.mean().item() - 0.5772156649) < 0.01  # Euler–Mascheroni
    assert abs(g.var().item() - math.pi**2 / 6) < 0.03
    assert not torch.equal(g[:1000], gumbel_noise(1235, (1000,), dtype=torch.float64))
    assert torch.equal(gumbel_noise(1234, (4, 5)), gumbel_noise(1234, (20,)).reshape(4, 5).float())


def test_deterministic_without_noise():
    q, k, v, tau = make_case((2, 3, 80, 16, 8), noise="none").args
    a = group_assign(q, k, v, tau)
    b = group_assign(q, k, v, tau)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("noise", ["explicit", "none", "seed"])
@pytest.mark.parametrize("shape", [(2, 5, 120, 16, 8), (1, 9, 300, 16, 8)], ids=lambda s: "x".join(map(str, s)))
def test_assignment_is_exactly_one_hot_and_pooling_normalised(backend, noise, shape):
    require_backend(SPEC, backend, "cpu")
    case = make_case(shape, noise=noise, seed=3)
    q, k, v, tau = case.args
    out, assign = group_assign(q, k, v, tau, **case.kwargs, backend=backend)
    assert_one_hot(assign)
    counts = assign.sum(-1, keepdim=True)
    torch.testing.assert_close(out, (assign @ v) / (counts + 1))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("n_tokens", [3, 9], ids=["direct", "gemm"])
def test_exact_ties_go_to_the_first_token(backend, n_tokens):
    require_backend(SPEC, backend, "cpu")
    case = tie_case(torch.float32, "cpu", N=n_tokens)
    out, assign = group_assign(*case.args, **case.kwargs, backend=backend)
    assert_one_hot(assign)
    assert not assign[:, 1].any(), "token 1 equals token 0 and must never win a tie"
    assert assign[:, 0].sum() > 0  # the tied pair wins somewhere, so the tie-break was exercised


@pytest.mark.parametrize("noise", ["none", "explicit"])
@pytest.mark.parametrize("shape", [(2, 8, 3600, 512, 512), (1, 9, 1000, 96, 40)], ids=["paper-size", "ragged"])
def test_cpu_gemm_path_at_cgformer_sizes_float64(shape, noise):
    """N ≥ 8 runs per-chunk matrix products (256-pixel chunks): these cases cross
    many chunks and end on a ragged one; CGFormer's paper variant is B=2, N=8, P=60².
    Without noise the winners are decided by the similarities alone: random 512-d
    vectors have cosines of ~0.04, which Gumbel noise (std 1.3) would drown, so a
    wrong product in one chunk row passed with noise only (tried by a temporary break)."""
    require_backend(SPEC, "cpu", "cpu")
    case = make_case(shape, dtype=torch.float64, noise=noise, seed=5)
    check_against_reference(SPEC, case, "cpu", torch.float64, grad_seed=8)


@pytest.mark.parametrize("shape", [(2, 8, 3600, 64, 48), (3, 2, 1300, 64, 48)], ids=["gemm", "direct"])
def test_cpu_results_do_not_depend_on_the_thread_count(shape):
    require_backend(SPEC, "cpu", "cpu")
    case = make_case(shape, noise="explicit", seed=6)
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            leaves = [t.detach().clone().requires_grad_(True) for t in case.args]
            out, assign = group_assign(*leaves, **case.kwargs, backend="cpu")
            grads = torch.autograd.grad((out, assign), leaves, (torch.ones_like(out), torch.full_like(assign, 0.3)))
            results.append((out, assign, *grads))
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(*results):
        assert torch.equal(a, b), "the CPU kernel must be bitwise independent of the thread count"


# ------------------------------------------------------------------ gradcheck (float64)
class _FrozenAssignment(torch.autograd.Function):
    """Forward: the smooth function whose derivative *is* the straight-through
    gradient at the check point (the hard one-hot H0 and soft Y0 frozen there,
    A(x) = H0 − Y0 + Y(x)). Backward: the backend's fused backward under test."""

    @staticmethod
    def forward(ctx, q, k, v, tau, noise, frozen, backend):
        hard0, soft0, out0, counts0 = frozen
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


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_float64(backend):
    require_backend(SPEC, backend, "cpu")
    case = make_case((2, 3, 40, 6, 5), dtype=torch.float64, noise="explicit", seed=5)
    q, k, v, tau = (t.detach() for t in case.args)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    tau = tau.double().reshape(1).requires_grad_(True)
    noise = case.kwargs["noise"]
    # v: the op is linear in v, so plain finite differences apply.
    assert torch.autograd.gradcheck(lambda v_: group_assign(q.detach(), k.detach(), v_, tau.detach(), noise=noise,
                                                            backend=backend), (v,))
    with torch.no_grad():
        out0, hard0, counts0 = torch.ops.rexfast.group_assign(q, k, v, tau, noise, None, backend)
        soft0 = (((l2n(q) @ l2n(k).transpose(-1, -2)) + noise) / tau).softmax(dim=1)
    frozen = (hard0, soft0, out0, counts0)
    assert torch.autograd.gradcheck(
        lambda q_, k_, v_, t_: _FrozenAssignment.apply(q_, k_, v_, t_, noise, frozen, backend), (q, k, v, tau),
        atol=1e-6, rtol=1e-4,
    )


# ------------------------------------------------------------------ registration
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    require_backend(SPEC, backend, "cpu")
    case = make_case((2, 3, 40, 8, 6), noise="explicit", seed=9)
    args = [t.detach().clone().requires_grad_(True) for t in case.args]
    torch.library.opcheck(torch.ops.rexfast.group_assign.default, (*args, case.kwargs["noise"], None, backend))
    torch.library.opcheck(torch.ops.rexfast.group_assign.default, (*args, None, 12345, backend))


def test_torch_compile_fullgraph_inductor():
    backend = "cpu" if "cpu" in BACKENDS.available("cpu") else "reference"
    case = make_case((2, 3, 64, 8, 6), noise="explicit", seed=13)
    noise = case.kwargs["noise"]

    def fn(q, k, v, tau, noise):
        out, assign = group_assign(q, k, v, tau, noise=noise, backend=backend)
        return out.sum() + (assign * 0.5).sum()

    compiled = torch.compile(fn, fullgraph=True)  # Inductor
    leaves = [t.detach().clone().requires_grad_(True) for t in case.args]
    leaves_c = [t.detach().clone().requires_grad_(True) for t in case.args]
    loss = fn(*leaves, noise)
    loss_c = compiled(*leaves_c, noise)
    torch.testing.assert_close(loss_c, loss)
    for a, b in zip(torch.autograd.grad(loss, leaves), torch.autograd.grad(loss_c, leaves_c)):
        torch.testing.assert_close(a, b)


def test_torch_export():
    backend = "cpu" if "cpu" in BACKENDS.available("cpu") else "reference"

    class Block(torch.nn.Module):
        def forward(self, q, k, v, tau):
            return group_assign(q, k, v, tau, backend=backend)

    args = make_case((1, 2, 50, 8, 4), noise="none").args
    exported = torch.export.export(Block(), args)
    got = exported.module()(*args)
    want = Block()(*args)
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


def test_bad_noise_seed_and_backend():
    q, k, v, t = _ok()
    with pytest.raises(ValueError, match="noise must be"):
        group_assign(q, k, v, t, noise=torch.randn(2, 3, 19))
    with pytest.raises(ValueError, match="either noise= or seed="):
        group_assign(q, k, v, t, noise=torch.randn(2, 3, 20), seed=1)
    with pytest.raises(TypeError, match="seed must be an int"):
        group_assign(q, k, v, t, seed=1.5)
    with pytest.raises(ValueError, match="unknown backend"):
        group_assign(q, k, v, t, backend="fpga")
    with pytest.raises(RuntimeError, match="cannot run cpu tensors"):
        group_assign(q, k, v, t, backend="cuda")


def test_backend_env_override(monkeypatch):
    monkeypatch.setenv("REXFAST_BACKEND", "reference")
    assert BACKENDS.choose(torch.device("cpu"), None) == "reference"
    monkeypatch.setenv("REXFAST_BACKEND", "nope")
    with pytest.raises(ValueError, match="unknown backend"):
        BACKENDS.choose(torch.device("cpu"), None)


def test_triton_on_cpu_without_the_interpreter_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        BACKENDS.choose(torch.device("cpu"), "triton")
