"""torchvision ResNet-18 with an optional CIFAR stem."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from prunelab.models.base import check_num_classes, image_shape


class ResNet18(ResNet):
    """ResNet-18 of He et al. (2016), "Deep residual learning for image recognition".

    Exactly torchvision's ``resnet18(weights=None, num_classes=...)`` (same parameter
    names; pretrained weights are never loaded). With ``cifar_stem=True`` (default) the
    stem is adapted to 32x32 inputs: conv1 becomes 3x3 stride 1 padding 1 and the max-pool
    is removed (11,173,962 parameters for 10 classes). ``cifar_stem=False`` keeps the
    ImageNet stem (7x7 stride 2 conv + max-pool), e.g. for FLOP counts at 224x224. conv1
    takes C input channels from ``input_shape``.
    """

    model_name = "resnet18"

    def __init__(
        self, input_shape: Sequence[int], num_classes: int, cifar_stem: bool = True
    ) -> None:
        name = self.model_name
        channels, _, _ = image_shape(name, input_shape)
        num_classes = check_num_classes(name, num_classes)
        super().__init__(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)
        if cifar_stem:
            self.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        elif channels != 3:
            self.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        if cifar_stem or channels != 3:
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
