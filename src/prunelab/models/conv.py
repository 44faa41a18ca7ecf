"""Conv-4 / Conv-6 of the lottery ticket paper."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from prunelab.models.base import check_num_classes, image_shape, probe_output_shape


class _LotteryConvNet(nn.Module):
    """VGG-like convnet: 3x3 convs (padding 1) + ReLU, 2x2 max-pool after each pair, then
    FC 256, 256, num_classes with ReLU."""

    model_name = "conv"
    plan: tuple[int | str, ...] = ()

    def __init__(self, input_shape: Sequence[int], num_classes: int) -> None:
        name = self.model_name
        channels, _, _ = image_shape(name, input_shape)
        num_classes = check_num_classes(name, num_classes)
        super().__init__()
        layers: list[nn.Module] = []
        for spec in self.plan:
            if spec == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(channels, int(spec), 3, padding=1), nn.ReLU(inplace=True)]
                channels = int(spec)
        self.features = nn.Sequential(*layers, nn.Flatten())
        n_flat = math.prod(probe_output_shape(name, self.features, input_shape))
        self.classifier = nn.Sequential(
            nn.Linear(n_flat, 256),
            nn.ReLU(inplace=True),
            nn.Linear(256, 256),
            nn.ReLU(inplace=True),
            nn.Linear(256, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class Conv4(_LotteryConvNet):
    """Conv-4 of Frankle & Carbin (2019), "The lottery ticket hypothesis".

    64, 64, pool, 128, 128, pool, FC 256, 256, num_classes; 2,425,930 parameters on
    CIFAR-10 (the paper's 2.4M).
    """

    model_name = "conv4"
    plan = (64, 64, "M", 128, 128, "M")


class Conv6(_LotteryConvNet):
    """Conv-6 of Frankle & Carbin (2019), "The lottery ticket hypothesis".

    64, 64, pool, 128, 128, pool, 256, 256, pool, FC 256, 256, num_classes; 2,262,602
    parameters on CIFAR-10.
    """

    model_name = "conv6"
    plan = (64, 64, "M", 128, 128, "M", 256, 256, "M")
