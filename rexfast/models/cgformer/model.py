"""CGFormer (Tang et al., CVPR 2023): Contrastive Grouping with Transformer.

    images ─► multimodal Swin (PWAM after every stage) ─► c1 (H/4) … c4 (H/32)
    words  ─► BERT (fine-tuned) ────────────────────────┘
    decoder, three consecutive steps, coarse to fine (c4+c3 → +c2 → +c1):
        Fusion (upsample, concat, 2×[3×3 conv, BN, ReLU])
        Load   (the referent token cross-attends to the words; then LN + MLP)
        Group  (tokens group the pixels by hard Gumbel assignment: rexfast.ops.group_assign)
    mask head (DProjector): 2×[upsample ×2, 3×3 conv, BN, ReLU], 1×1 conv, then a
        per-sample 1×1 kernel (+bias) predicted from the referent token.

Module and parameter names follow the released code (``model/layers.py``,
``model/segmenter.py`` of SooLab/CGFormer), so ``state_dict()`` keys equal the
released checkpoint's (after stripping DDP's ``module.``).

Released-code behaviour kept on purpose (it is what the checkpoint computes):
- only the last (referent) token reads the words; the first decoder step does
  not read them at all; the second and third group steps share one block
  (``cgattention2``); the group block's MLP output replaces the tokens (no
  residual around the MLP);
- ``LoadToken.norm`` / ``LoadToken.mlp`` exist (and are in the checkpoint) but
  are never used; ``tau`` is clamped at 0 (τ = exp(min(τ_p, 0))), so while
  τ_p ≥ 0 — its initial value is 1 — it receives no gradient;
- the mask head's dynamic 1×1 kernel is applied with ``padding=1``: the logits
  are (H+2)×(W+2), the border holding only the dynamic bias, and are then
  resized to the input size (bilinear, align_corners=True).

Exact speed-ups (``fused=True``, the default; outputs equal up to rounding):
- Â·v without V: ``group_assign`` pools the normalised features X and v_proj
  is applied afterwards, Â(XWᵀ + b) = (ÂX)Wᵀ + rowsum(Â) b, rowsum(Â) = r/(r+1)
  with r = Σ_P assign (gradients identical: r carries the straight-through
  gradient back through ``assign``);
- the mask head's last 1×1 conv is folded into the dynamic kernel:
  w·(W₁x + b₁) + b = (wW₁)x + (w·b₁ + b), saving a 512→512 conv at full resolution.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...ops import group_assign
from ...ops.gumbel import gumbel_noise
from ..backbones.swin import MultiModalSwinTransformer
from ..base import Prediction, ReferringModel
from ..explain import TokenGrouping
from ..layers import CrossAttn, Mlp, ReluMLP, conv_bn_relu
from ..text import bert_config, build_bert
from .config import CGFormerConfig, CGFormerRuntime
from .losses import cgformer_losses, no_target_loss


# ----------------------------------------------------------------------------- decoder blocks
class Fusion(nn.Module):
    """Resize the coarser map to the finer one, concat, two 3×3 conv-BN-ReLU."""

    def __init__(self, in_dim_1: int, in_dim_2: int, out_dim: int, bias: bool = True):
        super().__init__()
        self.fusion = nn.Sequential(
            nn.Conv2d(in_dim_1 + in_dim_2, out_dim, 3, padding=1, bias=bias), nn.BatchNorm2d(out_dim), nn.ReLU(),
            nn.Conv2d(out_dim, out_dim, 3, padding=1, bias=bias), nn.BatchNorm2d(out_dim), nn.ReLU(),
        )

    def forward(self, coarse: Tensor, fine: Tensor) -> Tensor:
        # the released code compares widths only
        if coarse.shape[-1] < fine.shape[-1]:
            coarse = F.interpolate(coarse, size=fine.shape[-2:], mode="bilinear", align_corners=True)
        elif coarse.shape[-1] > fine.shape[-1]:
            fine = F.interpolate(fine, size=coarse.shape[-2:], mode="bilinear", align_corners=True)
        return self.fusion(torch.cat((coarse, fine), dim=1))


class LoadToken(nn.Module):
    """The referent (last) token reads the words; the other tokens pass through."""

    def __init__(self, token_dim: int, text_dim: int, bias: bool, drop: float):
        super().__init__()
        self.cross_attn = CrossAttn(token_dim, text_dim, token_dim, num_heads=1, out_dim=token_dim, qkv_bias=bias,
                                    attn_drop=drop, proj_drop=drop)
        self.normq = nn.LayerNorm(token_dim)
        self.normk = nn.LayerNorm(text_dim)
        # present in the released module (and checkpoint) but unused by its forward
        self.norm = nn.LayerNorm(token_dim)
        self.mlp = Mlp(token_dim, token_dim * 2, token_dim)

    def forward(self, tokens: Tensor, words: Tensor, word_mask: Tensor) -> Tensor:
        others, referent = tokens[:, :-1], tokens[:, -1:]
        referent = referent + self.cross_attn(self.normq(referent), self.normk(words), word_mask)
        return torch.cat((others, referent), dim=1)


class LoadLayer(nn.Module):
    """Holds the step's positional embedding; all steps but the first also load words."""

    def __init__(self, token_dim: int, text_dim: int, pe_size: int, load_words: bool, drop: float):
        super().__init__()
        self.load_words = load_words
        if load_words:
            self.loadtoken = LoadToken(token_dim, text_dim, bias=False, drop=drop)
            self.norm = nn.LayerNorm(token_dim)
            self.mlp = Mlp(token_dim, token_dim * 2, token_dim)
        self.positional_embedding = nn.Parameter(torch.randn(pe_size**2, token_dim) / token_dim**0.5)
        self.pe_size = pe_size

    def forward(self, tokens: Tensor, words: Tensor, word_mask: Tensor) -> Tensor:
        if self.load_words:
            tokens = self.mlp(self.norm(self.loadtoken(tokens, words, word_mask)))  # no residual, as released
        return tokens

    def positional_embedding_for(self, h: int, w: int) -> Tensor:
        """(h·w, C) positional embedding; resized (bicubic) when the map is not pe_size²."""
        pe = self.positional_embedding
        if (h, w) == (self.pe_size, self.pe_size):
            return pe
        grid = pe.reshape(1, self.pe_size, self.pe_size, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        return grid.permute(0, 2, 3, 1).reshape(h * w, -1)


def _gumbel_from_torch_rng(shape, like: Tensor) -> Tensor:
    u = torch.rand(shape, device=like.device, dtype=torch.float32).clamp_(1e-10, 1 - 1e-7)
    return -torch.log(-torch.log(u))


class CGAttention(nn.Module):
    """Group block: tokens claim pixels by hard Gumbel assignment, pool them, update."""

    def __init__(self, token_dim: int, vis_dim: int, hidden_dim: int, drop: float = 0.0, bias: bool = True):
        super().__init__()
        self.norm_v = nn.LayerNorm(vis_dim)
        self.norm_t = nn.LayerNorm(token_dim)
        self.q_proj = nn.Linear(token_dim, hidden_dim, bias=bias)
        self.k_proj = nn.Linear(vis_dim, hidden_dim, bias=bias)
        self.v_proj = nn.Linear(vis_dim, hidden_dim, bias=bias)
        self.proj = nn.Linear(hidden_dim, token_dim)
        self.proj_drop = nn.Dropout(drop)
        self.norm = nn.LayerNorm(token_dim)
        self.mlp = Mlp(token_dim, token_dim * 2, token_dim, drop=drop)
        self.tau = nn.Parameter(torch.ones(1))

    def forward(self, tokens: Tensor, vis: Tensor, pe: Tensor, *, noise: Optional[Tensor] = None,
                seed: Optional[int] = None, fused: bool = True, backend: Optional[str] = None):
        b, c, h, w = vis.shape
        x = self.norm_v(vis.flatten(2).transpose(1, 2) + pe)  # B, P, C
        q = self.q_proj(self.norm_t(tokens))
        k = self.k_proj(x)
        tau = self.tau.clamp(max=0).exp()
        dtype = k.dtype  # under autocast: the autocast dtype (LayerNorm outputs stay fp32)
        if fused:
            pooled, assign = group_assign(q.to(dtype), k, x.to(dtype), tau, noise=noise, seed=seed, backend=backend)
            counts = assign.sum(dim=-1, keepdim=True)  # r, with the straight-through gradient
            out = F.linear(pooled, self.v_proj.weight)
            if self.v_proj.bias is not None:
                out = out + (counts / (counts + 1)).to(out.dtype) * self.v_proj.bias
        else:
            v = self.v_proj(x)
            out, assign = group_assign(q.to(dtype), k, v.to(dtype), tau, noise=noise, seed=seed, backend=backend)
        out = self.proj_drop(self.proj(out))
        tokens = self.mlp(self.norm(out + tokens))  # no residual around the MLP, as released
        return tokens, assign.reshape(b, -1, h, w)


class DProjector(nn.Module):
    """Mask head: upsample ×4 through two conv blocks, a 1×1 conv, then a
    per-sample 1×1 kernel and bias predicted from the referent token."""

    def __init__(self, text_dim: int, in_dim: int):
        super().__init__()
        self.in_dim = in_dim
        self.vis = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="bilinear"),
            conv_bn_relu(in_dim, in_dim, 3, padding=1),
            nn.Upsample(scale_factor=2, mode="bilinear"),
            conv_bn_relu(in_dim, in_dim, 3, padding=1),
            nn.Conv2d(in_dim, in_dim, 1),
        )
        self.txt = nn.Linear(text_dim, in_dim + 1)

    def forward(self, x: Tensor, referent: Tensor, fused: bool = True) -> Tensor:
        """x (B, C, h, w), referent (B, T) -> logits (B, 1, 4h+2, 4w+2)."""
        params = self.txt(referent)
        weight, bias = params[:, :-1], params[:, -1]
        b = x.shape[0]
        if not fused:
            y = self.vis(x)
            _, c, h, w = y.shape
            # one group per sample; padding=1 with a 1×1 kernel as in the released code
            out = F.conv2d(y.reshape(1, b * c, h, w), weight.reshape(b, c, 1, 1).to(y.dtype), bias.to(y.dtype),
                           padding=1, groups=b)
            return out.transpose(0, 1)
        y = self.vis[:4](x)  # up, conv, up, conv — the 1×1 conv is folded below
        conv = self.vis[4]
        _, c, h, w = y.shape
        w_eff = weight @ conv.weight.reshape(c, c).to(weight.dtype)  # (B, C): w·W₁
        b_inner = weight @ conv.bias.to(weight.dtype) if conv.bias is not None else weight.new_zeros(b)
        w_eff = w_eff.to(y.dtype)
        if y.is_contiguous(memory_format=torch.channels_last):
            inner = (y.permute(0, 2, 3, 1).reshape(b, h * w, c) @ w_eff.unsqueeze(-1)).reshape(b, 1, h, w)
        else:
            inner = (w_eff.unsqueeze(1) @ y.reshape(b, c, h * w)).reshape(b, 1, h, w)
        inner = inner + b_inner.to(inner.dtype).view(b, 1, 1, 1)
        # the padded border sees zero features: only the dynamic bias survives there
        return F.pad(inner, (1, 1, 1, 1)) + bias.to(inner.dtype).view(b, 1, 1, 1)


class Decoder(nn.Module):
    def __init__(self, config: CGFormerConfig, feature_dims: Sequence[int], text_dim: int):
        super().__init__()
        d = config.token_dim
        self.tokens = nn.Embedding(config.num_tokens, d)
        nn.init.trunc_normal_(self.tokens.weight, std=0.02)
        pe_sizes = [config.image_size // s for s in (16, 8, 4)]
        self.layers = nn.ModuleList([
            # The released rule is "load words when pe_size > 30", written for
            # 480² only (pe sizes 30, 60, 120); "every step but the first" is
            # the same structure at 480 and keeps it at other sizes.
            LoadLayer(d, text_dim, size, load_words=i > 0, drop=config.decoder_dropout)
            for i, size in enumerate(pe_sizes)
        ])
        self.cgattention1 = CGAttention(d, d, d, drop=config.decoder_dropout, bias=True)
        self.cgattention2 = CGAttention(d, d, d, drop=config.decoder_dropout, bias=True)
        c1, c2, c3, c4 = feature_dims
        # The released code declares the first fusion as dims[0] + token_dim
        # (1024 + 512), which equals c4 + c3 only for Swin-B; c4 + c3 is what it
        # actually concatenates, so we size it from the features.
        self.fuses = nn.ModuleList([Fusion(c4, c3, d), Fusion(c2, d, d), Fusion(c1, d, d)])
        self.proj = DProjector(text_dim=d, in_dim=d)
        if config.variant == "paper":
            self.sentence_proj = nn.Linear(text_dim, d)
        if config.no_target_head:
            self.nt_head = ReluMLP(d, d, 2, 2)

    def forward(self, features: Sequence[Tensor], words: Tensor, word_mask: Tensor, *,
                noises: Sequence[Optional[Tensor]], seeds: Sequence[Optional[int]], fused: bool,
                backend: Optional[str]):
        c1, c2, c3, c4 = features
        tokens = self.tokens.weight[None].expand(c1.shape[0], -1, -1)
        maps = []
        v = c4
        blocks = (self.cgattention1, self.cgattention2, self.cgattention2)
        for i, (load, block, fuse, skip) in enumerate(zip(self.layers, blocks, self.fuses, (c3, c2, c1))):
            v = fuse(v, skip)
            tokens = load(tokens, words, word_mask)
            pe = load.positional_embedding_for(v.shape[-2], v.shape[-1]).to(v.dtype)
            tokens, hit = block(tokens, v, pe, noise=noises[i], seed=seeds[i], fused=fused, backend=backend)
            maps.append(hit)
        logits = self.proj(v, tokens[:, -1], fused=fused)
        return logits, maps, tokens


# ----------------------------------------------------------------------------- model
class CGFormer(ReferringModel):
    """CGFormer for referring expression segmentation.

    ``CGFormer()`` builds the released architecture (random weights; BERT from
    ``config.bert_weights`` if given); ``CGFormer(CGFormerConfig.tiny())`` a toy;
    ``CGFormer.from_official(path)`` the released checkpoint. Keyword arguments are
    runtime options (:class:`CGFormerRuntime`: ``CGFormer(ops_backend="reference", fused=False)``)
    or override config fields (``CGFormer(num_tokens=3)``).

    ``forward(images, input_ids, attention_mask, targets=None)``:
        images (B, 3, H, W), H and W divisible by 32, normalised as the data
        pipeline does; input_ids / attention_mask (B, L) (the released model
        uses L = 20). Returns mask logits (B, 1, H, W); with ``targets``
        (B, H, W) binary masks, returns ``(logits, losses)`` where ``losses``
        is a dict whose values sum to the training loss.
    """

    model_type = "cgformer"
    config_class = CGFormerConfig
    runtime_class = CGFormerRuntime

    def __init__(self, config: Optional[CGFormerConfig] = None, **kwargs):
        super().__init__()
        config, self.runtime = self._config_and_runtime(config, kwargs)
        self.config = config
        text_cfg = bert_config(config.bert)
        self.backbone = MultiModalSwinTransformer(config.swin, text_dim=text_cfg.hidden_size)
        self.decoder = Decoder(config, self.backbone.num_features, text_cfg.hidden_size)
        self.text_encoder = build_bert(text_cfg, config.bert_weights)
        self._apply_runtime()

    def _apply_runtime(self) -> None:
        if self.runtime.channels_last:
            self.to(memory_format=torch.channels_last)

    def use_channels_last(self) -> None:
        super().use_channels_last()
        self.set_runtime(dataclasses.replace(self.runtime, channels_last=True))  # the feature maps too

    def fp32_modules(self) -> tuple[str, ...]:
        # the Swin backbone's pixel-word attentions stay float32 under bf16 (see its fp32_modules)
        return tuple(f"backbone.{name}" for name in self.backbone.fp32_modules())

    def param_groups(self, train_cfg) -> list[dict]:
        """The released optimizer groups (model/__init__.py): the decoder and the
        PWAM modules at ``train_cfg.lr``, the rest of the backbone at
        ``lr × config.lr_backbone_scale``, BERT at ``lr × config.lr_text_scale``;
        one weight decay (``train_cfg.weight_decay``) for every parameter, as released."""
        lr, wd = float(train_cfg.lr), float(train_cfg.weight_decay)
        groups = {"decoder": [], "pwam": [], "backbone": [], "text": []}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if name.startswith("text_encoder."):
                groups["text"].append(p)
            elif name.startswith("backbone."):
                groups["pwam" if "pwam" in name else "backbone"].append(p)
            else:
                groups["decoder"].append(p)
        scales = {"decoder": 1.0, "pwam": 1.0, "backbone": self.config.lr_backbone_scale,
                  "text": self.config.lr_text_scale}
        return [{"name": g, "params": groups[g], "lr": lr * scales[g], "weight_decay": wd}
                for g in ("decoder", "pwam", "backbone", "text") if groups[g]]

    # -- forward ----------------------------------------------------------------
    def _noise_plan(self, gumbel_noise, sample_seeds=None):
        """Per group block: explicit noise, or noise drawn per sample from ``sample_seeds``,
        or a seed drawn from torch's RNG (so ``torch.manual_seed`` reproduces runs), or
        nothing (deterministic eval)."""
        if gumbel_noise is not None:
            if len(gumbel_noise) != 3:
                raise ValueError(f"gumbel_noise needs one (B, N, P) tensor per group block (3), got {len(gumbel_noise)}")
            return list(gumbel_noise), [None] * 3
        if not (self.training or self.config.eval_noise):
            return [None] * 3, [None] * 3
        if sample_seeds is not None:
            return ["per_sample"] * 3, [None] * 3
        if torch.compiler.is_compiling():
            return ["torch_rng"] * 3, [None] * 3  # materialised per block: a Python int seed would recompile
        return [None] * 3, [int(torch.randint(0, 2**31 - 1, (1,))) for _ in range(3)]

    def forward_features(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor, *,
                         gumbel_noise: Optional[Sequence[Tensor]] = None,
                         sample_seeds: Optional[Sequence[int]] = None) -> dict[str, Any]:
        """Everything the forward computes: ``logits`` (B,1,H,W), ``hit_maps``
        (three (B,N,h,w) assignments, coarse to fine), ``tokens`` (B,N,C),
        ``words`` (B,L,768) and ``sentence`` (paper variant). Where noise is drawn (training,
        ``eval_noise``), ``sample_seeds`` (one int per sample) draws each sample's from its
        own seed, so that a sample's answer does not depend on the batch it is in."""
        self.check_inputs(images, input_ids, attention_mask)
        if sample_seeds is not None and len(sample_seeds) != images.shape[0]:
            raise ValueError(f"sample_seeds needs one int per sample ({images.shape[0]}), got {len(sample_seeds)}")
        images = self.prepare_images(images)
        cfg, run = self.config, self.runtime
        words = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        word_mask = attention_mask.to(words.dtype)
        if run.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        features = self.backbone(images, words, word_mask)
        memory_format = torch.channels_last if run.channels_last else torch.contiguous_format
        features = [f.contiguous(memory_format=memory_format) for f in features]
        noises, seeds = self._noise_plan(gumbel_noise, sample_seeds)
        if noises[0] == "per_sample":
            noises = [self._sample_noise(features, i, sample_seeds) for i in range(3)]
        elif any(isinstance(n, str) for n in noises):
            noises = [self._torch_noise(features, i) for i in range(3)]
        logits, maps, tokens = self.decoder(features, words, word_mask, noises=noises, seeds=seeds, fused=run.fused,
                                            backend=run.ops_backend)
        logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=True)
        out = {"logits": logits, "hit_maps": maps, "tokens": tokens, "words": words}
        if cfg.no_target_head:  # (B, 2): target, no target
            out["nt_logits"] = self.decoder.nt_head(tokens[:, -1])
        if cfg.variant == "paper":
            pooled = (words * word_mask[..., None]).sum(1) / word_mask.sum(1, keepdim=True).clamp(min=1)
            out["sentence"] = self.decoder.sentence_proj(pooled)
        return out

    def _torch_noise(self, features, i: int) -> Tensor:
        c1 = features[0]
        b, n = c1.shape[0], self.config.num_tokens
        h, w = c1.shape[-2] // 2 ** (2 - i), c1.shape[-1] // 2 ** (2 - i)
        return _gumbel_from_torch_rng((b, n, h * w), c1)

    def _sample_noise(self, features, i: int, sample_seeds: Sequence[int]) -> Tensor:
        """Block ``i``'s (B, N, P) Gumbel noise, sample b's drawn from the counter-based
        generator (:mod:`rexfast.ops.gumbel`) for the seed 3·sample_seeds[b] + i."""
        c1 = features[0]
        n = self.config.num_tokens
        h, w = c1.shape[-2] // 2 ** (2 - i), c1.shape[-1] // 2 ** (2 - i)
        return torch.stack([gumbel_noise(3 * int(seed) + i, (n, h * w), dtype=torch.float32, device=c1.device)
                            for seed in sample_seeds])

    def losses(self, outputs: Mapping[str, Any], targets: Tensor) -> dict[str, Tensor]:
        cfg = self.config
        losses = cgformer_losses(
            outputs["logits"], outputs["hit_maps"], targets, referent_index=-1,
            hitmap_weights=cfg.hitmap_loss_weights, tokens=outputs["tokens"], sentence=outputs.get("sentence"),
            contrastive_weight=cfg.contrastive_weight if cfg.variant == "paper" else 0.0,
            temperature=cfg.contrastive_temperature)
        if cfg.no_target_head:
            losses["nt_ce"] = cfg.no_target_weight * no_target_loss(outputs["nt_logits"], targets)
        return losses

    def forward(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor, targets: Optional[Tensor] = None,
                gumbel_noise: Optional[Sequence[Tensor]] = None):
        # No keyword-only parameters: torch.onnx's legacy (TorchScript) exporter
        # passes every default positionally.
        out = self.forward_features(images, input_ids, attention_mask, gumbel_noise=gumbel_noise)
        if targets is None:
            return out["logits"]
        if targets.shape[0] != images.shape[0] or targets.shape[-2:] != images.shape[-2:]:
            raise ValueError(f"targets {tuple(targets.shape)} must be (B, H, W) matching images {tuple(images.shape)}")
        return out["logits"], self.losses(out, targets)

    def inference_outputs(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
        """What an inference engine returns (``rexfast export``): ``logits`` (B, 1, H, W) and,
        with the no-target head, ``nt_logits`` (B, 2: target, no target)."""
        out = self.forward_features(images, input_ids, attention_mask)
        return {name: out[name] for name in ("logits", "nt_logits") if name in out}

    def predict(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor, *,
                sample_seeds: Optional[Sequence[int]] = None) -> Prediction:
        """The mask probability (B, H, W) = sigmoid of the logits, as the released
        evaluation computes it. Without the no-target head (the released model)
        ``no_target`` is None and an empty mask means "no target"; with it, the
        probability softmax(nt_logits)[1] (and with ``config.no_target_if_empty`` an empty
        thresholded mask says "no target" too: :attr:`empty_mask_says_no_target`).
        ``sample_seeds``: see :meth:`forward_features` (only a model with ``eval_noise`` draws
        noise here)."""
        return self._prediction(self.forward_features(images, input_ids, attention_mask, sample_seeds=sample_seeds))

    def explain(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor, *,
                sample_seeds: Optional[Sequence[int]] = None) -> tuple[Prediction, TokenGrouping]:
        """:meth:`predict`'s answer and, from the same forward pass, every token's hard
        assignment map at each of the three decoder stages (:class:`TokenGrouping`; the
        referent token is the last): the last stage's referent map is the pixel group whose
        pooled features the mask head reads."""
        out = self.forward_features(images, input_ids, attention_mask, sample_seeds=sample_seeds)
        return self._prediction(out), TokenGrouping.from_assignments(out["hit_maps"], referent=-1)

    def _prediction(self, out: Mapping[str, Any]) -> Prediction:
        nt = out["nt_logits"].float().softmax(-1)[:, 1] if "nt_logits" in out else None
        return Prediction(mask=out["logits"].float().sigmoid()[:, 0], no_target=nt)

    @property
    def empty_mask_says_no_target(self) -> bool:
        return self.config.no_target_head and self.config.no_target_if_empty


__all__ = ["CGFormer", "CGFormerConfig", "CGFormerRuntime", "CGAttention", "DProjector", "Decoder", "Fusion", "LoadLayer", "LoadToken"]
