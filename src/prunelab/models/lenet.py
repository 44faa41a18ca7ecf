"""LeNet-5 (Caffe variant)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from prunelab.models.base import check_num_classes, image_shape, probe_output_shape


class LeNet5(nn.Module):
    """LeNet-5 as in Caffe's MNIST example, after LeCun et al. (1998).

    conv 5x5 20 ch, maxpool 2, conv 5x5 50 ch, maxpool 2, fc 500, ReLU, fc num_classes
    (no activation between the conv layers, as in Caffe); the variant pruned by Han et al.
    (2015) and Lee et al. (2019, SNIP). 431,080 parameters on 28x28 inputs with 10 classes.
    Needs images of at least 16x16.
    """

    model_name = "lenet5"

    def __init__(self, input_shape: Sequence[int], num_classes: int) -> None:
        name = self.model_name
        channels, _, _ = image_shape(name, input_shape)
        num_classes = check_num_classes(name, num_classes)
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 20, kernel_size=5),
            nn.MaxPool2d(2),
            nn.Conv2d(20, 50, kernel_size=5),
            nn.MaxPool2d(2),
        )
        n_flat = math.prod(
            probe_output_shape(
                name,
                self.features,
                input_shape,
                hint="choose a dataset with images of at least 16x16 (e.g. MNIST) or model=mlp",
            )
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(n_flat, 500),
            nn.ReLU(inplace=True),
            nn.Linear(500, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
