"""Inference FLOPs and MACs: dense counts measured once, scaled by each layer's density.

Definitions used throughout :mod:`prunelab.cost`:

- **MAC**: one multiply-accumulate ``a += w * x``.
- **FLOPs**: floating-point operations as counted by PyTorch's
  :class:`torch.utils.flop_counter.FlopCounterMode`, which counts ``2 x MACs`` for matrix
  multiplications and convolutions (``addmm``, ``mm``, ``convolution``, ...) and nothing for
  element-wise operations (bias add, BatchNorm, ReLU, pooling, residual adds). So for a
  conv/linear network ``FLOPs = 2 x MACs`` exactly.
- **Density** of a layer: fraction of its weight entries that are non-zero (kept).

The dense counts are measured, not hand-written per layer type: one forward pass of a single
sample under the counter, whose per-module breakdown (:meth:`FlopCounterMode.get_flop_counts`,
keyed ``<RootClass>.<module qualified name>``) is attributed to the modules owning the
prunable weights (``x.weight`` -> module ``x``). Counts not inside a prunable layer form
``other``; a prunable layer that the counter credits with no FLOPs while the model has some
is an error (its weight is used outside its module, e.g. through a functional call, and its
FLOPs would otherwise sit in ``other``, never scaled by its density). A sparse layer's FLOPs are its dense FLOPs times its density, as in Evci et al.
(2020), "Rigging the lottery", appendix H, and Blalock et al. (2020), "What is the state of
neural network pruning?" (ShrinkBench); this ignores that zero-padding makes border outputs
of a conv use fewer weights, which every FLOP table in that literature ignores too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from prunelab.errors import ConfigError
from prunelab.models import prunable_parameters
from prunelab.models.base import check_input_shape


@dataclass(frozen=True)
class LayerFlops:
    """Dense forward FLOPs of one sample, split over the prunable layers.

    ``layers``: ``{prunable parameter name: dense forward FLOPs of the module owning it}``;
    ``other``: FLOPs outside the prunable layers (never scaled by a density); ``total``: the
    dense forward FLOPs per sample, ``f_D = other + sum(layers)``. ``activations``: per
    prunable layer, ``(input elements, output elements)`` of one sample's forward, used by the
    energy estimate.
    """

    layers: dict[str, float]
    other: float
    total: float
    activations: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def macs(self) -> dict[str, float]:
        """Dense MACs per sample of each prunable layer (FLOPs / 2)."""
        return {n: f / 2 for n, f in self.layers.items()}


def _module_of(param_name: str) -> str:
    """``'layers.0.weight'`` -> ``'layers.0'``; a root-level ``'weight'`` -> ``''``."""
    return param_name.rpartition(".")[0]


def _counter_key(root: nn.Module, module_name: str) -> str:
    """The key FlopCounterMode's module tracker gives ``module_name`` under ``root``."""
    root_name = type(root).__name__
    return f"{root_name}.{module_name}" if module_name else root_name


def layer_flops(
    model: nn.Module,
    input_shape: Sequence[int],
    params: Mapping[str, torch.Tensor] | None = None,
) -> LayerFlops:
    """Dense forward FLOPs of one sample of shape ``input_shape`` (no batch dimension).

    Measured with :class:`torch.utils.flop_counter.FlopCounterMode` on a batch of one random
    sample in eval mode (BatchNorm uses running statistics; the model's mode is restored).
    ``params`` names the prunable weights (default :func:`prunelab.models.prunable_parameters`).
    A prunable module called several times per forward has all its calls counted. Raises
    ConfigError (a ValueError, one line naming the layer) when a prunable layer is credited
    with no FLOPs while the model has some.
    """
    shape = check_input_shape(input_shape, "FLOP count")
    if params is None:
        params = prunable_parameters(model)
    if not params:
        raise ConfigError("layer_flops: the model has no prunable parameters to count")
    owners = dict(model.named_modules())
    module_names = {}
    for name in params:
        module = _module_of(name)
        if module not in owners:
            raise ConfigError(f"layer_flops: no module owns the prunable parameter '{name}'")
        module_names[name] = module
    try:
        first = next(iter(model.parameters()))
        device, dtype = first.device, first.dtype
    except StopIteration:
        device, dtype = torch.device("cpu"), torch.float32
    x = torch.randn(1, *shape, device=device, dtype=dtype)

    activations: dict[str, tuple[int, int]] = {}
    hooks = []
    for name, module in module_names.items():

        def hook(mod, inputs, output, _name=name) -> None:
            n_in = sum(t.numel() for t in inputs if torch.is_tensor(t))
            n_out = output.numel() if torch.is_tensor(output) else 0
            old = activations.get(_name, (0, 0))
            activations[_name] = (old[0] + n_in, old[1] + n_out)

        hooks.append(owners[module].register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    except (RuntimeError, ValueError, TypeError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"layer_flops: the model cannot run an input of shape {tuple(shape)}: {first_line}"
        ) from None
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    counts = counter.get_flop_counts()
    total = float(counter.get_total_flops())
    layers = {
        name: float(sum(counts.get(_counter_key(model, module), {}).values()))
        for name, module in module_names.items()
    }
    _check_attributed(layers, module_names, total)
    # Two prunable weights in one module would be counted twice: split its FLOPs instead.
    per_module: dict[str, list[str]] = {}
    for name, module in module_names.items():
        per_module.setdefault(module, []).append(name)
    for names in per_module.values():
        if len(names) > 1:
            numels = [params[n].numel() for n in names]
            share = layers[names[0]] / sum(numels)
            for n, k in zip(names, numels, strict=True):
                layers[n] = share * k
    other = max(total - sum(layers.values()), 0.0)
    return LayerFlops(layers=layers, other=other, total=total, activations=activations)


def _check_attributed(
    layers: Mapping[str, float], module_names: Mapping[str, str], total: float
) -> None:
    """Raise ConfigError (a ValueError) when the counter gave a prunable layer no FLOPs while
    the model has some: its weight is used outside its module's forward (a functional call
    on ``module.weight``, a weight shared with another module), so its FLOPs would be
    counted in ``other`` and never scaled by its density."""
    if total <= 0:
        return
    missing = [name for name, flops in layers.items() if flops <= 0]
    if missing:
        name = missing[0]
        raise ConfigError(
            f"layer_flops: torch's FLOP counter attributes 0 of the model's {total:.0f} FLOPs "
            f"to the prunable layer '{name}' (module '{module_names[name]}'"
            f"{f', and {len(missing) - 1} more' if len(missing) > 1 else ''}); its weight is "
            "used outside that module's forward (e.g. a functional call): call the module, "
            "or leave the weight out of prunable_parameters()"
        )


def check_densities(lf: LayerFlops, densities: Mapping[str, float]) -> dict[str, float]:
    """``densities`` restricted to the prunable layers, checked; missing layers count as dense."""
    unknown = sorted(set(densities) - set(lf.layers))
    if unknown:
        raise ConfigError(
            f"densities name layers that are not prunable layers of the model: {unknown[:3]}"
        )
    out = {}
    for name in lf.layers:
        d = float(densities.get(name, 1.0))
        if not 0.0 <= d <= 1.0:
            raise ConfigError(f"density of '{name}' is {d}; densities must lie in [0, 1]")
        out[name] = d
    return out


def sparse_forward_flops(lf: LayerFlops, densities: Mapping[str, float]) -> float:
    """Forward FLOPs per sample with per-layer ``densities``: ``f_S = other + sum f_l d_l``.

    Layers missing from ``densities`` are dense (density 1).
    """
    d = check_densities(lf, densities)
    return lf.other + sum(f * d[n] for n, f in lf.layers.items())


def densities_of(
    params: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor] | None = None
) -> dict[str, float]:
    """Per-layer density of the effective weights: entries that are kept by ``masks`` (if
    given) and non-zero, over all entries."""
    out = {}
    with torch.no_grad():
        for name, p in params.items():
            support = p != 0
            if masks is not None and name in masks:
                support = support & masks[name].to(device=p.device, dtype=torch.bool)
            out[name] = float(support.sum()) / max(p.numel(), 1)
    return out


def inference_report(lf: LayerFlops, densities: Mapping[str, float]) -> dict[str, float]:
    """Dense and sparse forward FLOPs and MACs per sample and the theoretical speedup.

    Theoretical speedup = dense FLOPs / sparse FLOPs, as defined by Blalock et al. (2020),
    "What is the state of neural network pruning?" (ShrinkBench, section 4). MACs = FLOPs / 2.
    Keys: ``flops_infer_dense``, ``flops_infer_sparse``, ``macs_infer_dense``,
    ``macs_infer_sparse``, ``macs_prunable_dense``, ``macs_prunable_sparse`` (the prunable
    layers alone) and ``theoretical_speedup``.
    """
    d = check_densities(lf, densities)
    sparse = sparse_forward_flops(lf, d)
    prunable_dense = sum(lf.layers.values())
    prunable_sparse = sum(f * d[n] for n, f in lf.layers.items())
    return {
        "flops_infer_dense": lf.total,
        "flops_infer_sparse": sparse,
        "macs_infer_dense": lf.total / 2,
        "macs_infer_sparse": sparse / 2,
        "macs_prunable_dense": prunable_dense / 2,
        "macs_prunable_sparse": prunable_sparse / 2,
        "theoretical_speedup": lf.total / sparse if sparse > 0 else float("inf"),
    }
