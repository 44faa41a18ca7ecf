"""The model zoo: every model is built as ``Model(input_shape, num_classes, **hparams)``.

``input_shape`` is the per-sample shape without batch dimension, as the dataset reports it;
a model that cannot handle it raises :class:`prunelab.errors.ConfigError` when built.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from prunelab.lazy import LazyClasses, lazy_attributes
from prunelab.models.cnn1d import MNIST1DCNN
from prunelab.models.conv import Conv4, Conv6
from prunelab.models.lenet import LeNet5
from prunelab.models.mlp import MLP, LeNet300_100
from prunelab.models.resnet_cifar import CifarResNet, ResNet20, ResNet32, ResNet56
from prunelab.models.vgg import VGG16
from prunelab.models.wrn import WRN22_2, WideResNet

# Models built on torchvision's are imported on first use (``prunelab.models.ResNet18``), so
# that a run with another model never imports torchvision.
_LAZY = {"ResNet18": "prunelab.models.resnet18"}


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())


#: Hydra option name (``conf/model/<name>.yaml``) -> model class.
MODELS: Mapping[str, type[nn.Module]] = LazyClasses(
    __name__,
    {
        "mlp": "MLP",
        "lenet300_100": "LeNet300_100",
        "lenet5": "LeNet5",
        "mnist1d_cnn": "MNIST1DCNN",
        "conv4": "Conv4",
        "conv6": "Conv6",
        "resnet20": "ResNet20",
        "resnet32": "ResNet32",
        "resnet56": "ResNet56",
        "vgg16": "VGG16",
        "wrn22_2": "WRN22_2",
        "resnet18": "ResNet18",
    },
)

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Linear)


def prunable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Ordered ``{qualified name: parameter}`` of the weights that pruning may touch.

    If ``model`` defines a ``prunable_parameters()`` method, its result is returned.
    Otherwise: the ``.weight`` of every ``nn.Conv1d``/``nn.Conv2d``/``nn.Linear`` in module
    order (never biases or normalisation parameters). Names are those of
    ``model.named_parameters()``.
    """
    override = getattr(model, "prunable_parameters", None)
    if callable(override):
        return dict(override())
    params = dict(model.named_parameters())
    result: dict[str, nn.Parameter] = {}
    for module_name, module in model.named_modules():
        if isinstance(module, PRUNABLE_TYPES):
            key = f"{module_name}.weight" if module_name else "weight"
            if key in params:
                result[key] = params[key]
    return result


def unpruned_weights(
    model: nn.Module, prunable: Mapping[str, nn.Parameter] | None = None
) -> dict[str, int]:
    """``{name: numel}`` of the weights with two or more dimensions that pruning leaves out.

    ``prunable`` defaults to :func:`prunable_parameters`. Every parameter with ``ndim >= 2``
    that is not prunable is listed (Conv3d, ConvTranspose, Embedding, the packed input
    projection of ``nn.MultiheadAttention``, ...); biases and normalisation parameters
    (one dimension) are not weights in this sense.
    """
    kept = prunable_parameters(model) if prunable is None else prunable
    return {
        name: p.numel() for name, p in model.named_parameters() if p.dim() >= 2 and name not in kept
    }


def unpruned_share(model: nn.Module, prunable: Mapping[str, nn.Parameter] | None = None) -> float:
    """The fraction of all entries of weights with two or more dimensions that pruning leaves
    out (see :func:`unpruned_weights`); 0.0 when the model has no such weight."""
    total = sum(p.numel() for p in model.parameters() if p.dim() >= 2)
    left_out = sum(unpruned_weights(model, prunable).values())
    return left_out / total if total else 0.0


__all__ = [
    "MODELS",
    "MLP",
    "CifarResNet",
    "Conv4",
    "Conv6",
    "LeNet300_100",
    "LeNet5",
    "MNIST1DCNN",
    "ResNet18",
    "ResNet20",
    "ResNet32",
    "ResNet56",
    "VGG16",
    "WRN22_2",
    "WideResNet",
    "prunable_parameters",
    "unpruned_share",
    "unpruned_weights",
]
