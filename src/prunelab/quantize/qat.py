"""Quantization-aware fine-tuning (QAT) of a pruned model, with the masks kept exactly zero.

Fake quantization (Jacob et al. 2018, "Quantization and training of neural networks for
efficient integer-arithmetic-only inference", CVPR, section 3; Krishnamoorthi 2018,
"Quantizing deep convolutional networks for efficient inference: a whitepaper",
arXiv:1806.08342, section 3) simulates in float the int8 model that
:func:`prunelab.quantize.int8.quantize_int8` deploys through onnxruntime, so the weights
learn to live on its grid:

- weights: masked first (``w * mask``), then fake-quantized symmetric per output channel to
  the integers [-127, 127] with scale ``max|w_c| / 127`` (1.0 for a channel pruned whole),
  exactly onnxruntime's symmetric ``QInt8`` weight scheme, by
  ``torch.fake_quantize_per_channel_affine``. Zero-point 0, so a pruned weight is 0 in the
  forward pass; the straight-through estimator passes the gradient of ``w * mask``, which is
  0 at pruned positions;
- activations: the input of every quantized layer fake-quantized per tensor to uint8 by
  ``torch.fake_quantize_per_tensor_affine``, with min/max tracked as moving averages (factor
  ``momentum``, 0.01 like ``torch.ao``'s ``MovingAverageMinMaxObserver``) in training mode
  and frozen in eval mode. In the chain Linear/Conv -> ReLU -> Linear/Conv this is where
  onnxruntime quantizes too (it merges the ReLU into the previous layer's output range).

Both ops are core ATen operators (not the ``torch.ao.quantization`` workflow, which PyTorch
is moving to torchao). A convolution followed by BatchNorm is fake-quantized before the
folding that the ONNX export does; per-channel symmetric integers do not change when a
channel is multiplied by a constant, so the deployed weights are the same ones.

Use in a plain loop: :func:`qat_finetune`. Use inside another training loop (e.g. a Lightning
module): ``prepare_qat(model, masks)`` (in place: same modules, same parameter objects and
names, so optimizers and the sparsity engine keep working), train as usual re-masking after
each optimizer step (:func:`apply_masks`; the project's engine does it), then
``finalize_qat(model)`` and :func:`~prunelab.quantize.int8.quantize_int8` (calibration gives
the activation ranges; the weights quantize to exactly the integers QAT trained with).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunelab.errors import ConfigError

WEIGHT_QMIN, WEIGHT_QMAX = -127, 127  # onnxruntime's symmetric QInt8 range
ACT_QMIN, ACT_QMAX = 0, 255  # uint8 activations


def weight_scale(weight: torch.Tensor) -> torch.Tensor:
    """Per-output-channel symmetric scale ``max|w_c| / 127`` (1.0 where the channel is all
    zero, as onnxruntime does), float32, one entry per ``weight.shape[0]``."""
    absmax = weight.detach().abs().flatten(1).amax(dim=1).to(torch.float32)
    return torch.where(absmax > 0, absmax / WEIGHT_QMAX, torch.ones_like(absmax))


def fake_quant_weight(weight: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``weight`` (masked first when ``mask`` is given) fake-quantized symmetric per output
    channel to int8 (zero-point 0: pruned weights stay exactly 0.0)."""
    if mask is not None:
        weight = weight * mask.to(weight.dtype)
    scale = weight_scale(weight)
    zero = torch.zeros(scale.shape, dtype=torch.int32, device=weight.device)
    return torch.fake_quantize_per_channel_affine(
        weight, scale.to(weight.device), zero, 0, WEIGHT_QMIN, WEIGHT_QMAX
    )


def activation_qparams(lo: float, hi: float) -> tuple[float, int]:
    """``(scale, zero_point)`` of the affine uint8 grid on ``[min(lo, 0), max(hi, 0)]``, as
    onnxruntime computes it for calibrated activations."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = (hi - lo) / (ACT_QMAX - ACT_QMIN)
    if scale < torch.finfo(torch.float32).tiny:
        return 1.0, 0
    zero = round(ACT_QMIN - lo / scale)
    return scale, int(min(max(zero, ACT_QMIN), ACT_QMAX))


class _QATMixin:
    """Fake-quantized forward for a Linear/Conv layer (see the module docstring).

    Set on an existing module by :func:`prepare_qat` (its class swapped for the QAT subclass,
    non-persistent buffers added), so the parameters and their names do not change.
    """

    qat_mask: torch.Tensor | None
    act_range: torch.Tensor  # [min, max] moving averages of the input
    act_seen: torch.Tensor  # 0 until the first training batch
    qat_momentum: float
    weight: nn.Parameter

    def _qat_setup(self, mask: torch.Tensor | None, momentum: float) -> None:
        module: nn.Module = self  # type: ignore[assignment]
        device = self.weight.device
        mask_t = None if mask is None else mask.to(device=device, dtype=torch.bool)
        module.register_buffer("qat_mask", mask_t, persistent=False)
        module.register_buffer("act_range", torch.zeros(2, device=device), persistent=False)
        module.register_buffer(
            "act_seen", torch.zeros((), dtype=torch.bool, device=device), persistent=False
        )
        self.qat_momentum = float(momentum)

    def fake_quant_input(self, x: torch.Tensor) -> torch.Tensor:
        """Observe ``x`` (training mode) and fake-quantize it to uint8 per tensor."""
        module: nn.Module = self  # type: ignore[assignment]
        if module.training:
            with torch.no_grad():
                now = torch.stack([x.detach().min(), x.detach().max()]).to(self.act_range)
                if bool(self.act_seen):
                    self.act_range.lerp_(now, self.qat_momentum)
                else:
                    self.act_range.copy_(now)
                    self.act_seen.fill_(True)
        if not bool(self.act_seen):
            return x  # eval before any training batch: nothing observed yet
        scale, zero = activation_qparams(*self.act_range.tolist())
        return torch.fake_quantize_per_tensor_affine(x, scale, zero, ACT_QMIN, ACT_QMAX)

    def quantized_weight(self) -> torch.Tensor:
        """The masked, fake-quantized weight the forward pass uses."""
        return fake_quant_weight(self.weight, self.qat_mask)


class QATLinear(_QATMixin, nn.Linear):
    """``nn.Linear`` with fake-quantized input and weight (made by :func:`prepare_qat`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.fake_quant_input(x), self.quantized_weight(), self.bias)


class QATConv1d(_QATMixin, nn.Conv1d):
    """``nn.Conv1d`` with fake-quantized input and weight (made by :func:`prepare_qat`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.fake_quant_input(x), self.quantized_weight(), self.bias)


class QATConv2d(_QATMixin, nn.Conv2d):
    """``nn.Conv2d`` with fake-quantized input and weight (made by :func:`prepare_qat`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.fake_quant_input(x), self.quantized_weight(), self.bias)


_QAT_CLASSES: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: QATLinear,
    nn.Conv1d: QATConv1d,
    nn.Conv2d: QATConv2d,
}
_PLAIN_CLASSES = {v: k for k, v in _QAT_CLASSES.items()}
_QAT_BUFFERS = ("qat_mask", "act_range", "act_seen")


def _check_masks(model: nn.Module, masks: Mapping[str, torch.Tensor] | None) -> dict:
    from prunelab.cost.export import _resolve_masks

    return _resolve_masks(model, masks)


def prepare_qat(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor] | None,
    momentum: float = 0.01,
) -> dict[str, str]:
    """Turn every ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` of ``model`` (exact types) into
    its fake-quantized QAT form, **in place**, and zero the masked weights.

    ``masks``: ``{parameter name: bool mask}`` (None: the zeros of the prunable weights).
    The parameters stay the same objects under the same names; only non-persistent buffers
    are added (mask, activation range), so ``state_dict()`` is unchanged. Returns
    ``{module name: reason}`` for the weighted modules left in float (other layer types):
    onnxruntime may still quantize them, but QAT does not simulate it.
    """
    if not 0.0 < float(momentum) <= 1.0:
        raise ConfigError(f"momentum must be in (0, 1], got {momentum!r}")
    resolved = _check_masks(model, masks)
    apply_masks(model, resolved)
    skipped: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, _QATMixin):
            raise ConfigError(f"module '{name}' is already prepared for QAT; call finalize_qat")
        cls = _QAT_CLASSES.get(type(module))
        weight = getattr(module, "weight", None)
        if cls is None:
            if isinstance(weight, nn.Parameter) and weight.dim() >= 2:
                skipped[name] = f"{type(module).__name__} is not fake-quantized"
            continue
        key = f"{name}.weight" if name else "weight"
        module.__class__ = cls
        module._qat_setup(resolved.get(key), momentum)  # type: ignore[attr-defined]
    return skipped


def finalize_qat(model: nn.Module) -> nn.Module:
    """Undo :func:`prepare_qat` in place (plain modules, QAT buffers removed) with the masked
    weights zeroed; returns ``model``, ready for
    :func:`~prunelab.quantize.int8.quantize_int8`."""
    for module in model.modules():
        plain = _PLAIN_CLASSES.get(type(module))
        if plain is None:
            continue
        mask = module.qat_mask
        if mask is not None:
            with torch.no_grad():
                module.weight.mul_(mask.to(module.weight.dtype))
        for buffer in _QAT_BUFFERS:
            delattr(module, buffer)
        del module.qat_momentum
        module.__class__ = plain
    return model


def activation_ranges(model: nn.Module) -> dict[str, tuple[float, float]]:
    """``{module name: (min, max)}`` of the layer inputs a QAT-prepared model has observed."""
    return {
        name: tuple(module.act_range.tolist())
        for name, module in model.named_modules()
        if isinstance(module, _QATMixin) and bool(module.act_seen)
    }


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the masked weights of ``model`` in place (``w *= mask``)."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        params[name].mul_(mask.to(device=params[name].device, dtype=params[name].dtype))


@dataclass
class QATResult:
    """What :func:`qat_finetune` did: the fine-tuned model (plain modules, masked weights),
    the optimizer steps taken, the mean training loss of each epoch, the activation ranges
    observed, and the modules left in float by :func:`prepare_qat`."""

    model: nn.Module
    steps: int = 0
    epoch_losses: list[float] = field(default_factory=list)
    activation_ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    not_fake_quantized: dict[str, str] = field(default_factory=dict)


def qat_finetune(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor] | None,
    batches: Iterable[Any],
    epochs: int = 1,
    *,
    lr: float = 1e-4,
    optimizer_factory: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    momentum: float = 0.01,
    on_step: Callable[[nn.Module, int], None] | None = None,
) -> QATResult:
    """Quantization-aware fine-tuning of ``model`` (in place) for ``epochs`` passes over
    ``batches`` ((x, y) pairs, re-iterable), masks kept.

    The optimizer is ``optimizer_factory(model.parameters())``, by default Adam at ``lr``;
    the loss ``loss_fn(logits, y)``, by default cross-entropy. After every optimizer step the
    masked weights are set to 0 again (so weight decay or momentum cannot revive them), then
    ``on_step(model, step)`` is called if given (the model is still in its QAT form there).
    Returns a :class:`QATResult` whose model is finalized (:func:`finalize_qat`), in eval mode.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"epochs must be an int >= 1 for QAT, got {epochs!r}")
    if optimizer_factory is None and not (isinstance(lr, (int, float)) and lr > 0):
        raise ConfigError(f"lr must be a positive number, got {lr!r}")
    resolved = _check_masks(model, masks)
    loss_fn = loss_fn or F.cross_entropy
    skipped = prepare_qat(model, resolved, momentum=momentum)
    try:
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = (
            optimizer_factory(params)
            if optimizer_factory is not None
            else torch.optim.Adam(params, lr=float(lr))
        )
        device = next(model.parameters()).device
        result = QATResult(model=model, not_fake_quantized=skipped)
        model.train()
        for _ in range(epochs):
            total, count = 0.0, 0
            for batch in batches:
                x, y = batch[0].to(device), batch[1].to(device)
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(x), y)
                if not torch.isfinite(loss):
                    raise ConfigError(f"QAT loss became {loss.item()}; lower lr (got {lr})")
                loss.backward()
                optimizer.step()
                apply_masks(model, resolved)
                result.steps += 1
                total += float(loss.detach()) * len(y)
                count += len(y)
                if on_step is not None:
                    on_step(model, result.steps)
            if count == 0:
                raise ConfigError("no QAT batches: pass at least one (x, y) training batch")
            result.epoch_losses.append(total / count if count else math.nan)
        result.activation_ranges = activation_ranges(model)
    finally:
        finalize_qat(model)
    model.eval()
    return result
