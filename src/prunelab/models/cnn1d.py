"""1-D convnet for MNIST-1D."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from prunelab.errors import ConfigError
from prunelab.models.base import check_num_classes, probe_output_shape, sequence_shape


class MNIST1DCNN(nn.Module):
    """The MNIST-1D convnet of Greydanus (2020), "Scaling down deep learning".

    Conv1d(C, 25, 5, stride 2, padding 1), ReLU, Conv1d(25, 25, 3, 2, 1), ReLU,
    Conv1d(25, 25, 3, 2, 1), ReLU, flatten, Linear(125, num_classes): 5,210 parameters on
    (1, 40) inputs with 10 classes. Takes (C, L) inputs.
    """

    model_name = "mnist1d_cnn"

    def __init__(self, input_shape: Sequence[int], num_classes: int, channels: int = 25) -> None:
        name = self.model_name
        in_channels, _ = sequence_shape(name, input_shape)
        num_classes = check_num_classes(name, num_classes)
        if not isinstance(channels, int) or channels <= 0:
            raise ConfigError(f"model '{name}' got channels={channels!r}; use a positive int")
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(in_channels, channels, kernel_size=5, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(channels, channels, kernel_size=3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(channels, channels, kernel_size=3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        n_flat = math.prod(probe_output_shape(name, self.features, input_shape))
        self.linear = nn.Linear(n_flat, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(x))
