"""Where the gates of input-adaptive channel pruning go, and which later computation a skipped
channel lets an executor skip: a static analysis of the model's :mod:`torch.fx` graph.

Pure torch. Two questions, both answered from the traced graph:

- **gate points** (:func:`gate_points`): every ``nn.Conv1d``/``nn.Conv2d`` with ``groups=1``
  that the forward calls once is gated. Its gate multiplies the conv's output channels, or,
  when the conv's only consumer is a BatchNorm, the BatchNorm's output (gating before the
  normalisation would let it shift a suppressed channel away from zero; Gao et al. 2019 put
  the gate after the normalisation too). A suppressed channel is then exactly zero.
- **zero propagation** (:func:`build_plan`): the zeros a gate leaves survive element-wise and
  per-channel operations that map 0 to 0 (ReLU and its kin, max/average pooling, dropout in
  evaluation, identity) and flattening, so a conv (or a Linear after a flatten) that reads
  such a tensor can drop the input channels (columns) of the suppressed channels. Anything
  else (a residual addition, a BatchNorm that is not a gate point, padding, concatenation)
  sees the full tensor with its zeros.

The :class:`Plan` lists every multiply-accumulating layer with the gates that decide its
input and output channels, from which the MACs of one input follow (:meth:`Plan.macs`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from prunelab.errors import ConfigError

CONV_TYPES = (nn.Conv1d, nn.Conv2d)
NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)
# Modules, functions and tensor methods that map a zero channel to a zero channel.
ZERO_PRESERVING_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Identity,
)
ZERO_PRESERVING_FUNCTIONS: tuple[Any, ...] = (
    F.relu,
    torch.relu,
    F.relu6,
    F.leaky_relu,
    F.elu,
    F.gelu,
    F.silu,
    torch.tanh,
    F.max_pool1d,
    F.max_pool2d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    F.dropout,
)
ZERO_PRESERVING_METHODS = ("relu", "tanh", "contiguous")


@dataclass(frozen=True)
class GatePoint:
    """One gated conv: its module path (``conv``), the module whose output the gate
    multiplies (``point``: the conv itself or its BatchNorm) and the channel counts."""

    conv: str
    point: str
    in_channels: int
    out_channels: int


@dataclass
class Op:
    """A multiply-accumulating layer: MACs = ``per`` x input channels x output channels,
    each the gate's executed count when ``in_gate`` / ``out_gate`` is set, else the full
    ``c_in`` / ``c_out``. For a conv ``per`` = kernel size x output positions; for a Linear
    reading a flattened gated map ``c_in`` counts channels and ``per`` = features per channel
    (a plain Linear: ``per`` = 1, ``c_in`` = in_features)."""

    name: str
    kind: str
    c_in: int
    c_out: int
    per: int
    in_gate: int | None = None
    out_gate: int | None = None

    def macs(self, n_in: int | None = None, n_out: int | None = None) -> int:
        """MACs with ``n_in`` / ``n_out`` executed channels (None: all)."""
        i = self.c_in if self.in_gate is None or n_in is None else n_in
        o = self.c_out if self.out_gate is None or n_out is None else n_out
        return self.per * i * o


@dataclass
class Plan:
    """The traced graph with its gate points, zero sources and MAC-bearing layers."""

    graph_module: fx.GraphModule
    gates: list[GatePoint]
    # node name -> (gate index, features per channel) for tensors whose channels outside the
    # gate's executed set are exactly zero
    zero_source: dict[str, tuple[int, int]]
    # node name -> full per-sample shape (batch dimension 1)
    shapes: dict[str, tuple[int, ...]]
    ops: list[Op] = field(default_factory=list)

    def dense_macs(self) -> int:
        """MACs of one input with every channel computed (no predictors)."""
        return sum(op.macs() for op in self.ops)

    def predictor_macs(self) -> int:
        """MACs of the saliency predictors of one input (one Linear C_in -> C_out each; the
        global pooling's additions are not MACs)."""
        return sum(g.in_channels * g.out_channels for g in self.gates)

    def macs(self, executed: torch.Tensor) -> torch.Tensor:
        """MACs per input (int64, shape ``(B,)``) from the executed channel counts
        ``executed`` (``(B, n_gates)``), the predictors included."""
        executed = executed.to(torch.int64)
        total = torch.full(
            (executed.shape[0],), self.predictor_macs(), dtype=torch.int64, device=executed.device
        )
        for op in self.ops:
            i = executed[:, op.in_gate] if op.in_gate is not None else op.c_in
            o = executed[:, op.out_gate] if op.out_gate is not None else op.c_out
            total += op.per * i * o
        return total


def trace(model: nn.Module) -> fx.GraphModule:
    """``model`` traced by :func:`torch.fx.symbolic_trace` (its submodules shared, not
    copied), or a one-line ConfigError when it cannot be traced."""
    try:
        return fx.symbolic_trace(model)
    except Exception as err:  # fx raises TraceError, TypeError, NotImplementedError, ...
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"pruning=fbs needs a model torch.fx can trace to place its gates; "
            f"{type(model).__name__} failed: {text}"
        ) from None


def _module_calls(gm: fx.GraphModule) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            counts[node.target] = counts.get(node.target, 0) + 1
    return counts


def gate_points(model: nn.Module, gm: fx.GraphModule | None = None) -> list[GatePoint]:
    """The gated convs of ``model`` in graph order (see the module docstring); [] when it
    has none."""
    gm = trace(model) if gm is None else gm
    modules = dict(gm.named_modules())
    calls = _module_calls(gm)
    points = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        conv = modules[node.target]
        if not isinstance(conv, CONV_TYPES) or conv.groups != 1 or calls[node.target] != 1:
            continue
        point = node.target
        users = list(node.users)
        if (
            len(users) == 1
            and users[0].op == "call_module"
            and isinstance(modules[users[0].target], NORM_TYPES)
            and calls[users[0].target] == 1
            and modules[users[0].target].num_features == conv.out_channels
        ):
            point = users[0].target
        points.append(GatePoint(node.target, point, conv.in_channels, conv.out_channels))
    return points


def _is_zero_preserving(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], ZERO_PRESERVING_MODULES)
    if node.op == "call_function":
        return node.target in ZERO_PRESERVING_FUNCTIONS
    if node.op == "call_method":
        return node.target in ZERO_PRESERVING_METHODS
    return False


def _flatten_start(node: fx.Node, modules: dict[str, nn.Module]) -> int | None:
    """The start dimension of a flatten to the end (module, torch.flatten or the method),
    or None when ``node`` is not one."""
    if node.op == "call_module":
        module = modules[node.target]
        if isinstance(module, nn.Flatten) and module.end_dim == -1:
            return module.start_dim
        return None
    if (node.op == "call_function" and node.target is torch.flatten) or (
        node.op == "call_method" and node.target == "flatten"
    ):
        args = list(node.args[1:])
        start = args[0] if args else node.kwargs.get("start_dim", 0)
        end = args[1] if len(args) > 1 else node.kwargs.get("end_dim", -1)
        return int(start) if end == -1 else None
    return None


def build_plan(model: nn.Module, input_shape: Sequence[int]) -> Plan:
    """Trace ``model``, run one zero input of ``input_shape`` (no batch dimension) through
    it for the shapes, and find its gate points, zero sources and MAC-bearing layers. Run it
    with any gating hooks removed and the model in evaluation mode."""
    from torch.fx.passes.shape_prop import ShapeProp

    gm = trace(model)
    points = gate_points(model, gm)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    with torch.no_grad():
        ShapeProp(gm).propagate(torch.zeros(1, *input_shape, device=device))
    shapes: dict[str, tuple[int, ...]] = {}
    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "shape"):
            shapes[node.name] = tuple(int(s) for s in meta.shape)
    modules = dict(gm.named_modules())
    by_conv = {p.conv: i for i, p in enumerate(points)}
    by_point = {p.point: i for i, p in enumerate(points)}
    zero: dict[str, tuple[int, int]] = {}
    ops: list[Op] = []
    for node in gm.graph.nodes:
        first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        source = zero.get(first.name) if first is not None else None
        if node.op == "call_module" and node.target in by_point:
            zero[node.name] = (by_point[node.target], 1)
        elif source is not None and source[1] == 1 and _is_zero_preserving(node, modules):
            zero[node.name] = source
        elif source is not None and source[1] == 1 and _flatten_start(node, modules) == 1:
            in_shape = shapes[first.name]
            zero[node.name] = (source[0], math.prod(in_shape[2:]))
        if node.op != "call_module":
            continue
        module = modules[node.target]
        if isinstance(module, CONV_TYPES):
            out_shape = shapes[node.name]
            per = math.prod(module.kernel_size) * math.prod(out_shape[2:])
            in_gate = source[0] if source is not None and source[1] == 1 else None
            if module.groups != 1:
                per = per // module.groups
                in_gate = None
            ops.append(
                Op(
                    node.target,
                    "conv",
                    module.in_channels,
                    module.out_channels,
                    per,
                    in_gate=in_gate,
                    out_gate=by_conv.get(node.target),
                )
            )
        elif isinstance(module, nn.Linear):
            in_shape = shapes[first.name] if first is not None else (1, module.in_features)
            rows = math.prod(in_shape[1:-1]) if len(in_shape) > 2 else 1
            if source is not None and len(in_shape) == 2:
                group = source[1]
                ops.append(
                    Op(
                        node.target,
                        "linear",
                        module.in_features // group,
                        module.out_features,
                        group * rows,
                        in_gate=source[0],
                    )
                )
            else:
                ops.append(Op(node.target, "linear", module.in_features, module.out_features, rows))
    return Plan(gm, points, zero, shapes, ops)


def linear_columns(index: torch.Tensor, group: int) -> torch.Tensor:
    """The flattened feature positions of channels ``index`` with ``group`` features each."""
    if group == 1:
        return index
    offsets = torch.arange(group, device=index.device)
    return (index[:, None] * group + offsets).flatten()


__all__ = [
    "CONV_TYPES",
    "NORM_TYPES",
    "GatePoint",
    "Op",
    "Plan",
    "build_plan",
    "gate_points",
    "linear_columns",
    "trace",
]
