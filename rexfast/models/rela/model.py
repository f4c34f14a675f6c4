"""ReLA (Liu, Ding, Jiang — "GRES: Generalized Referring Expression Segmentation", CVPR 2023).

    images ─► backbone (multimodal Swin with PWAM, or ResNet-50) ─► res2 … res5
    words  ─► BERT ───────────┘ (PWAM in every Swin stage)          │
    pixel decoder (deformable attention over res3–res5, FPN to 1/4) ─► mask features, 3 maps
    decoder: Q region queries, RIA (region-masked image attention) / RLA (words at layer 0,
             region self-attention) / FFN, cycling 1/32, 1/16, 1/8        (rexfast/models/rela/decoder.py)
    heads:   target mask (B, 2, H/4, W/4) = minimap-weighted region masks; no-target (B, 2); minimap (B, Q, 2)
             (H/2, W/2 with ``mask_stride=2``, not released: rexfast/models/rela/pixel_decoder.py)

As the authors' main branch runs it (``../shared/RELA.md``). Module names
reproduce the released checkpoint's (``backbone.*``, ``text_encoder.*``,
``sem_seg_head.pixel_decoder.*``, ``sem_seg_head.predictor.*``), so
:meth:`ReLA.from_official` loads it key for key.

Images come normalised as rexfast's data pipeline makes them (ImageNet
mean/std on [0, 1] pixels), which is the authors' in-model normalisation
((x − 255·mean) / (255·std) on [0, 255] pixels).
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones.resnet import ResNet
from ..backbones.swin import MultiModalSwinTransformer
from ..base import Prediction, ReferringModel
from ..explain import RegionMinimap
from ..text import bert_config, build_bert
from .config import ReLAConfig, ReLARuntime
from .decoder import ReferringDecoder
from .losses import rela_losses
from .pixel_decoder import PixelDecoder

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.InstanceNorm1d, nn.InstanceNorm2d)


class ReferringHead(nn.Module):
    """``sem_seg_head``: the pixel decoder and the decoder (``predictor``)."""

    def __init__(self, pixel_decoder: PixelDecoder, predictor: ReferringDecoder):
        super().__init__()
        self.pixel_decoder = pixel_decoder
        self.predictor = predictor


def _strictly_above_half(p: Tensor, decide: Tensor) -> Tensor:
    """``p`` moved by at most one ulp so that ``p > 0.5`` holds exactly where ``decide``:
    the released evaluator takes an argmax over two sigmoid scores, and thresholding
    this probability at 0.5 must give the same decision, ties included."""
    above = torch.nextafter(torch.tensor(0.5, dtype=p.dtype, device=p.device), torch.tensor(1.0, dtype=p.dtype,
                                                                                              device=p.device))
    return torch.where(decide, torch.maximum(p, above), torch.minimum(p, torch.full_like(p, 0.5)))


class ReLA(ReferringModel):
    """ReLA for generalized referring expression segmentation.

    ``ReLA()`` builds the released architecture (Swin-B; random weights, BERT
    from ``config.bert_weights`` if given); ``ReLA(ReLAConfig.tiny())`` a toy;
    ``ReLA.from_official(path)`` the authors' checkpoint. Keyword arguments are runtime
    options (:class:`ReLARuntime`: ``ReLA(ops_backend="reference")``) or override config fields.

    ``forward(images, input_ids, attention_mask, targets=None)``: images
    (B, 3, H, W), H and W multiples of 32; ids / mask (B, L) (released: L = 20).
    Returns a dict with ``mask_logits`` (B, 2, H/s, W/s: background, target; s =
    ``config.mask_stride``, 4 as released), ``nt_logits`` (B, 2: target, no target) and
    ``minimap_logits`` (B, Q, 2); with
    ``targets`` (B, H, W) binary masks (all zero for "no target"), ``(outputs, losses)``.
    """

    model_type = "rela"
    config_class = ReLAConfig
    runtime_class = ReLARuntime

    def __init__(self, config: Optional[ReLAConfig] = None, **kwargs):
        super().__init__()
        config, self.runtime = self._config_and_runtime(config, kwargs)
        self.config = config
        text_cfg = bert_config(config.bert)
        if config.backbone == "swin":
            self.backbone = MultiModalSwinTransformer(config.swin, text_dim=text_cfg.hidden_size)
        else:
            self.backbone = ResNet(config.resnet)
        self.text_encoder = build_bert(text_cfg, config.bert_weights)
        pixel_decoder = PixelDecoder(self.backbone.num_features, config.conv_dim, config.mask_dim, config.enc_layers,
                                     config.enc_heads, config.enc_points, config.enc_ffn, backend=self.runtime.ops_backend,
                                     mask_stride=config.mask_stride)
        predictor = ReferringDecoder(
            config.hidden_dim, config.num_queries, config.nheads, config.dim_feedforward, config.dec_layers,
            config.mask_dim, text_cfg.hidden_size, config.rla_weight,
            region_masks_at_key_resolution=self.runtime.region_masks_at_key_resolution,
            backend=self.runtime.ops_backend)
        self.sem_seg_head = ReferringHead(pixel_decoder, predictor)

    def fp32_modules(self) -> tuple[str, ...]:
        # The Swin backbone keeps its pixel-word attentions float32 (see its fp32_modules).
        # The deformable pixel decoder is no island: under autocast it still runs float32, as the
        # authors run it, but a bf16 model runs it in bf16 with float32 accumulation (its module
        # docstring). Its float32 linear layers were a third of a bf16 ReLA's addmm time; what bf16
        # costs it on trained weights: benchmarks/bf16_agreement.py --island sem_seg_head.pixel_decoder.
        return tuple(f"backbone.{name}" for name in self.backbone.fp32_modules())

    def _apply_runtime(self) -> None:
        self.sem_seg_head.predictor.region_masks_at_key_resolution = self.runtime.region_masks_at_key_resolution
        for module in self.modules():  # the decoder and every MSDeformAttn hold their backend
            if hasattr(module, "backend"):
                module.backend = self.runtime.ops_backend

    # -- forward ----------------------------------------------------------------
    def check_inputs(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor) -> None:
        super().check_inputs(images, input_ids, attention_mask)
        h, w = images.shape[-2:]
        if (self.config.conv_dim // 32) * (h // 32) * (w // 32) < 2:
            # GroupNorm(32) of the 1/32 map would normalise single values
            raise ValueError(f"images of {h}×{w} are too small for this ReLA (conv_dim {self.config.conv_dim}): "
                             "use at least 64×64")

    def forward_features(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor,
                         keep_regions: bool = False) -> dict:
        """``mask_logits``, ``nt_logits``, ``minimap_logits``; with ``keep_regions`` also
        ``region_logits`` (B, Q, H/s, W/s), the region masks M_r = E·F_m the target mask is
        the minimap-weighted sum of (only :meth:`explain` asks for them)."""
        self.check_inputs(images, input_ids, attention_mask)
        images = self.prepare_images(images)
        words = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        features = self.backbone(images, words, attention_mask.to(words.dtype))
        mask_features, maps = self.sem_seg_head.pixel_decoder(features, images)
        out = self.sem_seg_head.predictor(maps, mask_features, words)
        region_embed = out.pop("region_embed")
        if keep_regions:
            out["region_logits"] = torch.einsum("bqc,bchw->bqhw", region_embed, mask_features)
        return out

    def forward(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor, targets: Optional[Tensor] = None):
        out = self.forward_features(images, input_ids, attention_mask)
        if targets is None:
            return out
        if targets.shape[0] != images.shape[0] or targets.shape[-2:] != images.shape[-2:]:
            raise ValueError(f"targets {tuple(targets.shape)} must be (B, H, W) matching images {tuple(images.shape)}")
        return out, self.losses(out, targets)

    def inference_outputs(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor) -> dict[str, Tensor]:
        """What an inference engine returns (``rexfast export``): ``mask_logits`` (B, 2, H/s, W/s),
        ``nt_logits`` (B, 2) and ``minimap_logits`` (B, Q, 2), as :meth:`forward` without targets."""
        out = self.forward_features(images, input_ids, attention_mask)
        return {name: out[name] for name in ("mask_logits", "nt_logits", "minimap_logits")}

    def losses(self, outputs: Mapping[str, Tensor], targets: Tensor) -> dict[str, Tensor]:
        cfg = self.config
        return rela_losses(outputs["mask_logits"], outputs["minimap_logits"], outputs["nt_logits"], targets,
                           class_weights=cfg.class_weights, minimap_size=cfg.minimap_size,
                           minimap_weight=cfg.minimap_weight, nt_weight=cfg.nt_weight, mask_weight=cfg.mask_weight,
                           dice_weight=cfg.dice_weight)

    def predict(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor, *,
                sample_seeds: Optional[Sequence[int]] = None) -> Prediction:
        """As the released inference and evaluator: the target-mask logits resized
        (bilinear, align_corners=False) to the input size; a pixel is the target
        where sigmoid(target) > sigmoid(background), the sentence names nothing
        where sigmoid(no target) > sigmoid(target) (``config.decision="released"``; with
        ``"logits"``: where target − background > 0, no target − target > 0). Returned as
        probabilities (softmax of the two logits) that exceed 0.5 exactly where those
        decisions pick. With ``config.no_target_if_empty`` an empty thresholded mask says "no
        target" too (:attr:`empty_mask_says_no_target`). ReLA draws no noise at
        inference: ``sample_seeds`` (the protocol's) changes nothing."""
        return self._prediction(self.forward_features(images, input_ids, attention_mask), images.shape[-2:])

    def explain(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor, *,
                sample_seeds: Optional[Sequence[int]] = None) -> tuple[Prediction, RegionMinimap]:
        """:meth:`predict`'s answer and, from the same forward pass, the region masks and the
        minimap that weights them (:class:`RegionMinimap`): the target-vs-background logit is
        Σ_q (X[q,1] − X[q,0]) M_r[q]."""
        out = self.forward_features(images, input_ids, attention_mask, keep_regions=True)
        return self._prediction(out, images.shape[-2:]), RegionMinimap(
            minimap_logits=out["minimap_logits"].float(), region_logits=out["region_logits"].float())

    def _prediction(self, out: Mapping[str, Tensor], size) -> Prediction:
        logits = F.interpolate(out["mask_logits"].float(), size=tuple(size), mode="bilinear", align_corners=False)
        nt = out["nt_logits"].float()
        return Prediction(mask=self._win_probability(logits[:, 1], logits[:, 0]),
                          no_target=self._win_probability(nt[:, 1], nt[:, 0]))

    @property
    def empty_mask_says_no_target(self) -> bool:
        return self.config.no_target_if_empty

    def _win_probability(self, a: Tensor, b: Tensor) -> Tensor:
        """softmax of (b, a) at a, above 0.5 exactly where class ``a`` wins by ``config.decision``
        (ties to ``b``, as an argmax over (b, a) picks)."""
        wins = a - b > 0 if self.config.decision == "logits" else torch.sigmoid(a) > torch.sigmoid(b)
        return _strictly_above_half(torch.sigmoid(a - b), wins)

    # -- training ------------------------------------------------------------------
    def param_groups(self, train_cfg) -> list[dict]:
        """The released optimizer (train_net.py ``build_optimizer``): every parameter
        outside BERT at ``train_cfg.lr`` with ``train_cfg.weight_decay``, except norm
        layers, embeddings and Swin relative-position tables (no weight decay); of
        BERT only layers ``0 … text_trained_layers − 1`` (released: 0–9, with weight
        decay throughout; its embeddings and last layers never update)."""
        lr, wd = float(train_cfg.lr), float(train_cfg.weight_decay)
        decay, no_decay = [], []
        for module_name, module in self.named_modules():
            if module_name.startswith("text_encoder"):
                continue
            for name, p in module.named_parameters(recurse=False):
                if not p.requires_grad:
                    continue
                free = isinstance(module, (_NORM_TYPES, nn.Embedding)) or "relative_position_bias_table" in name
                (no_decay if free else decay).append(p)
        n = self.config.text_trained_layers
        if n is None:
            text = [p for p in self.text_encoder.parameters() if p.requires_grad]
        else:
            text = [p for layer in self.text_encoder.encoder.layer[:n] for p in layer.parameters() if p.requires_grad]
        groups = [{"name": "decay", "params": decay, "lr": lr, "weight_decay": wd},
                  {"name": "no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0},
                  {"name": "text", "params": text, "lr": lr, "weight_decay": wd}]
        return [g for g in groups if g["params"]]


__all__ = ["ReLA", "ReLAConfig", "ReLARuntime", "ReferringHead"]
