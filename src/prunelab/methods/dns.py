"""Dynamic Network Surgery: prune and splice on a full-precision copy of the weights."""

from __future__ import annotations

import math
from typing import Any

import torch

from prunelab.errors import ConfigError
from prunelab.methods.base import Params, PruningMethod, topk_mask
from prunelab.sparsity.distributions import keep_counts
from prunelab.sparsity.engine import Context
from prunelab.sparsity.masks import Masks
from prunelab.sparsity.schedules import SparsitySchedule


def _non_negative(key: str, value: Any, example: str, below: float = math.inf) -> float:
    """``value`` as a finite float in ``[0, below)``, or a one-line ConfigError."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    number = float(value) if ok else math.nan
    if not (math.isfinite(number) and 0.0 <= number < below):
        bound = "a number >= 0" if below == math.inf else f"a number in [0, {below:g})"
        raise ConfigError(
            f"pruning.{key} must be {bound}, got {value!r}; e.g. pruning.{key}={example}"
        )
    return number


class DynamicNetworkSurgery(PruningMethod):
    """Guo, Yao & Chen 2016, "Dynamic Network Surgery for Efficient DNNs" (NeurIPS; reference
    code yiwenguo/Dynamic-Network-Surgery, Caffe).

    Every prunable weight ``W`` keeps training under its mask ``T``: the forward pass uses
    ``W ⊙ T`` and the gradient of the loss with respect to ``W ⊙ T`` updates every entry of
    ``W``, pruned ones included (the paper's update rule), so a pruned connection whose
    magnitude grows back is spliced in again. The engine provides this (``keeps_pruned_values``, see
    :mod:`prunelab.sparsity.engine`): it trains a full-precision shadow of the weights, leaves
    their gradients unmasked (``mask_gradients = False``) and calls :meth:`update` with the
    shadow after the optimizer step, so the masks decided at step ``t`` are those of the
    forward at ``t + 1``, as the reference recomputes them at the start of an iteration.

    Surgery, per layer, with a threshold ``θ = μ + cσ`` (``μ``, ``σ``: mean and standard
    deviation of the layer's ``|W|``) and ``m = margin``: an active weight is pruned when
    ``|w| <= (1 - m)·θ``, a pruned one is spliced back when ``|w| > (1 + m)·θ``, and in
    between a weight keeps its state. ``m = 0.1`` is the reference code's ``a = 0.9·θ`` and
    ``b = 1.1·θ`` (with ``θ = max(μ + cσ, 0)``); the paper only asks for ``b > a``.
    Equivalently a weight survives exactly when ``r > θ``, with ``r = |w| / (1 - m)`` for an
    active and ``r = |w| / (1 + m)`` for a pruned weight, so one ``θ`` meets any keep count
    ``k``: the ``k`` largest ``r``.

    Meeting ``sparsity``: the paper sets ``c`` by hand per layer and the sparsity is what it
    gives; here ``θ`` is solved for. The target follows the shared polynomial schedule
    (``schedule=cubic`` by default, or ``linear``) from 0 at ``begin`` to ``sparsity`` at
    ``end``, moving at its points ``begin + j·frequency`` and ``end``. At each point the
    thresholds are solved from the current weights: the weights are ranked by
    ``(r - μ) / σ`` and each layer keeps its count from the distribution (uniform, the
    default here, er, erk: one ``c`` per layer, as the paper's hand-set ones; ``global``:
    one cut over all layers, i.e. one ``c`` for the network), so ``θ = μ + cσ`` with ``c``
    the largest score pruned (``θ = 0`` while nothing is). Between points, surgery applies
    the two-threshold rule with the thresholds in force, as the reference does with its
    fixed ones, so the realised sparsity floats around the ramp (the engine's history
    records it at every surgery; the thresholds in force are in :attr:`thresholds`).

    Surgery is considered at every optimizer step ``t`` from ``begin`` to ``end``; each
    layer undergoes it with probability ``σ(t) = (1 + gamma·t)^(-power)`` (the paper's
    decaying probability; the reference's ``gamma = 1e-4``, ``power = 1``), drawn per layer
    from the generator of (seed, step, layer), so every DDP rank makes the same choice. At
    ``end`` every layer undergoes it with freshly solved thresholds, so the masks hold exactly
    the distribution's counts (the global count on target; with a per-layer distribution each
    layer within one weight of its share); from then on the masks are frozen for a fine-tune
    phase (the pruned weights still move in the shadow, unseen).

    The optimizer state is never zeroed (``reset_state = "none"``): pruned weights keep
    receiving gradients and optimizer updates, so their momentum and Adam moments belong to
    the values that are trained, and a spliced weight resumes with the value and state it
    trained with, as in the reference, which never touches the solver's history.
    ``update_step`` and ``adam_bias_correction=per_weight`` concern weights regrown from zero
    and are rejected. Under Adam a pruned weight moves by about ``lr`` per step whatever the
    size of its gradient (Adam normalises it), so pruned weights drift much further than
    under the reference's SGD, where they move in proportion to their gradient, and splicing
    is more aggressive; the rarer the surgery (larger ``gamma``), the further they drift
    between two surgeries of their layer.

    Deviations from the paper and the reference code:

    - the sparsity is a target met by solving for ``θ`` at the schedule's points, not the
      outcome of a hand-set ``c``; exact ties at a solve are broken at random (seeded);
    - training starts dense from scratch along the schedule's ramp; the paper prunes a
      trained dense model (``schedule.begin`` > 0 trains dense first);
    - ``μ`` and ``σ`` are taken over all of the layer's full-precision weights at each solve
      (the reference computes them once, over the nonzero weights and biases at the first
      iteration); with a per-layer distribution they only rescale the reported ``c``;
    - only the prunable weights are masked (the reference also masks the biases, with the
      layer's thresholds); the surgery draws come from seeded generators, not C ``rand()``;
    - surgery stops at the schedule's ``end`` (the reference's ``iter_stop``) with an exact
      solve, and the masks stay frozen after it.
    """

    name = "dns"
    schedule_kinds = ("polynomial",)
    keeps_pruned_values = True
    mask_gradients = False
    reset_state = "none"

    def __init__(
        self,
        sparsity: float,
        distribution: dict[str, Any] | None = None,
        schedule: dict[str, Any] | None = None,
        gamma: float = 1e-4,
        power: float = 1.0,
        margin: float = 0.1,
        **options: Any,
    ) -> None:
        super().__init__(sparsity, distribution, schedule, **options)
        if self.update_step != "masked":
            raise ConfigError(
                f"pruning.update_step={self.update_step} does not apply to pruning=dns (a "
                "spliced weight keeps its trained value and state); set pruning.update_step=masked"
            )
        if self.adam_bias_correction != "per_tensor":
            raise ConfigError(
                "pruning.adam_bias_correction=per_weight does not apply to pruning=dns (no "
                "weight restarts from zero); set pruning.adam_bias_correction=per_tensor"
            )
        self.gamma = _non_negative("gamma", gamma, "1e-4")
        self.power = _non_negative("power", power, "1")
        self.margin = _non_negative("margin", margin, "0.1", below=1.0)
        # Per layer, from the last solve: θ and c (0-dim tensors: reading them needs no sync).
        self._thresholds: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def build_schedule(self) -> None:
        cfg = self.schedule_cfg
        begin, end = self._step_of("begin", 0.0), self._step_of("end", 0.75)
        self.schedule = SparsitySchedule(
            kind="polynomial",
            begin_step=begin,
            end_step=max(begin, end),
            frequency=int(cfg.get("frequency", 100)),
            power=float(cfg.get("power", 3.0)),
        )

    # -- when -------------------------------------------------------------------------------
    def is_update_step(self, step: int) -> bool:
        """Surgery is considered at every step from ``begin`` to ``end`` (inclusive)."""
        return self.schedule.begin_step <= step <= self.schedule.end_step

    def probability(self, step: int) -> float:
        """The chance that a layer undergoes surgery at ``step``: ``(1 + gamma·step)^-power``,
        and 1 at the schedule's end (the final, exact surgery)."""
        if step >= self.schedule.end_step:
            return 1.0
        return (1.0 + self.gamma * step) ** (-self.power)

    def undergoes_surgery(self, step: int, layer: int, ctx: Context) -> bool:
        """Whether layer number ``layer`` undergoes surgery at ``step``: a draw below
        :meth:`probability` from the generator of (seed, step, layer)."""
        p = self.probability(step)
        if p >= 1.0:
            return True
        return float(torch.rand((), generator=ctx.generator(layer, "dns-surgery"))) < p

    def target_at(self, step: int) -> float:
        """The scheduled sparsity in force at ``step``: the ramp's value at its last point
        (``begin + j·frequency``, or ``end``) not after ``step``."""
        s = self.schedule
        point = step
        if s.begin_step <= step < s.end_step:
            point = s.begin_step + (step - s.begin_step) // s.frequency * s.frequency
        return s.sparsity_at(point, self.sparsity)

    # -- what -------------------------------------------------------------------------------
    def ratios(self, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``r = |w| / (1 - margin)`` where active, ``|w| / (1 + margin)`` where pruned: a
        weight survives surgery at the threshold ``θ`` exactly when ``r > θ``."""
        factor = torch.where(mask, 1.0 - self.margin, 1.0 + self.margin)
        return weight.detach().abs().float() / factor

    def surgery(self, name: str, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The two-threshold rule with the layer's current ``θ``: prune an active weight at
        ``|w| <= (1 - margin)·θ``, splice a pruned one at ``|w| > (1 + margin)·θ``."""
        theta, c = self._thresholds[name]
        if theta.device != weight.device:  # restored from a checkpoint
            theta, c = theta.to(weight.device), c.to(weight.device)
            self._thresholds[name] = (theta, c)
        return self.ratios(weight, mask) > theta

    def solve(
        self, step: int, params: Params, masks: Masks, ctx: Context
    ) -> dict[str, torch.Tensor]:
        """Choose each layer's ``θ`` so that surgery meets the scheduled count: rank the
        weights by ``(r - μ) / σ`` and keep the distribution's count per layer (``global``:
        one cut over all layers, i.e. one ``c``). Returns the masks this surgery gives (exact
        counts; exact ties broken at random) and records ``θ = μ + cσ``, ``c`` the largest
        score pruned (``θ = 0`` when nothing is)."""
        target = self.target_at(step)
        layers = [n for n in masks if n not in self.dense]
        scores, stats = {}, {}
        for name in layers:
            magnitude = params[name].detach().abs().float()
            std, mean = torch.std_mean(magnitude, correction=0)
            std = std.clamp_min(1e-12)
            scores[name] = (self.ratios(params[name], masks[name]) - mean) / std
            stats[name] = (mean, std)
        kept: dict[str, torch.Tensor] = {}
        if self.distribution == "global" and layers:
            # One cut over all layers: the total the budget leaves to the pruned layers.
            budget = keep_counts(
                "uniform", self.shapes, self.budget_sparsity(target), dense=self.dense
            )
            flat = torch.cat([scores[n].flatten() for n in layers])
            chosen = topk_mask(
                flat, sum(budget[n] for n in layers), ctx.generator(-1, "ties-global")
            )
            for name, part in zip(
                layers, chosen.split([scores[n].numel() for n in layers]), strict=True
            ):
                kept[name] = part.view_as(scores[name])
        else:
            counts = self.keep_counts(target)
            index = {n: i for i, n in enumerate(masks)}
            for name in layers:
                ties = self.tie_generator(ctx, index[name], "surgery")
                kept[name] = topk_mask(scores[name], counts[name], ties)
        for name in layers:
            mean, std = stats[name]
            pruned = ~kept[name]
            c = scores[name].masked_fill(kept[name], -math.inf).max()
            c = torch.where(pruned.any(), c, -mean / std)  # nothing pruned: θ = 0
            self._thresholds[name] = (mean + c * std, c)
        return kept

    def update(self, step: int, params: Params, masks: Masks, ctx: Context) -> Masks:
        """Surgery on the layers drawn at ``step``: at the schedule's points (where the target
        moves) the thresholds are solved anew and the drawn layers get exactly their counts;
        in between, the drawn layers apply the two-threshold rule with the last thresholds,
        so their sparsity floats as in the reference."""
        index = {n: i for i, n in enumerate(masks)}
        layers = [n for n in masks if n not in self.dense]
        operate = [n for n in layers if self.undergoes_surgery(step, index[n], ctx)]
        solve = self.schedule.is_update_step(step) or any(n not in self._thresholds for n in layers)
        if not operate and not solve:
            return masks
        new = dict(masks.items())
        if solve:
            kept = self.solve(step, params, masks, ctx)
            for name in operate:
                new[name] = kept[name]
        else:
            for name in operate:
                new[name] = self.surgery(name, params[name], masks[name])
        return Masks(new)

    @property
    def thresholds(self) -> dict[str, tuple[float, float]]:
        """``{layer: (θ, c)}``: the thresholds in force, from the last solve."""
        return {name: (float(theta), float(c)) for name, (theta, c) in self._thresholds.items()}

    def state_dict(self) -> dict[str, Any]:
        """The thresholds in force (the engine saves them with its own state)."""
        return {
            "thresholds": {
                name: (theta.detach().cpu(), c.detach().cpu())
                for name, (theta, c) in self._thresholds.items()
            }
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._thresholds = {
            name: (torch.as_tensor(theta), torch.as_tensor(c))
            for name, (theta, c) in state.get("thresholds", {}).items()
        }
