"""``group_assign`` in plain PyTorch: the truth every fused backend is tested against.

:func:`group_assign_reference` follows the released CGFormer code
(``model/layers.py``: ``l2norm``, ``gumbel_softmax``, ``CGAttention``) operation
for operation; autograd through it defines the gradients the kernels must
reproduce. :func:`reference_backward` is the same gradient as a closed formula
(the one the kernels implement), used by the ``reference`` backend.

Non-finite inputs, as the released code computes them (every backend matches):
a pixel whose logits Z = (S + G)/τ hold a NaN or a +inf, or are all −inf, has a
NaN softmax column; its argmax is token 0 and its assignment column is NaN, so
the counts, and with them every output of that batch item, are NaN. A
non-finite value in v at (p, d) reaches every token's output at d (0·inf and
0·NaN are NaN), not only the winner's.
"""

from __future__ import annotations

import torch

from ..gumbel import gumbel_noise, gumbel_noise_from_key

L2N_EPS = 1e-12  # released code: x / (sqrt(sum(x^2)) + 1e-12)


def l2n(x: torch.Tensor) -> torch.Tensor:
    """Released-code L2 normalisation over the last axis."""
    return x / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) + L2N_EPS)


def l2n_backward(x: torch.Tensor, grad_xhat: torch.Tensor) -> torch.Tensor:
    """Gradient of :func:`l2n` at ``x`` for the output gradient ``grad_xhat``:
    x̂ = x/(‖x‖+ε)  ⇒  dx = g/(‖x‖+ε) − x (x·g) / (‖x‖ (‖x‖+ε)²), the last term 0 at x = 0."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    den = norm + L2N_EPS
    proj = (x * grad_xhat).sum(-1, keepdim=True)
    return grad_xhat / den - x * proj / torch.where(norm > 0, norm * den * den, torch.ones_like(norm))


def group_assign_reference(q, k, v, tau, noise=None, seed=None):
    """CGFormer grouping: cosine similarity, Gumbel hard assignment, pooling.

    q (B,N,C) token queries, k (B,P,C) pixel keys, v (B,P,D) pixel values,
    tau a positive scalar tensor; ``noise`` an explicit (B,N,P) Gumbel tensor or
    ``seed`` an int (the shared hash noise, :mod:`rexfast.ops.gumbel`).
    Returns ``(out, assign)`` with out (B,N,D) = Â·v and assign (B,N,P) = A,
    the straight-through one-hot.
    """
    s = l2n(q) @ l2n(k).transpose(-1, -2)  # (B, N, P)
    if seed is not None:
        noise = gumbel_noise(seed, s.shape, dtype=s.dtype, device=s.device)
    if noise is not None:
        s = s + noise.to(s.dtype)
    y_soft = (s / tau.to(s.dtype)).softmax(dim=-2)  # over the token axis
    index = y_soft.argmax(dim=-2, keepdim=True)
    y_hard = torch.zeros_like(y_soft).scatter_(-2, index, 1.0)
    assign = y_hard - y_soft.detach() + y_soft  # straight-through
    normalised = assign / (assign.sum(dim=-1, keepdim=True) + 1)
    return normalised @ v, assign


# ----------------------------------------------------------------------------- the reference backend
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _noise_for(noise, key, shape, device, dtype):
    if key is not None:  # the reference draws the same hash noise as the kernels
        return gumbel_noise_from_key(key, shape, device=device, dtype=dtype)
    return None if noise is None else noise.to(dtype)


def reference_forward(q, k, v, tau, noise, key):
    """The ``reference`` backend's forward: (out, assign, counts) as the kernels return them."""
    compute = _compute_dtype(q.dtype)
    noise = _noise_for(noise, key, (q.shape[0], q.shape[1], k.shape[1]), q.device, compute)
    out, assign = group_assign_reference(q.to(compute), k.to(compute), v.to(compute),
                                         tau.to(device=q.device, dtype=compute), noise)
    counts = assign.detach().sum(dim=-1).round().to(torch.float32)
    return out.to(q.dtype), assign.to(q.dtype), counts


def reference_backward(dout, dassign, q, k, v, tau, noise, key, out, counts):
    """The straight-through gradient as the kernels compute it (see :mod:`.op`'s docstring)."""
    compute = _compute_dtype(q.dtype)
    q, k, v, dout, dassign, out = (t.to(compute) for t in (q, k, v, dout, dassign, out))
    tau_c = tau.to(device=q.device, dtype=compute).reshape(())
    s = l2n(q) @ l2n(k).transpose(-1, -2)
    noise = _noise_for(noise, key, s.shape, q.device, compute)
    z = (s if noise is None else s + noise) / tau_c
    y = z.softmax(dim=1)
    inv = (1.0 / (counts.to(compute) + 1.0)).unsqueeze(-1)  # (B, N, 1)
    c = (dout * out).sum(-1, keepdim=True)  # (B, N, 1)
    dy = dassign + (dout @ v.transpose(-1, -2) - c) * inv
    dz = y * (dy - (y * dy).sum(dim=1, keepdim=True))
    # Σ_N dZ = 0 per pixel, so shifting Z by its max changes nothing
    # mathematically and avoids cancellation between large terms in fp32.
    dtau = -(dz * (z - z.amax(dim=1, keepdim=True))).sum() / tau_c
    ds = dz / tau_c
    hard = torch.zeros_like(y).scatter_(1, y.argmax(dim=1, keepdim=True), 1.0)
    dv = (hard * inv).transpose(-1, -2) @ dout
    dq = l2n_backward(q, ds @ l2n(k))
    dk = l2n_backward(k, ds.transpose(-1, -2) @ l2n(q))
    return dq, dk, dv, dtau.reshape(1)


__all__ = ["L2N_EPS", "l2n", "l2n_backward", "group_assign_reference", "reference_forward", "reference_backward"]
