"""Removing whole residual blocks: each is replaced by its shortcut.

A residual block computes ``y = post(branch(x) + shortcut(x))``. Removing it keeps what the
block computes when its residual branch outputs zero, ``y = post(shortcut(x))``, as in the
layer-dropping view of residual networks (Veit et al. 2016, "Residual networks behave like
ensembles of relatively shallow networks"; Huang et al. 2016, "Deep networks with stochastic
depth"). Every block of the supported models can be removed:

- an **identity** shortcut leaves ``post`` alone: ``nn.ReLU()`` for the post-activation blocks
  of :class:`~prunelab.models.CifarResNet` and torchvision's ResNets (the block ends with a
  ReLU after the sum; its input is already non-negative there, so this is the identity), and
  ``nn.Identity()`` for the pre-activation blocks of :class:`~prunelab.models.WideResNet`;
- a **projection** shortcut (where the block changes the number of channels or the
  resolution) is kept with what it reads: the 1x1 conv + BatchNorm (CIFAR ResNet option B,
  torchvision's ``downsample``) then the ReLU; for a pre-activation block, the block's own
  ``bn1`` and ReLU (its shortcut reads the pre-activated input) then the 1x1 conv;
- a **zero-pad** shortcut (CIFAR ResNet option A: subsample and pad channels with zeros) is
  kept, then the ReLU.

The replacement is an ``nn.Sequential`` whose children keep the block's attribute names
(``shortcut``, ``downsample``, ``bn1``), so the surviving parameters keep their qualified
names (``layer2.0.shortcut.0.weight``), and the model stays traceable by
:func:`prunelab.structured.channel_groups`. The result equals the model in which those blocks'
residual branches output zero, in train and eval mode alike.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Iterable

from torch import nn
from torchvision.models.resnet import BasicBlock as TorchvisionBasicBlock
from torchvision.models.resnet import Bottleneck as TorchvisionBottleneck

from prunelab.errors import ConfigError
from prunelab.models.resnet_cifar import BasicBlock as CifarBasicBlock
from prunelab.models.resnet_cifar import _PadShortcut
from prunelab.models.wrn import _PreActBlock

SHORTCUT_KINDS = ("identity", "projection", "zero_pad")


def _shortcut_kind(block: nn.Module) -> str | None:
    """The block's shortcut kind, or ``None`` when ``block`` is not a supported block."""
    if isinstance(block, CifarBasicBlock):
        if isinstance(block.shortcut, nn.Identity):
            return "identity"
        return "zero_pad" if isinstance(block.shortcut, _PadShortcut) else "projection"
    if isinstance(block, _PreActBlock):
        return "identity" if block.shortcut is None else "projection"
    if isinstance(block, (TorchvisionBasicBlock, TorchvisionBottleneck)):
        return "identity" if block.downsample is None else "projection"
    return None


def residual_blocks(model: nn.Module) -> dict[str, str]:
    """``{qualified name: shortcut kind}`` of the removable residual blocks of ``model``, in
    module order; kinds are ``identity``, ``projection`` and ``zero_pad`` (module docstring).

    Recognised blocks: the basic blocks of :class:`~prunelab.models.CifarResNet` (ResNet-20/
    32/56), the pre-activation blocks of :class:`~prunelab.models.WideResNet` (WRN-22-2) and
    torchvision's ``BasicBlock``/``Bottleneck`` (:class:`~prunelab.models.ResNet18`).
    """
    out = {}
    for name, module in model.named_modules():
        kind = _shortcut_kind(module)
        if kind is not None:
            out[name] = kind
    return out


def _replacement(block: nn.Module) -> nn.Module:
    """What is left of ``block`` without its residual branch (module docstring)."""
    if isinstance(block, CifarBasicBlock):
        if isinstance(block.shortcut, nn.Identity):
            return nn.ReLU()
        return nn.Sequential(OrderedDict(shortcut=block.shortcut, relu=nn.ReLU()))
    if isinstance(block, _PreActBlock):
        if block.shortcut is None:
            return nn.Identity()
        return nn.Sequential(OrderedDict(bn1=block.bn1, relu=nn.ReLU(), shortcut=block.shortcut))
    if block.downsample is None:  # torchvision
        return nn.ReLU()
    return nn.Sequential(OrderedDict(downsample=block.downsample, relu=nn.ReLU()))


def remove_blocks(model: nn.Module, block_names: Iterable[str]) -> nn.Module:
    """A deep copy of ``model`` in which each named residual block is replaced by its
    shortcut (see the module docstring); ``model`` is untouched and keeps its mode.

    Raises ConfigError (one line listing the removable blocks) for a name that is not a
    block of :func:`residual_blocks`.
    """
    names = list(dict.fromkeys(block_names))
    blocks = residual_blocks(model)
    unknown = [n for n in names if n not in blocks]
    if unknown:
        raise ConfigError(
            f"remove_blocks: '{unknown[0]}' is not a removable residual block of "
            f"{type(model).__name__}; choose from {', '.join(blocks) or 'none'}"
        )
    out = copy.deepcopy(model)
    for name in names:
        block = out.get_submodule(name)
        replacement = _replacement(block)
        replacement.train(block.training)
        parent_name, _, child = name.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        setattr(parent, child, replacement)
    return out
