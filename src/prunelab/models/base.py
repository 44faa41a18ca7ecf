"""Shared input checks for the model zoo.

Every model validates the dataset's per-sample shape (no batch dimension) when it is built,
so that a wrong model/dataset pairing fails with one :class:`ConfigError` line before any
training starts. The helpers here are the only place those checks and messages live.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch
from torch import nn

from prunelab.errors import ConfigError

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "sigmoid": nn.Sigmoid,
}

IMAGE_HINT = "choose an image dataset or model=mlp/mnist1d_cnn"
SEQUENCE_HINT = "choose a sequence dataset (mnist1d) or model=mlp/lenet300_100"
SMALL_HINT = "choose a dataset with larger inputs (e.g. MNIST or CIFAR) or model=mlp"


def check_input_shape(value: object, what: str = "input_shape") -> tuple[int, ...]:
    """``value`` as one sample's shape (no batch dimension): a non-empty tuple of positive
    ints, or a one-line ConfigError naming ``what`` (the option or caller it came from)."""
    try:
        shape = tuple(int(s) for s in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        shape = ()
    if not shape or any(s <= 0 for s in shape):
        raise ConfigError(
            f"{what}: input_shape={value!r} must be one sample's shape without the batch "
            "dimension, a non-empty list of positive ints, e.g. [3, 32, 32]"
        )
    return shape


def as_shape(name: str, input_shape: Sequence[int]) -> tuple[int, ...]:
    """Return ``input_shape`` as a tuple of positive ints, or raise :class:`ConfigError`."""
    try:
        shape = tuple(operator.index(d) for d in input_shape)
    except TypeError:
        raise ConfigError(
            f"model '{name}' got input_shape={input_shape!r}; pass the per-sample shape "
            "without batch dimension as a tuple of ints, e.g. (3, 32, 32)"
        ) from None
    if not shape or any(d <= 0 for d in shape):
        raise ConfigError(
            f"model '{name}' got input_shape={shape}; every dimension must be a positive int, "
            "e.g. (3, 32, 32)"
        )
    return shape


def check_num_classes(name: str, num_classes: int) -> int:
    """Return ``num_classes`` as an int >= 1, or raise :class:`ConfigError`."""
    try:
        n = operator.index(num_classes)
    except TypeError:
        n = 0
    if n < 1:
        raise ConfigError(
            f"model '{name}' got num_classes={num_classes!r}; it must be a positive int "
            "(the dataset's number of classes)"
        )
    return n


def flat_features(name: str, input_shape: Sequence[int]) -> int:
    """Number of features of one flattened sample (any input rank is accepted)."""
    return math.prod(as_shape(name, input_shape))


def image_shape(name: str, input_shape: Sequence[int]) -> tuple[int, int, int]:
    """Return ``(C, H, W)`` or raise :class:`ConfigError` if the input is not an image."""
    shape = as_shape(name, input_shape)
    if len(shape) != 3:
        raise ConfigError(
            f"model '{name}' needs image inputs (C, H, W) but dataset gives shape {shape}; "
            f"{IMAGE_HINT}"
        )
    return shape[0], shape[1], shape[2]


def sequence_shape(name: str, input_shape: Sequence[int]) -> tuple[int, int]:
    """Return ``(C, L)`` or raise :class:`ConfigError` if the input is not a 1-D sequence."""
    shape = as_shape(name, input_shape)
    if len(shape) != 2:
        raise ConfigError(
            f"model '{name}' needs sequence inputs (C, L) but dataset gives shape {shape}; "
            f"{SEQUENCE_HINT}"
        )
    return shape[0], shape[1]


def probe_output_shape(
    name: str, module: nn.Module, input_shape: Sequence[int], hint: str = SMALL_HINT
) -> tuple[int, ...]:
    """Per-sample output shape of ``module`` on ``input_shape``, found by a dummy forward.

    Used to size the classifier after a conv/pool stack. Raises :class:`ConfigError` when
    the input is too small for the stack (a kernel larger than the feature map, or an empty
    output).
    """
    shape = as_shape(name, input_shape)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = module(torch.zeros(1, *shape))
    except RuntimeError:
        out = None
    finally:
        module.train(was_training)
    if out is None or out.numel() == 0:
        raise ConfigError(
            f"model '{name}' cannot process inputs of shape {shape}: they are too small for "
            f"its convolution/pooling layers; {hint}"
        )
    return tuple(out.shape[1:])


def make_activation(name: str, activation: str) -> nn.Module:
    """Instantiate a named activation, or raise :class:`ConfigError` for an unknown name."""
    if activation not in ACTIVATIONS:
        raise ConfigError(
            f"model '{name}' got activation={activation!r}; choose one of "
            f"{', '.join(sorted(ACTIVATIONS))}"
        )
    return ACTIVATIONS[activation]()


def kaiming_init_(model: nn.Module) -> None:
    """He et al. (2015) normal init for convs (fan-out, ReLU); BN to identity."""
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
