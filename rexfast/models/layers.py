"""Building blocks shared by the models: stochastic depth, the GELU MLP, the
released multi-head cross-attention with its padding convention, conv-norm-act
(the torchvision-style ``Sequential`` and detectron2's ``Conv2d`` layout), a
ReLU MLP, and a frozen batch norm."""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
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


class ConvNormAct(nn.Conv2d):
    """detectron2's ``Conv2d`` layout: a convolution whose ``norm`` and ``activation``
    run after it (keys ``weight``, ``bias``, ``norm.*``)."""

    def __init__(self, *args, norm: Optional[nn.Module] = None, activation: Optional[Callable] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        x = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


def c2_xavier_fill(conv: nn.Conv2d) -> None:
    """Caffe2's "XavierFill" as detectron2 initialises convs: kaiming_uniform(a=1), zero bias."""
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def c2_msra_fill(conv: nn.Conv2d) -> None:
    """Caffe2's "MSRAFill": kaiming_normal(fan_out, relu), zero bias."""
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def merge_heads(out: Tensor) -> Tensor:
    """(B, heads, n, d) attention output -> (B, n, heads·d).

    While ``torch.export`` traces (``torch.onnx.export(dynamo=True)`` and the
    TensorRT paths go through it), the merge is recorded as a *view* of the
    layout that ``scaled_dot_product_attention`` had when traced; when the
    attention takes grad-requiring inputs, the exporter's decomposition of that
    call returns another layout and the view fails ("Cannot view a tensor with
    shape [B, n, heads, d] and strides ..."). An explicit contiguous copy makes
    the recorded graph layout-independent; eager and ``torch.compile`` keep the
    plain reshape (a free view here)."""
    b, h, n, d = out.shape
    out = out.transpose(1, 2)
    if torch.compiler.is_exporting():
        return out.clone(memory_format=torch.contiguous_format).view(b, n, h * d)
    return out.reshape(b, n, h * d)


def _onednn_linear_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


_ONEDNN_LINEAR = _onednn_linear_available()


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear``; on CPU bf16 inference y = x Wᵀ + b in one oneDNN matmul that applies the
    bias itself (``torch.ops.mkldnn._linear_pointwise``, the op inductor's CPU freezing emits).

    ``F.linear`` with a bias runs ``addmm``, which on a CPU first copies the broadcast bias
    into the whole (N, out) output and then accumulates the product onto it: one more write
    and read of the output per layer, which next to an AMX bf16 matmul costs about as much as
    the matmul itself (4725×256→1024: 16 ms against 8–10 ms here, measured on a 2-core AMX
    Xeon). Both accumulate in float32 and round once; on contiguous inputs the results are
    bitwise equal (tested). Other dtypes and devices, and anything autograd records, take
    ``F.linear`` (the oneDNN op has no derivative)."""
    if (bias is not None and _ONEDNN_LINEAR and x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16
            and x.device.type == "cpu"
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad))):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class BiasInMatmulLinear(nn.Linear):
    """``nn.Linear`` computed by :func:`linear` (same parameters, same state_dict keys):
    ``rexfast.optimize`` turns a bf16 CPU model's plain ``nn.Linear`` layers (BERT's too) into these."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


def use_bias_in_matmul(model: nn.Module) -> int:
    """Every plain ``nn.Linear`` with a bias becomes a :class:`BiasInMatmulLinear`, in place
    (subclasses of ``nn.Linear`` keep their own forward); returns how many."""
    n = 0
    for module in model.modules():
        if type(module) is nn.Linear and module.bias is not None:
            module.__class__ = BiasInMatmulLinear
            n += 1
    return n


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics and affine terms (all four are buffers,
    never trained): y = (x − mean) / sqrt(var + eps) · weight + bias, as one affine map."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features) - eps)  # identity at initialisation

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.to(x.dtype).view(1, -1, 1, 1) + shift.to(x.dtype).view(1, -1, 1, 1)


def _fold_into(conv: nn.Conv2d, bn: nn.Module) -> None:
    """conv ← bn ∘ conv, in float64, stored in the conv weight's dtype."""
    mean = bn.running_mean.detach().double()
    var = bn.running_var.detach().double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma * (var + bn.eps).rsqrt()
    weight = conv.weight.detach()
    bias = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(mean)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    conv.weight = nn.Parameter((weight.double() * scale.view(shape)).to(weight.dtype), requires_grad=False)
    conv.bias = nn.Parameter(((bias - mean) * scale + beta).to(weight.dtype), requires_grad=False)


def _is_foldable_norm(module: nn.Module) -> bool:
    if isinstance(module, FrozenBatchNorm2d):
        return True
    return isinstance(module, nn.BatchNorm2d) and module.running_mean is not None


def _is_plain_conv(module: nn.Module) -> bool:
    return type(module) is nn.Conv2d and not module.transposed


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every BatchNorm that directly follows a convolution into it (in place, eval
    semantics: the running statistics). Two places qualify: consecutive children of an
    ``nn.Sequential`` (conv, norm), and a :class:`~rexfast.models.layers.ConvNormAct`'s
    ``norm``. Returns the number folded."""
    count = 0
    for module in list(model.modules()):
        if isinstance(module, ConvNormAct) and module.norm is not None and _is_foldable_norm(module.norm):
            if module.norm.num_features != module.out_channels:
                continue
            _fold_into(module, module.norm)
            module.norm = None
            count += 1
        elif isinstance(module, nn.Sequential):
            names = list(module._modules)
            for first, second in zip(names[:-1], names[1:]):
                conv, norm = module._modules[first], module._modules[second]
                if _is_plain_conv(conv) and _is_foldable_norm(norm) and norm.num_features == conv.out_channels:
                    _fold_into(conv, norm)
                    module._modules[second] = nn.Identity()
                    count += 1
    return count


class ReluMLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (keys ``layers.{i}``)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


__all__ = ["BiasInMatmulLinear", "linear", "use_bias_in_matmul", "DropPath", "Mlp", "CrossAttn", "merge_heads", "conv_bn_relu", "ConvNormAct", "c2_xavier_fill",
           "c2_msra_fill", "FrozenBatchNorm2d", "ReluMLP", "fold_batchnorm"]
