"""Saliency predictors and channel gates of Feature Boosting and Suppression (Gao et al.
2019, "Dynamic Channel Pruning: Feature Boosting and Suppression", ICLR), attached to an
unchanged model through forward hooks.

Pure torch. For gated conv ``l`` with input ``x`` (``C_in`` channels) and ``C_out`` output
channels:

- saliency ``g = relu(W s + b)``, ``s`` the global average of each input channel over its
  positions (the paper's subsampling ``ss``; it takes each channel's mean absolute value,
  which is the same for the non-negative inputs after a ReLU), ``W`` of shape
  ``(C_out, C_in)``;
- gating decision per input: ``topk`` keeps the ``k = ceil(d C_out)`` largest saliencies
  (the paper's k-winners-take-all), ``threshold`` keeps the saliencies above a per-layer
  threshold (see :class:`FBSGates`);
- the conv's output (its BatchNorm's output when one follows, see
  :mod:`prunelab.dynamic.plan`) is multiplied channel-wise by ``pi = g * keep``: the kept
  channels are scaled by their saliency (boosting), the others are zero (suppression).
  ``keep`` is a constant for autograd, so the task loss trains the predictor through the kept
  channels.

A channel kept by the gating but with saliency exactly 0 (the ReLU) is zero as well; the
executor (:mod:`prunelab.dynamic.executor`) skips it, and the MAC accounting counts the
*executed* channels: kept and with positive saliency.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunelab.dynamic.plan import GatePoint

GATINGS = ("topk", "threshold")


def keep_count(density: float, channels: int) -> int:
    """``ceil(density * channels)`` channels, at least one (the paper's k of the k-WTA)."""
    return max(1, min(channels, math.ceil(density * channels - 1e-9)))


class FBSGates(nn.Module):
    """One saliency predictor per gated conv of a model, and the hooks that gate it.

    ``points`` (:func:`prunelab.dynamic.plan.gate_points`) name the convs and the modules
    whose outputs are gated; ``modules`` maps those names to the model's modules. The
    predictors start as in the reference implementation (deep-fry/mayo): weights from a
    truncated normal with standard deviation 0.01, biases 1, so every saliency starts near 1.

    ``gating="threshold"``: a channel is kept when its saliency exceeds the layer's threshold
    ``tau``; the number of channels varies per input. With ``threshold=None`` ``tau`` is
    calibrated as the reference's ``threshold: local`` mode does: at every training forward
    the per-input saliency just below the top k (``k = ceil(d C_out)``) is averaged over the
    batch and folded into an exponential moving average with ``decay`` (the first batch
    sets it), so that on average about ``d`` of the channels pass. A number fixes ``tau``
    for every layer. The thresholds are buffers (saved with the state dict).
    """

    def __init__(
        self,
        points: list[GatePoint],
        modules: dict[str, nn.Module],
        density: float,
        gating: str = "topk",
        threshold: float | None = None,
        decay: float = 0.9,
    ) -> None:
        super().__init__()
        if gating not in GATINGS:
            raise ValueError(f"gating must be one of {GATINGS}, got {gating!r}")
        self.points = list(points)
        self.density = float(density)
        self.gating = gating
        self.fixed_threshold = None if threshold is None else float(threshold)
        self.decay = float(decay)
        self.k = [keep_count(self.density, p.out_channels) for p in self.points]
        self.predictors = nn.ModuleList()
        for p in self.points:
            linear = nn.Linear(p.in_channels, p.out_channels)
            nn.init.trunc_normal_(linear.weight, std=0.01, a=-0.02, b=0.02)
            nn.init.constant_(linear.bias, 1.0)
            self.predictors.append(linear)
        n = len(self.points)
        initial = 0.0 if self.fixed_threshold is None else self.fixed_threshold
        self.register_buffer("thresholds", torch.full((n,), initial))
        self.register_buffer("calibrated", torch.zeros(n, dtype=torch.bool))
        # Plain lists, not registered: the layers belong to the model.
        self._convs = [modules[p.conv] for p in self.points]
        self._outputs = [modules[p.point] for p in self.points]
        self._handles: list[Any] = []
        self._pi: list[torch.Tensor | None] = [None] * n
        # Saliencies of the last training forward (for the L1 penalty).
        self.saliencies: list[torch.Tensor | None] = [None] * n
        self._recording: list[list[torch.Tensor]] | None = None
        self.install()

    # -- hooks ------------------------------------------------------------------------------
    def install(self) -> None:
        """Hook the gates into the model (done at construction)."""
        if self._handles:
            return
        for i, (conv, out) in enumerate(zip(self._convs, self._outputs, strict=True)):
            self._handles.append(conv.register_forward_pre_hook(functools.partial(self._pre, i)))
            self._handles.append(out.register_forward_hook(functools.partial(self._post, i)))

    def remove(self) -> None:
        """Unhook the gates: the model computes as if it had none."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._pi = [None] * len(self.points)

    @contextlib.contextmanager
    def removed(self) -> Iterator[None]:
        """The plain model inside the block (hooks removed), gated again after it."""
        installed = bool(self._handles)
        self.remove()
        try:
            yield
        finally:
            if installed:
                self.install()

    @contextlib.contextmanager
    def recording(self) -> Iterator[list[list[torch.Tensor]]]:
        """Collect, per gate, the executed channel count of every input that passes through
        the model inside the block: ``rec[gate]`` is a list of ``(B,)`` int tensors."""
        self._recording = [[] for _ in self.points]
        try:
            yield self._recording
        finally:
            self._recording = None

    def _pre(self, index: int, module: nn.Module, args: Any) -> None:
        # The gated layer's mode decides (the gates belong to the model, whatever mode this
        # module was left in): training stores saliencies and calibrates thresholds.
        x, training = args[0], module.training
        g = self.saliency(index, x)
        if training and torch.is_grad_enabled():
            self.saliencies[index] = g
        keep = self.select(index, g, update=training)
        pi = g * keep.to(g.dtype)
        self._pi[index] = pi
        if self._recording is not None:
            self._recording[index].append((pi > 0).sum(dim=1).detach().cpu())

    def _post(self, index: int, module: nn.Module, args: Any, output: torch.Tensor):
        pi = self._pi[index]
        self._pi[index] = None
        if pi is None:
            return None
        return output * pi.view(*pi.shape, *(1,) * (output.dim() - 2))

    # -- saliency and gating ----------------------------------------------------------------
    def saliency(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """``relu(W s + b)`` of gate ``index`` for input ``x``: ``(B, C_out)``."""
        s = x.mean(dim=tuple(range(2, x.dim()))) if x.dim() > 2 else x
        return F.relu(self.predictors[index](s))

    def select(self, index: int, g: torch.Tensor, update: bool = False) -> torch.Tensor:
        """The bool mask ``(B, C_out)`` of the channels gate ``index`` keeps for saliencies
        ``g``; ``update`` (training) moves a calibrated threshold first."""
        k, channels = self.k[index], g.shape[1]
        if self.gating == "topk":
            if k >= channels:
                return torch.ones_like(g, dtype=torch.bool)
            top = torch.topk(g.detach(), k, dim=1).indices
            keep = torch.zeros_like(g, dtype=torch.bool)
            return keep.scatter_(1, top, True)
        if self.fixed_threshold is None:
            if k >= channels:
                return torch.ones_like(g, dtype=torch.bool)
            if update:
                self._calibrate(index, g.detach(), k)
        return g.detach() > self.thresholds[index]

    @torch.no_grad()
    def _calibrate(self, index: int, g: torch.Tensor, k: int) -> None:
        # The (k+1)-th largest saliency of each input: ``g > it`` keeps k channels.
        below = torch.topk(g, k + 1, dim=1).values[:, -1].mean()
        # Under data parallelism every rank sees its own shard: the ranks average their
        # values, so all of them hold the same thresholds (and gate alike at evaluation).
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(below, op=torch.distributed.ReduceOp.SUM)
            below = below / torch.distributed.get_world_size()
        if bool(self.calibrated[index]):
            value = self.decay * self.thresholds[index] + (1.0 - self.decay) * below
        else:
            value = below
            self.calibrated[index] = True
        self.thresholds[index] = value

    def l1(self) -> torch.Tensor | None:
        """Sum over the gates of the mean (over the batch) L1 norm of the saliencies of the
        last training forward, or None before one."""
        terms = [g.sum(dim=1).mean() for g in self.saliencies if g is not None]
        return torch.stack(terms).sum() if terms else None

    def extra_repr(self) -> str:
        return f"gates={len(self.points)}, density={self.density}, gating={self.gating}"


__all__ = ["GATINGS", "FBSGates", "keep_count"]
