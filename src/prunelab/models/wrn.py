"""Wide ResNets of Zagoruyko & Komodakis (2016)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from prunelab.errors import ConfigError
from prunelab.models.base import check_num_classes, image_shape, kaiming_init_


class _PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 with identity or 1x1-conv shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        return out + skip


class WideResNet(nn.Module):
    """WRN-depth-width of Zagoruyko & Komodakis (2016), "Wide residual networks".

    3x3 conv 16 ch, three stages of (depth-4)/6 pre-activation blocks with 16k/32k/64k
    channels (k = width; stride 2 at the start of stages 2 and 3; 1x1 conv shortcut where
    the shape changes), final BN-ReLU, global average pooling, linear classifier.
    Works with any image size (adaptive pooling).
    """

    model_name = "wide_resnet"

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        depth: int = 22,
        width: int = 2,
        dropout: float = 0.0,
    ) -> None:
        name = self.model_name
        channels, _, _ = image_shape(name, input_shape)
        num_classes = check_num_classes(name, num_classes)
        if not isinstance(depth, int) or depth < 10 or (depth - 4) % 6 != 0:
            raise ConfigError(
                f"model '{name}' got depth={depth!r}; a Wide ResNet needs depth = 6n+4 "
                "(e.g. 16, 22, 28, 40)"
            )
        if not isinstance(width, int) or width < 1:
            raise ConfigError(f"model '{name}' got width={width!r}; use a positive int")
        if not 0.0 <= float(dropout) < 1.0:
            raise ConfigError(f"model '{name}' got dropout={dropout!r}; use a value in [0, 1)")
        super().__init__()
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(channels, 16, 3, stride=1, padding=1, bias=False)
        in_planes = 16
        stages = []
        for planes, stride in ((16 * width, 1), (32 * width, 2), (64 * width, 2)):
            blocks = []
            for i in range(n):
                blocks.append(
                    _PreActBlock(in_planes, planes, stride if i == 0 else 1, float(dropout))
                )
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.bn = nn.BatchNorm2d(in_planes)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        kaiming_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        out = F.relu(self.bn(out))
        return self.fc(self.pool(out).flatten(1))


class WRN22_2(WideResNet):
    """WRN-22-2 of Zagoruyko & Komodakis (2016), the CIFAR-10 model of Evci et al. (2020),
    "Rigging the lottery" (RigL). See :class:`WideResNet`."""

    model_name = "wrn22_2"

    def __init__(self, input_shape: Sequence[int], num_classes: int, dropout: float = 0.0) -> None:
        super().__init__(input_shape, num_classes, depth=22, width=2, dropout=dropout)
