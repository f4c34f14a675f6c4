"""ResNet-50 in detectron2's layout (ReLA's ``build_d2_resnet_backbone``), no language fusion.

Keys: ``stem.conv1``, ``res{2..5}.{j}.{conv1,conv2,conv3,shortcut}``, each a
convolution with its frozen batch norm under ``.norm``. As ReLA's
``referring_R50.yaml`` builds it: bottleneck blocks 3-4-6-3, the stride on the
3×3 convolution (``STRIDE_IN_1X1: False``), frozen batch norm everywhere
(``RESNETS.NORM`` is detectron2's default ``FrozenBN``), nothing else frozen
(``FREEZE_AT: 0``), Caffe2 MSRA initialisation. The language inputs are
accepted and ignored: ReLA-R50 reads the sentence only in its decoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from ..base import check_field_types
from ..layers import ConvNormAct, FrozenBatchNorm2d, c2_msra_fill

BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


@dataclass(frozen=True)
class ResNetConfig:
    depth: int = 50
    stem_channels: int = 64
    res2_channels: int = 256  # output channels of res2 (bottleneck width: a quarter)

    def __post_init__(self):
        check_field_types(self)
        if self.depth not in BLOCKS:
            raise ValueError(f"ResNetConfig.depth must be one of {sorted(BLOCKS)}, got {self.depth}")

    @property
    def num_features(self) -> list[int]:
        return [self.res2_channels * 2**i for i in range(4)]


def _conv(cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0) -> ConvNormAct:
    conv = ConvNormAct(cin, cout, kernel, stride=stride, padding=padding, bias=False, norm=FrozenBatchNorm2d(cout))
    c2_msra_fill(conv)
    return conv


class Bottleneck(nn.Module):
    def __init__(self, cin: int, cout: int, width: int, stride: int):
        super().__init__()
        self.shortcut = _conv(cin, cout, 1, stride) if cin != cout else None
        self.conv1 = _conv(cin, width, 1)
        self.conv2 = _conv(width, width, 3, stride, 1)
        self.conv3 = _conv(width, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.conv1(x))
        out = F.relu(self.conv2(out))
        out = self.conv3(out)
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class Stem(nn.Module):
    def __init__(self, cout: int):
        super().__init__()
        self.conv1 = _conv(3, cout, 7, 2, 3)

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool2d(F.relu(self.conv1(x)), kernel_size=3, stride=2, padding=1)


class ResNet(nn.Module):
    """Returns the four stage features res2..res5 (B, C·2^i, H/2^(i+2), W/2^(i+2))."""

    def __init__(self, config: ResNetConfig):
        super().__init__()
        self.config = config
        self.num_features = config.num_features
        self.stem = Stem(config.stem_channels)
        cin = config.stem_channels
        for i, (n, cout) in enumerate(zip(BLOCKS[config.depth], self.num_features)):
            stride = 1 if i == 0 else 2
            blocks = [Bottleneck(cin if j == 0 else cout, cout, cout // 4, stride if j == 0 else 1) for j in range(n)]
            self.add_module(f"res{i + 2}", nn.Sequential(*blocks))
            cin = cout

    def fp32_modules(self) -> tuple[str, ...]:
        """Submodules kept float32 under a bf16 model (as the Swin backbone's): none."""
        return ()

    def forward(self, images: Tensor, words: Tensor = None, word_mask: Tensor = None) -> list[Tensor]:
        x = self.stem(images)
        outs = []
        for i in range(4):
            x = getattr(self, f"res{i + 2}")(x)
            outs.append(x)
        return outs


__all__ = ["ResNetConfig", "ResNet"]
