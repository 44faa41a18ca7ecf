"""Dynamic execution of a gated model: per input, only the executed channels are computed.

Pure torch. :class:`DynamicExecutor` runs a model gated by :class:`~prunelab.dynamic.gates.
FBSGates` one input at a time (batch 1, evaluation mode) from its :class:`~prunelab.dynamic.
plan.Plan`:

- a gated conv computes its saliencies, picks the executed output channels (kept by the
  gating, saliency > 0), and convolves with the weight rows of those channels only (and, when
  its input comes from another gate through zero-preserving operations, the weight columns of
  that gate's executed channels only); its BatchNorm (evaluation mode: a per-channel affine
  map) and the saliency scaling are applied to those channels;
- a tensor whose suppressed channels are zero is kept *compact*: only the executed channels,
  in the order of their indices. Zero-preserving operations (ReLU, pooling, ...) run on the
  compact tensor; a flatten keeps it compact; a Linear reading it uses only the matching
  weight columns; any other operation (a residual addition, a BatchNorm that is not a gate
  point, padding) gets the full tensor, the skipped channels filled with zeros.

The result equals the gated model's output (the masked computation: every channel computed,
then multiplied by ``pi``) up to floating-point summation order. ``macs`` counts the
multiply-accumulates actually performed (predictors included), the figure
:meth:`~prunelab.dynamic.plan.Plan.macs` derives from the executed counts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from prunelab.dynamic.gates import FBSGates
from prunelab.dynamic.plan import CONV_TYPES, NORM_TYPES, Plan, build_plan, linear_columns

Step = Callable[[dict[str, Any], list[torch.Tensor | None]], None]


class DynamicExecutor:
    """Batch-1 dynamic execution of ``model`` gated by ``gates`` (see the module docstring).

    Built from a trained model: the BatchNorm of each gate point (evaluation mode: running
    statistics) is folded into a per-channel scale and shift when the executor is built, so
    rebuild it after training further; the conv and Linear weights are read at every call.
    """

    def __init__(self, model: nn.Module, gates: FBSGates, input_shape: Sequence[int]) -> None:
        was_training = model.training
        model.eval()
        try:
            with gates.removed():
                self.plan: Plan = build_plan(model, tuple(input_shape))
        finally:
            model.train(was_training)
        self.gates = gates
        self.input_shape = tuple(int(s) for s in input_shape)
        self.gm = self.plan.graph_module
        self.modules = dict(self.gm.named_modules())
        self.macs = 0
        self.count_macs = False
        names = [p.conv for p in gates.points]
        if names != [p.conv for p in self.plan.gates]:
            raise ValueError("the gates do not match the model's gate points")
        self._gate_of_conv = {p.conv: i for i, p in enumerate(self.plan.gates)}
        self._gate_of_point = {p.point: i for i, p in enumerate(self.plan.gates)}
        self._ops = {op.name: op for op in self.plan.ops}
        self._steps: list[Step] = []
        self._output: fx.Node | None = None
        for node in self.gm.graph.nodes:
            self._steps.append(self._compile(node))

    # -- running ----------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The logits of one input ``x`` (shape ``(1, *input_shape)``)."""
        if x.shape[0] != 1:
            raise ValueError(
                f"dynamic execution takes one input at a time, got a batch of {len(x)}"
            )
        env: dict[str, Any] = {"__input__": x}
        executed: list[torch.Tensor | None] = [None] * len(self.plan.gates)
        self.macs = self.plan.predictor_macs() if self.count_macs else 0
        for step in self._steps:
            step(env, executed)
        self.executed = executed
        return env["__output__"]

    def executed_counts(self) -> list[int]:
        """Executed channels per gate of the last call."""
        return [int(t.numel()) if t is not None else 0 for t in self.executed]

    # -- compiling --------------------------------------------------------------------------
    def _dense(self, env: dict[str, Any], executed: list, node: fx.Node) -> Any:
        """The full value of ``node``: compact tensors scattered into zeros (cached)."""
        source = self.plan.zero_source.get(node.name)
        value = env[node.name]
        if source is None:
            return value
        key = node.name + "/dense"
        if key in env:
            return env[key]
        gate, group = source
        shape = self.plan.shapes[node.name]
        full = value.new_zeros(shape)
        index = linear_columns(executed[gate], group)
        full.index_copy_(1, index, value)
        env[key] = full
        return full

    def _args(self, node: fx.Node) -> Callable[[dict[str, Any], list], tuple[tuple, dict]]:
        def fetch(env: dict[str, Any], executed: list) -> tuple[tuple, dict]:
            args = fx.node.map_arg(node.args, lambda n: self._dense(env, executed, n))
            kwargs = fx.node.map_arg(node.kwargs, lambda n: self._dense(env, executed, n))
            return args, kwargs

        return fetch

    def _compile(self, node: fx.Node) -> Step:
        name = node.name
        if node.op == "placeholder":

            def placeholder(env: dict[str, Any], executed: list) -> None:
                env[name] = env["__input__"]

            return placeholder
        if node.op == "output":
            fetch = self._args(node)

            def output(env: dict[str, Any], executed: list) -> None:
                args, _ = fetch(env, executed)
                env["__output__"] = args[0]

            return output
        if node.op == "call_module" and node.target in self._gate_of_conv:
            return self._gated_conv(node, self._gate_of_conv[node.target])
        if node.op == "call_module" and node.target in self._gate_of_point:
            # A gate's BatchNorm: applied inside the gated conv's step.
            conv_node = node.args[0]

            def alias(env: dict[str, Any], executed: list) -> None:
                env[name] = env[conv_node.name]

            return alias
        first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        source = self.plan.zero_source.get(first.name) if first is not None else None
        if source is not None and name in self.plan.zero_source:
            return self._on_compact(node, first)
        if source is not None and node.op == "call_module":
            module = self.modules[node.target]
            op = self._ops.get(node.target)
            if op is not None and op.in_gate is not None:
                if isinstance(module, CONV_TYPES):
                    return self._conv_compact_input(node, first, module, op)
                if isinstance(module, nn.Linear):
                    return self._linear_compact_input(node, first, module, op)
        return self._generic(node)

    def _generic(self, node: fx.Node) -> Step:
        name, fetch = node.name, self._args(node)
        op_of = self._ops.get(node.target) if node.op == "call_module" else None
        if node.op == "call_module":
            module = self.modules[node.target]

            def call_module(env: dict[str, Any], executed: list) -> None:
                args, kwargs = fetch(env, executed)
                env[name] = module(*args, **kwargs)
                if self.count_macs and op_of is not None:
                    self.macs += op_of.macs()

            return call_module
        if node.op == "call_function":
            target = node.target

            def call_function(env: dict[str, Any], executed: list) -> None:
                args, kwargs = fetch(env, executed)
                env[name] = target(*args, **kwargs)

            return call_function
        if node.op == "call_method":
            method = node.target

            def call_method(env: dict[str, Any], executed: list) -> None:
                args, kwargs = fetch(env, executed)
                env[name] = getattr(args[0], method)(*args[1:], **kwargs)

            return call_method
        if node.op == "get_attr":
            value = self.gm
            for part in str(node.target).split("."):
                value = getattr(value, part)

            def get_attr(env: dict[str, Any], executed: list) -> None:
                env[name] = value

            return get_attr
        raise ValueError(f"cannot execute fx node {node.op} {node.target}")

    def _on_compact(self, node: fx.Node, first: fx.Node) -> Step:
        """A zero-preserving operation or flatten applied to a compact tensor as it is."""
        name = node.name
        first_name = first.name

        def rest(env: dict[str, Any], executed: list) -> tuple[tuple, dict]:
            args = fx.node.map_arg(node.args[1:], lambda n: self._dense(env, executed, n))
            kwargs = fx.node.map_arg(node.kwargs, lambda n: self._dense(env, executed, n))
            return args, kwargs

        if node.op == "call_module":
            module = self.modules[node.target]

            def module_step(env: dict[str, Any], executed: list) -> None:
                args, kwargs = rest(env, executed)
                env[name] = module(env[first_name], *args, **kwargs)

            return module_step
        if node.op == "call_function":
            target = node.target

            def function_step(env: dict[str, Any], executed: list) -> None:
                args, kwargs = rest(env, executed)
                env[name] = target(env[first_name], *args, **kwargs)

            return function_step
        method = node.target

        def method_step(env: dict[str, Any], executed: list) -> None:
            args, kwargs = rest(env, executed)
            env[name] = getattr(env[first_name], method)(*args, **kwargs)

        return method_step

    def _gated_conv(self, node: fx.Node, gate: int) -> Step:
        conv = self.modules[node.target]
        point = self.plan.gates[gate]
        norm = self.modules[point.point] if point.point != point.conv else None
        if norm is not None and not isinstance(norm, NORM_TYPES):
            raise ValueError(f"gate point {point.point} is not a BatchNorm")
        first = node.args[0]
        source = self.plan.zero_source.get(first.name)
        in_gate = source[0] if source is not None and source[1] == 1 else None
        op = self._ops[node.target]
        out_spatial = self.plan.shapes[node.name][2:]
        name, first_name = node.name, first.name
        predictor = self.gates.predictors[gate]
        gates = self.gates
        spatial_dims = tuple(range(2, 2 + len(out_spatial)))
        view = (1, -1) + (1,) * len(out_spatial)
        c_in = conv.in_channels
        k, channels = gates.k[gate], conv.out_channels
        if gates.gating == "topk" and k < channels:

            def choose(g: torch.Tensor) -> torch.Tensor:
                # the k winners (the gates' top-k: same values, same ties), saliency > 0
                top = torch.topk(g, k, sorted=False).indices
                return top[g.index_select(0, top) > 0]

        elif gates.gating == "threshold" and (gates.fixed_threshold is not None or k < channels):
            tau = float(gates.thresholds[gate])

            def choose(g: torch.Tensor) -> torch.Tensor:
                return (g > tau).nonzero().flatten()

        else:  # every channel kept: those with saliency > 0 run

            def choose(g: torch.Tensor) -> torch.Tensor:
                return (g > 0).nonzero().flatten()

        scale, shift = _fold_affine(conv, norm)

        def gated_conv(env: dict[str, Any], executed: list) -> None:
            x = env[first_name]
            if in_gate is not None:
                idx_in = executed[in_gate]
                s = x.new_zeros(1, c_in)
                s[:, idx_in] = x.mean(dim=spatial_dims)
            else:
                idx_in = None
                s = x.mean(dim=spatial_dims)
            g = F.relu(F.linear(s, predictor.weight, predictor.bias))
            idx_out = choose(g[0])
            executed[gate] = idx_out
            n_out = int(idx_out.numel())
            if self.count_macs:
                n_in = int(idx_in.numel()) if idx_in is not None else None
                self.macs += op.macs(n_in, n_out)
            if n_out == 0:
                env[name] = x.new_zeros(1, 0, *out_spatial)
                return
            if idx_in is not None and idx_in.numel() == 0:  # every input channel is zero
                y = x.new_zeros(1, n_out, *out_spatial)
            else:
                weight = conv.weight.index_select(0, idx_out)
                if idx_in is not None:
                    weight = weight.index_select(1, idx_in)
                y = conv._conv_forward(x, weight, None)
            pi = g[0].index_select(0, idx_out)
            a = (scale.index_select(0, idx_out) * pi).view(view)
            b = (shift.index_select(0, idx_out) * pi).view(view)
            env[name] = torch.addcmul(b, y, a)

        return gated_conv

    def _conv_compact_input(self, node: fx.Node, first: fx.Node, conv: nn.Module, op) -> Step:
        name, first_name, gate = node.name, first.name, op.in_gate

        out_shape = self.plan.shapes[node.name]
        view = (1, -1) + (1,) * (len(out_shape) - 2)

        def conv_step(env: dict[str, Any], executed: list) -> None:
            idx_in = executed[gate]
            x = env[first_name]
            if idx_in.numel() == 0:  # every input channel is zero: the bias alone
                y = x.new_zeros(out_shape)
                env[name] = y if conv.bias is None else y + conv.bias.view(view)
            else:
                weight = conv.weight.index_select(1, idx_in)
                env[name] = conv._conv_forward(x, weight, conv.bias)
            if self.count_macs:
                self.macs += op.macs(int(idx_in.numel()), None)

        return conv_step

    def _linear_compact_input(self, node: fx.Node, first: fx.Node, linear: nn.Linear, op) -> Step:
        name, first_name = node.name, first.name
        gate, group = self.plan.zero_source[first.name]

        def linear_step(env: dict[str, Any], executed: list) -> None:
            idx_in = executed[gate]
            columns = linear_columns(idx_in, group)
            weight = linear.weight.index_select(1, columns)
            env[name] = F.linear(env[first_name], weight, linear.bias)
            if self.count_macs:
                self.macs += op.macs(int(idx_in.numel()), None)

        return linear_step


@torch.no_grad()
def _fold_affine(conv: nn.Module, norm: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(scale, shift)`` that follow ``conv`` computed without its bias: its
    BatchNorm in evaluation mode (with the conv's bias folded in), or the bias alone."""
    weight = conv.weight
    bias = conv.bias.detach() if conv.bias is not None else None
    if norm is None:
        scale = torch.ones(conv.out_channels, dtype=weight.dtype, device=weight.device)
        shift = bias.clone() if bias is not None else torch.zeros_like(scale)
        return scale, shift
    scale = torch.rsqrt(norm.running_var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight.detach()
    shift = -norm.running_mean * scale
    if norm.bias is not None:
        shift = shift + norm.bias.detach()
    if bias is not None:
        shift = shift + bias * scale
    return scale, shift


__all__ = ["DynamicExecutor"]
