"""Fully connected models that flatten any input shape."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch
from torch import nn

from prunelab.errors import ConfigError
from prunelab.models.base import check_num_classes, flat_features, make_activation


class MLP(nn.Module):
    """Multi-layer perceptron on the flattened input.

    With ``residual=True`` every hidden layer whose width equals the previous hidden layer's
    adds a skip connection, ``h <- h + act(W h + b)``: the MLP of Greydanus (2020), "Scaling
    down deep learning" (arXiv:2011.14439), 40-100-100-10 with a residual second layer,
    15,210 parameters on MNIST-1D.
    """

    model_name = "mlp"

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        hidden: Sequence[int] = (100, 100),
        residual: bool = False,
        activation: str = "relu",
    ) -> None:
        name = self.model_name
        in_features = flat_features(name, input_shape)
        num_classes = check_num_classes(name, num_classes)
        try:
            widths = [int(h) for h in hidden]
        except (TypeError, ValueError):
            widths = [0]
        if any(w <= 0 for w in widths):
            raise ConfigError(
                f"model '{name}' got hidden={hidden!r}; it must be a list of positive ints, "
                "e.g. [100, 100]"
            )
        super().__init__()
        self.act = make_activation(name, activation)
        dims = [in_features, *widths]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(dims))
        self.skip = [
            bool(residual) and i > 0 and dims[i] == dims[i + 1] for i in range(len(widths))
        ]
        self.head = nn.Linear(dims[-1], num_classes)
        # Read by the mask diagnostics: with a residual layer the layers are no longer a chain.
        self.has_skip_connections = any(self.skip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1)
        for layer, skip in zip(self.layers, self.skip, strict=True):
            out = self.act(layer(h))
            h = h + out if skip else out
        return self.head(h)


class LeNet300_100(MLP):
    """LeNet-300-100: 784-300-100-10 fully connected net with ReLU.

    From LeCun et al. (1998), "Gradient-based learning applied to document recognition", as
    used for pruning by Han et al. (2015), "Learning both weights and connections for
    efficient neural networks"; 266,610 parameters on 28x28 inputs with 10 classes.
    """

    model_name = "lenet300_100"

    def __init__(
        self, input_shape: Sequence[int], num_classes: int, activation: str = "relu"
    ) -> None:
        super().__init__(
            input_shape, num_classes, hidden=(300, 100), residual=False, activation=activation
        )
