"""CIFAR ResNets of He et al. (2016)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from prunelab.errors import ConfigError
from prunelab.models.base import check_num_classes, image_shape, kaiming_init_

SHORTCUTS = ("A", "B")


class _PadShortcut(nn.Module):
    """Option A: parameter-free shortcut, subsample spatially and zero-pad new channels."""

    def __init__(self, extra_channels: int, stride: int) -> None:
        super().__init__()
        self.extra_channels = extra_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a ReLU between and after the residual sum."""

    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module
        if stride == 1 and in_planes == planes:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = _PadShortcut(planes - in_planes, stride)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for CIFAR of He et al. (2016), "Deep residual learning for image
    recognition", Sec. 4.2.

    3x3 conv 16 ch, three stages of n basic blocks with 16/32/64 channels (stride 2 at the
    start of stages 2 and 3), global average pooling, linear classifier. Convs have no bias
    and are followed by BatchNorm.

    Shortcuts where the shape changes: ``shortcut="B"`` (default) uses a 1x1 conv + BN
    projection, as in the lottery-ticket code base (Frankle et al.) used across the pruning
    literature: ResNet-20 has 272,474 parameters. ``shortcut="A"`` is the paper's own CIFAR
    choice, parameter-free subsampling + zero-padding: ResNet-20 has 269,722 (the paper's
    0.27M). Works with any image size (adaptive pooling).
    """

    model_name = "resnet"

    def __init__(
        self, input_shape: Sequence[int], num_classes: int, depth: int = 20, shortcut: str = "B"
    ) -> None:
        name = self.model_name
        channels, _, _ = image_shape(name, input_shape)
        num_classes = check_num_classes(name, num_classes)
        if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6 != 0:
            raise ConfigError(
                f"model '{name}' got depth={depth!r}; a CIFAR ResNet needs depth = 6n+2 "
                "(e.g. 20, 32, 44, 56, 110)"
            )
        if shortcut not in SHORTCUTS:
            raise ConfigError(
                f"model '{name}' got shortcut={shortcut!r}; choose 'A' (zero-padding) or "
                "'B' (1x1 conv projection)"
            )
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes = 16
        stages = []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1, shortcut))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        kaiming_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(self.pool(out).flatten(1))


class ResNet20(CifarResNet):
    """ResNet-20 (n=3) of He et al. (2016); ~0.27M parameters. See :class:`CifarResNet`."""

    model_name = "resnet20"

    def __init__(self, input_shape: Sequence[int], num_classes: int, shortcut: str = "B") -> None:
        super().__init__(input_shape, num_classes, depth=20, shortcut=shortcut)


class ResNet32(CifarResNet):
    """ResNet-32 (n=5) of He et al. (2016); ~0.46M parameters. See :class:`CifarResNet`."""

    model_name = "resnet32"

    def __init__(self, input_shape: Sequence[int], num_classes: int, shortcut: str = "B") -> None:
        super().__init__(input_shape, num_classes, depth=32, shortcut=shortcut)


class ResNet56(CifarResNet):
    """ResNet-56 (n=9) of He et al. (2016); ~0.85M parameters. See :class:`CifarResNet`."""

    model_name = "resnet56"

    def __init__(self, input_shape: Sequence[int], num_classes: int, shortcut: str = "B") -> None:
        super().__init__(input_shape, num_classes, depth=56, shortcut=shortcut)
