"""Input construction and comparison helpers for group_assign tests and benchmarks.

A hard argmax is discontinuous: if two tokens' logits for one pixel lie within
rounding error of each other, a correct float32 kernel and the float64
reference may pick different tokens and disagree everywhere downstream. Cases
are therefore drawn so that every pixel's winning margin (in logit units,
computed in float64 from the exact low-precision inputs) is far above rounding
error: explicit noise is nudged where needed, noise-free cases use clustered
keys, and seeded cases re-draw the seed. Inputs are fresh random values, never zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rexfast.ops.reference import gumbel_noise, l2n

MIN_MARGIN = 2e-3  # logit units; fp32 rounding of S/τ is ~1e-6


@dataclass
class Case:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    tau: torch.Tensor
    noise: torch.Tensor | None
    seed: int | None

    def inputs(self):
        return self.q, self.k, self.v, self.tau

    def kwargs(self):
        return {"noise": self.noise, "seed": self.seed}


def _margins(q, k, tau, noise):
    z = l2n(q.double()) @ l2n(k.double()).transpose(-1, -2)
    if noise is not None:
        z = z + noise.double()
    z = z / tau.double()
    if z.shape[1] == 1:
        return torch.full(z[:, 0].shape, float("inf"), dtype=z.dtype), z
    top2 = z.topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1], z


def make_case(
    B, N, P, C, D, *, dtype=torch.float32, noise="explicit", device="cpu", generator_seed=0, layout="contiguous"
) -> Case:
    """Draw a case with safe argmax margins. noise: 'none' | 'explicit' | 'seed'.
    layout: 'contiguous' | 'strided' (k, v slices of one fused kv tensor; q transposed storage)."""
    g = torch.Generator().manual_seed(generator_seed)
    tau = torch.tensor(0.3 + 0.7 * torch.rand((), generator=g).item(), dtype=torch.float32)
    q = torch.randn(B, N, C, generator=g)
    if noise == "none":
        # Clustered keys: each pixel is a noisy copy of one token query, so the
        # winning cosine similarity clearly beats the others.
        owner = torch.randint(0, N, (B, P), generator=g)
        k = q.gather(1, owner.unsqueeze(-1).expand(B, P, C)) * (0.5 + torch.rand(B, P, 1, generator=g))
        k = k + 0.3 * torch.randn(B, P, C, generator=g) * k.abs().mean()
    else:
        k = torch.randn(B, P, C, generator=g)
    v = torch.randn(B, P, D, generator=g)
    if layout == "strided":
        kv = torch.randn(B, P, C + D + 3, generator=g)
        kv[..., :C] = k
        kv[..., C + 3 :] = v
        k, v = kv[..., :C], kv[..., C + 3 :]
        q = q.transpose(1, 2).contiguous().transpose(1, 2)  # inner stride != 1
    q, k, v = (t.to(dtype) for t in (q, k, v))
    if dtype == torch.float64:
        tau = tau.double()
    seed = None
    noise_t = None
    if noise == "explicit":
        noise_t = -torch.log(-torch.log(torch.rand(B, N, P, generator=g).clamp(1e-6, 1 - 1e-6)))
        margin, z = _margins(q, k, tau, noise_t)
        # Nudge the winner of every ambiguous pixel: still a random input, no ties.
        bad = margin < MIN_MARGIN
        if bad.any():
            top = z.argmax(dim=1)
            bump = torch.zeros_like(noise_t)
            bump.scatter_(1, top.unsqueeze(1), (2 * MIN_MARGIN * tau).float().expand(B, 1, P).clone())
            noise_t = noise_t + bump * bad.unsqueeze(1)
        noise_t = noise_t.to(dtype)
        assert (_margins(q, k, tau, noise_t)[0] > MIN_MARGIN / 2).all()
    elif noise == "seed":
        for attempt in range(200):
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
            margin, _ = _margins(q, k, tau, gumbel_noise(seed, (B, N, P), dtype=torch.float64))
            if (margin > MIN_MARGIN).all():
                break
        else:
            raise RuntimeError("could not draw a tie-free seed; use a smaller case")
    else:
        margin, _ = _margins(q, k, tau, None)
        assert (margin > MIN_MARGIN).all(), "clustered construction failed to separate tokens"
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return Case(move(q), move(k), move(v), tau.to(device), move(noise_t), seed)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double().cpu(), ref.double().cpu()
    assert not torch.isnan(x).any(), "output holds NaN (an element was never written?)"
    denom = ref.norm().item()
    return (x - ref).norm().item() / (denom if denom > 0 else 1.0)


TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


# (B, N, P, C, D): N from 1 to 128, P off any block multiple, C and D up to 1024
PARITY_SHAPES = [
    (2, 1, 37, 8, 5),
    (2, 2, 300, 64, 48),
    (1, 8, 129, 32, 16),
    (2, 32, 97, 16, 24),
    (1, 128, 70, 24, 8),
    (1, 3, 50, 1024, 7),
    (1, 2, 33, 5, 1024),
]


def reference_with_grads(case, dout, dassign):
    """The float64 reference's outputs and its (dq, dk, dv, dtau) for these upstream gradients."""
    from rexfast.ops import group_assign_reference

    leaves = [t.detach().double().requires_grad_(True) for t in case.inputs()]
    noise = None if case.noise is None else case.noise.double()
    out, assign = group_assign_reference(*leaves, noise=noise, seed=case.seed)
    grads = torch.autograd.grad((out, assign), leaves, (dout.double(), dassign.double()))
    return out, assign, grads


def check_against_reference(case, backend, dtype, *, grad_seed=0, exact_assign=False, device_type=None):
    """Run ``backend`` forward and backward on ``case`` and compare outputs and
    (dq, dk, dv, dtau) with the float64 reference for seeded upstream gradients
    (unseeded ones made dtau's relative error flaky when dtau ≈ 0)."""
    from rexfast.ops import group_assign

    leaves = [t.detach().clone().requires_grad_(True) for t in case.inputs()]
    out, assign = group_assign(*leaves, **case.kwargs(), backend=backend)
    assert out.dtype == dtype and assign.dtype == dtype
    if device_type is not None:
        assert out.device.type == device_type and assign.device.type == device_type
    gen = torch.Generator().manual_seed(grad_seed)
    dout = torch.randn(out.shape, generator=gen).to(dtype).to(out.device)
    dassign = torch.randn(assign.shape, generator=gen).to(dtype).to(out.device)
    grads = torch.autograd.grad((out, assign), leaves, (dout, dassign))
    ref_out, ref_assign, ref_grads = reference_with_grads(case, dout, dassign)
    tol = TOLERANCE[dtype]
    if exact_assign:
        assert rel_err(assign, ref_assign) == 0.0, "assignment differs from the float64 reference"
    else:
        assert rel_err(assign, ref_assign) < tol
    assert rel_err(out, ref_out) < tol, f"out: {rel_err(out, ref_out):.2e}"
    for name, got, want in zip(("dq", "dk", "dv", "dtau"), grads, ref_grads):
        assert got.shape == want.shape, name
        if device_type is not None:
            assert got.device.type == device_type, name
        err = rel_err(got, want)
        assert err < tol * (5 if name == "dtau" else 1), f"{name}: rel err {err:.2e} (tol {tol:.0e})"
    return out, assign, grads
