"""Physical compaction: a smaller dense model without the channels that masks prune whole.

The channels are removed with Torch-Pruning (Fang et al. 2023, "DepGraph: Towards Any
Structural Pruning", CVPR): one ``DependencyGraph.get_pruning_group(...).prune()`` per channel
group, which slices every coupled tensor (producer rows and biases, BatchNorm entries and
running statistics, consumer columns, through residual additions, reshapes and
concatenations). What this module adds is exactness with respect to the masked model.

**Constants of removed channels.** Masking a filter does not silence its channel: the masked
model still adds the producer's bias and the BatchNorm shift, ``beta - gamma * mu /
sqrt(var + eps)`` in eval mode, so after the activation a removed channel carries a constant
``c`` (the same for every input and position), and the next layer reads it. Removing the
channel drops that constant. Compaction therefore folds it into the consumer: with ``Z`` the
consumer's input holding only the removed channels at their constants, its output gains
``f(Z)`` (its weights applied to ``Z`` without bias), computed in float64 before the columns
are removed:

- for a Linear consumer, and for a convolution whose ``f(Z)`` is the same at every output
  position (no zero padding, or ``c = 0``), ``f(Z)`` is added to the consumer's bias (a bias
  is created where the layer had none);
- for a zero-padded convolution (3x3 with padding 1: VGG, ResNet), ``f(Z)`` differs at the
  border, where the kernel overlaps the padding. With ``bias_maps=True`` (default) the
  convolution becomes a :class:`BiasMapConv2d` (``Conv1d``/``Conv3d`` likewise): the same
  layer plus a fixed per-position buffer ``bias_map`` of shape ``(C_out, *spatial_out)``, so
  the compacted model is exact but accepts only inputs of ``input_shape``. With
  ``bias_maps=False`` such channels are kept instead (their weights stay zero), and the result
  holds only standard layers; channels whose constant is 0 (e.g. a zero BatchNorm shift, or
  a negative one before a ReLU) are always removed.

The constants are read from a forward pass of the masked model: compaction checks that each
removed channel really is constant at its consumers, and, after removal, that the compacted
model's outputs match the masked model's; either failure (a coupling the graph got wrong)
raises :class:`~prunelab.errors.ConfigError`. Equality holds in eval mode (BatchNorm with
running statistics), which is the mode the compacted model is returned in.

Two further rules: a group whose channels are all removable keeps one (its lowest index),
so that no layer is left with zero channels; and only whole channels are removed, so
unstructured zeros inside the kept channels stay in the dense weights.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from prunelab.errors import ConfigError
from prunelab.models.base import check_input_shape
from prunelab.structured.groups import (
    CONV_TYPES,
    build_graph,
    example_input,
    graph_groups,
    removable_channels,
    run_named,
)

CALLER = "compact"
MISCOUPLED = (
    "Torch-Pruning's dependency graph mis-couples this model's channels (an op it treats as "
    "element-wise changes or mixes channels); keep those channels dense"
)
CHECK_RTOL = 1e-4  # the post-compaction check: max |diff| <= CHECK_RTOL * max(1, max |y|)


class BiasMapConv1d(nn.Conv1d):
    """``nn.Conv1d`` plus a fixed additive buffer ``bias_map`` of shape ``(C_out, L_out)``:
    the folded contribution of removed constant channels through zero padding."""

    bias_map: torch.Tensor

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return super().forward(input) + self.bias_map


class BiasMapConv2d(nn.Conv2d):
    """``nn.Conv2d`` plus a fixed additive buffer ``bias_map`` of shape ``(C_out, H_out,
    W_out)``: the folded contribution of removed constant channels through zero padding."""

    bias_map: torch.Tensor

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return super().forward(input) + self.bias_map


class BiasMapConv3d(nn.Conv3d):
    """``nn.Conv3d`` plus a fixed additive buffer ``bias_map`` of shape ``(C_out, D_out,
    H_out, W_out)``: the folded contribution of removed constant channels."""

    bias_map: torch.Tensor

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return super().forward(input) + self.bias_map


_BIAS_MAP_TYPES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: BiasMapConv1d,
    nn.Conv2d: BiasMapConv2d,
    nn.Conv3d: BiasMapConv3d,
}


@dataclass(frozen=True)
class LayerChannels:
    """Input and output channels (features) of one Conv/Linear layer before and after."""

    in_before: int
    in_after: int
    out_before: int
    out_after: int

    @property
    def changed(self) -> bool:
        return self.in_before != self.in_after or self.out_before != self.out_after


@dataclass(frozen=True)
class CompactionReport:
    """What :func:`compact_with_report` removed.

    ``layers``: every Conv/Linear layer of the model, by qualified name, with its channels
    before and after; ``removed``: per channel group (by root), the channels removed;
    ``kept``: per group, removable channels that were kept (the one channel a fully removable
    group keeps, and, with ``bias_maps=False``, channels whose constant reaches a zero-padded
    convolution); ``folded``: layers whose bias absorbed the constants of removed channels;
    ``bias_maps``: layers that became ``BiasMapConv*d``; ``params_before``/``params_after``:
    parameter counts; ``max_abs_diff``: max |compacted - masked| on the check batch (``None``
    without the check); ``blocks_removed``: the residual blocks removed whole
    (:func:`prunelab.structured.compact_with_blocks`; :func:`compact_with_report` removes
    none), whose internal channels ``removed`` then lists too.
    """

    layers: dict[str, LayerChannels]
    removed: dict[str, tuple[int, ...]]
    kept: dict[str, tuple[int, ...]] = field(default_factory=dict)
    folded: tuple[str, ...] = ()
    bias_maps: tuple[str, ...] = ()
    params_before: int = 0
    params_after: int = 0
    max_abs_diff: float | None = None
    blocks_removed: list[str] = field(default_factory=list)

    @property
    def channels_removed(self) -> int:
        """Total number of channels removed over all groups (those inside the branches of
        removed blocks included)."""
        return sum(len(v) for v in self.removed.values())

    @property
    def changed(self) -> bool:
        """True when compaction removed anything: a channel or a whole block."""
        return bool(self.blocks_removed) or self.channels_removed > 0

    def table(self) -> str:
        """The changed layers, one line each: ``name  in a -> b  out c -> d``."""
        rows = [(n, c) for n, c in self.layers.items() if c.changed]
        width = max((len(n) for n, _ in rows), default=5)
        lines = [f"{'layer':<{width}}  {'in':>13}  {'out':>13}"]
        for name, c in rows:
            lines.append(
                f"{name:<{width}}  {c.in_before:>5} -> {c.in_after:<5}  "
                f"{c.out_before:>5} -> {c.out_after:<5}"
            )
        if self.blocks_removed:
            lines.append(f"blocks removed: {', '.join(self.blocks_removed)}")
        lines.append(f"parameters {self.params_before} -> {self.params_after}")
        return "\n".join(lines)


# -- helpers -----------------------------------------------------------------------------------


def _check_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        if name not in params:
            raise ConfigError(f"{CALLER}: masks name '{name}', which is not a model parameter")
        if tuple(mask.shape) != tuple(params[name].shape):
            raise ConfigError(
                f"{CALLER}: mask '{name}' has shape {tuple(mask.shape)}, the parameter "
                f"{tuple(params[name].shape)}"
            )


def _layer_sizes(model: nn.Module) -> dict[str, tuple[int, int]]:
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            out[name] = (m.in_features, m.out_features)
        elif isinstance(m, CONV_TYPES):
            out[name] = (m.in_channels, m.out_channels)
    return out


def _zero_padded(conv: nn.Module) -> bool:
    """True when ``conv`` pads its input with zeros (border outputs see fewer inputs)."""
    if conv.padding_mode != "zeros":
        return False
    if isinstance(conv.padding, str):
        return conv.padding == "same" and any(
            (k - 1) * d > 0 for k, d in zip(conv.kernel_size, conv.dilation, strict=True)
        )
    return any(p > 0 for p in conv.padding)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _with_bias_map(conv: nn.Module, bias_map: torch.Tensor) -> nn.Module:
    """A ``BiasMapConv*d`` with ``conv``'s configuration, weights and ``bias_map``."""
    cls = _BIAS_MAP_TYPES[type(conv)]
    new = cls(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    new.load_state_dict(conv.state_dict())
    new.register_buffer("bias_map", bias_map.to(device=conv.weight.device, dtype=conv.weight.dtype))
    new.train(conv.training)
    return new


def _tensors(out: object) -> list[torch.Tensor]:
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


class _InputCapture:
    """Forward hooks that keep the given input positions of consumer layers."""

    def __init__(self, model: nn.Module, positions: Mapping[str, list[int]]) -> None:
        self.values: dict[str, torch.Tensor] = {}
        self.calls: dict[str, int] = {}
        self.handles = []
        for name, pos in positions.items():
            module = model.get_submodule(name)
            index = torch.tensor(pos, dtype=torch.long)
            self.handles.append(module.register_forward_hook(self._hook(name, module, index)))

    def _hook(self, name: str, module: nn.Module, index: torch.Tensor):
        def hook(mod, inputs, output) -> None:
            x = inputs[0]
            self.calls[name] = self.calls.get(name, 0) + 1
            idx = index.to(x.device)
            self.values[name] = x.index_select(
                x.dim() - 1 if isinstance(mod, nn.Linear) else 1, idx
            )

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _constants(module: nn.Module, values: torch.Tensor, name: str, groups: str) -> torch.Tensor:
    """Per captured position, the constant value; ConfigError if it varies."""
    if isinstance(module, nn.Linear):
        flat = values.reshape(-1, values.shape[-1])
        const = flat[0]
        dev = (flat - const).abs().max() if flat.numel() else torch.tensor(0.0)
    else:
        flat = values.flatten(2)  # (N, P, positions)
        const = flat[0, :, 0]
        dev = (flat - const[None, :, None]).abs().max() if flat.numel() else torch.tensor(0.0)
    tol = 1e-6 * (1.0 + float(const.abs().max())) if const.numel() else 0.0
    if float(dev) > tol:
        raise ConfigError(
            f"{CALLER}: channels to be removed from the input of layer '{name}' (group "
            f"{groups}) vary with the input in the masked model (by {float(dev):.2e}), so "
            "the dependency graph misses a coupling of this model (an op Torch-Pruning treats "
            "as element-wise mixes or pads channels); keep those channels"
        )
    return const


def _contribution(module: nn.Module, pos: list[int], const: torch.Tensor, spatial) -> torch.Tensor:
    """The consumer's output gained from input positions ``pos`` held at ``const`` (float64,
    no bias): ``(out,)`` for Linear, ``(out, *spatial_out)`` for a convolution."""
    weight = module.weight.detach().double()
    const = const.detach().double().to(weight.device)
    index = torch.tensor(pos, dtype=torch.long, device=weight.device)
    if isinstance(module, nn.Linear):
        return weight.index_select(1, index) @ const
    z = torch.zeros((1, module.in_channels, *spatial), dtype=torch.float64, device=weight.device)
    view = (-1,) + (1,) * len(spatial)
    z[0].index_copy_(0, index, const.view(view).expand(len(pos), *spatial).contiguous())
    return module._conv_forward(z, weight, None)[0]


# -- compaction --------------------------------------------------------------------------------


def compact_with_report(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    input_shape: Sequence[int],
    *,
    bias_maps: bool = True,
    check: bool = True,
) -> tuple[nn.Module, CompactionReport]:
    """:func:`compact` plus a :class:`CompactionReport` of what was removed."""
    shape = check_input_shape(input_shape, CALLER)
    _check_masks(model, masks)
    net = copy.deepcopy(model)
    params = dict(net.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(mask.to(device=params[name].device, dtype=params[name].dtype))
    net.eval()
    params_before = sum(p.numel() for p in net.parameters())
    sizes_before = _layer_sizes(net)
    graph = build_graph(net, shape, CALLER)
    groups = graph_groups(net, graph, CALLER)
    removable = removable_channels(net, groups, masks)

    chosen: dict[str, set[int]] = {}
    kept: dict[str, set[int]] = {}
    for g in groups:
        chans = set(torch.nonzero(removable[g.root]).flatten().tolist())
        if len(chans) == g.size:
            keep = min(chans)
            chans.discard(keep)
            kept.setdefault(g.root, set()).add(keep)
        if chans:
            chosen[g.root] = chans
    by_root = {g.root: g for g in groups}

    # The inputs of every consumer at the positions of candidate channels, from one forward
    # pass of the masked model, which also gives the reference output of the check.
    def consumer_positions() -> dict[str, list[tuple[int, str, int]]]:
        out: dict[str, list[tuple[int, str, int]]] = {}
        for root, chans in chosen.items():
            for sl in by_root[root].slices:
                if sl.role != "in":
                    continue
                for i, c in zip(sl.index, sl.channel, strict=True):
                    if c in chans:
                        out.setdefault(sl.module, []).append((i, root, c))
        return {k: sorted(v) for k, v in out.items()}

    candidates = consumer_positions()
    capture = _InputCapture(net, {n: [p for p, _, _ in v] for n, v in candidates.items()})
    x_check = example_input(net, shape, batch=2, seed=1)
    try:
        with torch.no_grad():
            reference = _tensors(run_named(net, x_check, CALLER))
    finally:
        capture.remove()
    constants: dict[str, dict[int, float]] = {}
    spatial_in: dict[str, tuple[int, ...]] = {}
    for name, entries in candidates.items():
        module = net.get_submodule(name)
        if capture.calls.get(name, 0) != 1:
            raise ConfigError(
                f"{CALLER}: layer '{name}' runs {capture.calls.get(name, 0)} times per forward "
                "pass; compaction needs each layer that reads removed channels to run once"
            )
        roots = ", ".join(sorted({r for _, r, _ in entries}))
        const = _constants(module, capture.values[name], name, roots).double().cpu()
        constants[name] = {p: float(v) for (p, _, _), v in zip(entries, const, strict=True)}
        if not isinstance(module, nn.Linear):
            spatial_in[name] = tuple(capture.values[name].shape[2:])

    if not bias_maps:  # keep channels whose constant would reach a zero-padded convolution
        for name, entries in candidates.items():
            module = net.get_submodule(name)
            if isinstance(module, nn.Linear) or not _zero_padded(module):
                continue
            w = module.weight.detach()
            for p, root, c in entries:
                live = constants[name][p] != 0.0 and bool(w[:, p].any())
                if live and c in chosen.get(root, set()):
                    chosen[root].discard(c)
                    kept.setdefault(root, set()).add(c)
        chosen = {r: c for r, c in chosen.items() if c}
        candidates = consumer_positions()

    contributions: dict[str, torch.Tensor] = {}
    for name, entries in candidates.items():
        module = net.get_submodule(name)
        pos = [p for p, _, _ in entries]
        const = torch.tensor([constants[name][p] for p in pos], dtype=torch.float64)
        if not bool(const.any()):
            continue
        contributions[name] = _contribution(module, pos, const, spatial_in.get(name, ()))

    # Removed output positions of every layer (to index the folded contributions after).
    removed_out: dict[str, set[int]] = {}
    for root, chans in chosen.items():
        for sl in by_root[root].slices:
            if sl.role == "out" and sl.name.endswith("weight"):
                removed_out.setdefault(sl.module, set()).update(sl.positions(chans))

    for root, chans in chosen.items():
        module = net.get_submodule(root)
        pruner = graph.get_pruner_of_module(module)
        graph.get_pruning_group(module, pruner.prune_out_channels, sorted(chans)).prune()

    folded, mapped = [], []
    with torch.no_grad():
        for name, contribution in contributions.items():
            module = net.get_submodule(name)
            out_before = sizes_before[name][1]
            gone = removed_out.get(name, set())
            keep = torch.tensor([i for i in range(out_before) if i not in gone], dtype=torch.long)
            contribution = contribution.index_select(0, keep.to(contribution.device))
            flat = contribution.reshape(contribution.shape[0], -1)
            spread = float((flat - flat[:, :1]).abs().max()) if flat.numel() else 0.0
            if spread <= 1e-9 * (1.0 + float(flat.abs().max())):
                value = flat.mean(dim=1).to(device=module.weight.device, dtype=module.weight.dtype)
                if module.bias is None:
                    module.bias = nn.Parameter(torch.zeros_like(value))
                module.bias.add_(value)
                folded.append(name)
            else:
                _set_submodule(net, name, _with_bias_map(module, contribution))
                mapped.append(name)

    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    for name, p in net.named_parameters():  # the library re-creates the parameters it slices
        p.requires_grad_(name not in frozen)
    max_diff = None
    if check:
        with torch.no_grad():
            result = _tensors(run_named(net, x_check, CALLER, MISCOUPLED))
        max_diff = _check_equal(reference, result)
    sizes_after = _layer_sizes(net)
    layers = {
        n: LayerChannels(b[0], sizes_after[n][0], b[1], sizes_after[n][1])
        for n, b in sizes_before.items()
        if n in sizes_after
    }
    report = CompactionReport(
        layers=layers,
        removed={r: tuple(sorted(c)) for r, c in chosen.items()},
        kept={r: tuple(sorted(c)) for r, c in kept.items()},
        folded=tuple(folded),
        bias_maps=tuple(mapped),
        params_before=params_before,
        params_after=sum(p.numel() for p in net.parameters()),
        max_abs_diff=max_diff,
    )
    return net.eval(), report


def _check_equal(reference: list[torch.Tensor], result: list[torch.Tensor]) -> float:
    if len(reference) != len(result) or any(
        a.shape != b.shape for a, b in zip(reference, result, strict=True)
    ):
        raise ConfigError(
            f"{CALLER}: the compacted model returns outputs of shapes "
            f"{[tuple(t.shape) for t in result]}, the masked model "
            f"{[tuple(t.shape) for t in reference]}; {MISCOUPLED}"
        )
    diff = max(
        (float((a - b).abs().max()) for a, b in zip(reference, result, strict=True)), default=0.0
    )
    scale = max([1.0, *(float(a.abs().max()) for a in reference if a.numel())])
    if not diff <= CHECK_RTOL * scale:
        raise ConfigError(
            f"{CALLER}: the compacted model's outputs differ from the masked model's by "
            f"{diff:.2e} (max abs, outputs up to {scale:.2e}); {MISCOUPLED}"
        )
    return diff


def compact(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    input_shape: Sequence[int],
    *,
    bias_maps: bool = True,
    check: bool = True,
) -> nn.Module:
    """A physically smaller copy of ``model`` (in eval mode; ``model`` is untouched) without
    the channels/neurons that ``masks`` prune whole, computing what the masked model computes.

    ``masks`` (a :class:`~prunelab.sparsity.masks.Masks` or any ``name -> bool tensor``
    mapping over parameters) is applied to the copy first; a channel is removed when its
    output row/filter is all False in every producer of its channel group
    (:func:`~prunelab.structured.removable_channels`), with every coupled tensor, by
    Torch-Pruning (Fang et al. 2023, "DepGraph: Towards Any Structural Pruning", CVPR). The
    constant a removed channel still contributes in the masked model (its bias and BatchNorm
    shift after the activation) is folded into the consumers' biases, or into a per-position
    ``bias_map`` of a zero-padded convolution (``bias_maps=True``, exact only for inputs of
    ``input_shape``); with ``bias_maps=False`` such channels are kept (see the module
    docstring). With ``check=True`` the outputs on a seeded batch of two are compared with
    the masked model's and a difference above ``1e-4 * max(1, max |y|)`` raises ConfigError.
    See :func:`compact_with_report` for the per-layer record.
    """
    net, _ = compact_with_report(model, masks, input_shape, bias_maps=bias_maps, check=check)
    return net


__all__ = [
    "BiasMapConv1d",
    "BiasMapConv2d",
    "BiasMapConv3d",
    "CompactionReport",
    "LayerChannels",
    "compact",
    "compact_with_report",
]
