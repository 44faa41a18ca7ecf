"""Coupled channel groups of a model, found with Torch-Pruning's dependency graph.

A *channel group* is the set of tensor slices that must be removed together when one
output channel (conv filter) or neuron (Linear row) is removed: the rows of every Conv/Linear
layer that produces the channel (several when a residual addition ties the outputs of
different layers), the per-channel entries of the BatchNorm layers that normalise it, and the
input columns of every layer that consumes it (one column per channel, or ``H x W`` columns
for a Linear layer after a ``Flatten``; concatenations shift the positions). The graph is
Torch-Pruning's DepGraph: Fang et al. (2023), "DepGraph: Towards Any Structural Pruning",
CVPR. It is built by tracing one forward pass through autograd, so it follows what the
``forward`` actually computes (additions, concatenations, reshapes) without per-model code.

Channels are numbered by the group's root layer (the first producer in module order), so
channel ``j`` of a group is output ``j`` of its root; the other slices map each of their
positions to a channel (``Slice.channel``). Groups that reach the model's output (the
classifier and anything tied to the logits) are never returned: their channels are the
model's outputs.

Supported layers inside a group: ``nn.Conv1d/2d/3d`` (``groups=1``), ``nn.Linear`` and
``nn.BatchNorm1d/2d/3d``; a group that touches another parametrised layer (LayerNorm,
GroupNorm, grouped or transposed convolutions, attention, ...) raises
:class:`~prunelab.errors.ConfigError`, as does a model the graph cannot trace.
Torch-Pruning treats operations it has no rule for as element-wise (a channel-wise op); an op
that is not (e.g. padding along the channel dimension) can couple channels wrongly: groups
that span only part of a producer's outputs are left out, and
:func:`prunelab.structured.compact` checks its result against the masked model.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from prunelab.errors import ConfigError
from prunelab.models.base import check_input_shape
from prunelab.sparsity.masks import Masks

CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
LAYER_TYPES: tuple[type[nn.Module], ...] = (*CONV_TYPES, nn.Linear)
NORM_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass(frozen=True)
class Slice:
    """One tensor slice of a channel group.

    ``name``: qualified parameter (or buffer, ``buffer=True``) name as in
    ``model.named_parameters()`` / ``named_buffers()``; ``dim``: the dimension the group's
    channels run along; ``index``: the positions along ``dim`` that belong to the group, and
    ``channel``: the group channel of each position (same length). ``role``: ``"out"`` for the
    weight rows/filters and bias entries of a layer that produces the channels, ``"channel"``
    for per-channel entries (BatchNorm affine parameters and running statistics), ``"in"`` for
    the weight columns of a layer that consumes them.
    """

    name: str
    dim: int
    role: str
    index: tuple[int, ...]
    channel: tuple[int, ...]
    buffer: bool = False

    @property
    def module(self) -> str:
        """The qualified name of the module owning the tensor (``''`` for the root)."""
        return self.name.rpartition(".")[0]

    def positions(self, channels: Iterable[int]) -> list[int]:
        """Positions along ``dim`` that belong to the given group channels, in order."""
        wanted = {int(c) for c in channels}
        return [i for i, c in zip(self.index, self.channel, strict=True) if c in wanted]


@dataclass(frozen=True)
class ChannelGroup:
    """The coupled slices that one set of ``size`` channels spans (see the module docstring).

    ``root``: qualified name of the Conv/Linear layer whose output channels number the group
    (its first producer in module order); ``slices``: every parameter and buffer slice the
    group touches.
    """

    root: str
    size: int
    slices: tuple[Slice, ...]

    @property
    def producers(self) -> tuple[str, ...]:
        """Weight names of the Conv/Linear layers whose output rows produce the channels (a
        channel can be removed only when all of them are pruned there), root first."""
        return tuple(s.name for s in self.slices if s.role == "out" and s.name.endswith("weight"))

    @property
    def consumers(self) -> tuple[str, ...]:
        """Weight names of the layers whose input columns read the channels."""
        return tuple(s.name for s in self.slices if s.role == "in")

    @property
    def params(self) -> tuple[tuple[str, int], ...]:
        """``(parameter name, dim)`` of every parameter the group touches (buffers left out)."""
        return tuple((s.name, s.dim) for s in self.slices if not s.buffer)

    @property
    def layers(self) -> tuple[str, ...]:
        """Qualified names of the modules the group touches, in slice order, no repeats."""
        return tuple(dict.fromkeys(s.module for s in self.slices))

    def slice(self, name: str) -> Slice:
        """The slice of parameter or buffer ``name``."""
        for s in self.slices:
            if s.name == name:
                return s
        raise KeyError(f"group '{self.root}' has no slice of '{name}'")

    def positions(self, name: str, channels: Iterable[int]) -> list[int]:
        """Positions along the group's dim of ``name`` that belong to ``channels``."""
        return self.slice(name).positions(channels)


# -- tracing -----------------------------------------------------------------------------------


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def example_input(model: nn.Module, shape: Sequence[int], batch: int = 1, seed: int = 0):
    """A seeded normal batch of ``shape`` samples on the model's device, in its dtype."""
    device, dtype = torch.device("cpu"), torch.float32
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            device, dtype = t.device, t.dtype
            break
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *shape, generator=generator).to(device=device, dtype=dtype)


INPUT_HINT = "pass the per-sample input shape the model was built for"


def run_named(model: nn.Module, x: torch.Tensor, caller: str, hint: str = INPUT_HINT) -> object:
    """``model(x)``; an exception becomes a one-line ConfigError naming the innermost module
    that was running when it was raised, followed by ``hint``."""
    stack: list[str] = []

    def enter(name: str) -> None:
        stack.append(name)

    def leave() -> None:
        if stack:
            stack.pop()

    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(lambda m, a, _n=name: enter(_n)))
        handles.append(module.register_forward_hook(lambda m, a, o: leave()))
    try:
        return model(x)
    except Exception as err:  # noqa: BLE001 - any failure of user code becomes one line
        where = stack[-1] if stack else ""
        module = model.get_submodule(where) if where else model
        label = f"module '{where}' ({type(module).__name__})" if where else "the model's forward"
        raise ConfigError(
            f"{caller}: {label} failed on an input of shape {tuple(x.shape[1:])}: "
            f"{_first_line(err)}; {hint}"
        ) from None
    finally:
        for h in handles:
            h.remove()


def build_graph(model: nn.Module, input_shape: Sequence[int], caller: str) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph of ``model`` traced on one sample (eval mode; every
    module's training flag is restored). Failures become one-line ConfigErrors."""
    shape = check_input_shape(input_shape, caller)
    x = example_input(model, shape)
    modes = {m: m.training for m in model.modules()}
    # Autograd is the tracer: frozen parameters would leave their layers out of the graph.
    frozen = [p for p in model.parameters() if not p.requires_grad]
    model.eval()
    for p in frozen:
        p.requires_grad_(True)
    hooks = {m: set(m._forward_hooks) for m in model.modules()}
    try:
        with torch.no_grad():  # a failing forward, named, before the library adds its hooks
            run_named(model, x, caller)
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                graph = tp.DependencyGraph().build_dependency(
                    model, example_inputs=x, forward_fn=lambda m, inputs: m(inputs), verbose=False
                )
            except Exception as err:  # noqa: BLE001 - the library's failure, in one line
                _drop_new_hooks(hooks)
                raise ConfigError(
                    f"{caller}: Torch-Pruning could not build the dependency graph: "
                    f"{_first_line(err)}; use standard nn.Conv/nn.Linear/nn.BatchNorm modules "
                    "called in forward"
                ) from None
    finally:
        for m, mode in modes.items():
            m.training = mode
        for p in frozen:
            p.requires_grad_(False)
    _check_traced(model, graph, caller)
    return graph


def _drop_new_hooks(before: Mapping[nn.Module, set[int]]) -> None:
    """Remove forward hooks added since ``before`` (the library's tracing hooks stay behind
    when its forward pass raises)."""
    for module, keys in before.items():
        for key in [k for k in module._forward_hooks if k not in keys]:
            del module._forward_hooks[key]
            module._forward_hooks_with_kwargs.pop(key, None)
            module._forward_hooks_always_called.pop(key, None)


def _check_traced(model: nn.Module, graph: tp.DependencyGraph, caller: str) -> None:
    from prunelab.models import prunable_parameters

    for p, _dim in graph.unwrapped_parameters:
        if sum(1 for s in p.shape if s > 1) > 1:
            name = graph._param_to_name.get(p, "?")
            raise ConfigError(
                f"{caller}: parameter '{name}' of shape {tuple(p.shape)} is used outside an "
                "nn.Conv/nn.Linear/nn.BatchNorm module (a functional call), so the dependency "
                "graph cannot tell which dimension follows the channels; compute it with a "
                "standard layer module"
            )
    owners = dict(model.named_modules())
    for name in prunable_parameters(model):
        module_name = name.rpartition(".")[0]
        module = owners.get(module_name)
        if isinstance(module, LAYER_TYPES) and module not in graph.module2node:
            raise ConfigError(
                f"{caller}: layer '{module_name}' ({type(module).__name__}) is not in the "
                "dependency graph: its output does not reach the model's output through "
                "autograd (unused, detached, computed under no_grad, or its weight used by a "
                "functional call); call the module in forward, or leave its weight out of "
                "prunable_parameters()"
            )


# -- groups ------------------------------------------------------------------------------------


def _item_slices(
    graph: tp.DependencyGraph, dep, idxs: list[int], channels: list[int], names: dict, caller: str
) -> list[Slice]:
    """The parameter/buffer slices of one Torch-Pruning group item."""
    target = dep.target.module
    if isinstance(target, nn.Parameter):
        name = graph._param_to_name.get(target, "?")
        return [Slice(name, dep.target.pruning_dim, "channel", tuple(idxs), tuple(channels))]
    name = names.get(target)
    if name is None:  # one of Torch-Pruning's own op nodes (add, reshape, concat, ...)
        return []
    prefix = f"{name}." if name else ""
    index, chans = tuple(idxs), tuple(channels)
    is_out = graph.is_out_channel_pruning_fn(dep.handler)
    if isinstance(target, LAYER_TYPES):
        if isinstance(target, CONV_TYPES) and target.groups != 1:
            raise ConfigError(
                f"{caller}: layer '{name}' is a grouped convolution (groups={target.groups}); "
                "structured compaction supports only groups=1 convolutions"
            )
        if is_out:
            out = [Slice(f"{prefix}weight", 0, "out", index, chans)]
            if target.bias is not None:
                out.append(Slice(f"{prefix}bias", 0, "out", index, chans))
            return out
        return [Slice(f"{prefix}weight", 1, "in", index, chans)]
    if isinstance(target, NORM_TYPES):
        out = []
        if target.affine:
            out += [Slice(f"{prefix}{p}", 0, "channel", index, chans) for p in ("weight", "bias")]
        if target.track_running_stats and target.running_mean is not None:
            out += [
                Slice(f"{prefix}{b}", 0, "channel", index, chans, buffer=True)
                for b in ("running_mean", "running_var")
            ]
        return out
    if any(True for _ in target.parameters(recurse=False)) or any(
        True for _ in target.buffers(recurse=False)
    ):
        raise ConfigError(
            f"{caller}: layer '{name}' ({type(target).__name__}) is coupled to the channels "
            "of a Conv/Linear layer, but structured compaction supports only Conv, Linear and "
            "BatchNorm layers there; replace it or keep that layer dense"
        )
    return []


def _reaches_output(graph: tp.DependencyGraph, group) -> bool:
    """True when the group changes the outputs of a node with no successor (the model's
    output); a layer that only reads the channels (the classifier's inputs) does not count."""
    return any(
        graph.is_out_channel_pruning_fn(item.dep.handler) and not item.dep.target.outputs
        for item in group
    )


def _meets_constant(group) -> bool:
    """True when an element-wise op of the group (an addition, a product) also reads a tensor
    outside the graph: the model's input (``x + f(x)``) or a buffer. That tensor's channels
    cannot be removed, so neither can the group's."""
    for item in group:
        node = item.dep.target
        if node.type != tp.ops.OPTYPE.ELEMENTWISE or node.grad_fn is None:
            continue
        if any(fn is None for fn, _ in getattr(node.grad_fn, "next_functions", ())):
            return True
    return False


def _partial_producer(slices: Sequence[Slice], params: Mapping[str, torch.Tensor]) -> bool:
    """True when the group holds only some of a producer's output rows. Torch-Pruning couples
    the whole output of a layer to its successors unless an op re-indexes channels; one it
    treats as element-wise while it changes the channel count (padding along channels, as in
    the zero-pad shortcut of CIFAR ResNets, option A) shows up as a group that spans part of
    a producer, and its coupling is not trustworthy."""
    for s in slices:
        producer = s.role == "out" and s.name.endswith("weight")
        if producer and len(set(s.index)) != params[s.name].shape[0]:
            return True
    return False


def graph_groups(
    model: nn.Module, graph: tp.DependencyGraph, caller: str = "channel_groups"
) -> list[ChannelGroup]:
    """The channel groups of ``graph`` (built on ``model``), ordered by root in module order;
    groups tied to the output, groups that span only part of a producer's outputs
    (:func:`_partial_producer`) and groups that meet a tensor outside the graph in an
    element-wise op (:func:`_meets_constant`) are left out."""
    names = {m: n for n, m in model.named_modules()}
    order = {n: i for i, n in enumerate(names.values())}
    params = dict(model.named_parameters())
    groups: list[ChannelGroup] = []
    for group in graph.get_all_groups(root_module_types=LAYER_TYPES):
        if _reaches_output(graph, group):
            continue
        producers = [
            item.dep.target.module
            for item in group
            if isinstance(item.dep.target.module, LAYER_TYPES)
            and graph.is_out_channel_pruning_fn(item.dep.handler)
        ]
        first = min(producers, key=lambda m: order[names[m]])
        if first is not group[0].dep.target.module:  # renumber the channels by `first`
            pruner = graph.get_pruner_of_module(first)
            group = graph.get_pruning_group(
                first, pruner.prune_out_channels, list(range(pruner.get_out_channels(first)))
            )
        slices: list[Slice] = []
        for item in group:
            slices += _item_slices(
                graph, item.dep, list(item.idxs), list(item.root_idxs), names, caller
            )
        slices.sort(
            key=lambda s: (order.get(s.module, -1), {"out": 0, "channel": 1}.get(s.role, 2))
        )
        if _partial_producer(slices, params) or _meets_constant(group):
            continue
        root = names[first]
        size = graph.get_pruner_of_module(first).get_out_channels(first)
        groups.append(ChannelGroup(root=root, size=int(size), slices=tuple(slices)))
    groups.sort(key=lambda g: order[g.root])
    return groups


def channel_groups(model: nn.Module, input_shape: Sequence[int]) -> list[ChannelGroup]:
    """The prunable channel groups of ``model`` for inputs of ``input_shape`` (per sample,
    no batch dimension), one per independent set of coupled output channels/neurons.

    Built with Torch-Pruning's dependency graph (Fang et al. 2023, "DepGraph: Towards Any
    Structural Pruning", CVPR) from one traced forward pass on the model's device; the model
    is not changed (its training flags are restored). The output layer, and any layer tied to
    the model's outputs, is never a root. Channels that cannot be removed are in no group:
    those added to (or multiplied with) the model's input or a buffer, and those the graph
    couples only in part (the residual stream of a CIFAR ResNet with the zero-padding shortcut
    A, whose channel padding Torch-Pruning treats as element-wise). Raises :class:`~prunelab.errors.ConfigError` (one
    line naming the module) when the model cannot run the input, when a prunable layer is not
    reached by the trace, or when a group touches a layer type the compaction cannot handle.
    """
    graph = build_graph(model, input_shape, "channel_groups")
    return graph_groups(model, graph)


# -- channels and masks ------------------------------------------------------------------------


def _pruned_rows(weight: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Per output row: True when every entry is pruned (mask False; without a mask: zero)."""
    kept = mask.to(device=weight.device, dtype=torch.bool) if mask is not None else weight != 0
    return ~kept.reshape(kept.shape[0], -1).any(dim=1)


def removable_channels(
    model: nn.Module, groups: Sequence[ChannelGroup], masks: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``{group root: bool tensor of its size}``: True where a channel can be removed.

    A channel is removable when its output row/filter is pruned in every producer of the
    group: all False in ``masks`` (a producer without a mask counts as pruned where its weight
    row is exactly zero). Biases, BatchNorm shifts and the other per-channel tensors do not
    matter: :func:`prunelab.structured.compact` folds the constant they leave behind.
    """
    params = dict(model.named_parameters())
    out: dict[str, torch.Tensor] = {}
    for group in groups:
        removable = torch.ones(group.size, dtype=torch.bool)
        for name in group.producers:
            sl = group.slice(name)
            rows = _pruned_rows(params[name].detach(), masks.get(name)).cpu()
            chans = torch.tensor(sl.channel, dtype=torch.long)
            pruned = rows[torch.tensor(sl.index, dtype=torch.long)]
            alive = torch.zeros(group.size, dtype=torch.long)
            alive.index_add_(0, chans, (~pruned).long())
            removable &= alive == 0
        out[group.root] = removable
    return out


def structured_masks(
    model: nn.Module,
    groups: Sequence[ChannelGroup],
    pruned: Mapping[str, Iterable[int] | torch.Tensor],
    masks: Mapping[str, torch.Tensor] | None = None,
) -> Masks:
    """Masks over ``prunable_parameters(model)`` with whole channels pruned.

    ``pruned`` maps group roots to the channels to prune (indices, or a bool tensor of the
    group's size, True = prune); every producer row of those channels is set False, so the
    channels are removable (:func:`removable_channels`). Starts from ``masks`` (copied) or all
    True. Raises ConfigError for an unknown root, a channel out of range, or a producer weight
    that is not a prunable parameter.
    """
    from prunelab.models import prunable_parameters

    params = prunable_parameters(model)
    base = dict(masks) if masks is not None else {}
    out = {
        n: (base[n].detach().clone().bool() if n in base else torch.ones_like(p, dtype=torch.bool))
        for n, p in params.items()
    }
    by_root = {g.root: g for g in groups}
    for root, chosen in pruned.items():
        group = by_root.get(root)
        if group is None:
            raise ConfigError(
                f"structured_masks: no channel group has root '{root}'; roots: "
                f"{', '.join(by_root) or 'none'}"
            )
        if isinstance(chosen, torch.Tensor) and chosen.dtype == torch.bool:
            channels = torch.nonzero(chosen.flatten().cpu()).flatten().tolist()
        else:
            channels = [int(c) for c in chosen]
        bad = [c for c in channels if not 0 <= c < group.size]
        if bad:
            raise ConfigError(
                f"structured_masks: channel {bad[0]} of group '{root}' is out of range "
                f"[0, {group.size})"
            )
        for name in group.producers:
            if name not in out:
                raise ConfigError(
                    f"structured_masks: producer '{name}' of group '{root}' is not a prunable "
                    "parameter of the model, so no mask can prune it"
                )
            rows = group.positions(name, channels)
            if rows:
                out[name][torch.tensor(rows, dtype=torch.long, device=out[name].device)] = False
    return Masks(out)


def channel_norms(model: nn.Module, group: ChannelGroup, p: float = 1.0) -> torch.Tensor:
    """Per channel of ``group``, the ``p``-norm of all its producer rows taken together (the
    filter L1 norm of Li et al. 2017, "Pruning filters for efficient convnets", extended to
    coupled producers by summing over them, as Torch-Pruning's group importance does)."""
    params = dict(model.named_parameters())
    total = torch.zeros(group.size, dtype=torch.float64)
    for name in group.producers:
        sl = group.slice(name)
        w = params[name].detach().abs().double().cpu()
        rows = w.reshape(w.shape[0], -1).pow(p).sum(dim=1)
        index = torch.tensor(sl.index, dtype=torch.long)
        total.index_add_(0, torch.tensor(sl.channel, dtype=torch.long), rows[index])
    return total.pow(1.0 / p)
