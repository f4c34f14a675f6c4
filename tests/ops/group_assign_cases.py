"""group_assign's op spec for the parity harness: input construction and edge cases.

A hard argmax is discontinuous: if two tokens' logits for one pixel lie within
rounding error of each other, a correct float32 kernel and the float64
reference may pick different tokens and disagree everywhere downstream. Random
cases are therefore drawn so that every pixel's winning margin (in logit units,
computed in float64 from the exact low-precision inputs) is far above rounding
error: explicit noise is nudged where needed, noise-free cases use clustered
keys, and seeded cases re-draw the seed. Inputs are fresh random values.

The edge cases do the opposite on purpose: exact ties (the first token wins),
all-zero query/key rows, NaN and ±inf in every input, an empty batch — every
backend must give what the reference gives.
"""

from __future__ import annotations

import torch

from harness import Case, OpSpec
from rexfast.ops import group_assign, group_assign_reference
from rexfast.ops.group_assign import BACKENDS
from rexfast.ops.group_assign.reference import l2n
from rexfast.ops.gumbel import gumbel_noise

MIN_MARGIN = 2e-3  # logit units; fp32 rounding of S/τ is ~1e-6

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
NOISE_MODES = ("explicit", "none", "seed")


def _margins(q, k, tau, noise):
    z = l2n(q.double()) @ l2n(k.double()).transpose(-1, -2)
    if noise is not None:
        z = z + noise.double()
    z = z / tau.double()
    if z.shape[1] == 1:
        return torch.full(z[:, 0].shape, float("inf"), dtype=z.dtype), z
    top2 = z.topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1], z


def make_case(shape, *, dtype=torch.float32, noise="explicit", device="cpu", seed=0, layout="contiguous") -> Case:
    """A random case with safe argmax margins. noise: 'none' | 'explicit' | 'seed'.
    layout: 'contiguous' | 'strided' (k, v slices of one fused kv tensor; q transposed storage)."""
    B, N, P, C, D = shape
    g = torch.Generator().manual_seed(seed)
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
    seed_arg, noise_t = None, None
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
        # Rounding to bf16 (ulp 1/64 at 2) can undo a nudge of 2·MIN_MARGIN·τ: nudge what
        # is still ambiguous again, doubling the step until it survives the rounding.
        step = 2 * MIN_MARGIN * tau
        for _ in range(16):
            margin, z = _margins(q, k, tau, noise_t)
            bad = margin <= MIN_MARGIN / 2
            if not bad.any():
                break
            step = 2 * step
            bump = torch.zeros(B, N, P)
            bump.scatter_(1, z.argmax(dim=1).unsqueeze(1), step.float().expand(B, 1, P).clone())
            noise_t = (noise_t.float() + bump * bad.unsqueeze(1)).to(dtype)
        assert (_margins(q, k, tau, noise_t)[0] > MIN_MARGIN / 2).all()
    elif noise == "seed":
        for _ in range(200):
            seed_arg = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
            margin, _ = _margins(q, k, tau, gumbel_noise(seed_arg, (B, N, P), dtype=torch.float64))
            if (margin > MIN_MARGIN).all():
                break
        else:
            raise RuntimeError("could not draw a tie-free seed; use a smaller case")
    else:
        margin, _ = _margins(q, k, tau, None)
        assert (margin > MIN_MARGIN).all(), "clustered construction failed to separate tokens"
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return Case((move(q), move(k), move(v), tau.to(device)), {"noise": move(noise_t), "seed": seed_arg},
                label=f"{shape} {noise} {layout}")


# ----------------------------------------------------------------------------- edge cases
def _base(dtype, device, *, N=3, P=70, C=16, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(2, N, C, generator=g), torch.randn(2, P, C, generator=g), torch.randn(2, P, D, generator=g)
    return q, k, v, torch.tensor(0.7), g


def _case(q, k, v, tau, dtype, device, noise=None, label=""):
    to = lambda t: None if t is None else t.to(dtype).to(device)  # noqa: E731
    return Case((to(q), to(k), to(v), tau.to(device)), {"noise": to(noise)}, label=label)


def tie_case(dtype, device, N=3):
    """Tokens 0 and 1 are identical: every pixel they win is an exact tie; token 0 must win."""
    q, k, v, tau, g = _base(dtype, device, N=N)
    q[:, 1] = q[:, 0]
    return _case(q, k, v, tau, dtype, device, label="ties")


def tie_noise_case(dtype, device):
    """Equal explicit noise on identical tokens: ties through the noise path too."""
    q, k, v, tau, g = _base(dtype, device)
    q[:, 2] = q[:, 0]
    noise = torch.randn(2, 3, 70, generator=g)
    noise[:, 2] = noise[:, 0]
    return _case(q, k, v, tau, dtype, device, noise, label="ties with noise")


def zero_rows_case(dtype, device, N=3):
    """An all-zero token query and all-zero pixel keys (l2n of 0 is 0: S = 0, a tie over every token)."""
    q, k, v, tau, g = _base(dtype, device, N=N)
    q[0, 1] = 0
    k[:, ::7] = 0
    return _case(q, k, v, tau, dtype, device, label="zero rows")


def _poke(name, value, where):
    def make(dtype, device):
        q, k, v, tau, g = _base(dtype, device)
        noise = torch.randn(2, 3, 70, generator=g).abs()
        target = {"q": q, "k": k, "v": v, "noise": noise}[name]
        target[where] = value
        return _case(q, k, v, tau, dtype, device, noise, label=f"{name}{list(where)}={value}")
    return make


def neg_inf_column_case(dtype, device):
    """Every token's noise −inf at one pixel (a NaN softmax column), −inf for one token elsewhere."""
    q, k, v, tau, g = _base(dtype, device)
    noise = torch.randn(2, 3, 70, generator=g)
    noise[1, :, 5] = float("-inf")
    noise[0, 2, 10:20] = float("-inf")
    return _case(q, k, v, tau, dtype, device, noise, label="-inf noise")


def empty_batch_case(dtype, device):
    q, k, v, tau, g = _base(dtype, device)
    return _case(q[:0], k[:0], v[:0], tau, dtype, device, label="B=0")


NAN, INF = float("nan"), float("inf")
EDGE_CASES = {
    "ties": tie_case,
    "ties_gemm_path": lambda dtype, device: tie_case(dtype, device, N=9),
    "ties_noise": tie_noise_case,
    "zero_rows": zero_rows_case,
    "zero_rows_gemm_path": lambda dtype, device: zero_rows_case(dtype, device, N=9),
    "nan_q": _poke("q", NAN, (1, 2, 3)),
    "inf_q": _poke("q", INF, (0, 0, 1)),
    "nan_k": _poke("k", NAN, (0, 11, 2)),
    "inf_k": _poke("k", -INF, (1, 40, 0)),
    "nan_noise": _poke("noise", NAN, (1, 0, 33)),
    "inf_noise": _poke("noise", INF, (0, 1, 3)),
    "neg_inf_noise": neg_inf_column_case,
    "nan_v": _poke("v", NAN, (0, 12, 4)),
    "inf_v": _poke("v", INF, (1, 30, 7)),
    "empty_batch": empty_batch_case,
}


def _reference(q, k, v, tau, noise=None, seed=None):
    return group_assign_reference(q, k, v, tau, noise=noise, seed=seed)


SPEC = OpSpec(
    name="group_assign",
    fn=group_assign,
    reference=_reference,
    backends=BACKENDS,
    make_case=make_case,
    shapes=PARITY_SHAPES,
    modes=tuple({"noise": mode} for mode in NOISE_MODES),
    dtype_shapes=[(2, 2, 300, 64, 48), (1, 16, 77, 40, 24)],
    differentiable=(0, 1, 2, 3),
    grad_tolerance_scale={3: 5.0},  # dτ sums over every pixel and token
    edge_cases=EDGE_CASES,
    dtypes={"triton": (torch.float32, torch.float16, torch.bfloat16)},
    too_slow=lambda backend, shape: backend == "triton" and shape[1] * shape[2] * max(shape[3], shape[4]) > 2_000_000,
    output_names=("out", "assign"),
)


def assert_one_hot(assign: torch.Tensor) -> None:
    """Exactly 0/1 with one 1 per pixel column (a softmax would pass a column-sum check)."""
    a = assign.detach()
    assert torch.equal(a, a.round()) and ((a == 0) | (a == 1)).all(), "assignment is not exactly 0/1"
    assert torch.equal(a.sum(dim=1), torch.ones_like(a[:, 0])), "not exactly one 1 per pixel"


__all__ = ["SPEC", "make_case", "PARITY_SHAPES", "NOISE_MODES", "EDGE_CASES", "assert_one_hot", "tie_case",
           "MIN_MARGIN"]


# ----------------------------------------------------------------------------- Triton: several tiles per program
class _LaunchSpy:
    """Stands in for one @triton.jit kernel of the group_assign Triton backend and records,
    per launch, the grid and the pixel tiles T the SPLITS programs of a batch item share."""

    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            bound = {**dict(zip(self.kernel.arg_names, args)), **kwargs}
            self.launches.append({"kernel": self.kernel.__name__, "grid": grid, "T": bound["T"],
                                  "SPLITS": bound["SPLITS"]})
            return launch(*args, **kwargs)

        return run


def force_tiles_per_program(monkeypatch, programs: int) -> list:
    """Make the group_assign Triton wrappers aim at ``programs`` programs in all (instead of
    4 per SM), so each program walks several pixel tiles: the forward's two phases over more
    than one tile, the backward's dq̂ read-modify-write across tiles and its barrier. On a GPU
    the natural choice gives one tile per program at CGFormer's sizes (P = 3600), so without
    this no GPU test takes that path. Returns the list the launches are recorded in."""
    from rexfast.ops.group_assign import triton_kernels as tk

    launches: list = []
    monkeypatch.setattr(tk, "_target_programs", lambda device: programs)
    for name in ("_group_assign_fwd_kernel", "_group_assign_bwd_kernel"):
        monkeypatch.setattr(tk, name, _LaunchSpy(getattr(tk, name), launches))
    return launches


def assert_several_tiles_per_program(launches, *, uneven: bool = False) -> None:
    """Both kernels ran, and every program of every launch owned at least two tiles
    (``uneven``: and the tiles did not divide evenly among the programs)."""
    kernels = {launch["kernel"] for launch in launches}
    assert kernels == {"_group_assign_fwd_kernel", "_group_assign_bwd_kernel"}, kernels
    for launch in launches:
        assert launch["T"] >= 2 * launch["SPLITS"], launch
        if uneven:
            assert launch["T"] % launch["SPLITS"], launch
