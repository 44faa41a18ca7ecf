"""CIFAR VGG-16 with BatchNorm."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from prunelab.models.base import (
    check_num_classes,
    image_shape,
    kaiming_init_,
    probe_output_shape,
)

_PLAN: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512,
)  # fmt: skip


class VGG16(nn.Module):
    """CIFAR VGG-16 with BatchNorm, the variant of Li et al. (2017), "Pruning filters for
    efficient convnets" (after Zagoruyko's cifar.torch, no dropout).

    13 conv layers (3x3, padding 1, no bias) each followed by BN and ReLU, with 2x2 max-pool
    after stages 1-4, then global average pooling (= AvgPool2d(2) on 32x32) and the
    classifier Linear(512, 512), BatchNorm1d, ReLU, Linear(512, num_classes). About 15.0M
    parameters on CIFAR-10. Needs images of at least 16x16.
    """

    model_name = "vgg16"

    def __init__(self, input_shape: Sequence[int], num_classes: int) -> None:
        name = self.model_name
        channels, _, _ = image_shape(name, input_shape)
        num_classes = check_num_classes(name, num_classes)
        super().__init__()
        layers: list[nn.Module] = []
        for spec in _PLAN:
            if spec == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                width = int(spec)
                layers += [
                    nn.Conv2d(channels, width, 3, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                ]
                channels = width
        self.features = nn.Sequential(*layers)
        probe_output_shape(
            name,
            self.features,
            input_shape,
            hint="choose a dataset with images of at least 16x16 (e.g. CIFAR) or model=resnet20",
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(channels, 512),
            nn.BatchNorm1d(512),
            nn.ReLU(inplace=True),
            nn.Linear(512, num_classes),
        )
        kaiming_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))
