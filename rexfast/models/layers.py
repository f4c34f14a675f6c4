"""Building blocks shared by the models: stochastic depth, the GELU MLP, the
released multi-head cross-attention with its padding convention, conv-norm-act."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, out_features: Optional[int] = None, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class CrossAttn(nn.Module):
    """Multi-head cross-attention with the released padding convention:
    padded keys/values are zeroed and their logits lowered by 1e4."""

    def __init__(self, q_dim: int, kv_dim: int, hidden_dim: int, num_heads: int = 1, out_dim: Optional[int] = None,
                 qkv_bias: bool = False, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (hidden_dim // num_heads) ** -0.5
        self.q_proj = nn.Linear(q_dim, hidden_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(kv_dim, hidden_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(kv_dim, hidden_dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(hidden_dim, out_dim or q_dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, query: Tensor, key: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        b, n, _ = query.shape
        s, h = key.shape[1], self.num_heads
        q = self.q_proj(query).view(b, n, h, -1).transpose(1, 2)
        k = self.k_proj(key).view(b, s, h, -1).transpose(1, 2)
        v = self.v_proj(key).view(b, s, h, -1).transpose(1, 2)
        if mask is not None:
            m = mask.to(k.dtype)[:, None, :, None]  # B, 1, S, 1
            k, v = k * m, v * m
            attn = (q @ k.transpose(-2, -1)) * self.scale + (1e4 * m.transpose(-2, -1) - 1e4)
        else:
            attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = self.attn_drop(attn.softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(b, n, -1)
        return self.proj_drop(self.proj(out))


def conv_bn_relu(in_dim: int, out_dim: int, kernel_size: int = 1, padding: int = 0) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_dim, out_dim, kernel_size, 1, padding, bias=False), nn.BatchNorm2d(out_dim),
                         nn.ReLU(True))


__all__ = ["DropPath", "Mlp", "CrossAttn", "conv_bn_relu"]
