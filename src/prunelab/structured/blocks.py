"""Removing whole residual blocks: each is replaced by its shortcut.

A residual block computes ``y = post(branch(x) + shortcut(x))``. Removing it keeps what the
block computes when its residual branch is silenced, as in the layer-dropping view of
residual networks (Veit et al. 2016, "Residual networks behave like ensembles of relatively
shallow networks"; Huang et al. 2016, "Deep networks with stochastic depth"). Every block of
the supported models can be removed:

- an **identity** shortcut leaves ``post`` alone: ``nn.ReLU()`` for the post-activation blocks
  of :class:`~prunelab.models.CifarResNet` and torchvision's ResNets (the block ends with a
  ReLU after the sum), and ``nn.Identity()`` for the pre-activation blocks of
  :class:`~prunelab.models.WideResNet`;
- a **projection** shortcut (where the block changes the number of channels or the
  resolution) is kept with what it reads: the 1x1 conv + BatchNorm (CIFAR ResNet option B,
  torchvision's ``downsample``) then the ReLU; for a pre-activation block, the block's own
  ``bn1`` and ReLU (its shortcut reads the pre-activated input) then the 1x1 conv;
- a **zero-pad** shortcut (CIFAR ResNet option A: subsample and pad channels with zeros) is
  kept, then the ReLU.

**The constant of a masked branch.** A branch whose weights are all masked (as
:class:`~prunelab.methods.block.BlockPruning` removes blocks) does not output zero: in eval
mode its last BatchNorm reads zeros and outputs its shift ``beta - gamma * mu / sqrt(var +
eps)`` (CIFAR ResNet and torchvision blocks), and a pre-activation branch outputs the bias of
its last convolution (none, so zero, in WRN). With ``exact=True`` (default)
:func:`remove_blocks` computes that per-channel constant ``c`` in float64 from the block's
own modules in eval mode (the branch of a copy with its Conv/Linear weights zeroed, run on a
random input; a result that varies over samples or positions, e.g. a ``BiasMapConv2d`` in the
branch, is a ConfigError) and keeps it as a :class:`ChannelBias` named ``shift`` between the
shortcut and ``post``: ``y = post(shortcut(x) + c)``. The result then equals the masked model
in eval mode (BatchNorm with running statistics). In train mode the masked branch's last
BatchNorm normalises with batch statistics and outputs ``beta`` instead. A constant that is
exactly zero adds no module. With ``exact=False`` the constant is dropped, ``y =
post(shortcut(x))``: the model whose branches output zero, in train and eval mode alike.

The replacement is an ``nn.Sequential`` whose children keep the block's attribute names
(``shortcut``, ``downsample``, ``bn1``), so the surviving parameters keep their qualified
names (``layer2.0.shortcut.0.weight``), and the model stays traceable by
:func:`prunelab.structured.channel_groups`: the bias of a :class:`ChannelBias` is a
one-dimensional parameter that Torch-Pruning slices with the channels it is added to, so a
later channel compaction can still remove those channels.

:func:`compact_with_blocks` combines both kinds of compaction: it removes the blocks whose
branch ``masks`` prune whole (:func:`masked_blocks`), then the channels the remaining masks
prune whole (:func:`prunelab.structured.compact_with_report`), and checks the result against
the masked model.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from prunelab.errors import ConfigError
from prunelab.models.base import check_input_shape
from prunelab.models.resnet_cifar import BasicBlock as CifarBasicBlock
from prunelab.models.resnet_cifar import _PadShortcut
from prunelab.models.wrn import _PreActBlock
from prunelab.structured.compaction import (
    CALLER,
    CHECK_RTOL,
    CompactionReport,
    LayerChannels,
    _check_masks,
    _layer_sizes,
    _tensors,
    compact_with_report,
)
from prunelab.structured.groups import LAYER_TYPES, example_input, run_named

SHORTCUT_KINDS = ("identity", "projection", "zero_pad")
SHORTCUT_MODULES = ("shortcut", "downsample")
"""Children of a block that belong to its shortcut; everything else is its residual branch."""


class ChannelBias(nn.Module):
    """Adds a per-channel constant: ``x + bias`` along dimension 1 (``bias`` of shape
    ``(C,)``, broadcast over the batch and any spatial dimensions). It holds the constant
    output of a removed block's masked residual branch (module docstring)."""

    def __init__(self, bias: torch.Tensor) -> None:
        super().__init__()
        self.bias = nn.Parameter(bias.detach().clone().flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias
        for _ in range(x.dim() - 2):
            bias = bias.unsqueeze(-1)
        return x + bias

    def extra_repr(self) -> str:
        return f"{self.bias.numel()}"


def _torchvision_blocks() -> tuple[type, ...]:
    """torchvision's ResNet block classes, or none when torchvision's ResNet module has not
    been imported (then no model can hold them; importing it would cost start-up time)."""
    resnet = sys.modules.get("torchvision.models.resnet")
    return (resnet.BasicBlock, resnet.Bottleneck) if resnet is not None else ()


def _shortcut_kind(block: nn.Module) -> str | None:
    """The block's shortcut kind, or ``None`` when ``block`` is not a supported block."""
    if isinstance(block, CifarBasicBlock):
        if isinstance(block.shortcut, nn.Identity):
            return "identity"
        return "zero_pad" if isinstance(block.shortcut, _PadShortcut) else "projection"
    if isinstance(block, _PreActBlock):
        return "identity" if block.shortcut is None else "projection"
    if isinstance(block, _torchvision_blocks()):
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


def branch_parameters(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, list[str]]:
    """``{block: parameter names of its residual branch}`` for the blocks of
    :func:`residual_blocks`, in module order: the names among ``names`` (default: the
    model's :func:`~prunelab.models.prunable_parameters`) inside the block and outside its
    shortcut (its ``shortcut``/``downsample`` children). Blocks without any are left out."""
    if names is None:
        from prunelab.models import prunable_parameters

        names = prunable_parameters(model)
    names = list(names)
    out: dict[str, list[str]] = {}
    for block in residual_blocks(model):
        prefix = f"{block}." if block else ""
        skip = tuple(f"{prefix}{m}." for m in SHORTCUT_MODULES)
        branch = [n for n in names if n.startswith(prefix) and not n.startswith(skip)]
        if branch:
            out[block] = branch
    return out


def masked_blocks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> list[str]:
    """The blocks of :func:`residual_blocks` whose residual branch ``masks`` prune whole:
    every Conv/Linear weight of the branch (:func:`branch_parameters`) has a mask, all False."""
    weights = [
        f"{n}.weight" if n else "weight"
        for n, m in model.named_modules()
        if isinstance(m, LAYER_TYPES)
    ]
    return [
        block
        for block, names in branch_parameters(model, weights).items()
        if all(n in masks and not bool(masks[n].any()) for n in names)
    ]


def _branch_layers(block: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(relative name, module)`` of the Conv/Linear layers of the block's branch."""
    return [
        (name, m)
        for name, m in block.named_modules()
        if isinstance(m, LAYER_TYPES) and name.split(".")[0] not in SHORTCUT_MODULES
    ]


def _branch(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The residual branch of a supported block (as its ``forward`` computes it)."""
    tv = _torchvision_blocks()
    if isinstance(block, (CifarBasicBlock, *tv[:1])):
        return block.bn2(block.conv2(F.relu(block.bn1(block.conv1(x)))))
    if isinstance(block, tv[1:]):
        out = F.relu(block.bn1(block.conv1(x)))
        out = F.relu(block.bn2(block.conv2(out)))
        return block.bn3(block.conv3(out))
    pre = F.relu(block.bn1(x))  # pre-activation block
    return block.conv2(block.dropout(F.relu(block.bn2(block.conv1(pre)))))


def branch_constant(block: nn.Module, name: str = "block") -> torch.Tensor:
    """The per-channel output (float64, shape ``(C,)``) of ``block``'s residual branch with
    its Conv/Linear weights zeroed, in eval mode (module docstring); ``block`` is untouched.
    Raises ConfigError when that output is not one constant per channel."""
    net = copy.deepcopy(block).to(torch.float64).eval()
    with torch.no_grad():
        for _, layer in _branch_layers(net):
            layer.weight.zero_()
        first = _branch_layers(net)[0][1]
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2, first.in_channels, 8, 8, generator=gen, dtype=torch.float64)
        try:
            out = _branch(net, x.to(first.weight.device))
        except Exception as err:  # noqa: BLE001 - any failure is the same user error
            lines = str(err).strip().splitlines()
            raise ConfigError(
                f"remove_blocks: the residual branch of '{name}' failed on a probe input: "
                f"{lines[0][:200] if lines else type(err).__name__}; use exact=False"
            ) from None
    flat = out.flatten(2)
    const = flat[0, :, 0]
    dev = float((flat - const[None, :, None]).abs().max())
    if dev > 1e-9 * (1.0 + float(const.abs().max())):
        raise ConfigError(
            f"remove_blocks: the masked residual branch of '{name}' does not output one "
            f"constant per channel (it varies by {dev:.2e}), so the block cannot be replaced "
            "exactly by its shortcut plus a bias; use exact=False"
        )
    return const.cpu()


def _replacement(block: nn.Module, shift: ChannelBias | None) -> nn.Module:
    """What is left of ``block`` without its residual branch (module docstring)."""
    parts: OrderedDict[str, nn.Module] = OrderedDict()
    if isinstance(block, CifarBasicBlock):
        if not isinstance(block.shortcut, nn.Identity):
            parts["shortcut"] = block.shortcut
        post: nn.Module | None = nn.ReLU()
    elif isinstance(block, _PreActBlock):
        if block.shortcut is not None:
            parts.update(bn1=block.bn1, relu=nn.ReLU(), shortcut=block.shortcut)
        post = None
    else:  # torchvision
        if block.downsample is not None:
            parts["downsample"] = block.downsample
        post = nn.ReLU()
    if shift is not None:
        parts["shift"] = shift
    if post is not None:
        if not parts:
            return post
        parts["relu"] = post
    return nn.Sequential(parts) if parts else nn.Identity()


def remove_blocks(model: nn.Module, block_names: Iterable[str], *, exact: bool = True) -> nn.Module:
    """A deep copy of ``model`` in which each named residual block is replaced by its
    shortcut (see the module docstring); ``model`` is untouched and keeps its mode.

    With ``exact=True`` the constant output of the block's masked branch is kept as a
    :class:`ChannelBias`, so the result equals the model with those branches' weights
    masked, in eval mode; with ``exact=False`` it is dropped. Raises ConfigError (one line
    listing the removable blocks) for a name that is not a block of :func:`residual_blocks`,
    and (one line) when a branch's constant cannot be computed.
    """
    names = list(dict.fromkeys(block_names))
    blocks = residual_blocks(model)
    unknown = [n for n in names if n not in blocks]
    if unknown:
        raise ConfigError(
            f"remove_blocks: '{unknown[0]}' is not a removable residual block of "
            f"{type(model).__name__}; choose from {', '.join(blocks) or 'none'}"
        )
    shifts: dict[str, ChannelBias | None] = {}
    for name in names:
        shift = None
        if exact:
            block = model.get_submodule(name)
            const = branch_constant(block, name)
            if bool(const.any()):
                ref = next(iter(block.parameters()))
                shift = ChannelBias(const.to(device=ref.device, dtype=ref.dtype))
                shift.bias.requires_grad_(ref.requires_grad)
        shifts[name] = shift
    out = copy.deepcopy(model)
    for name in names:
        block = out.get_submodule(name)
        replacement = _replacement(block, shifts[name])
        replacement.train(block.training)
        parent_name, _, child = name.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        setattr(parent, child, replacement)
    return out


def compact_with_blocks(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    input_shape: Sequence[int],
    *,
    bias_maps: bool = True,
    check: bool = True,
) -> tuple[nn.Module, CompactionReport]:
    """:func:`~prunelab.structured.compact_with_report` that also removes whole blocks: the
    residual blocks whose branch ``masks`` prune whole (:func:`masked_blocks`) are replaced
    by their shortcut plus the branch's constant (:func:`remove_blocks`, ``exact=True``),
    their masks dropped, then the channels the other masks prune whole are removed from the
    result (the surviving parameters keep their names). Without such blocks this is
    :func:`~prunelab.structured.compact_with_report` itself.

    The report's ``blocks_removed`` names the removed blocks; ``layers`` lists their layers
    with 0 channels after; ``removed`` also holds, under each of their branch layers but the
    last, all its output channels (the channels internal to the branch), so
    ``channels_removed`` counts them; ``params_before`` is ``model``'s count. With
    ``check=True`` the result is compared with the masked ``model`` on a seeded batch of two
    in eval mode (``max_abs_diff``) and a difference above ``1e-4 * max(1, max |y|)`` raises
    ConfigError.
    """
    blocks = masked_blocks(model, masks)
    if not blocks:
        return compact_with_report(model, masks, input_shape, bias_maps=bias_maps, check=check)
    shape = check_input_shape(input_shape, CALLER)
    _check_masks(model, masks)
    reduced = remove_blocks(model, blocks, exact=True)
    kept = set(dict(reduced.named_parameters()))
    rest = {n: m for n, m in masks.items() if n in kept}
    net, report = compact_with_report(reduced, rest, shape, bias_maps=bias_maps, check=check)

    max_diff = report.max_abs_diff
    if check:
        max_diff = _check_against_masked(model, masks, net, shape)
    sizes = _layer_sizes(model)
    layers = {
        n: report.layers.get(n) or LayerChannels(size[0], 0, size[1], 0)
        for n, size in sizes.items()
    }
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    removed = dict(report.removed)
    for block in blocks:
        inner = _branch_layers(model.get_submodule(block))[:-1]
        for rel, layer in inner:
            count = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
            removed[f"{block}.{rel}"] = tuple(range(count))
    removed = dict(sorted(removed.items(), key=lambda kv: order.get(kv[0], len(order))))
    return net, dataclasses.replace(
        report,
        layers=layers,
        removed=removed,
        params_before=sum(p.numel() for p in model.parameters()),
        max_abs_diff=max_diff,
        blocks_removed=list(blocks),
    )


def _check_against_masked(
    model: nn.Module, masks: Mapping[str, torch.Tensor], net: nn.Module, shape: tuple[int, ...]
) -> float:
    """Max |net - masked model| on a seeded batch of two (eval mode); ConfigError when it
    exceeds ``CHECK_RTOL * max(1, max |y|)``."""
    reference_model = copy.deepcopy(model).eval()
    params = dict(reference_model.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(mask.to(device=params[name].device, dtype=params[name].dtype))
        x = example_input(reference_model, shape, batch=2, seed=1)
        reference = _tensors(run_named(reference_model, x, CALLER))
        result = _tensors(run_named(net, x, CALLER))
    shapes = [tuple(t.shape) for t in reference] != [tuple(t.shape) for t in result]
    diff = (
        float("inf")
        if shapes
        else max(
            (float((a - b).abs().max()) for a, b in zip(reference, result, strict=True)),
            default=0.0,
        )
    )
    scale = max([1.0, *(float(a.abs().max()) for a in reference if a.numel())])
    if not diff <= CHECK_RTOL * scale:
        raise ConfigError(
            f"{CALLER}: the model with its fully masked residual blocks removed differs from "
            f"the masked model by {diff:.2e} (max abs, outputs up to {scale:.2e}); keep those "
            "blocks"
        )
    return diff


__all__ = [
    "SHORTCUT_KINDS",
    "SHORTCUT_MODULES",
    "ChannelBias",
    "branch_constant",
    "branch_parameters",
    "compact_with_blocks",
    "masked_blocks",
    "remove_blocks",
    "residual_blocks",
]
